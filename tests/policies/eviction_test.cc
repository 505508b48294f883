#include "policies/eviction.h"

#include <cstdint>
#include <vector>

#include "absl/random/random.h"
#include "gtest/gtest.h"
#include "tests/policies/page_list_helpers.h"

namespace headwise {
namespace {

using testing_helpers::AppendTokens;
using testing_helpers::ApplyDecision;
using testing_helpers::ChooseVictims;
using testing_helpers::ContiguousPages;
using testing_helpers::EvictionDecision;
using testing_helpers::ViewOf;

// The brute-force rule, token by token: page i may be dropped iff none of its tokens is a sink
// or in the recent window, and it is not the last page.
std::vector<int32_t> BruteForceDroppable(const std::vector<PageMeta>& pages, int64_t seq_len,
                                         const SinkRecentWindow& window) {
  std::vector<int32_t> drop;
  for (size_t i = 0; i + 1 < pages.size(); ++i) {
    bool keep = false;
    for (int64_t t = pages[i].first_position; t < pages[i].first_position + pages[i].token_count;
         ++t) {
      keep |= t < window.sink_tokens || t >= seq_len - window.recent_tokens;
    }
    if (!keep) drop.push_back(static_cast<int32_t>(i));
  }
  return drop;
}

std::unique_ptr<StreamingLlmPolicy> MakeStreaming(int64_t sink, int64_t recent) {
  auto policy =
      StreamingLlmPolicy::Create({.window = {.sink_tokens = sink, .recent_tokens = recent}});
  EXPECT_TRUE(policy.ok()) << policy.status();
  return *std::move(policy);
}

TEST(StreamingLlmPolicy, MatchesBruteForceOnManyLengths) {
  const SinkRecentWindow windows[] = {{64, 256}, {4, 512}, {0, 100}, {1, 1},   {100, 0},
                                      {0, 0},    {63, 65}, {16, 16}, {17, 33}, {128, 2000}};
  for (int page_tokens : {1, 2, 16, 64}) {
    for (const SinkRecentWindow& window : windows) {
      auto policy = MakeStreaming(window.sink_tokens, window.recent_tokens);
      for (int64_t seq_len = 0; seq_len <= 3000; seq_len += (seq_len < 700 ? 1 : 37)) {
        const std::vector<PageMeta> pages = ContiguousPages(seq_len, page_tokens);
        absl::StatusOr<EvictionDecision> decision =
            ChooseVictims(*policy, ViewOf(pages, page_tokens), HeadRole::kRetrieval, seq_len);
        ASSERT_TRUE(decision.ok()) << decision.status();
        ASSERT_EQ(decision->drop, BruteForceDroppable(pages, seq_len, window))
            << "P=" << page_tokens << " sink=" << window.sink_tokens
            << " recent=" << window.recent_tokens << " S=" << seq_len;
        if (seq_len <= window.sink_tokens + window.recent_tokens) {
          EXPECT_TRUE(decision->drop.empty()) << "S=" << seq_len;
        }
      }
    }
  }
}

TEST(StreamingLlmPolicy, EdgeLengths) {
  auto policy = MakeStreaming(64, 256);
  // One token: one partial page, kept.
  std::vector<PageMeta> pages = ContiguousPages(1, 64);
  EXPECT_TRUE(ChooseVictims(*policy, ViewOf(pages, 64), HeadRole::kStreaming, 1)->drop.empty());
  // Fewer tokens than sink + recent: nothing to drop.
  pages = ContiguousPages(319, 64);
  EXPECT_TRUE(ChooseVictims(*policy, ViewOf(pages, 64), HeadRole::kStreaming, 319)->drop.empty());
  // 1000 tokens, P = 64: pages 0 (sink), 11..15 (window [744, 1000) starts inside page 11).
  pages = ContiguousPages(1000, 64);
  EXPECT_EQ(ChooseVictims(*policy, ViewOf(pages, 64), HeadRole::kStreaming, 1000)->drop,
            (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}));
  // Empty head.
  pages.clear();
  EXPECT_TRUE(ChooseVictims(*policy, ViewOf(pages, 64), HeadRole::kStreaming, 0)->drop.empty());
}

TEST(StreamingLlmPolicy, ZeroWindowKeepsOnlyTheLastPage) {
  auto policy = MakeStreaming(0, 0);
  const std::vector<PageMeta> pages = ContiguousPages(256, 64);  // Last page is full.
  EXPECT_EQ(ChooseVictims(*policy, ViewOf(pages, 64), HeadRole::kRetrieval, 256)->drop,
            (std::vector<int32_t>{0, 1, 2}));
}

// Decode token by token (and prefill in random chunks), applying each decision as the engine
// would: the surviving pages always equal the one-shot brute-force survivors.
TEST(StreamingLlmPolicy, IncrementalApplicationMatchesOneShot) {
  absl::BitGen bitgen;
  for (int trial = 0; trial < 40; ++trial) {
    const int page_tokens = 1 << absl::Uniform<int>(bitgen, 0, 7);
    const SinkRecentWindow window{absl::Uniform<int64_t>(bitgen, 0, 200),
                                  absl::Uniform<int64_t>(bitgen, 0, 400)};
    auto policy = MakeStreaming(window.sink_tokens, window.recent_tokens);
    std::vector<PageMeta> pages;
    int64_t seq_len = 0;
    while (seq_len < 2500) {
      AppendTokens(pages, seq_len, absl::Uniform<int64_t>(bitgen, 1, 300), page_tokens);
      absl::StatusOr<EvictionDecision> decision =
          ChooseVictims(*policy, ViewOf(pages, page_tokens), HeadRole::kRetrieval, seq_len);
      ASSERT_TRUE(decision.ok()) << decision.status();
      ApplyDecision(pages, *decision);

      std::vector<PageMeta> expected = ContiguousPages(seq_len, page_tokens);
      ApplyDecision(expected, {BruteForceDroppable(expected, seq_len, window)});
      ASSERT_EQ(pages.size(), expected.size()) << "S=" << seq_len;
      for (size_t i = 0; i < pages.size(); ++i) {
        ASSERT_EQ(pages[i].first_position, expected[i].first_position);
        ASSERT_EQ(pages[i].token_count, expected[i].token_count);
      }
    }
  }
}

TEST(DuoAttentionPolicy, RetrievalKeepsAllStreamingFollowsStreamingLlm) {
  absl::StatusOr<std::unique_ptr<DuoAttentionPolicy>> duo = DuoAttentionPolicy::Create({});
  ASSERT_TRUE(duo.ok());
  EXPECT_EQ((*duo)->window().sink_tokens, 64);
  EXPECT_EQ((*duo)->window().recent_tokens, 256);
  auto streaming = MakeStreaming(64, 256);
  for (int64_t seq_len : {0, 1, 63, 64, 65, 320, 321, 1000, 4097, 100000}) {
    const std::vector<PageMeta> pages = ContiguousPages(seq_len, 64);
    const HeadPagesView view = ViewOf(pages, 64);
    EXPECT_TRUE(ChooseVictims(**duo, view, HeadRole::kRetrieval, seq_len)->drop.empty());
    EXPECT_EQ(ChooseVictims(**duo, view, HeadRole::kStreaming, seq_len)->drop,
              ChooseVictims(*streaming, view, HeadRole::kStreaming, seq_len)->drop);
  }
}

TEST(EvictionPolicy, RejectsInconsistentViews) {
  auto policy = MakeStreaming(4, 8);
  std::vector<PageMeta> pages = ContiguousPages(100, 16);
  // Pages reaching past seq_len.
  EXPECT_EQ(ChooseVictims(*policy, ViewOf(pages, 16), HeadRole::kRetrieval, 50).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Zero page_tokens.
  EXPECT_EQ(ChooseVictims(*policy, ViewOf(pages, 0), HeadRole::kRetrieval, 100).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Overlapping pages.
  std::vector<PageMeta> overlapping = pages;
  overlapping[2].first_position -= 1;
  EXPECT_EQ(
      ChooseVictims(*policy, ViewOf(overlapping, 16), HeadRole::kRetrieval, 100).status().code(),
      absl::StatusCode::kInvalidArgument);
  // Empty page.
  std::vector<PageMeta> empty_page = pages;
  empty_page[1].token_count = 0;
  EXPECT_EQ(
      ChooseVictims(*policy, ViewOf(empty_page, 16), HeadRole::kRetrieval, 100).status().code(),
      absl::StatusCode::kInvalidArgument);
  NoEvictionPolicy none;
  EXPECT_EQ(ChooseVictims(none, ViewOf(pages, 16), HeadRole::kRetrieval, 50).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(ChooseVictims(none, ViewOf(pages, 16), HeadRole::kStreaming, 100)->drop.empty());
}

TEST(Registry, ResolvesEveryCombination) {
  headwise::v1::PolicySpec spec;
  absl::StatusOr<std::unique_ptr<ActionPolicy>> policy = CreateActionPolicy(spec);
  ASSERT_TRUE(policy.ok());
  EXPECT_EQ((*policy)->name(), "none");

  spec.mutable_eviction()->mutable_streaming_llm();
  absl::StatusOr<EvictionSpec> resolved = ResolveEvictionSpec(spec);
  ASSERT_TRUE(resolved.ok());
  EXPECT_EQ(resolved->method, EvictionSpec::Method::kStreamingLlm);
  EXPECT_EQ(resolved->window.sink_tokens, 64);
  EXPECT_EQ(resolved->window.recent_tokens, 256);
  EXPECT_EQ((*CreateActionPolicy(spec))->name(), "streaming_llm");

  spec.mutable_eviction()->mutable_streaming_llm()->set_sink_tokens(4);
  spec.mutable_eviction()->mutable_streaming_llm()->set_recent_tokens(0);
  resolved = ResolveEvictionSpec(spec);
  ASSERT_TRUE(resolved.ok());
  EXPECT_EQ(resolved->window.sink_tokens, 4);
  EXPECT_EQ(resolved->window.recent_tokens, 0);  // Explicit zero is not "unset".

  spec.mutable_head_roles()->mutable_duo_attention();
  EXPECT_EQ((*CreateActionPolicy(spec))->name(), "duo_attention");
  spec.mutable_eviction()->clear_method();
  resolved = ResolveEvictionSpec(spec);
  ASSERT_TRUE(resolved.ok());
  EXPECT_EQ(resolved->method, EvictionSpec::Method::kDuoAttention);
  EXPECT_EQ(resolved->window.sink_tokens, 64);
  spec.mutable_eviction()->mutable_none();
  EXPECT_EQ((*CreateActionPolicy(spec))->name(), "none");
  EXPECT_EQ(EvictionMethodName(EvictionSpec::Method::kDuoAttention), "duo_attention");
}

TEST(Registry, NegativeWindowsAreInvalidArgument) {
  for (bool duo : {false, true}) {
    for (bool negative_sink : {false, true}) {
      headwise::v1::PolicySpec spec;
      if (duo) spec.mutable_head_roles()->mutable_duo_attention()->set_pattern_name("x");
      auto* streaming = spec.mutable_eviction()->mutable_streaming_llm();
      if (negative_sink) {
        streaming->set_sink_tokens(-1);
      } else {
        streaming->set_recent_tokens(-256);
      }
      absl::StatusOr<std::unique_ptr<ActionPolicy>> policy = CreateActionPolicy(spec);
      EXPECT_EQ(policy.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_NE(std::string(policy.status().message())
                    .find(negative_sink ? "sink_tokens" : "recent_tokens"),
                std::string::npos)
          << policy.status();
    }
  }
  EXPECT_EQ(StreamingLlmPolicy::Create({.window = {.sink_tokens = -5}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DuoAttentionPolicy::Create({.window = {.recent_tokens = -5}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CreateActionPolicy(EvictionSpec{.method = EvictionSpec::Method::kStreamingLlm,
                                            .window = {.sink_tokens = 0, .recent_tokens = -1}})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace headwise
