// Merge of partial attention states (FlashAttention's merge_state), policies.md §0.2.

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_attention.h"

namespace headwise::kernels::cpu {

void MergeStates(const float* const* o_parts, const float* const* lse_parts, int num_parts,
                 int rows, int head_dim, float* o_out, float* lse_out) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  std::vector<float> weights(num_parts);
  std::vector<float> row(head_dim);
  for (int r = 0; r < rows; ++r) {
    float max_lse = kNegInf;
    for (int p = 0; p < num_parts; ++p) max_lse = std::max(max_lse, lse_parts[p][r]);
    float* out = o_out + int64_t{r} * head_dim;
    if (max_lse == kNegInf) {  // No part saw a token.
      std::fill(out, out + head_dim, 0.0f);
      lse_out[r] = kNegInf;
      continue;
    }
    // Weights relative to the largest part keep every exponent <= 0.
    double sum = 0.0;
    for (int p = 0; p < num_parts; ++p) {
      weights[p] = std::exp(lse_parts[p][r] - max_lse);
      sum += weights[p];
    }
    std::fill(row.begin(), row.end(), 0.0f);
    for (int p = 0; p < num_parts; ++p) {
      const float w = static_cast<float>(weights[p] / sum);
      if (w == 0.0f) continue;
      const float* part = o_parts[p] + int64_t{r} * head_dim;
      for (int c = 0; c < head_dim; ++c) row[c] += w * part[c];
    }
    // Written last so that o_out may alias o_parts[0].
    std::copy(row.begin(), row.end(), out);
    lse_out[r] = max_lse + static_cast<float>(std::log(sum));
  }
}

}  // namespace headwise::kernels::cpu
