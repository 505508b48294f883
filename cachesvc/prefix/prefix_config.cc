#include "cachesvc/prefix/prefix_config.h"

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "cachesvc/replay/block_cache.h"

namespace headwise {
namespace {

absl::Status CheckRemote(const headwise::v1::RedisRemoteConfig& remote) {
  if (remote.tls()) {
    return absl::InvalidArgumentError(
        "config: prefix_cache.remote.tls: the installed hiredis (0.14) has no TLS");
  }
  for (const std::string& seed : remote.seeds()) {
    const size_t colon = seed.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == seed.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("config: prefix_cache.remote.seeds: '", seed, "' is not host:port"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ResolvePrefixCacheConfig(headwise::v1::DaemonConfig& config) {
  headwise::v1::PrefixCacheConfig& p = *config.mutable_prefix_cache();
  if (!p.has_enabled()) p.set_enabled(true);
  if (!p.has_block_pages()) p.set_block_pages(kDefaultPrefixBlockPages);
  if (!p.has_policy()) p.set_policy("lru");
  if (!p.has_device_budget_bytes()) p.set_device_budget_bytes(0);
  if (!p.has_host_budget_bytes()) p.set_host_budget_bytes(kDefaultPrefixHostBudgetBytes);
  headwise::v1::RedisRemoteConfig& r = *p.mutable_remote();
  if (!r.has_wait_timeout_ms()) r.set_wait_timeout_ms(kDefaultRemoteWaitTimeoutMs);
  if (!r.has_command_timeout_ms()) r.set_command_timeout_ms(kDefaultRemoteCommandTimeoutMs);
  if (!r.has_max_queued_writes()) r.set_max_queued_writes(kDefaultRemoteMaxQueuedWrites);
  if (!r.has_key_prefix()) r.set_key_prefix(kDefaultRemoteKeyPrefix);

  if (p.block_pages() < 1 || p.block_pages() > 1024) {
    return absl::InvalidArgumentError("config: prefix_cache.block_pages must be in 1..1024");
  }
  if (BlockCachePolicyIsOffline(p.policy()) || !MakeBlockCache(p.policy(), 1).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("config: prefix_cache.policy '", p.policy(),
                                                   "' is not one of lru, lfu, s3fifo, arc"));
  }
  if (r.max_queued_writes() < 1) {
    return absl::InvalidArgumentError("config: prefix_cache.remote.max_queued_writes must be >= 1");
  }
  absl::flat_hash_set<std::string> tenants, grouped, groups;
  for (const auto& t : config.tenants()) tenants.insert(t.name());
  for (const auto& g : p.share_groups()) {
    if (g.name().empty() || !groups.insert(g.name()).second) {
      return absl::InvalidArgumentError("config: every prefix share group needs a unique name");
    }
    for (const std::string& t : g.tenants()) {
      if (!tenants.contains(t)) {
        return absl::InvalidArgumentError(
            absl::StrCat("config: share group '", g.name(), "' names unknown tenant '", t, "'"));
      }
      if (!grouped.insert(t).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("config: tenant '", t, "' is in two prefix share groups"));
      }
    }
  }
  return CheckRemote(r);
}

absl::flat_hash_map<std::string, std::string> PrefixScopes(
    const headwise::v1::DaemonConfig& config) {
  absl::flat_hash_map<std::string, std::string> out;
  for (const auto& t : config.tenants()) out[t.name()] = absl::StrCat("t:", t.name());
  for (const auto& g : config.prefix_cache().share_groups()) {
    for (const std::string& t : g.tenants()) out[t] = absl::StrCat("g:", g.name());
  }
  return out;
}

}  // namespace headwise
