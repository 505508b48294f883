// Tenants, bearer-token authentication, and each tenant's byte usage per tier against its quota.
#ifndef HEADWISE_CACHESVC_SERVICE_TENANTS_H_
#define HEADWISE_CACHESVC_SERVICE_TENANTS_H_

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "cachesvc/base/ids.h"
#include "headwise/v1/config.pb.h"

namespace headwise {

struct Tenant {
  std::string name;
  std::string token;
  headwise::v1::TenantQuota quota;
  // Sees the daemon-wide figures in Stats (TenantConfig.admin). Every other tenant sees only
  // its own.
  bool admin = false;
};

// Immutable after construction; thread-safe.
class TenantRegistry {
 public:
  explicit TenantRegistry(
      const google::protobuf::RepeatedPtrField<headwise::v1::TenantConfig>& tenants);

  // The tenant whose token matches the value of an `authorization` metadata entry
  // ("Bearer <token>"; the scheme is case-insensitive). UNAUTHENTICATED when `header` is empty,
  // malformed or matches no tenant. Every configured token is compared in constant time (in the
  // token's length), so the time taken reveals neither which tenant nor how many bytes matched.
  absl::StatusOr<const Tenant*> Authenticate(const std::string& header) const;

  // The tenant named `name`, or nullptr.
  const Tenant* Find(const std::string& name) const;

  const std::vector<std::unique_ptr<Tenant>>& tenants() const { return tenants_; }

 private:
  std::vector<std::unique_ptr<Tenant>> tenants_;
};

// True when a == b, in time that depends only on the lengths.
bool ConstantTimeEquals(const std::string& a, const std::string& b);

// One tenant's bytes and pages per tier (indexed by Tier: device, host, disk), and the bytes
// reserved by appends in flight, checked against its TenantQuota. Thread-safe.
//
// The quota holds under concurrency because admission and accounting are one ledger: an append
// first Reserve()s an upper bound of what it can take (under the ledger's lock, against usage
// plus every other reservation in flight), then makes its engine call, then Settle()s: the
// change the engine actually made (page-rounded) replaces the reservation in one step. So the
// bytes held plus reserved never pass a tier's quota through appends, and no two appends can
// both be admitted into the same room. (Pages the engine moves on its own, such as host pages
// spilled to disk, are charged when they are settled; a tier past its quota then refuses
// appends.)
class TierLedger {
 public:
  static constexpr int kTiers = 3;
  using PerTier = std::array<int64_t, kTiers>;

  // Bytes reserved in one tier until settled or destroyed (then given back). Move-only; a
  // default-constructed one holds nothing. Must not outlive its ledger.
  class Reservation {
   public:
    Reservation() = default;
    ~Reservation();
    Reservation(Reservation&& other) noexcept;
    Reservation& operator=(Reservation&& other) noexcept;
    Reservation(const Reservation&) = delete;
    Reservation& operator=(const Reservation&) = delete;

    uint64_t bytes() const { return bytes_; }

   private:
    friend class TierLedger;
    Reservation(TierLedger* ledger, Tier tier, uint64_t bytes)
        : ledger_(ledger), tier_(tier), bytes_(bytes) {}
    void GiveBack();

    TierLedger* ledger_ = nullptr;
    Tier tier_ = Tier::kDevice;
    uint64_t bytes_ = 0;
  };

  struct Snapshot {
    PerTier bytes{};     // Held now.
    PerTier peak{};      // Most bytes held at once since the ledger was made.
    PerTier pages{};     // Pages held now.
    PerTier reserved{};  // Reserved by calls in flight.
  };

  explicit TierLedger(const headwise::v1::TenantQuota& quota);
  TierLedger(const TierLedger&) = delete;
  TierLedger& operator=(const TierLedger&) = delete;

  // Reserves `bytes` in `tier`. RESOURCE_EXHAUSTED, with nothing reserved, when held plus
  // reserved plus `bytes` would pass the tier's quota, or when another tier with a quota is
  // already past it. A tier without quota (0) admits anything (the bytes are still reserved).
  absl::StatusOr<Reservation> Reserve(Tier tier, uint64_t bytes);

  // Applies a change of what the tenant holds (bytes and pages per tier, may be negative) and,
  // in the same step, gives back `reservation` when not null (it then holds nothing).
  void Settle(const PerTier& bytes_delta, const PerTier& pages_delta,
              Reservation* reservation = nullptr);

  // The tier's quota in bytes (0: none).
  uint64_t quota(Tier tier) const { return quota_[static_cast<int>(tier)]; }
  Snapshot snapshot() const;

 private:
  void Release(Tier tier, uint64_t bytes);

  const std::array<uint64_t, kTiers> quota_;
  mutable absl::Mutex mu_;
  Snapshot state_ ABSL_GUARDED_BY(mu_);
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_SERVICE_TENANTS_H_
