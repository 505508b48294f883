#include "cachesvc/replay/replay_report.h"

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cachesvc/planner/byte_size.h"
#include "nlohmann/json.hpp"

namespace headwise {
namespace {

using json = nlohmann::json;

std::string Bytes(double bytes) { return FormatBytes(static_cast<int64_t>(bytes)); }

std::string SummaryText(const RequestReplayReport& report) {
  const TraceSummary& s = report.summary;
  const RequestReplayOptions& o = report.options;
  std::string out = absl::StrFormat(
      "trace %s: %d requests over %.1f s\n"
      "  input tokens  %d (p50 %d, p99 %d, max %d per request), KV %s at %d B/token\n"
      "  output tokens %d (p50 %d, p99 %d per request)\n"
      "  prefill with no reuse: %.1f s on %s (%.3g FLOP/s, %.3g parameters)\n",
      report.source, s.requests, s.duration_s, s.input_tokens, s.p50_input_tokens,
      s.p99_input_tokens, s.max_input_tokens, Bytes(s.input_kv_bytes), o.token_kv_bytes,
      s.output_tokens, s.p50_output_tokens, s.p99_output_tokens, s.prefill_s, o.device.name,
      o.device.flops_per_s, o.model_params);
  if (s.blocks > 0) {
    absl::StrAppendFormat(&out,
                          "  blocks %d references, %d unique; unlimited-cache hit ratio %.4f\n",
                          s.blocks, s.unique_blocks, s.unlimited_hit_ratio);
  }
  return out;
}

json ResultJson(const PolicyResult& r) {
  return {{"policy", r.policy},
          {"capacity", r.capacity_label},
          {"capacity_blocks", r.capacity_blocks},
          {"references", r.references},
          {"hits", r.hits},
          {"prefix_hits", r.prefix_hits},
          {"hit_ratio", r.hit_ratio()},
          {"prefix_hit_ratio", r.prefix_hit_ratio()},
          {"inserted", r.inserted},
          {"evicted", r.evicted},
          {"prefix_hit_tokens", r.prefix_hit_tokens},
          {"hit_bytes", r.hit_bytes},
          {"inserted_bytes", r.inserted_bytes},
          {"prefill_saved_s", r.prefill_saved_s},
          {"load_s", r.load_s},
          {"mean_ttft_saving_ms", r.mean_ttft_saving_ms}};
}

}  // namespace

std::string FormatReplayTable(const RequestReplayReport& report) {
  std::string out = SummaryText(report);
  if (report.results.empty()) {
    out += "  no prefix block ids in this trace: reuse cannot be computed, only the volume above\n";
    return out;
  }
  absl::StrAppendFormat(&out, "\n%-8s %-10s %8s %7s %7s %8s %8s %11s %11s %9s %8s %9s\n", "policy",
                        "capacity", "blocks", "hit", "prefix", "inserted", "evicted", "hit bytes",
                        "written", "prefill-s", "load-s", "ttft-ms");
  std::string last_label;
  for (const PolicyResult& r : report.results) {
    if (!last_label.empty() && r.capacity_label != last_label) out += "\n";
    last_label = r.capacity_label;
    absl::StrAppendFormat(
        &out, "%-8s %-10s %8d %6.2f%% %6.2f%% %8d %8d %11s %11s %9.1f %8.2f %9.1f\n", r.policy,
        r.capacity_label, r.capacity_blocks, 100 * r.hit_ratio(), 100 * r.prefix_hit_ratio(),
        r.inserted, r.evicted, Bytes(r.hit_bytes), Bytes(r.inserted_bytes), r.prefill_saved_s,
        r.load_s, r.mean_ttft_saving_ms);
  }
  return out;
}

std::string ReplayReportJson(const RequestReplayReport& report) {
  const TraceSummary& s = report.summary;
  const RequestReplayOptions& o = report.options;
  json results = json::array();
  for (const PolicyResult& r : report.results) results.push_back(ResultJson(r));
  const json root = {{"source", report.source},
                     {"model",
                      {{"token_kv_bytes", o.token_kv_bytes},
                       {"model_params", o.model_params},
                       {"device", o.device.name},
                       {"flops_per_s", o.device.flops_per_s},
                       {"link_bytes_per_s", o.device.link_bytes_per_s}}},
                     {"summary",
                      {{"requests", s.requests},
                       {"duration_s", s.duration_s},
                       {"input_tokens", s.input_tokens},
                       {"output_tokens", s.output_tokens},
                       {"max_input_tokens", s.max_input_tokens},
                       {"p50_input_tokens", s.p50_input_tokens},
                       {"p99_input_tokens", s.p99_input_tokens},
                       {"p50_output_tokens", s.p50_output_tokens},
                       {"p99_output_tokens", s.p99_output_tokens},
                       {"input_kv_bytes", s.input_kv_bytes},
                       {"prefill_s", s.prefill_s},
                       {"blocks", s.blocks},
                       {"unique_blocks", s.unique_blocks},
                       {"unlimited_hit_ratio", s.unlimited_hit_ratio},
                       {"reuse_computed", !report.results.empty()}}},
                     {"results", results}};
  return root.dump(2) + "\n";
}

std::string ReplayReportCsv(const RequestReplayReport& report) {
  std::string out =
      "policy,capacity,capacity_blocks,references,hits,prefix_hits,hit_ratio,prefix_hit_ratio,"
      "inserted,evicted,prefix_hit_tokens,hit_bytes,inserted_bytes,prefill_saved_s,load_s,"
      "mean_ttft_saving_ms\n";
  for (const PolicyResult& r : report.results) {
    absl::StrAppendFormat(&out, "%s,%s,%d,%d,%d,%d,%.6f,%.6f,%d,%d,%d,%.0f,%.0f,%.6g,%.6g,%.6g\n",
                          r.policy, r.capacity_label, r.capacity_blocks, r.references, r.hits,
                          r.prefix_hits, r.hit_ratio(), r.prefix_hit_ratio(), r.inserted, r.evicted,
                          r.prefix_hit_tokens, r.hit_bytes, r.inserted_bytes, r.prefill_saved_s,
                          r.load_s, r.mean_ttft_saving_ms);
  }
  return out;
}

}  // namespace headwise
