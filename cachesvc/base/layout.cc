#include "cachesvc/base/layout.h"

#include "absl/strings/str_format.h"

namespace headwise {

bool IsSupportedHeadDim(int head_dim) {
  switch (head_dim) {
    case 8:
    case 16:
    case 32:
    case 64:
    case 96:
    case 128:
    case 256:
      return true;
    default:
      return false;
  }
}

std::string ModelLayout::DebugString() const {
  return absl::StrFormat("layers=%d q_heads=%d kv_heads=%d head_dim=%d dtype=%s page_tokens=%d",
                         num_layers, num_q_heads, num_kv_heads, head_dim, DTypeName(dtype),
                         page_tokens);
}

absl::Status ValidateLayout(const ModelLayout& layout) {
  auto bad = [&](const char* what) {
    return absl::InvalidArgumentError(
        absl::StrFormat("layout: %s (%s)", what, layout.DebugString()));
  };
  if (layout.num_layers < 1 || layout.num_layers > 1024) return bad("num_layers must be 1..1024");
  if (layout.num_kv_heads < 1 || layout.num_kv_heads > 256) {
    return bad("num_kv_heads must be 1..256");
  }
  if (layout.num_q_heads < layout.num_kv_heads || layout.num_q_heads > 1024 ||
      layout.num_q_heads % layout.num_kv_heads != 0) {
    return bad("num_q_heads must be a multiple of num_kv_heads, at most 1024");
  }
  if (!IsSupportedHeadDim(layout.head_dim)) {
    return bad("head_dim must be one of 8, 16, 32, 64, 96, 128, 256");
  }
  const int p = layout.page_tokens;
  if (p < 1 || p > 1024 || (p & (p - 1)) != 0) {
    return bad("page_tokens must be a power of two in 1..1024");
  }
  switch (layout.dtype) {
    case DType::kF32:
    case DType::kF16:
    case DType::kBF16:
      break;
    default:
      return bad("unknown dtype");
  }
  return absl::OkStatus();
}

}  // namespace headwise
