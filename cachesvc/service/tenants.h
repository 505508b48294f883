// Tenants and bearer-token authentication.
#ifndef HEADWISE_CACHESVC_SERVICE_TENANTS_H_
#define HEADWISE_CACHESVC_SERVICE_TENANTS_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "headwise/v1/config.pb.h"

namespace headwise {

struct Tenant {
  std::string name;
  std::string token;
  headwise::v1::TenantQuota quota;
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

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_SERVICE_TENANTS_H_
