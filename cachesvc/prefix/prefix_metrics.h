// The prefix cache's figures in Prometheus text (appended to the daemon's /metrics).
#ifndef HEADWISE_CACHESVC_PREFIX_PREFIX_METRICS_H_
#define HEADWISE_CACHESVC_PREFIX_PREFIX_METRICS_H_

#include <string>

#include "cachesvc/prefix/prefix_cache.h"

namespace headwise {

// headwise_prefix_lookups_total, headwise_prefix_miss_blocks_total, and per tier
// ("device", "host", "remote"): headwise_prefix_hit_blocks_total, _hit_tokens_total,
// _bytes_saved_total, _resident_blocks, _resident_bytes, _budget_bytes, _inserted_blocks_total,
// _evicted_blocks_total.
void RenderPrefixMetrics(const PrefixCacheStats& stats, std::string* out);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_PREFIX_PREFIX_METRICS_H_
