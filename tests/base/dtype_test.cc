#include "cachesvc/base/dtype.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "gtest/gtest.h"

namespace headwise {
namespace {

TEST(DType, NamesSizesAndParsingComeFromOneList) {
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    auto parsed = ParseDType(DTypeName(dtype));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, dtype);
  }
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(ParseDType("fp8").status().code(), absl::StatusCode::kInvalidArgument);
}

// Every one of the 65536 half values survives half -> float -> half (NaNs stay NaN).
TEST(DType, HalfRoundTripsEveryBitPattern) {
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const float f = HalfToFloat(static_cast<uint16_t>(bits));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f))));
      continue;
    }
    ASSERT_EQ(FloatToHalf(f), bits) << "bits " << bits << " value " << f;
  }
}

// Rounding to half is to nearest: no other half value is closer (ties to even).
TEST(DType, FloatToHalfRoundsToNearest) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> exponent(-26.0f, 15.99f);  // Below the max half.
  for (int i = 0; i < 100000; ++i) {
    const float f = std::exp2(exponent(rng)) * ((rng() & 1) ? 1.0f : -1.0f);
    const uint16_t h = FloatToHalf(f);
    const double err = std::abs(double{HalfToFloat(h)} - f);
    for (int delta : {-1, 1}) {
      const uint16_t other = static_cast<uint16_t>(h + delta);
      if (std::isnan(HalfToFloat(other)) || std::isinf(HalfToFloat(other))) continue;
      if ((other & 0x7fff) == 0x7fff || ((other ^ h) & 0x8000)) continue;
      ASSERT_LE(err, std::abs(double{HalfToFloat(other)} - f)) << f;
    }
  }
  EXPECT_TRUE(std::isinf(HalfToFloat(FloatToHalf(1e6f))));
  EXPECT_EQ(HalfToFloat(FloatToHalf(65504.0f)), 65504.0f);
}

TEST(DType, BFloat16RoundsToNearestEven) {
  EXPECT_EQ(BFloat16ToFloat(FloatToBFloat16(1.0f)), 1.0f);
  // 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties to even gives 1.
  EXPECT_EQ(BFloat16ToFloat(FloatToBFloat16(1.0f + std::exp2(-8.0f))), 1.0f);
  EXPECT_EQ(BFloat16ToFloat(FloatToBFloat16(1.0f + 3 * std::exp2(-8.0f))), 1.0f + std::exp2(-6.0f));
  EXPECT_TRUE(std::isnan(BFloat16ToFloat(FloatToBFloat16(std::nanf("")))));
  std::mt19937 rng(4);
  std::normal_distribution<float> normal(0.0f, 100.0f);
  for (int i = 0; i < 10000; ++i) {
    const float f = normal(rng);
    EXPECT_LE(std::abs(BFloat16ToFloat(FloatToBFloat16(f)) - f), std::abs(f) * std::exp2(-8.0f));
  }
}

TEST(DType, StoreAndLoadAgree) {
  float buf32[1];
  uint16_t buf16[1];
  StoreFromFloat(buf32, DType::kF32, 0, 1.2345f);
  EXPECT_EQ(LoadAsFloat(buf32, DType::kF32, 0), 1.2345f);
  StoreFromFloat(buf16, DType::kF16, 0, 1.2345f);
  EXPECT_NEAR(LoadAsFloat(buf16, DType::kF16, 0), 1.2345f, 1e-3f);
  StoreFromFloat(buf16, DType::kBF16, 0, 1.2345f);
  EXPECT_NEAR(LoadAsFloat(buf16, DType::kBF16, 0), 1.2345f, 1e-2f);
}

}  // namespace
}  // namespace headwise
