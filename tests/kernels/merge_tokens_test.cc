// MergeTokens against float64 weighted means, and the count-bias property of policies.md §6.0:
// n tokens with equal keys attend exactly like their representative with bias ln n.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "cachesvc/base/dtype.h"
#include "gtest/gtest.h"
#include "kernels/attention.h"

namespace headwise::kernels {
namespace {

constexpr DType kDTypes[] = {DType::kF32, DType::kF16, DType::kBF16};

// Upper bound of |round_to_dtype(z) - z| (via f32) for a normal-range z, with one extra
// half-ulp for the double -> f32 -> dtype double rounding.
double DTypeRounding(DType dtype, double z) {
  switch (dtype) {
    case DType::kF32:
      return std::abs(z) * std::ldexp(1.0, -23);
    case DType::kF16:
      return std::abs(z) * std::ldexp(1.0, -10) + std::ldexp(1.0, -24);
    case DType::kBF16:
      return std::abs(z) * std::ldexp(1.0, -7);
  }
  return 0.0;
}

// n rows of nonzero random values in [-3, -0.02] U [0.02, 3], stored in `dtype`.
std::vector<std::byte> RandomRows(std::mt19937& rng, DType dtype, int n, int d) {
  std::vector<std::byte> rows(static_cast<size_t>(n) * d * DTypeSize(dtype));
  std::uniform_real_distribution<float> mag(0.02f, 3.0f);
  std::bernoulli_distribution sign(0.5);
  for (size_t i = 0; i < static_cast<size_t>(n) * d; ++i) {
    StoreFromFloat(rows.data(), dtype, i, mag(rng) * (sign(rng) ? 1.0f : -1.0f));
  }
  return rows;
}

std::vector<float> RandomCounts(std::mt19937& rng, int n, bool integral) {
  std::vector<float> counts(n);
  std::uniform_int_distribution<int> whole(1, 10);
  std::uniform_real_distribution<float> real(0.25f, 20.0f);
  for (float& c : counts) c = integral ? static_cast<float>(whole(rng)) : real(rng);
  return counts;
}

TEST(MergeTokensTest, CountWeightedMeansAndLogCountBias) {
  std::mt19937 rng(8675309);
  for (DType dtype : kDTypes) {
    for (int d : {8, 64, 128, 256}) {
      for (int n : {1, 2, 5, 17}) {
        for (int weighting = 0; weighting < 3; ++weighting) {
          SCOPED_TRACE(testing::Message() << DTypeName(dtype) << " d=" << d << " n=" << n
                                          << " weighting=" << weighting);
          const auto k = RandomRows(rng, dtype, n, d);
          const auto v = RandomRows(rng, dtype, n, d);
          std::vector<float> counts;
          if (weighting > 0) counts = RandomCounts(rng, n, weighting == 1);
          const float* counts_ptr = weighting > 0 ? counts.data() : nullptr;
          std::vector<std::byte> k_out(static_cast<size_t>(d) * DTypeSize(dtype));
          std::vector<std::byte> v_out(k_out.size());
          float bias = 0.0f;
          ASSERT_TRUE(MergeTokens(k.data(), v.data(), counts_ptr, n, d, dtype, k_out.data(),
                                  v_out.data(), &bias)
                          .ok());
          double total = 0.0;
          for (int i = 0; i < n; ++i) total += weighting > 0 ? counts[i] : 1.0;
          EXPECT_NEAR(bias, std::log(total), 1e-6 * std::max(1.0, std::log(total)));
          for (int c = 0; c < d; ++c) {
            double k_ref = 0.0;
            double v_ref = 0.0;
            for (int i = 0; i < n; ++i) {
              const double w = weighting > 0 ? counts[i] : 1.0;
              const size_t e = static_cast<size_t>(i) * d + c;
              k_ref += w * LoadAsFloat(k.data(), dtype, e);
              v_ref += w * LoadAsFloat(v.data(), dtype, e);
            }
            k_ref /= total;
            v_ref /= total;
            ASSERT_NEAR(LoadAsFloat(k_out.data(), dtype, c), k_ref,
                        DTypeRounding(dtype, k_ref) + 1e-12)
                << "channel " << c;
            ASSERT_NEAR(LoadAsFloat(v_out.data(), dtype, c), v_ref,
                        DTypeRounding(dtype, v_ref) + 1e-12)
                << "channel " << c;
          }
        }
      }
    }
  }
}

// Double-precision attention of q over tokens (k_t, v_t, bias_t); returns lse, fills out.
double Attend(const std::vector<double>& q, const std::vector<std::vector<double>>& k,
              const std::vector<std::vector<double>>& v, const std::vector<double>& bias,
              std::vector<double>& out) {
  const size_t d = q.size();
  std::vector<double> z(k.size());
  double m = -std::numeric_limits<double>::infinity();
  for (size_t t = 0; t < k.size(); ++t) {
    double dot = 0.0;
    for (size_t c = 0; c < d; ++c) dot += q[c] * k[t][c];
    z[t] = dot / std::sqrt(static_cast<double>(d)) + bias[t];
    m = std::max(m, z[t]);
  }
  double den = 0.0;
  out.assign(d, 0.0);
  for (size_t t = 0; t < k.size(); ++t) {
    const double p = std::exp(z[t] - m);
    den += p;
    for (size_t c = 0; c < d; ++c) out[c] += p * v[t][c];
  }
  for (double& o : out) o /= den;
  return m + std::log(den);
}

std::vector<double> Row(const std::vector<std::byte>& rows, DType dtype, int i, int d) {
  std::vector<double> row(d);
  for (int c = 0; c < d; ++c)
    row[c] = LoadAsFloat(rows.data(), dtype, static_cast<size_t>(i) * d + c);
  return row;
}

// With equal keys the logits of a group are equal, so replacing the group by its
// representative with bias ln(sum of counts) leaves attention unchanged up to the rounding of
// v̄. Other tokens in the context keep the softmax non-trivial. Tokens that already stand for
// c_i merged tokens carry bias ln c_i in the original context.
TEST(MergeTokensTest, EqualKeysAttendLikeRepresentativeWithLogCountBias) {
  std::mt19937 rng(31337);
  std::normal_distribution<double> normal(0.0, 1.0);
  constexpr int kOthers = 6;
  for (DType dtype : kDTypes) {
    for (int d : {8, 64, 128, 256}) {
      for (int n : {2, 3, 16}) {
        for (bool weighted : {false, true}) {
          SCOPED_TRACE(testing::Message()
                       << DTypeName(dtype) << " d=" << d << " n=" << n << " weighted=" << weighted);
          const auto key = RandomRows(rng, dtype, 1, d);
          std::vector<std::byte> k(static_cast<size_t>(n) * key.size());
          for (int i = 0; i < n; ++i) std::copy(key.begin(), key.end(), k.begin() + i * key.size());
          const auto v = RandomRows(rng, dtype, n, d);
          const auto other_k = RandomRows(rng, dtype, kOthers, d);
          const auto other_v = RandomRows(rng, dtype, kOthers, d);
          std::vector<float> counts;
          if (weighted) counts = RandomCounts(rng, n, /*integral=*/false);

          std::vector<std::byte> k_bar(key.size());
          std::vector<std::byte> v_bar(key.size());
          float bias = 0.0f;
          ASSERT_TRUE(MergeTokens(k.data(), v.data(), weighted ? counts.data() : nullptr, n, d,
                                  dtype, k_bar.data(), v_bar.data(), &bias)
                          .ok());
          EXPECT_EQ(k_bar, key) << "the mean of equal keys is that key";

          std::vector<double> q(d);
          for (double& x : q) x = normal(rng);
          std::vector<std::vector<double>> ks, vs;
          std::vector<double> biases;
          for (int i = 0; i < kOthers; ++i) {
            ks.push_back(Row(other_k, dtype, i, d));
            vs.push_back(Row(other_v, dtype, i, d));
            biases.push_back(0.0);
          }
          auto merged_ks = ks;
          auto merged_vs = vs;
          auto merged_biases = biases;
          double v_max = 0.0;
          for (int i = 0; i < n; ++i) {
            ks.push_back(Row(k, dtype, i, d));
            vs.push_back(Row(v, dtype, i, d));
            biases.push_back(weighted ? std::log(double{counts[i]}) : 0.0);
            for (double x : vs.back()) v_max = std::max(v_max, std::abs(x));
          }
          merged_ks.push_back(Row(k_bar, dtype, 0, d));
          merged_vs.push_back(Row(v_bar, dtype, 0, d));
          merged_biases.push_back(bias);

          std::vector<double> out_orig;
          std::vector<double> out_merged;
          const double lse_orig = Attend(q, ks, vs, biases, out_orig);
          const double lse_merged = Attend(q, merged_ks, merged_vs, merged_biases, out_merged);
          EXPECT_NEAR(lse_merged, lse_orig, 1e-6 * std::max(1.0, std::abs(lse_orig)));
          for (int c = 0; c < d; ++c) {
            ASSERT_NEAR(out_merged[c], out_orig[c], DTypeRounding(dtype, v_max) + 1e-6)
                << "channel " << c;
          }
        }
      }
    }
  }
}

TEST(MergeTokensTest, OutputsMayAliasInputs) {
  std::mt19937 rng(2);
  constexpr int kN = 5;
  constexpr int kD = 64;
  for (DType dtype : kDTypes) {
    auto k = RandomRows(rng, dtype, kN, kD);
    auto v = RandomRows(rng, dtype, kN, kD);
    std::vector<std::byte> k_out(kD * DTypeSize(dtype));
    std::vector<std::byte> v_out(k_out.size());
    float bias = 0.0f;
    ASSERT_TRUE(
        MergeTokens(k.data(), v.data(), nullptr, kN, kD, dtype, k_out.data(), v_out.data(), &bias)
            .ok());
    float bias_in_place = 0.0f;
    ASSERT_TRUE(
        MergeTokens(k.data(), v.data(), nullptr, kN, kD, dtype, k.data(), v.data(), &bias_in_place)
            .ok());
    EXPECT_TRUE(std::equal(k_out.begin(), k_out.end(), k.begin()));
    EXPECT_TRUE(std::equal(v_out.begin(), v_out.end(), v.begin()));
    EXPECT_EQ(bias, bias_in_place);
  }
}

TEST(MergeTokensTest, BadArgumentsAreInvalid) {
  std::mt19937 rng(4);
  constexpr int kN = 4;
  constexpr int kD = 32;
  const auto k = RandomRows(rng, DType::kF16, kN, kD);
  const auto v = RandomRows(rng, DType::kF16, kN, kD);
  std::vector<std::byte> k_out(kD * 2);
  std::vector<std::byte> v_out(kD * 2);
  float bias = 0.0f;
  const std::vector<float> good_counts = {1.0f, 2.0f, 3.0f, 0.5f};
  constexpr auto kBad = absl::StatusCode::kInvalidArgument;
  const auto merge = [&](const std::byte* kk, const std::byte* vv, const float* counts, int n,
                         int d, DType dtype, std::byte* ko, std::byte* vo, float* b) {
    return MergeTokens(kk, vv, counts, n, d, dtype, ko, vo, b).code();
  };
  EXPECT_EQ(merge(k.data(), v.data(), good_counts.data(), kN, kD, DType::kF16, k_out.data(),
                  v_out.data(), &bias),
            absl::StatusCode::kOk);
  EXPECT_EQ(
      merge(nullptr, v.data(), nullptr, kN, kD, DType::kF16, k_out.data(), v_out.data(), &bias),
      kBad);
  EXPECT_EQ(
      merge(k.data(), nullptr, nullptr, kN, kD, DType::kF16, k_out.data(), v_out.data(), &bias),
      kBad);
  EXPECT_EQ(merge(k.data(), v.data(), nullptr, kN, kD, DType::kF16, nullptr, v_out.data(), &bias),
            kBad);
  EXPECT_EQ(merge(k.data(), v.data(), nullptr, kN, kD, DType::kF16, k_out.data(), nullptr, &bias),
            kBad);
  EXPECT_EQ(
      merge(k.data(), v.data(), nullptr, kN, kD, DType::kF16, k_out.data(), v_out.data(), nullptr),
      kBad);
  for (int n : {0, -1}) {
    EXPECT_EQ(
        merge(k.data(), v.data(), nullptr, n, kD, DType::kF16, k_out.data(), v_out.data(), &bias),
        kBad);
  }
  for (int d : {0, 12, 512}) {
    EXPECT_EQ(
        merge(k.data(), v.data(), nullptr, kN, d, DType::kF16, k_out.data(), v_out.data(), &bias),
        kBad);
  }
  EXPECT_EQ(merge(k.data(), v.data(), nullptr, kN, kD, static_cast<DType>(5), k_out.data(),
                  v_out.data(), &bias),
            kBad);
  for (float bad : {0.0f, -1.0f, std::numeric_limits<float>::quiet_NaN(),
                    std::numeric_limits<float>::infinity()}) {
    std::vector<float> counts = good_counts;
    counts[2] = bad;
    EXPECT_EQ(merge(k.data(), v.data(), counts.data(), kN, kD, DType::kF16, k_out.data(),
                    v_out.data(), &bias),
              kBad)
        << "count " << bad;
  }
}

}  // namespace
}  // namespace headwise::kernels
