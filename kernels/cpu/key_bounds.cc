// Per-channel key bounds of one page (Quest metadata), compiled once per SIMD target by
// Highway; the best target the CPU supports is chosen at run time.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "key_bounds.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// Must come after foreach_target.h.
#include "hwy/highway.h"

#ifndef HEADWISE_KERNELS_CPU_KEY_BOUNDS_ONCE_
#define HEADWISE_KERNELS_CPU_KEY_BOUNDS_ONCE_
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cachesvc/base/dtype.h"
#include "cachesvc/base/layout.h"
#include "kernels/attention.h"
#endif  // HEADWISE_KERNELS_CPU_KEY_BOUNDS_ONCE_

HWY_BEFORE_NAMESPACE();
namespace headwise::kernels {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

template <typename T, class DF>
HWY_INLINE hn::Vec<DF> LoadKeys(DF df, const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return hn::LoadU(df, p);
  } else {
    const hn::Rebind<T, DF> dt;
    return hn::PromoteTo(df, hn::LoadU(dt, p));
  }
}

// Columns of one vector at a time, walking down the tokens, so the running bounds stay in
// registers. Requires Lanes(df) to divide head_dim. Widening is exact, so the bounds equal
// stored values.
template <typename T, class DF>
void KeyBoundsTyped(DF df, const T* k, int tokens, int head_dim, float* kmin, float* kmax) {
  const int n = static_cast<int>(hn::Lanes(df));
  for (int c = 0; c < head_dim; c += n) {
    auto lo = LoadKeys(df, k + c);
    auto hi = lo;
    for (int t = 1; t < tokens; ++t) {
      const auto x = LoadKeys(df, k + static_cast<size_t>(t) * head_dim + c);
      lo = hn::Min(lo, x);
      hi = hn::Max(hi, x);
    }
    hn::StoreU(lo, df, kmin + c);
    hn::StoreU(hi, df, kmax + c);
  }
}

template <class DF>
void KeyBoundsWithTag(DF df, const std::byte* page, DType dtype, int tokens, int head_dim,
                      float* kmin, float* kmax) {
  switch (dtype) {
    case DType::kF32:
      return KeyBoundsTyped(df, reinterpret_cast<const float*>(page), tokens, head_dim, kmin, kmax);
    case DType::kF16:
      return KeyBoundsTyped(df, reinterpret_cast<const hwy::float16_t*>(page), tokens, head_dim,
                            kmin, kmax);
    case DType::kBF16:
      return KeyBoundsTyped(df, reinterpret_cast<const hwy::bfloat16_t*>(page), tokens, head_dim,
                            kmin, kmax);
  }
}

// Full vectors when they tile a row; otherwise at most 8 lanes, which tile every supported
// head_dim (all are multiples of 8).
void KeyBoundsImpl(const std::byte* page, DType dtype, int tokens, int head_dim, float* kmin,
                   float* kmax) {
  const hn::ScalableTag<float> df;
  if (head_dim % hn::Lanes(df) == 0) {
    KeyBoundsWithTag(df, page, dtype, tokens, head_dim, kmin, kmax);
  } else {
    KeyBoundsWithTag(hn::CappedTag<float, 8>(), page, dtype, tokens, head_dim, kmin, kmax);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace headwise::kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace headwise::kernels {

HWY_EXPORT(KeyBoundsImpl);

absl::Status ComputeKeyBounds(const std::byte* page, DType dtype, int page_tokens, int tokens,
                              int head_dim, float* kmin, float* kmax) {
  if (page == nullptr || kmin == nullptr || kmax == nullptr) {
    return absl::InvalidArgumentError("ComputeKeyBounds: page, kmin and kmax are required");
  }
  if (DTypeSize(dtype) == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ComputeKeyBounds: unknown dtype ", static_cast<int>(dtype)));
  }
  if (!IsSupportedHeadDim(head_dim) || head_dim % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ComputeKeyBounds: unsupported head_dim ", head_dim));
  }
  if (page_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("ComputeKeyBounds: page_tokens must be positive, got ", page_tokens));
  }
  if (tokens < 1 || tokens > page_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("ComputeKeyBounds: tokens ", tokens, " is outside 1..", page_tokens));
  }
  HWY_DYNAMIC_DISPATCH(KeyBoundsImpl)(page, dtype, tokens, head_dim, kmin, kmax);
  return absl::OkStatus();
}

}  // namespace headwise::kernels
#endif  // HWY_ONCE
