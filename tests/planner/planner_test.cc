#include "cachesvc/planner/planner.h"

#include <cstdint>
#include <filesystem>
#include <string>

#include "cachesvc/planner/layout_presets.h"
#include "gtest/gtest.h"
#include "policies/head_roles.h"

namespace headwise {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kMiB = int64_t{1} << 20;
constexpr int64_t kGiB = int64_t{1} << 30;
constexpr int64_t kMillion = int64_t{1} << 20;  // 2^20 tokens

ModelLayout Llama3() {
  absl::StatusOr<ModelLayout> layout = LayoutPreset("llama-3-8b");
  EXPECT_TRUE(layout.ok()) << layout.status();
  return *layout;
}

DeviceProfile H100() {
  absl::StatusOr<DeviceProfile> profile = DeviceProfileByName("H100-PCIe5");
  EXPECT_TRUE(profile.ok()) << profile.status();
  return *profile;
}

PlanOptions Options(const PolicyChoice& choice, int64_t context, int64_t device_budget = -1) {
  PlanOptions options;
  options.layout = Llama3();
  options.context_tokens = context;
  absl::StatusOr<headwise::v1::PolicySpec> spec = BuildPolicySpec(choice, options.layout);
  EXPECT_TRUE(spec.ok()) << spec.status();
  options.policy = *spec;
  options.device_budget_bytes = device_budget;
  options.profile = H100();
  return options;
}

Plan MustPlan(const PlanOptions& options) {
  absl::StatusOr<Plan> plan = MakePlan(options);
  EXPECT_TRUE(plan.ok()) << plan.status();
  return plan.ok() ? *plan : Plan{};
}

// The real gate file of the 1M-context Llama-3-8B, or "" when the shared data is absent.
std::string Llama3MillionGates() {
  const fs::path dir = fs::path(HEADWISE_SHARED_DIR) /
                       "data/attention/duo_attention/attn_patterns/"
                       "Llama-3-8B-Instruct-Gradient-1048k";
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return "";
  for (const fs::directory_entry& run : fs::directory_iterator(dir, ec)) {
    const fs::path tsv = run.path() / "full_attention_heads.tsv";
    if (fs::exists(tsv, ec)) return tsv.string();
  }
  return "";
}

TEST(Planner, Llama3FullKvIs128GiBAtOneMillionTokens) {
  const Plan plan = MustPlan(Options({.name = "device_only"}, kMillion));
  EXPECT_EQ(plan.footprint.full_bytes, 128 * kGiB);
  EXPECT_EQ(plan.footprint.retained_bytes, 128 * kGiB);
  EXPECT_EQ(plan.device_bytes, 128 * kGiB);
  EXPECT_EQ(plan.host_bytes, 0);
  EXPECT_EQ(plan.resident_heads, 32 * 8);
  EXPECT_TRUE(plan.fits);  // Unlimited budget.
  // Attention reads the whole KV once from HBM: 128 GiB / 3.35 TB/s.
  EXPECT_NEAR(plan.hbm_seconds, 128.0 * kGiB / 3.35e12, 1e-9);
  EXPECT_EQ(plan.bound, "device memory");
  // 2*2*Hq*S*d per layer.
  EXPECT_DOUBLE_EQ(plan.flops_per_token, 32.0 * 4 * 32 * kMillion * 128);
}

TEST(Planner, DeviceOnlyOverBudgetDoesNotFit) {
  const Plan plan = MustPlan(Options({.name = "device_only"}, kMillion, 80 * kGiB));
  EXPECT_FALSE(plan.fits);
  EXPECT_NE(plan.note.find("48.00 GiB over"), std::string::npos) << plan.note;
}

TEST(Planner, HeadOffloadFitsOneMillionTokensInOneGiB) {
  const Plan plan = MustPlan(Options({.name = "head_offload"}, kMillion, kGiB));
  // Two (layer, kv head) staging buffers of 2^20 tokens x 2 x 128 x 2 B = 512 MiB each.
  EXPECT_EQ(plan.staging_unit_bytes, 512 * kMiB);
  EXPECT_EQ(plan.staging_buffers, 2);
  EXPECT_EQ(plan.device_bytes, kGiB);
  EXPECT_LE(plan.device_bytes, kGiB);
  EXPECT_TRUE(plan.fits);
  EXPECT_EQ(plan.host_bytes, 128 * kGiB);
  EXPECT_EQ(plan.disk_bytes, 0);
  EXPECT_EQ(plan.streamed_heads, 256);
  // Every byte crosses the link each token; PCIe binds: 128 GiB / 55 GB/s ~ 2.5 s.
  EXPECT_EQ(plan.link_bytes_per_token, 128 * kGiB);
  EXPECT_EQ(plan.bound, "link");
  EXPECT_NEAR(plan.seconds_per_token, 128.0 * kGiB / 55e9, 1e-6);
}

TEST(Planner, HeadOffloadDoesNotFitInHalfAHead) {
  const Plan plan = MustPlan(Options({.name = "head_offload"}, kMillion, 256 * kMiB));
  EXPECT_FALSE(plan.fits);
  EXPECT_NE(plan.note.find("staging buffers"), std::string::npos) << plan.note;
}

TEST(Planner, LayerOffloadStagesTwoLayers) {
  const Plan plan = MustPlan(Options({.name = "layer_offload"}, kMillion, 80 * kGiB));
  // HeadInfer Table 10: layer offload keeps 2 x 8 heads x 512 MiB = 8 GiB on the device.
  EXPECT_EQ(plan.device_bytes, 8 * kGiB);
  EXPECT_EQ(plan.host_bytes, 128 * kGiB);
  EXPECT_TRUE(plan.fits);
}

TEST(Planner, PinSpareKeepsHeadsResidentAndStreamsLess) {
  PlanOptions options = Options({.name = "head_offload"}, kMillion, 9 * kGiB);
  const Plan streamed = MustPlan(options);
  options.pin_spare = true;
  const Plan pinned = MustPlan(options);
  // 9 GiB = 2 staging buffers + 16 pinned heads of 512 MiB.
  EXPECT_EQ(pinned.resident_heads, 16);
  EXPECT_EQ(pinned.device_bytes, 9 * kGiB);
  EXPECT_EQ(pinned.host_bytes, 120 * kGiB);
  EXPECT_LT(pinned.seconds_per_token, streamed.seconds_per_token);
}

TEST(Planner, HostBudgetSpillsToDisk) {
  PlanOptions options = Options({.name = "head_offload"}, kMillion, kGiB);
  const Plan in_host = MustPlan(options);
  options.host_budget_bytes = 64 * kGiB;
  const Plan spilled = MustPlan(options);
  EXPECT_EQ(spilled.host_bytes, 64 * kGiB);
  EXPECT_EQ(spilled.disk_bytes, 64 * kGiB);
  EXPECT_NEAR(spilled.disk_bytes_per_token, 64.0 * kGiB, 1.0);
  // Half the KV at 12 GB/s is slower than all of it at 55 GB/s.
  EXPECT_EQ(spilled.bound, "disk");
  EXPECT_GT(spilled.seconds_per_token, in_host.seconds_per_token);
}

void ExpectDuoHalves(const Plan& plan) {
  EXPECT_EQ(plan.retrieval_heads, 128);
  EXPECT_EQ(plan.streaming_heads, 128);
  EXPECT_EQ(plan.footprint.full_bytes, 128 * kGiB);
  // 128 retrieval heads x 512 MiB + 128 streaming heads x 5 pages (1 sink + 4 recent) x 32 KiB.
  EXPECT_EQ(plan.footprint.retained_bytes, 64 * kGiB + 128 * 5 * 32 * 1024);
  EXPECT_NEAR(static_cast<double>(plan.footprint.retained_bytes) / kGiB, 64.0, 0.64);
  EXPECT_NEAR(plan.footprint.CompressionRatio(), 2.0, 0.02);
}

TEST(Planner, DuoAttentionWithRealGatesHalvesLlama3KvAtOneMillionTokens) {
  const std::string tsv = Llama3MillionGates();
  if (tsv.empty()) GTEST_SKIP() << "no DuoAttention gates under " << HEADWISE_SHARED_DIR;
  const Plan plan = MustPlan(Options({.name = "duo_attention",
                                      .sink_tokens = 64,
                                      .recent_tokens = 256,
                                      .duo_gates = *LoadDuoAttentionGates(tsv),
                                      .sparsity = 0.5},
                                     kMillion));
  ExpectDuoHalves(plan);
  // The global quantile gives layers different retrieval counts.
  int64_t min_layer = plan.layers[0].kv_bytes, max_layer = min_layer;
  for (const LayerCost& layer : plan.layers) {
    min_layer = std::min(min_layer, layer.kv_bytes);
    max_layer = std::max(max_layer, layer.kv_bytes);
  }
  EXPECT_LT(min_layer, max_layer);
}

TEST(Planner, DuoAttentionEvenSplitHalvesLlama3KvAtOneMillionTokens) {
  const Plan plan = MustPlan(
      Options({.name = "duo_attention", .sink_tokens = 64, .recent_tokens = 256, .sparsity = 0.5},
              kMillion));
  ExpectDuoHalves(plan);
  for (const LayerCost& layer : plan.layers) {
    EXPECT_EQ(layer.kv_bytes, 4 * 512 * kMiB + 4 * 5 * 32 * 1024);
  }
}

TEST(Planner, DuoAttentionEvenSplitHitsOtherSparsitiesExactly) {
  for (double sparsity : {0.0, 0.25, 0.75, 0.9, 1.0}) {
    const Plan plan = MustPlan(Options({.name = "duo_attention", .sparsity = sparsity}, 4096));
    EXPECT_EQ(plan.retrieval_heads, std::llround((1 - sparsity) * 256)) << sparsity;
  }
}

TEST(Planner, DuoAttentionWithHeadOffloadStreamsOnlyWhatIsRetained) {
  const Plan plan = MustPlan(Options(
      {.name = "duo_attention", .placement = "head_offload", .sparsity = 0.5}, kMillion, kGiB));
  EXPECT_TRUE(plan.fits);
  EXPECT_EQ(plan.device_bytes, kGiB);
  EXPECT_EQ(plan.link_bytes_per_token, plan.footprint.retained_bytes);
  EXPECT_NEAR(plan.seconds_per_token, static_cast<double>(plan.footprint.retained_bytes) / 55e9,
              1e-6);
}

TEST(Planner, StreamingLlmKeepsSinkAndWindowOnEveryHead) {
  const Plan plan = MustPlan(
      Options({.name = "streaming_llm", .sink_tokens = 4, .recent_tokens = 2000}, kMillion));
  // 1 sink page + the pages overlapping the last 2000 tokens (32 pages, 2^20 is page-aligned).
  EXPECT_EQ(plan.footprint.per_head[0].pages, 1 + 32);
  EXPECT_EQ(plan.footprint.retained_bytes, 256 * 33 * 32 * 1024);
}

TEST(Planner, TimeGrowsWithContext) {
  for (const char* policy : {"device_only", "layer_offload", "head_offload", "duo_attention"}) {
    double previous = -1;
    for (int64_t context : {0, 1, 1000, 4096, 65536, 1 << 20, 1 << 22}) {
      const Plan plan = MustPlan(Options({.name = policy}, context, 8 * kGiB));
      EXPECT_GE(plan.seconds_per_token, previous) << policy << " at " << context;
      previous = plan.seconds_per_token;
    }
    EXPECT_GT(previous, 0) << policy;
  }
}

TEST(Planner, TimeFallsAsLinkBandwidthGrows) {
  for (const char* policy : {"layer_offload", "head_offload"}) {
    for (int prefetch : {0, 1}) {
      double previous = 1e30;
      for (double link : {1e9, 8e9, 25e9, 55e9, 200e9, 1e12, 1e14}) {
        PlanOptions options =
            Options({.name = policy, .prefetch_depth = prefetch}, kMillion, 16 * kGiB);
        options.profile.link_bytes_per_s = link;
        const Plan plan = MustPlan(options);
        EXPECT_LE(plan.seconds_per_token, previous) << policy << " link " << link;
        previous = plan.seconds_per_token;
      }
      // Once the link is fast enough, overlapped transfers hide behind HBM-bound compute.
      if (prefetch == 1) {
        EXPECT_NEAR(previous, 128.0 * kGiB / 3.35e12, 1e-9) << policy;
      }
    }
  }
}

TEST(Planner, NoPrefetchSerialisesTransfersWithCompute) {
  const Plan overlapped = MustPlan(Options({.name = "head_offload"}, kMillion, kGiB));
  const Plan serial =
      MustPlan(Options({.name = "head_offload", .prefetch_depth = 0}, kMillion, kGiB));
  EXPECT_TRUE(overlapped.overlapped);
  EXPECT_FALSE(serial.overlapped);
  EXPECT_NEAR(serial.seconds_per_token, overlapped.link_seconds + overlapped.hbm_seconds, 1e-9);
}

TEST(Planner, RejectsBadInputs) {
  PlanOptions options = Options({.name = "device_only"}, 100);
  options.context_tokens = -1;
  EXPECT_EQ(MakePlan(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.context_tokens = 100;
  options.profile.link_bytes_per_s = 0;
  EXPECT_EQ(MakePlan(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.profile = H100();
  options.layout.head_dim = 100;
  EXPECT_EQ(MakePlan(options).status().code(), absl::StatusCode::kInvalidArgument);

  const ModelLayout layout = Llama3();
  EXPECT_FALSE(BuildPolicySpec({.name = "h2o"}, layout).ok());
  EXPECT_FALSE(
      BuildPolicySpec({.name = "head_offload", .placement = "layer_offload"}, layout).ok());
  EXPECT_FALSE(BuildPolicySpec({.name = "duo_attention", .placement = "disk"}, layout).ok());
  EXPECT_FALSE(BuildPolicySpec({.name = "duo_attention", .sparsity = 1.5}, layout).ok());
  EXPECT_FALSE(BuildPolicySpec({.name = "streaming_llm", .sink_tokens = -1}, layout).ok());
  EXPECT_FALSE(BuildPolicySpec({.name = "head_offload", .device_head_groups = 0}, layout).ok());

  // The planner has no pattern directory: a named pattern is refused, nothing is opened.
  PlanOptions named = Options({.name = "duo_attention"}, 100);
  named.policy.mutable_head_roles()->mutable_duo_attention()->set_pattern_name("a/b");
  EXPECT_EQ(MakePlan(named).status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace headwise
