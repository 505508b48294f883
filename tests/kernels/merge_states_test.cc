// Attention over a cache split into 2..8 disjoint parts, merged with the LSE rule, equals
// attention over the whole.

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "tests/kernels/paged_kv_fixture.h"

namespace headwise::kernels {
namespace {

using testing::MaxRelError;
using testing::RandomFloats;
using testing::RandomPagedKv;
using testing::ReferenceDecode;

// Runs decode over a subset of each head's pages (CSR positions in `pages_of_head[h]`).
void DecodeSubset(const RandomPagedKv& kv, const std::vector<std::vector<int32_t>>& pages_of_head,
                  const std::vector<float>& q, int num_q, std::vector<float>& o,
                  std::vector<float>& lse) {
  testing::ViewStorage storage;
  const PagedKvView sub = kv.SubsetView(pages_of_head, storage);
  DecodeArgs args;
  args.q = q.data();
  args.num_q_heads = num_q;
  args.o = o.data();
  args.lse = lse.data();
  ASSERT_TRUE(DecodeAttention(sub, args).ok());
}

TEST(MergeAttentionStates, SplitAndMergedEqualsWhole) {
  const int d = 128, group = 4, heads = 2, num_q = heads * group;
  std::mt19937 rng(5);
  for (int parts = 2; parts <= 8; ++parts) {
    SCOPED_TRACE(parts);
    RandomPagedKv kv(DType::kF16, d, 16, {333, 150}, 40 + parts);
    const std::vector<float> q = RandomFloats(num_q * d, 50 + parts);
    const PagedKvView full = kv.view();
    // Deal each head's pages to random parts; a part may get none (its lse is -inf).
    // The last page stays last within its part, as the page list of a head is ordered.
    std::vector<std::vector<std::vector<int32_t>>> part_pages(
        parts, std::vector<std::vector<int32_t>>(heads));
    for (int h = 0; h < heads; ++h) {
      for (int32_t j = full.indptr[h]; j < full.indptr[h + 1]; ++j) {
        part_pages[rng() % parts][h].push_back(j);
      }
    }
    std::vector<std::vector<float>> o(parts, std::vector<float>(num_q * d));
    std::vector<std::vector<float>> lse(parts, std::vector<float>(num_q));
    std::vector<const float*> o_ptrs, lse_ptrs;
    for (int p = 0; p < parts; ++p) {
      DecodeSubset(kv, part_pages[p], q, num_q, o[p], lse[p]);
      o_ptrs.push_back(o[p].data());
      lse_ptrs.push_back(lse[p].data());
    }
    std::vector<float> merged_o(num_q * d), merged_lse(num_q);
    ASSERT_TRUE(MergeAttentionStates(o_ptrs.data(), lse_ptrs.data(), parts, num_q, d,
                                     merged_o.data(), merged_lse.data())
                    .ok());
    for (int qh = 0; qh < num_q; ++qh) {
      const auto ref = ReferenceDecode(kv, q.data(), num_q, qh, d);
      EXPECT_LT(MaxRelError(merged_o.data() + qh * d, ref.o), 1e-5);
      EXPECT_NEAR(merged_lse[qh], ref.lse, 1e-5 * std::max(1.0, std::abs(ref.lse)));
    }
  }
}

TEST(MergeAttentionStates, AllEmptyPartsGiveZeroAndNegInf) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> o1(8, 3.0f), o2(8, 4.0f), lse1 = {-inf}, lse2 = {-inf};
  const float* o_parts[] = {o1.data(), o2.data()};
  const float* lse_parts[] = {lse1.data(), lse2.data()};
  std::vector<float> out(8, 1.0f), out_lse(1, 0.0f);
  ASSERT_TRUE(MergeAttentionStates(o_parts, lse_parts, 2, 1, 8, out.data(), out_lse.data()).ok());
  EXPECT_EQ(out_lse[0], -inf);
  for (float x : out) EXPECT_EQ(x, 0.0f);
}

TEST(MergeAttentionStates, OutputMayAliasFirstPart) {
  std::vector<float> o1 = RandomFloats(64, 1), o2 = RandomFloats(64, 2);
  std::vector<float> lse1 = {0.3f}, lse2 = {1.7f};
  std::vector<double> want(64);
  const double w1 = std::exp(0.3) / (std::exp(0.3) + std::exp(1.7));
  for (int i = 0; i < 64; ++i) want[i] = w1 * o1[i] + (1 - w1) * o2[i];
  const float* o_parts[] = {o1.data(), o2.data()};
  const float* lse_parts[] = {lse1.data(), lse2.data()};
  float lse_out;
  ASSERT_TRUE(MergeAttentionStates(o_parts, lse_parts, 2, 1, 64, o1.data(), &lse_out).ok());
  EXPECT_LT(MaxRelError(o1.data(), want), 1e-6);
  EXPECT_NEAR(lse_out, std::log(std::exp(0.3) + std::exp(1.7)), 1e-6);
}

TEST(MergeAttentionStates, RejectsBadArguments) {
  std::vector<float> o(8), lse(1);
  const float* o_parts[] = {o.data()};
  const float* lse_parts[] = {lse.data()};
  const float* null_parts[] = {nullptr};
  EXPECT_EQ(MergeAttentionStates(o_parts, lse_parts, 0, 1, 8, o.data(), lse.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MergeAttentionStates(null_parts, lse_parts, 1, 1, 8, o.data(), lse.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MergeAttentionStates(o_parts, lse_parts, 1, 1, 8, nullptr, lse.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MergeAttentionStates(o_parts, lse_parts, 1, 0, 8, o.data(), lse.data()).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace headwise::kernels
