// ModelLayout: the shape of one model's KV cache, registered once per model.
#ifndef HEADWISE_CACHESVC_BASE_LAYOUT_H_
#define HEADWISE_CACHESVC_BASE_LAYOUT_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "cachesvc/base/dtype.h"

namespace headwise {

struct ModelLayout {
  // Number of decoder layers. Valid: 1..1024.
  int num_layers = 0;
  // Query heads per layer. Valid: a positive multiple of num_kv_heads, at most 1024.
  int num_q_heads = 0;
  // KV heads per layer. Valid: 1..256.
  int num_kv_heads = 0;
  // Elements per head vector. Valid: 8, 16, 32, 64, 96, 128, 256.
  int head_dim = 0;
  // Storage dtype of K and V pages. Default: f16.
  DType dtype = DType::kF16;
  // Tokens per page (one page holds one (layer, kv head)). Valid: a power of two in 16..1024;
  // smaller powers of two (down to 1) are accepted for tests and tiny models. Default: 64.
  int page_tokens = 64;

  // GQA group size: query heads served by one KV head.
  int group_size() const { return num_q_heads / num_kv_heads; }
  // Bytes of K plus V for one token of one (layer, kv head).
  int64_t token_bytes_per_head() const { return 2 * int64_t{head_dim} * DTypeSize(dtype); }
  // Bytes of one page: K block [page_tokens][head_dim] followed by V block of the same shape.
  int64_t page_bytes() const { return page_tokens * token_bytes_per_head(); }
  // Bytes of KV for one token over every layer and KV head.
  int64_t token_bytes() const { return token_bytes_per_head() * num_kv_heads * num_layers; }

  std::string DebugString() const;
};

// OK when every field is in its valid range; INVALID_ARGUMENT naming the first bad field.
absl::Status ValidateLayout(const ModelLayout& layout);

// True when head_dim is one the kernels support.
bool IsSupportedHeadDim(int head_dim);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_BASE_LAYOUT_H_
