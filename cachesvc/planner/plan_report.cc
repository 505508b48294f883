#include "cachesvc/planner/plan_report.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cachesvc/planner/byte_size.h"
#include "nlohmann/json.hpp"

namespace headwise {
namespace {

std::string FormatSeconds(double s) {
  if (s == 0) return "0 s";
  if (s >= 1) return absl::StrFormat("%.3f s", s);
  if (s >= 1e-3) return absl::StrFormat("%.3f ms", s * 1e3);
  return absl::StrFormat("%.3f us", s * 1e6);
}

std::string FormatBudget(int64_t budget) {
  return budget < 0 ? std::string("unlimited") : FormatBytes(budget);
}

std::string FormatFlops(double flops) {
  const char* units[] = {"", "K", "M", "G", "T", "P"};
  int u = 0;
  while (flops >= 1000 && u < 5) {
    flops /= 1000;
    ++u;
  }
  return absl::StrFormat("%.3g %sFLOP", flops, units[u]);
}

}  // namespace

std::string FormatPlanTable(const Plan& plan, const PlanLabels& labels) {
  const ModelLayout& layout = plan.layout;
  const KvFootprint& kv = plan.footprint;
  std::string out;
  absl::StrAppend(&out, "headwise plan: ", labels.layout, ", ", plan.context_tokens,
                  " tokens, policy ", labels.policy, "\n");
  absl::StrAppendFormat(&out,
                        "  layout   %d layers, %d q / %d kv heads, head_dim %d, %s, %d-token "
                        "pages of %s\n",
                        layout.num_layers, layout.num_q_heads, layout.num_kv_heads, layout.head_dim,
                        std::string(DTypeName(layout.dtype)), layout.page_tokens,
                        FormatBytes(layout.page_bytes()));
  absl::StrAppendFormat(&out, "  policy   placement %s, eviction %s", plan.placement,
                        std::string(EvictionMethodName(plan.eviction.method)));
  if (plan.eviction.method != EvictionSpec::Method::kNone) {
    absl::StrAppendFormat(&out, " (%d sink + %d recent tokens)", plan.eviction.window.sink_tokens,
                          plan.eviction.window.recent_tokens);
  }
  absl::StrAppendFormat(&out, ", %d retrieval / %d streaming heads\n", plan.retrieval_heads,
                        plan.streaming_heads);
  if (plan.placement != "device_only") {
    absl::StrAppendFormat(&out, "           %s staged, prefetch depth %d, transfers %s%s\n",
                          plan.placement == "layer_offload"
                              ? absl::StrCat(1 + plan.prefetch_depth, " layers")
                              : absl::StrCat(plan.device_head_groups, " (layer, kv head) buffers"),
                          plan.prefetch_depth,
                          plan.overlapped ? "overlap compute" : "serialised with compute",
                          plan.pin_spare ? ", spare budget pinned" : "");
  }
  const DeviceProfile& p = plan.profile;
  absl::StrAppendFormat(&out, "  profile  %s: device %s, link %s, disk %s, %.4g TFLOP/s%s\n",
                        p.name, FormatRate(p.device_bytes_per_s), FormatRate(p.link_bytes_per_s),
                        FormatRate(p.disk_bytes_per_s), p.flops_per_s / 1e12,
                        p.measured ? " (device bandwidth measured)" : "");
  absl::StrAppend(&out, "           ", p.description, "\n\n");

  absl::StrAppendFormat(&out, "KV cache (engine accounting, page-granular)\n");
  absl::StrAppendFormat(&out, "  full       %14s  %d pages\n", FormatBytes(kv.full_bytes),
                        kv.full_pages);
  absl::StrAppendFormat(&out, "  retained   %14s  %d pages, compression %.3fx\n\n",
                        FormatBytes(kv.retained_bytes), kv.retained_pages, kv.CompressionRatio());

  absl::StrAppendFormat(&out, "  %-8s %14s %14s  %s\n", "tier", "bytes", "budget", "holds");
  std::string device_holds = absl::StrCat(plan.resident_heads, " resident heads");
  if (plan.staging_buffers > 0) {
    absl::StrAppend(&device_holds, " + ", plan.staging_buffers, " staging buffers of ",
                    FormatBytes(plan.staging_unit_bytes));
  }
  absl::StrAppendFormat(&out, "  %-8s %14s %14s  %s\n", "device", FormatBytes(plan.device_bytes),
                        FormatBudget(plan.device_budget_bytes), device_holds);
  absl::StrAppendFormat(&out, "  %-8s %14s %14s  %s\n", "host", FormatBytes(plan.host_bytes),
                        FormatBudget(plan.host_budget_bytes),
                        plan.streamed_heads > 0
                            ? absl::StrCat(plan.streamed_heads, " heads, streamed every token")
                            : std::string("-"));
  absl::StrAppendFormat(&out, "  %-8s %14s %14s  %s\n", "disk", FormatBytes(plan.disk_bytes), "",
                        plan.disk_bytes > 0 ? "oldest pages spilled past the host budget" : "-");
  absl::StrAppend(&out, "  fits: ", plan.fits ? "yes" : absl::StrCat("NO, ", plan.note), "\n\n");

  absl::StrAppend(&out, "decode, per token (attention only; model in docs/planner.md)\n");
  absl::StrAppendFormat(&out, "  time           %12s  %.4g tokens/s, bound by %s\n",
                        FormatSeconds(plan.seconds_per_token),
                        plan.seconds_per_token > 0 ? 1.0 / plan.seconds_per_token : 0.0,
                        plan.bound);
  absl::StrAppendFormat(&out, "  device memory  %12s  %s read\n", FormatSeconds(plan.hbm_seconds),
                        FormatBytes(kv.retained_bytes));
  absl::StrAppendFormat(&out, "  compute        %12s  %s\n", FormatSeconds(plan.flop_seconds),
                        FormatFlops(plan.flops_per_token));
  absl::StrAppendFormat(&out, "  link           %12s  %s host -> device\n",
                        FormatSeconds(plan.link_seconds), FormatBytes(plan.link_bytes_per_token));
  absl::StrAppendFormat(&out, "  disk           %12s  %s disk -> host\n",
                        FormatSeconds(plan.disk_seconds),
                        FormatBytes(static_cast<int64_t>(std::llround(plan.disk_bytes_per_token))));
  return out;
}

std::string FormatPlanJson(const Plan& plan, const PlanLabels& labels) {
  using nlohmann::json;
  const ModelLayout& layout = plan.layout;
  const KvFootprint& kv = plan.footprint;
  auto budget = [](int64_t b) { return b < 0 ? json(nullptr) : json(b); };
  json out;
  out["layout"] = {{"name", labels.layout},
                   {"num_layers", layout.num_layers},
                   {"num_q_heads", layout.num_q_heads},
                   {"num_kv_heads", layout.num_kv_heads},
                   {"head_dim", layout.head_dim},
                   {"dtype", std::string(DTypeName(layout.dtype))},
                   {"page_tokens", layout.page_tokens},
                   {"page_bytes", layout.page_bytes()}};
  out["context_tokens"] = plan.context_tokens;
  out["policy"] = {{"name", labels.policy},
                   {"placement", plan.placement},
                   {"eviction", std::string(EvictionMethodName(plan.eviction.method))},
                   {"sink_tokens", plan.eviction.window.sink_tokens},
                   {"recent_tokens", plan.eviction.window.recent_tokens},
                   {"retrieval_heads", plan.retrieval_heads},
                   {"streaming_heads", plan.streaming_heads},
                   {"device_head_groups", plan.device_head_groups},
                   {"prefetch_depth", plan.prefetch_depth},
                   {"pin_spare", plan.pin_spare},
                   {"overlapped", plan.overlapped}};
  out["profile"] = {{"name", plan.profile.name},
                    {"description", plan.profile.description},
                    {"device_bytes_per_s", plan.profile.device_bytes_per_s},
                    {"link_bytes_per_s", plan.profile.link_bytes_per_s},
                    {"disk_bytes_per_s", plan.profile.disk_bytes_per_s},
                    {"flops_per_s", plan.profile.flops_per_s},
                    {"measured", plan.profile.measured}};
  out["kv"] = {
      {"full_bytes", kv.full_bytes},           {"full_pages", kv.full_pages},
      {"retained_bytes", kv.retained_bytes},   {"retained_pages", kv.retained_pages},
      {"retained_tokens", kv.retained_tokens}, {"compression_ratio", kv.CompressionRatio()}};
  out["tiers"] = {{"device_bytes", plan.device_bytes},
                  {"device_resident_bytes", plan.device_resident_bytes},
                  {"device_staging_bytes", plan.device_staging_bytes},
                  {"staging_buffers", plan.staging_buffers},
                  {"staging_unit_bytes", plan.staging_unit_bytes},
                  {"host_bytes", plan.host_bytes},
                  {"disk_bytes", plan.disk_bytes},
                  {"device_budget_bytes", budget(plan.device_budget_bytes)},
                  {"host_budget_bytes", budget(plan.host_budget_bytes)},
                  {"resident_heads", plan.resident_heads},
                  {"streamed_heads", plan.streamed_heads},
                  {"fits", plan.fits},
                  {"note", plan.note}};
  out["decode"] = {
      {"seconds_per_token", plan.seconds_per_token},
      {"tokens_per_second", plan.seconds_per_token > 0 ? 1.0 / plan.seconds_per_token : 0.0},
      {"bound", plan.bound},
      {"hbm_seconds", plan.hbm_seconds},
      {"flop_seconds", plan.flop_seconds},
      {"link_seconds", plan.link_seconds},
      {"disk_seconds", plan.disk_seconds},
      {"flops_per_token", plan.flops_per_token},
      {"link_bytes_per_token", plan.link_bytes_per_token},
      {"disk_bytes_per_token", plan.disk_bytes_per_token}};
  return out.dump(2) + "\n";
}

}  // namespace headwise
