// Checkpoint: the weights of a llama2.c model file (karpathy/llama2.c `run.c` format, "version 0").
//
// File layout: a header of 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
// vocab_size, seq_len), then float32 tensors in this order: token_embedding [vocab][dim],
// rms_att [layers][dim], wq [layers][dim][dim], wk [layers][kv_dim][dim], wv [layers][kv_dim][dim],
// wo [layers][dim][dim], rms_ffn [layers][dim], w1 [layers][hidden][dim], w2 [layers][dim][hidden],
// w3 [layers][hidden][dim], rms_final [dim], then 2 * seq_len * head_size / 2 floats of legacy
// RoPE tables (skipped), then the classifier wcls [vocab][dim] only when vocab_size < 0 in the
// header (a positive vocab_size means the classifier shares the token embedding).
// Matrices are row-major [out][in], as run.c's matmul reads them.
#ifndef HEADWISE_CLIENTS_LLAMA2_CHECKPOINT_H_
#define HEADWISE_CLIENTS_LLAMA2_CHECKPOINT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace headwise::llama2 {

struct ModelConfig {
  int dim = 0;         // Residual stream width.
  int hidden_dim = 0;  // SwiGLU hidden width.
  int n_layers = 0;
  int n_heads = 0;     // Query heads.
  int n_kv_heads = 0;  // KV heads (GQA when fewer than n_heads).
  int vocab_size = 0;  // Always positive here; shared_classifier records the header's sign.
  int seq_len = 0;     // Maximum context the model was trained for.
  bool shared_classifier = true;

  int head_size() const { return dim / n_heads; }
  int kv_dim() const { return n_kv_heads * head_size(); }
};

// Owns every weight; the pointers below point into `storage`, so a Checkpoint is move-only.
struct Checkpoint {
  ModelConfig config;
  std::vector<float> storage;
  const float* token_embedding = nullptr;  // [vocab][dim]
  const float* rms_att = nullptr;          // [layers][dim]
  const float* wq = nullptr;               // [layers][dim][dim]
  const float* wk = nullptr;               // [layers][kv_dim][dim]
  const float* wv = nullptr;               // [layers][kv_dim][dim]
  const float* wo = nullptr;               // [layers][dim][dim]
  const float* rms_ffn = nullptr;          // [layers][dim]
  const float* w1 = nullptr;               // [layers][hidden][dim]
  const float* w2 = nullptr;               // [layers][dim][hidden]
  const float* w3 = nullptr;               // [layers][hidden][dim]
  const float* rms_final = nullptr;        // [dim]
  const float* wcls = nullptr;             // [vocab][dim]; == token_embedding when shared.

  Checkpoint() = default;
  Checkpoint(Checkpoint&&) = default;
  Checkpoint& operator=(Checkpoint&&) = default;
  Checkpoint(const Checkpoint&) = delete;
  Checkpoint& operator=(const Checkpoint&) = delete;
};

// Parses a whole checkpoint file held in memory. INVALID_ARGUMENT for a header with a
// non-positive or inconsistent field (dim not a multiple of n_heads, n_heads not a multiple of
// n_kv_heads, odd head size, absurd sizes); DATA_LOSS when the byte count differs from what the
// header implies (truncated or trailing data). Never reads out of bounds.
absl::StatusOr<Checkpoint> ParseCheckpoint(const std::string& bytes);

// Reads and parses `path`. NOT_FOUND when it cannot be opened; otherwise ParseCheckpoint's errors.
absl::StatusOr<Checkpoint> LoadCheckpoint(const std::string& path);

// Reads a whole file. NOT_FOUND when it cannot be opened, DATA_LOSS on a read error.
absl::StatusOr<std::string> ReadFileBytes(const std::string& path);

}  // namespace headwise::llama2

#endif  // HEADWISE_CLIENTS_LLAMA2_CHECKPOINT_H_
