#include "policies/accounting.h"

#include <cmath>
#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "tests/policies/page_list_helpers.h"

namespace headwise {
namespace {

using testing_helpers::AppendTokens;
using testing_helpers::ApplyDecision;
using testing_helpers::ChooseVictims;
using testing_helpers::EvictionDecision;
using testing_helpers::ViewOf;

constexpr int64_t kGiB = int64_t{1} << 30;

ModelLayout Llama3_8B() {
  ModelLayout layout;
  layout.num_layers = 32;
  layout.num_q_heads = 32;
  layout.num_kv_heads = 8;
  layout.head_dim = 128;
  layout.dtype = DType::kF16;
  layout.page_tokens = 64;
  return layout;
}

// Half of the heads of every layer streaming: what sparsity 0.5 gives on average.
HeadRoles HalfStreaming(const ModelLayout& layout) {
  HeadRoles roles = UniformRoles(layout);
  for (int l = 0; l < layout.num_layers; ++l) {
    for (int h = 0; h < layout.num_kv_heads; h += 2) {
      roles.set_role(LayerId(l), HeadId(h), HeadRole::kStreaming);
    }
  }
  return roles;
}

TEST(Accounting, Llama3_8BFullIs128GiBAtOneMillionTokens) {
  const ModelLayout layout = Llama3_8B();
  const int64_t seq_len = int64_t{1} << 20;
  absl::StatusOr<KvFootprint> full =
      ComputeKvFootprint(layout, seq_len, UniformRoles(layout), EvictionSpec{});
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(full->full_bytes, 128 * kGiB);
  EXPECT_EQ(full->retained_bytes, 128 * kGiB);
  EXPECT_EQ(full->retained_tokens, seq_len * 32 * 8);
  EXPECT_DOUBLE_EQ(full->CompressionRatio(), 1.0);
}

TEST(Accounting, Llama3_8BDuoAttentionHalvesMemory) {
  const ModelLayout layout = Llama3_8B();
  const int64_t seq_len = int64_t{1} << 20;
  headwise::v1::PolicySpec spec;
  spec.mutable_head_roles()->mutable_duo_attention()->set_sparsity(0.5);
  absl::StatusOr<EvictionSpec> eviction = ResolveEvictionSpec(spec);
  ASSERT_TRUE(eviction.ok());
  const HeadRoles roles = HalfStreaming(layout);
  ASSERT_EQ(roles.Count(HeadRole::kStreaming), 128);
  absl::StatusOr<KvFootprint> duo = ComputeKvFootprint(layout, seq_len, roles, *eviction);
  ASSERT_TRUE(duo.ok()) << duo.status();
  // Retrieval heads: 128 heads x 2^20 tokens x 512 B = 64 GiB. Streaming heads: 1 sink page +
  // 4 window pages (256 tokens, page-aligned at 2^20) = 5 pages of 32 KiB each.
  EXPECT_EQ(duo->retained_bytes, 64 * kGiB + 128 * 5 * layout.page_bytes());
  EXPECT_NEAR(static_cast<double>(duo->retained_bytes) / kGiB, 64.0, 0.64);
  EXPECT_NEAR(duo->CompressionRatio(), 2.0, 0.02);
  EXPECT_EQ(duo->per_head[0].pages, 5);
  EXPECT_EQ(duo->per_head[0].tokens, 64 + 256);
  EXPECT_EQ(duo->per_head[1].tokens, seq_len);
}

TEST(Accounting, MatchesPolicyDecisionsExactly) {
  // The closed form must equal what the policy leaves behind when applied step by step.
  for (int page_tokens : {1, 4, 16, 64}) {
    for (SinkRecentWindow window :
         {SinkRecentWindow{64, 256}, SinkRecentWindow{4, 512}, SinkRecentWindow{0, 0},
          SinkRecentWindow{70, 1}, SinkRecentWindow{0, 33}}) {
      const EvictionSpec spec{.method = EvictionSpec::Method::kDuoAttention, .window = window};
      absl::StatusOr<std::unique_ptr<ActionPolicy>> policy = CreateActionPolicy(spec);
      ASSERT_TRUE(policy.ok());
      for (HeadRole role : {HeadRole::kRetrieval, HeadRole::kStreaming}) {
        std::vector<PageMeta> pages;
        int64_t seq_len = 0;
        while (seq_len < 1500) {
          AppendTokens(pages, seq_len, 1 + seq_len % 7, page_tokens);
          absl::StatusOr<EvictionDecision> decision =
              ChooseVictims(**policy, ViewOf(pages, page_tokens), role, seq_len);
          ASSERT_TRUE(decision.ok()) << decision.status();
          ApplyDecision(pages, *decision);
          int64_t tokens = 0;
          for (const PageMeta& page : pages) tokens += page.token_count;
          const HeadRetention expected = RetainedForHead(spec, role, seq_len, page_tokens);
          ASSERT_EQ(static_cast<int64_t>(pages.size()), expected.pages)
              << "P=" << page_tokens << " S=" << seq_len << " sink=" << window.sink_tokens
              << " recent=" << window.recent_tokens << " role=" << HeadRoleName(role);
          ASSERT_EQ(tokens, expected.tokens) << "P=" << page_tokens << " S=" << seq_len;
        }
      }
    }
  }
}

TEST(Accounting, StreamingLlmAppliesToEveryHead) {
  ModelLayout layout = Llama3_8B();
  const EvictionSpec spec{.method = EvictionSpec::Method::kStreamingLlm,
                          .window = {.sink_tokens = 4, .recent_tokens = 512}};
  absl::StatusOr<KvFootprint> footprint =
      ComputeKvFootprint(layout, 100000, UniformRoles(layout), spec);
  ASSERT_TRUE(footprint.ok());
  // 1 sink page + window [99488, 100000): pages 1554..1562 (9 pages, the last partial: 32 tokens).
  for (const HeadRetention& head : footprint->per_head) {
    EXPECT_EQ(head.pages, 10);
    EXPECT_EQ(head.tokens, 64 + (100000 - 1554 * 64));
  }
  EXPECT_EQ(footprint->full_pages, 1563 * 256);
}

TEST(Accounting, RejectsBadInput) {
  const ModelLayout layout = Llama3_8B();
  EXPECT_EQ(ComputeKvFootprint(layout, -1, UniformRoles(layout), {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      ComputeKvFootprint(layout, 10, HeadRoles(2, 2, HeadRole::kRetrieval), {}).status().code(),
      absl::StatusCode::kInvalidArgument);
  ModelLayout bad = layout;
  bad.num_layers = 0;
  EXPECT_EQ(ComputeKvFootprint(bad, 10, UniformRoles(bad), {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ComputeKvFootprint(
                layout, 10, UniformRoles(layout),
                {.method = EvictionSpec::Method::kStreamingLlm, .window = {.sink_tokens = -1}})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  absl::StatusOr<KvFootprint> empty = ComputeKvFootprint(layout, 0, UniformRoles(layout), {});
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->retained_bytes, 0);
  EXPECT_DOUBLE_EQ(empty->CompressionRatio(), 1.0);
}

}  // namespace
}  // namespace headwise
