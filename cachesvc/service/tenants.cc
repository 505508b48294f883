#include "cachesvc/service/tenants.h"

#include <algorithm>
#include <cstddef>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace headwise {

bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  // Compare over the longer length so that a prefix match is not faster than a mismatch.
  const size_t n = a.size() > b.size() ? a.size() : b.size();
  volatile unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff = diff | (x ^ y);
  }
  return diff == 0;
}

TenantRegistry::TenantRegistry(
    const google::protobuf::RepeatedPtrField<headwise::v1::TenantConfig>& tenants) {
  for (const auto& config : tenants) {
    auto tenant = std::make_unique<Tenant>();
    tenant->name = config.name();
    tenant->token = config.token();
    tenant->quota = config.quota();
    tenant->admin = config.admin();
    tenants_.push_back(std::move(tenant));
  }
}

absl::StatusOr<const Tenant*> TenantRegistry::Authenticate(const std::string& header) const {
  constexpr char kScheme[] = "bearer ";
  constexpr size_t kSchemeLen = sizeof(kScheme) - 1;
  if (header.size() <= kSchemeLen ||
      absl::AsciiStrToLower(header.substr(0, kSchemeLen)) != kScheme) {
    return absl::UnauthenticatedError("missing bearer token (metadata 'authorization')");
  }
  const std::string token = header.substr(kSchemeLen);
  const Tenant* match = nullptr;
  for (const auto& tenant : tenants_) {  // No early exit: every token is compared.
    if (ConstantTimeEquals(token, tenant->token)) match = tenant.get();
  }
  if (match == nullptr) return absl::UnauthenticatedError("invalid bearer token");
  return match;
}

const Tenant* TenantRegistry::Find(const std::string& name) const {
  for (const auto& tenant : tenants_) {
    if (tenant->name == name) return tenant.get();
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// TierLedger

namespace {
constexpr const char* kTierNames[TierLedger::kTiers] = {"device", "host", "disk"};
}  // namespace

TierLedger::Reservation::~Reservation() { GiveBack(); }

TierLedger::Reservation::Reservation(Reservation&& other) noexcept
    : ledger_(std::exchange(other.ledger_, nullptr)),
      tier_(other.tier_),
      bytes_(std::exchange(other.bytes_, 0)) {}

TierLedger::Reservation& TierLedger::Reservation::operator=(Reservation&& other) noexcept {
  if (this != &other) {
    GiveBack();
    ledger_ = std::exchange(other.ledger_, nullptr);
    tier_ = other.tier_;
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void TierLedger::Reservation::GiveBack() {
  if (ledger_ != nullptr) ledger_->Release(tier_, bytes_);
  ledger_ = nullptr;
  bytes_ = 0;
}

TierLedger::TierLedger(const headwise::v1::TenantQuota& quota)
    : quota_{quota.max_device_bytes(), quota.max_host_bytes(), quota.max_disk_bytes()} {}

absl::StatusOr<TierLedger::Reservation> TierLedger::Reserve(Tier tier, uint64_t bytes) {
  absl::MutexLock lock(&mu_);
  for (int t = 0; t < kTiers; ++t) {
    if (quota_[t] == 0) continue;
    // Held bytes are never negative (they are a sum of engine figures).
    const uint64_t committed = static_cast<uint64_t>(std::max<int64_t>(state_.bytes[t], 0)) +
                               static_cast<uint64_t>(state_.reserved[t]);
    const uint64_t adding = t == static_cast<int>(tier) ? bytes : 0;
    if (adding > quota_[t] || committed > quota_[t] - adding) {
      return absl::ResourceExhaustedError(
          absl::StrCat("tenant quota: ", kTierNames[t], " bytes would be ", committed,
                       " held or reserved + ", adding, " > ", quota_[t]));
    }
  }
  state_.reserved[static_cast<int>(tier)] += static_cast<int64_t>(bytes);
  return Reservation(this, tier, bytes);
}

void TierLedger::Settle(const PerTier& bytes_delta, const PerTier& pages_delta,
                        Reservation* reservation) {
  absl::MutexLock lock(&mu_);
  for (int t = 0; t < kTiers; ++t) {
    state_.bytes[t] += bytes_delta[t];
    state_.pages[t] += pages_delta[t];
    state_.peak[t] = std::max(state_.peak[t], state_.bytes[t]);
  }
  if (reservation != nullptr && reservation->ledger_ == this) {
    state_.reserved[static_cast<int>(reservation->tier_)] -=
        static_cast<int64_t>(reservation->bytes_);
    reservation->ledger_ = nullptr;
    reservation->bytes_ = 0;
  }
}

void TierLedger::Release(Tier tier, uint64_t bytes) {
  absl::MutexLock lock(&mu_);
  state_.reserved[static_cast<int>(tier)] -= static_cast<int64_t>(bytes);
}

TierLedger::Snapshot TierLedger::snapshot() const {
  absl::MutexLock lock(&mu_);
  return state_;
}

}  // namespace headwise
