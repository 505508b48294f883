// CheckFinite: NaN and infinities are found at every position of every dtype (the word-at-a-time
// scan and the tail), and the largest finite values, subnormals and signed zeros pass.
#include "cachesvc/service/tensor_io.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace headwise {
namespace {

template <typename Bits>
std::vector<std::byte> Bytes(const std::vector<Bits>& v) {
  std::vector<std::byte> out(v.size() * sizeof(Bits));
  std::memcpy(out.data(), v.data(), out.size());
  return out;
}

struct Case {
  DType dtype;
  std::vector<uint32_t> finite;  // Edge values that must pass.
  std::vector<uint32_t> bad;     // NaN, +Inf, -Inf patterns.
};

template <typename Bits>
void Check(const Case& c) {
  for (size_t n = 1; n <= 21; ++n) {
    std::vector<Bits> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = static_cast<Bits>(c.finite[i % c.finite.size()]);
    EXPECT_TRUE(CheckFinite(Bytes(v), c.dtype, "k").ok()) << "n " << n;
    for (size_t at = 0; at < n; ++at) {
      for (uint32_t bad : c.bad) {
        std::vector<Bits> w = v;
        w[at] = static_cast<Bits>(bad);
        const absl::Status st = CheckFinite(Bytes(w), c.dtype, "k");
        ASSERT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << "n " << n << " at " << at;
        EXPECT_NE(std::string(st.message()).find("element " + std::to_string(at) + " "),
                  std::string::npos)
            << st;
      }
    }
  }
}

TEST(CheckFinite, FindsEveryNonFiniteElementAndPassesEdgeValues) {
  Check<uint16_t>({DType::kF16,
                   {0x7bff, 0xfbff, 0x0001, 0x8000, 0x0000, 0x3c00, 0x7bfe, 0x03ff},
                   {0x7c00, 0xfc00, 0x7e00, 0x7c01, 0xffff}});
  Check<uint16_t>({DType::kBF16,
                   {0x7f7f, 0xff7f, 0x0001, 0x8000, 0x0000, 0x3f80, 0x007f},
                   {0x7f80, 0xff80, 0x7fc0, 0x7f81, 0xffff}});
  Check<uint32_t>({DType::kF32,
                   {0x7f7fffff, 0xff7fffff, 0x00000001, 0x80000000, 0x3f800000, 0x007fffff},
                   {0x7f800000, 0xff800000, 0x7fc00000, 0x7f800001, 0xffffffff}});
}

}  // namespace
}  // namespace headwise
