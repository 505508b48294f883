#include "cachesvc/base/dtype.h"

#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace headwise {

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
#define HEADWISE_DTYPE(name, str, bytes) \
  case DType::name:                      \
    return str;
#include "cachesvc/base/dtype.def"
#undef HEADWISE_DTYPE
  }
  return "unknown";
}

absl::StatusOr<DType> ParseDType(std::string_view name) {
#define HEADWISE_DTYPE(enumerator, str, bytes) \
  if (name == str) return DType::enumerator;
#include "cachesvc/base/dtype.def"
#undef HEADWISE_DTYPE
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype '", std::string(name), "'"));
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: value = mantissa * 2^-24.
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  uint32_t bits;
  if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

uint16_t FloatToHalf(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits >= 0x7f800000u) {  // Inf or NaN.
    return sign | 0x7c00u | (abs_bits > 0x7f800000u ? 0x200u : 0u);
  }
  if (abs_bits >= 0x477ff000u) return sign | 0x7c00u;  // Rounds to >= 65520: overflow to inf.
  if (abs_bits < 0x38800000u) {
    // Result is subnormal or zero: round abs(f) * 2^24 to nearest even integer.
    float magnitude;
    std::memcpy(&magnitude, &abs_bits, sizeof(magnitude));
    const float scaled = std::nearbyint(magnitude * 16777216.0f);
    return sign | static_cast<uint16_t>(scaled);
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
  const uint32_t rebiased = abs_bits - (112u << 23);
  const uint32_t round_bit = 1u << 12;
  const uint32_t lsb = (rebiased >> 13) & 1u;
  const uint32_t rounded = rebiased + round_bit - 1 + lsb;
  return sign | static_cast<uint16_t>(rounded >> 13);
}

uint16_t FloatToBFloat16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  const uint32_t lsb = (bits >> 16) & 1u;
  return static_cast<uint16_t>((bits + 0x7fffu + lsb) >> 16);
}

void StoreFromFloat(void* data, DType dtype, size_t i, float value) {
  switch (dtype) {
    case DType::kF32:
      static_cast<float*>(data)[i] = value;
      return;
    case DType::kF16:
      static_cast<uint16_t*>(data)[i] = FloatToHalf(value);
      return;
    case DType::kBF16:
      static_cast<uint16_t*>(data)[i] = FloatToBFloat16(value);
      return;
  }
}

}  // namespace headwise
