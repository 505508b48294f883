// Internal: byte offsets of the parts of a KIVI page (the layout documented at the top of
// kernels/cpu/quantize.cc and in docs/kernels.md), shared by the quantizer and the attention
// kernels that read KIVI pages directly.
#ifndef HEADWISE_KERNELS_CPU_QUANT_LAYOUT_H_
#define HEADWISE_KERNELS_CPU_QUANT_LAYOUT_H_

#include <cstdint>

namespace headwise::kernels {

struct QuantLayout {
  int64_t k_codes = 0;  // K codes, token-major, D * bits / 8 bytes per token.
  int64_t v_codes = 0;  // V codes, same packing.
  int64_t k_scale = 0;  // f32 [P / G][D]
  int64_t k_min = 0;    // f32 [P / G][D]
  int64_t v_scale = 0;  // f32 [P][D / G]
  int64_t v_min = 0;    // f32 [P][D / G]
  int64_t total = 0;
};

// Only for a shape the quantizer accepts (G divides P and D; D * bits a multiple of 8).
constexpr QuantLayout MakeQuantLayout(int page_tokens, int head_dim, int bits, int group_size) {
  const int64_t p = page_tokens;
  const int64_t d = head_dim;
  const int64_t g = group_size;
  const int64_t code_bytes = p * d * bits / 8;
  const int64_t k_params = (p / g) * d * int64_t{sizeof(float)};
  const int64_t v_params = p * (d / g) * int64_t{sizeof(float)};
  QuantLayout layout;
  layout.k_codes = 0;
  layout.v_codes = code_bytes;
  layout.k_scale = 2 * code_bytes;
  layout.k_min = layout.k_scale + k_params;
  layout.v_scale = layout.k_min + k_params;
  layout.v_min = layout.v_scale + v_params;
  layout.total = layout.v_min + v_params;
  return layout;
}

}  // namespace headwise::kernels

#endif  // HEADWISE_KERNELS_CPU_QUANT_LAYOUT_H_
