// The daemon's PrefixCacheConfig (proto/headwise/v1/config.proto): defaults and validation, and
// the sharing scope of each tenant.
#ifndef HEADWISE_CACHESVC_PREFIX_PREFIX_CONFIG_H_
#define HEADWISE_CACHESVC_PREFIX_PREFIX_CONFIG_H_

#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "headwise/v1/config.pb.h"

namespace headwise {

inline constexpr uint32_t kDefaultPrefixBlockPages = 4;
inline constexpr uint64_t kDefaultPrefixHostBudgetBytes = uint64_t{256} << 20;
inline constexpr uint32_t kDefaultRemoteWaitTimeoutMs = 1000;
inline constexpr uint32_t kDefaultRemoteCommandTimeoutMs = 2000;
inline constexpr uint32_t kDefaultRemoteMaxQueuedWrites = 256;
inline constexpr char kDefaultRemoteKeyPrefix[] = "hw:pb:";

// Fills the defaults of config.prefix_cache() and checks it against the configured tenants:
// INVALID_ARGUMENT for block_pages outside 1..1024, an unknown or offline policy, a share group
// without a name or naming an unknown tenant, a tenant in two groups, tls on the remote tier, or
// a remote seed that is not host:port. The password is never part of a message.
absl::Status ResolvePrefixCacheConfig(headwise::v1::DaemonConfig& config);

// tenant name -> the scope its blocks are hashed under: "g:<group>" for a tenant in a share
// group, "t:<tenant>" otherwise (so a group never collides with a tenant's own scope).
absl::flat_hash_map<std::string, std::string> PrefixScopes(
    const headwise::v1::DaemonConfig& config);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_PREFIX_PREFIX_CONFIG_H_
