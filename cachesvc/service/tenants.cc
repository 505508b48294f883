#include "cachesvc/service/tenants.h"

#include <cstddef>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"

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

}  // namespace headwise
