// KIVI quantization of one page (kernels/attention.h, policies.md §8.1), compiled once per SIMD
// target by Highway; the best target the CPU supports is chosen at run time.
//
// Quantized page layout (also in docs/kernels.md, section "Quantized page layout").
// P = page_tokens, D = head_dim, b = bits, G = group_size; offsets in bytes from `out`:
//
//   offset                      size           contents
//   0                           C              K codes
//   C                           C              V codes
//   2C                          4 (P/G) D      K scales, f32 [P/G][D]
//   2C + 4 (P/G) D              4 (P/G) D      K minimums, f32 [P/G][D]
//   2C + 8 (P/G) D              4 P (D/G)      V scales, f32 [P][D/G]
//   2C + 8 (P/G) D + 4 P (D/G)  4 P (D/G)      V minimums, f32 [P][D/G]
//   total = 2C + 8 (P/G) D + 8 P (D/G),   C = P D b / 8.
//
// * Both code blocks are in token-major order, like the page: element (t, c) of K (or V) is
//   code number i = t * D + c of its block. Code i occupies bits [(i b) mod 8, (i b) mod 8 + b)
//   of byte floor(i b / 8): codes are packed densely and the lower-numbered code sits in the
//   less significant bits of a byte (little-endian within bytes). D b / 8 is a whole number
//   for every supported D, so each token's codes start on a byte boundary.
// * K group (g, c) is channel c over tokens g G .. g G + G - 1; its scale and minimum are
//   entry [g][c]. V group (t, j) is token t over channels j G .. j G + G - 1; entry [t][j].
// * Scales and minimums are IEEE binary32 in little-endian byte order, with no alignment
//   promise (C need not be a multiple of 4).
// * Decoding: x̂ = code * scale + minimum. A constant group has scale 0 and codes 0, so it
//   decodes to its minimum exactly.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "quantize.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// Must come after foreach_target.h.
#include "hwy/highway.h"

#ifndef HEADWISE_KERNELS_CPU_QUANTIZE_ONCE_
#define HEADWISE_KERNELS_CPU_QUANTIZE_ONCE_
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cachesvc/base/dtype.h"
#include "cachesvc/base/layout.h"
#include "kernels/attention.h"
#include "quant_layout.h"

namespace headwise::kernels {

// The packing below moves codes through uint64_t words in memory order.
static_assert(std::endian::native == std::endian::little, "quantize.cc assumes little-endian");

// Per-row scratch arrays are sized for the largest supported head_dim.
inline constexpr int kQuantMaxHeadDim = 256;

}  // namespace headwise::kernels
#endif  // HEADWISE_KERNELS_CPU_QUANTIZE_ONCE_

HWY_BEFORE_NAMESPACE();
namespace headwise::kernels {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

template <DType kDt, class DF>
HWY_INLINE hn::Vec<DF> LoadF32(DF df, const std::byte* base, size_t i) {
  if constexpr (kDt == DType::kF32) {
    return hn::LoadU(df, reinterpret_cast<const float*>(base) + i);
  } else if constexpr (kDt == DType::kF16) {
    const hn::Rebind<hwy::float16_t, DF> dh;
    return hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(base) + i));
  } else {
    const hn::Rebind<hwy::bfloat16_t, DF> db;
    return hn::PromoteTo(df, hn::LoadU(db, reinterpret_cast<const hwy::bfloat16_t*>(base) + i));
  }
}

// Rounds to nearest even like headwise::StoreFromFloat; Highway 1.0.3's DemoteTo truncates to
// bf16 everywhere, and to f16 wherever F16C is unavailable, so those cases are done by hand.
template <DType kDt, class DF>
HWY_INLINE void StoreF32(DF df, hn::Vec<DF> v, std::byte* base, size_t i) {
  if constexpr (kDt == DType::kF32) {
    hn::StoreU(v, df, reinterpret_cast<float*>(base) + i);
  } else if constexpr (kDt == DType::kBF16) {
    const hn::RebindToUnsigned<DF> du;
    const hn::RebindToSigned<DF> di;
    const hn::Rebind<uint16_t, DF> d16;
    const auto bits = hn::BitCast(du, v);
    const auto lsb = hn::And(hn::ShiftRight<16>(bits), hn::Set(du, 1u));
    const auto rounded = hn::ShiftRight<16>(hn::Add(hn::Add(bits, hn::Set(du, 0x7fffu)), lsb));
    const auto quiet_nan = hn::ShiftRight<16>(hn::Or(bits, hn::Set(du, 0x400000u)));
    const auto out = hn::IfThenElse(hn::RebindMask(du, hn::IsNaN(v)), quiet_nan, rounded);
    hn::StoreU(hn::DemoteTo(d16, hn::BitCast(di, out)), d16, reinterpret_cast<uint16_t*>(base) + i);
  } else {
#if HWY_TARGET == HWY_SCALAR || HWY_TARGET == HWY_EMU128 || \
    (HWY_ARCH_X86 && (HWY_TARGET > HWY_AVX2 || defined(HWY_DISABLE_F16C)))
    float lanes[HWY_MAX_BYTES / sizeof(float)];
    hn::StoreU(v, df, lanes);
    for (size_t l = 0; l < hn::Lanes(df); ++l) StoreFromFloat(base, DType::kF16, i + l, lanes[l]);
#else
    const hn::Rebind<hwy::float16_t, DF> dh;
    hn::StoreU(hn::DemoteTo(dh, v), dh, reinterpret_cast<hwy::float16_t*>(base) + i);
#endif
  }
}

// Packs `d` codes (a multiple of 8, each < 2^bits) into d * bits / 8 bytes. Eight codes at a
// time travel as one uint64_t whose bytes are folded together by shifts.
HWY_INLINE void PackCodes(const uint8_t* codes, int d, int bits, std::byte* out) {
  if (bits == 8) {
    std::memcpy(out, codes, static_cast<size_t>(d));
    return;
  }
  for (int i = 0; i < d / 8; ++i) {
    uint64_t x;
    std::memcpy(&x, codes + 8 * i, sizeof(x));
    if (bits == 4) {
      x = (x | (x >> 4)) & 0x00ff00ff00ff00ffull;
      x = (x | (x >> 8)) & 0x0000ffff0000ffffull;
      x = (x | (x >> 16)) & 0x00000000ffffffffull;
      const uint32_t y = static_cast<uint32_t>(x);
      std::memcpy(out + 4 * i, &y, sizeof(y));
    } else {
      x = (x | (x >> 6)) & 0x000f000f000f000full;
      x = (x | (x >> 12)) & 0x000000ff000000ffull;
      x = (x | (x >> 24)) & 0x000000000000ffffull;
      const uint16_t y = static_cast<uint16_t>(x);
      std::memcpy(out + 2 * i, &y, sizeof(y));
    }
  }
}

// Inverse of PackCodes.
HWY_INLINE void UnpackCodes(const std::byte* in, int d, int bits, uint8_t* codes) {
  if (bits == 8) {
    std::memcpy(codes, in, static_cast<size_t>(d));
    return;
  }
  for (int i = 0; i < d / 8; ++i) {
    uint64_t x;
    if (bits == 4) {
      uint32_t y;
      std::memcpy(&y, in + 4 * i, sizeof(y));
      x = y;
      x = (x | (x << 16)) & 0x0000ffff0000ffffull;
      x = (x | (x << 8)) & 0x00ff00ff00ff00ffull;
      x = (x | (x << 4)) & 0x0f0f0f0f0f0f0f0full;
    } else {
      uint16_t y;
      std::memcpy(&y, in + 2 * i, sizeof(y));
      x = y;
      x = (x | (x << 24)) & 0x000000ff000000ffull;
      x = (x | (x << 12)) & 0x000f000f000f000full;
      x = (x | (x << 6)) & 0x0303030303030303ull;
    }
    std::memcpy(codes + 8 * i, &x, sizeof(x));
  }
}

// codes[c] = clamp(round((x[c] - mn[c]) / scale[c]), 0, levels) for one row of `d` elements
// starting at element `offset` of `src`. A zero scale only occurs for constant groups, where
// x == mn, so dividing by 1 instead yields code 0.
template <DType kDt, class DF>
HWY_INLINE void EncodeRow(DF df, const std::byte* src, size_t offset, const float* mn,
                          const float* scale, int d, float levels, uint8_t* codes) {
  const hn::RebindToSigned<DF> di;
  const hn::Rebind<uint8_t, DF> d8;
  const auto zero = hn::Zero(df);
  const auto one = hn::Set(df, 1.0f);
  const auto top = hn::Set(df, levels);
  const int n = static_cast<int>(hn::Lanes(df));
  for (int c = 0; c < d; c += n) {
    const auto x = LoadF32<kDt>(df, src, offset + static_cast<size_t>(c));
    const auto s = hn::LoadU(df, scale + c);
    const auto safe_s = hn::IfThenElse(hn::Gt(s, zero), s, one);
    auto q = hn::Div(hn::Sub(x, hn::LoadU(df, mn + c)), safe_s);
    q = hn::Min(hn::Max(hn::Round(q), zero), top);
    hn::StoreU(hn::DemoteTo(d8, hn::ConvertTo(di, q)), d8, codes + c);
  }
}

// Row of `d` elements at element `offset` of `dst`: code * scale + mn.
template <DType kDt, class DF>
HWY_INLINE void DecodeRow(DF df, const uint8_t* codes, const float* mn, const float* scale, int d,
                          std::byte* dst, size_t offset) {
  const hn::RebindToSigned<DF> di;
  const hn::Rebind<uint8_t, DF> d8;
  const int n = static_cast<int>(hn::Lanes(df));
  for (int c = 0; c < d; c += n) {
    const auto code = hn::ConvertTo(df, hn::PromoteTo(di, hn::LoadU(d8, codes + c)));
    const auto x = hn::MulAdd(code, hn::LoadU(df, scale + c), hn::LoadU(df, mn + c));
    StoreF32<kDt>(df, x, dst, offset + static_cast<size_t>(c));
  }
}

// Requires Lanes(df) to divide d. Returns false, with `out` partly written, when the page
// holds a non-finite value or a group whose range overflows f32.
template <DType kDt, class DF>
bool QuantizeTyped(DF df, const std::byte* page, int p, int d, int bits, int g,
                   const QuantLayout& layout, std::byte* out) {
  const int n = static_cast<int>(hn::Lanes(df));
  const float levels = static_cast<float>((1 << bits) - 1);
  const auto vlevels = hn::Set(df, levels);
  const size_t row_code_bytes = static_cast<size_t>(d) * bits / 8;
  const size_t block_elems = static_cast<size_t>(p) * d;
  const std::byte* k_block = page;
  const std::byte* v_block = page + block_elems * DTypeSize(kDt);
  HWY_ALIGN float mn[kQuantMaxHeadDim];
  HWY_ALIGN float scale[kQuantMaxHeadDim];
  HWY_ALIGN float row[kQuantMaxHeadDim];
  HWY_ALIGN uint8_t codes[kQuantMaxHeadDim];

  // Keys: per channel, groups of g tokens. `check` stays 0 while every value is finite
  // (x - x is NaN exactly for infinities and NaN), which Min/Max alone would not reveal.
  for (int group = 0; group < p / g; ++group) {
    const size_t t0 = static_cast<size_t>(group) * g;
    for (int c = 0; c < d; c += n) {
      auto lo = LoadF32<kDt>(df, k_block, t0 * d + c);
      auto hi = lo;
      auto check = hn::Sub(lo, lo);
      for (int t = 1; t < g; ++t) {
        const auto x = LoadF32<kDt>(df, k_block, (t0 + t) * d + c);
        lo = hn::Min(lo, x);
        hi = hn::Max(hi, x);
        check = hn::Add(check, hn::Sub(x, x));
      }
      const auto range = hn::Sub(hi, lo);
      check = hn::Add(check, hn::Sub(range, range));
      if (!hn::AllTrue(df, hn::Eq(check, check))) return false;
      hn::StoreU(lo, df, mn + c);
      hn::StoreU(hn::Div(range, vlevels), df, scale + c);
    }
    const size_t param_offset = static_cast<size_t>(group) * d * sizeof(float);
    std::memcpy(out + layout.k_scale + param_offset, scale, d * sizeof(float));
    std::memcpy(out + layout.k_min + param_offset, mn, d * sizeof(float));
    for (int t = 0; t < g; ++t) {
      EncodeRow<kDt>(df, k_block, (t0 + t) * d, mn, scale, d, levels, codes);
      PackCodes(codes, d, bits, out + layout.k_codes + (t0 + t) * row_code_bytes);
    }
  }

  // Values: per token, groups of g channels. The row is widened to f32 once, then each
  // group's parameters are spread over its channels so that encoding is one loop for any g.
  const int groups_per_row = d / g;
  for (int t = 0; t < p; ++t) {
    auto check = hn::Zero(df);
    for (int c = 0; c < d; c += n) {
      const auto x = LoadF32<kDt>(df, v_block, static_cast<size_t>(t) * d + c);
      check = hn::Add(check, hn::Sub(x, x));
      hn::StoreU(x, df, row + c);
    }
    if (!hn::AllTrue(df, hn::Eq(check, check))) return false;
    float group_scale[kQuantMaxHeadDim];
    float group_min[kQuantMaxHeadDim];
    for (int j = 0; j < groups_per_row; ++j) {
      const float* x = row + j * g;
      float lo = x[0];
      float hi = x[0];
      for (int i = 1; i < g; ++i) {
        lo = std::min(lo, x[i]);
        hi = std::max(hi, x[i]);
      }
      const float range = hi - lo;
      if (!std::isfinite(range)) return false;
      group_scale[j] = range / levels;
      group_min[j] = lo;
      std::fill_n(scale + j * g, g, group_scale[j]);
      std::fill_n(mn + j * g, g, lo);
    }
    const size_t param_offset = static_cast<size_t>(t) * groups_per_row * sizeof(float);
    std::memcpy(out + layout.v_scale + param_offset, group_scale, groups_per_row * sizeof(float));
    std::memcpy(out + layout.v_min + param_offset, group_min, groups_per_row * sizeof(float));
    EncodeRow<DType::kF32>(df, reinterpret_cast<const std::byte*>(row), 0, mn, scale, d, levels,
                           codes);
    PackCodes(codes, d, bits, out + layout.v_codes + static_cast<size_t>(t) * row_code_bytes);
  }
  return true;
}

template <DType kDt, class DF>
void DequantizeTyped(DF df, const std::byte* in, int p, int d, int bits, int g,
                     const QuantLayout& layout, std::byte* page) {
  const size_t row_code_bytes = static_cast<size_t>(d) * bits / 8;
  const size_t block_elems = static_cast<size_t>(p) * d;
  std::byte* k_block = page;
  std::byte* v_block = page + block_elems * DTypeSize(kDt);
  HWY_ALIGN float mn[kQuantMaxHeadDim];
  HWY_ALIGN float scale[kQuantMaxHeadDim];
  HWY_ALIGN uint8_t codes[kQuantMaxHeadDim];

  for (int group = 0; group < p / g; ++group) {
    const size_t param_offset = static_cast<size_t>(group) * d * sizeof(float);
    std::memcpy(scale, in + layout.k_scale + param_offset, d * sizeof(float));
    std::memcpy(mn, in + layout.k_min + param_offset, d * sizeof(float));
    for (int i = 0; i < g; ++i) {
      const size_t t = static_cast<size_t>(group) * g + i;
      UnpackCodes(in + layout.k_codes + t * row_code_bytes, d, bits, codes);
      DecodeRow<kDt>(df, codes, mn, scale, d, k_block, t * d);
    }
  }

  const int groups_per_row = d / g;
  for (int t = 0; t < p; ++t) {
    const size_t param_offset = static_cast<size_t>(t) * groups_per_row * sizeof(float);
    for (int j = 0; j < groups_per_row; ++j) {
      float s;
      float m;
      std::memcpy(&s, in + layout.v_scale + param_offset + j * sizeof(float), sizeof(float));
      std::memcpy(&m, in + layout.v_min + param_offset + j * sizeof(float), sizeof(float));
      std::fill_n(scale + j * g, g, s);
      std::fill_n(mn + j * g, g, m);
    }
    UnpackCodes(in + layout.v_codes + static_cast<size_t>(t) * row_code_bytes, d, bits, codes);
    DecodeRow<kDt>(df, codes, mn, scale, d, v_block, static_cast<size_t>(t) * d);
  }
}

template <class DF>
bool QuantizeWithTag(DF df, const std::byte* page, DType dtype, int p, int d, int bits, int g,
                     const QuantLayout& layout, std::byte* out) {
  switch (dtype) {
    case DType::kF32:
      return QuantizeTyped<DType::kF32>(df, page, p, d, bits, g, layout, out);
    case DType::kF16:
      return QuantizeTyped<DType::kF16>(df, page, p, d, bits, g, layout, out);
    case DType::kBF16:
      return QuantizeTyped<DType::kBF16>(df, page, p, d, bits, g, layout, out);
  }
  return false;
}

template <class DF>
void DequantizeWithTag(DF df, const std::byte* in, int p, int d, int bits, int g,
                       const QuantLayout& layout, DType dtype, std::byte* page) {
  switch (dtype) {
    case DType::kF32:
      return DequantizeTyped<DType::kF32>(df, in, p, d, bits, g, layout, page);
    case DType::kF16:
      return DequantizeTyped<DType::kF16>(df, in, p, d, bits, g, layout, page);
    case DType::kBF16:
      return DequantizeTyped<DType::kBF16>(df, in, p, d, bits, g, layout, page);
  }
}

// Full vectors when they tile a row; otherwise at most 8 lanes, which tile every supported
// head_dim (all are multiples of 8).
bool QuantizeImpl(const std::byte* page, DType dtype, int p, int d, int bits, int g,
                  const QuantLayout& layout, std::byte* out) {
  const hn::ScalableTag<float> df;
  if (d % hn::Lanes(df) == 0) return QuantizeWithTag(df, page, dtype, p, d, bits, g, layout, out);
  return QuantizeWithTag(hn::CappedTag<float, 8>(), page, dtype, p, d, bits, g, layout, out);
}

void DequantizeImpl(const std::byte* in, int p, int d, int bits, int g, const QuantLayout& layout,
                    DType dtype, std::byte* page) {
  const hn::ScalableTag<float> df;
  if (d % hn::Lanes(df) == 0) {
    DequantizeWithTag(df, in, p, d, bits, g, layout, dtype, page);
  } else {
    DequantizeWithTag(hn::CappedTag<float, 8>(), in, p, d, bits, g, layout, dtype, page);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace headwise::kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace headwise::kernels {

HWY_EXPORT(QuantizeImpl);
HWY_EXPORT(DequantizeImpl);

namespace {

absl::Status CheckQuantShape(const char* fn, int page_tokens, int head_dim,
                             const QuantParams& params) {
  if (page_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": page_tokens must be positive, got ", page_tokens));
  }
  if (!IsSupportedHeadDim(head_dim) || head_dim > kQuantMaxHeadDim || head_dim % 8 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": unsupported head_dim ", head_dim));
  }
  if (params.bits != 2 && params.bits != 4 && params.bits != 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": bits must be 2, 4 or 8, got ", params.bits));
  }
  const int g = params.group_size;
  if (g < 1 || page_tokens % g != 0 || head_dim % g != 0) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": group_size ", g,
                                                   " must divide page_tokens ", page_tokens,
                                                   " and head_dim ", head_dim));
  }
  return absl::OkStatus();
}

absl::Status CheckDType(const char* fn, DType dtype) {
  if (DTypeSize(dtype) == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": unknown dtype ", static_cast<int>(dtype)));
  }
  return absl::OkStatus();
}

// Only for a shape that passed CheckQuantShape.
QuantLayout MakeLayout(int page_tokens, int head_dim, const QuantParams& params) {
  return MakeQuantLayout(page_tokens, head_dim, params.bits, params.group_size);
}

}  // namespace

int64_t QuantizedPageBytes(int page_tokens, int head_dim, const QuantParams& params) {
  if (!CheckQuantShape("QuantizedPageBytes", page_tokens, head_dim, params).ok()) return 0;
  return MakeLayout(page_tokens, head_dim, params).total;
}

absl::Status QuantizePage(const std::byte* page, DType dtype, int page_tokens, int head_dim,
                          const QuantParams& params, std::byte* out) {
  if (page == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("QuantizePage: page and out are required");
  }
  if (absl::Status s = CheckDType("QuantizePage", dtype); !s.ok()) return s;
  if (absl::Status s = CheckQuantShape("QuantizePage", page_tokens, head_dim, params); !s.ok()) {
    return s;
  }
  const QuantLayout layout = MakeLayout(page_tokens, head_dim, params);
  if (!HWY_DYNAMIC_DISPATCH(QuantizeImpl)(page, dtype, page_tokens, head_dim, params.bits,
                                          params.group_size, layout, out)) {
    return absl::InvalidArgumentError(
        "QuantizePage: the page holds a non-finite value or a group range beyond f32");
  }
  return absl::OkStatus();
}

absl::Status DequantizePage(const std::byte* quantized, int page_tokens, int head_dim,
                            const QuantParams& params, DType dtype, std::byte* page) {
  if (quantized == nullptr || page == nullptr) {
    return absl::InvalidArgumentError("DequantizePage: quantized and page are required");
  }
  if (absl::Status s = CheckDType("DequantizePage", dtype); !s.ok()) return s;
  if (absl::Status s = CheckQuantShape("DequantizePage", page_tokens, head_dim, params); !s.ok()) {
    return s;
  }
  const QuantLayout layout = MakeLayout(page_tokens, head_dim, params);
  HWY_DYNAMIC_DISPATCH(DequantizeImpl)
  (quantized, page_tokens, head_dim, params.bits, params.group_size, layout, dtype, page);
  return absl::OkStatus();
}

}  // namespace headwise::kernels
#endif  // HWY_ONCE
