#include "cachesvc/prefix/prefix_metrics.h"

#include <cstdint>

#include "absl/strings/str_cat.h"

namespace headwise {
namespace {

constexpr const char* kTierNames[3] = {"device", "host", "remote"};

// One metric with a value per tier.
template <typename Field>
void PerTier(const PrefixCacheStats& stats, const char* name, const char* type, const char* help,
             Field field, std::string* out) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
  for (int t = 0; t < 3; ++t) {
    absl::StrAppend(out, name, "{tier=\"", kTierNames[t], "\"} ", field(stats.tiers[t]), "\n");
  }
}

}  // namespace

void RenderPrefixMetrics(const PrefixCacheStats& stats, std::string* out) {
  absl::StrAppend(out,
                  "# HELP headwise_prefix_lookups_total CreateSequence calls with prefix blocks.\n"
                  "# TYPE headwise_prefix_lookups_total counter\n"
                  "headwise_prefix_lookups_total ",
                  stats.lookups, "\n",
                  "# HELP headwise_prefix_miss_blocks_total Blocks asked for that no tier had.\n"
                  "# TYPE headwise_prefix_miss_blocks_total counter\n"
                  "headwise_prefix_miss_blocks_total ",
                  stats.miss_blocks, "\n");
  using T = const PrefixTierStats&;
  PerTier(
      stats, "headwise_prefix_hit_blocks_total", "counter", "Prefix blocks reused.",
      [](T t) { return t.hit_blocks; }, out);
  PerTier(
      stats, "headwise_prefix_hit_tokens_total", "counter", "Tokens of reused blocks.",
      [](T t) { return t.hit_tokens; }, out);
  PerTier(
      stats, "headwise_prefix_bytes_saved_total", "counter",
      "KV bytes of reused blocks (not recomputed, not held twice).",
      [](T t) { return t.bytes_saved; }, out);
  PerTier(
      stats, "headwise_prefix_resident_blocks", "gauge", "Blocks in the prefix cache.",
      [](T t) { return t.resident_blocks; }, out);
  PerTier(
      stats, "headwise_prefix_resident_bytes", "gauge", "Bytes of blocks in the cache.",
      [](T t) { return t.resident_bytes; }, out);
  PerTier(
      stats, "headwise_prefix_budget_bytes", "gauge", "Prefix cache budget per tier.",
      [](T t) { return t.budget_bytes; }, out);
  PerTier(
      stats, "headwise_prefix_inserted_blocks_total", "counter", "Blocks cached.",
      [](T t) { return t.inserted_blocks; }, out);
  PerTier(
      stats, "headwise_prefix_evicted_blocks_total", "counter", "Blocks evicted.",
      [](T t) { return t.evicted_blocks; }, out);
}

}  // namespace headwise
