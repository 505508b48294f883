// MergeTokens (kernels/attention.h, policies.md §6.0). Plain scalar code: a merge touches a
// handful of rows, far from any hot loop.

#include <cmath>
#include <cstddef>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cachesvc/base/dtype.h"
#include "cachesvc/base/layout.h"
#include "kernels/attention.h"

namespace headwise::kernels {

absl::Status MergeTokens(const std::byte* k, const std::byte* v, const float* counts, int n,
                         int head_dim, DType dtype, std::byte* k_out, std::byte* v_out,
                         float* bias_out) {
  if (k == nullptr || v == nullptr || k_out == nullptr || v_out == nullptr || bias_out == nullptr) {
    return absl::InvalidArgumentError("MergeTokens: k, v, k_out, v_out and bias_out are required");
  }
  if (n < 1) {
    return absl::InvalidArgumentError(absl::StrCat("MergeTokens: n must be positive, got ", n));
  }
  if (!IsSupportedHeadDim(head_dim)) {
    return absl::InvalidArgumentError(absl::StrCat("MergeTokens: unsupported head_dim ", head_dim));
  }
  if (DTypeSize(dtype) == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("MergeTokens: unknown dtype ", static_cast<int>(dtype)));
  }
  // Sums in double: a representative may already stand for very many tokens, and the
  // weighted mean should not lose precision to f32 accumulation.
  double total = 0.0;
  for (int i = 0; i < n; ++i) {
    const float c = counts == nullptr ? 1.0f : counts[i];
    if (!(c > 0.0f) || !std::isfinite(c)) {
      return absl::InvalidArgumentError(
          absl::StrCat("MergeTokens: counts[", i, "] must be positive and finite, got ", c));
    }
    total += c;
  }

  const size_t d = static_cast<size_t>(head_dim);
  std::vector<double> k_sum(d, 0.0);
  std::vector<double> v_sum(d, 0.0);
  for (int i = 0; i < n; ++i) {
    const double w = counts == nullptr ? 1.0 : counts[i];
    const size_t row = static_cast<size_t>(i) * d;
    for (size_t c = 0; c < d; ++c) {
      k_sum[c] += w * LoadAsFloat(k, dtype, row + c);
      v_sum[c] += w * LoadAsFloat(v, dtype, row + c);
    }
  }
  // Every input is read before any output is written, so the outputs may alias the inputs.
  for (size_t c = 0; c < d; ++c) {
    StoreFromFloat(k_out, dtype, c, static_cast<float>(k_sum[c] / total));
    StoreFromFloat(v_out, dtype, c, static_cast<float>(v_sum[c] / total));
  }
  *bias_out = static_cast<float>(std::log(total));
  return absl::OkStatus();
}

}  // namespace headwise::kernels
