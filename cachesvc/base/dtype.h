// Storage dtypes of KV pages. The list lives in dtype.def; this header derives the enum, names,
// sizes, parsing and scalar conversions from it. Scalar conversions here are the reference
// used by tests and by slow paths; the kernels convert whole vectors with Highway.
#ifndef HEADWISE_CACHESVC_BASE_DTYPE_H_
#define HEADWISE_CACHESVC_BASE_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "absl/status/statusor.h"

namespace headwise {

enum class DType : uint8_t {
#define HEADWISE_DTYPE(name, str, bytes) name,
#include "cachesvc/base/dtype.def"
#undef HEADWISE_DTYPE
};

// Bytes per element of `dtype`.
constexpr size_t DTypeSize(DType dtype) {
  switch (dtype) {
#define HEADWISE_DTYPE(name, str, bytes) \
  case DType::name:                      \
    return bytes;
#include "cachesvc/base/dtype.def"
#undef HEADWISE_DTYPE
  }
  return 0;
}

// Wire name ("f32", "f16", "bf16").
std::string_view DTypeName(DType dtype);

// Inverse of DTypeName. INVALID_ARGUMENT for an unknown name.
absl::StatusOr<DType> ParseDType(std::string_view name);

// IEEE binary16 <-> binary32, round to nearest even. Handles subnormals, infinities and NaN.
float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);

// bfloat16 <-> binary32, round to nearest even (NaN stays NaN).
inline float BFloat16ToFloat(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
uint16_t FloatToBFloat16(float f);

// Reads element `i` of a buffer of `dtype` as float.
inline float LoadAsFloat(const void* data, DType dtype, size_t i) {
  switch (dtype) {
    case DType::kF32:
      return static_cast<const float*>(data)[i];
    case DType::kF16:
      return HalfToFloat(static_cast<const uint16_t*>(data)[i]);
    case DType::kBF16:
      return BFloat16ToFloat(static_cast<const uint16_t*>(data)[i]);
  }
  return 0.0f;
}

// Writes `value`, rounded to `dtype`, into element `i`.
void StoreFromFloat(void* data, DType dtype, size_t i, float value);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_BASE_DTYPE_H_
