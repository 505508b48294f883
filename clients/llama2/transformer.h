// Transformer: the llama2 forward pass (RMSNorm, RoPE, GQA attention, SwiGLU, shared or separate
// classifier) for one token at a time, with llama2.c run.c's arithmetic everywhere except
// attention, which a KvBackend computes over the KV it stores. The Transformer keeps no KV cache.
//
// Generate() is run.c's `generate` loop: prompt tokens are forced, the rest sampled, and BOS
// ends the text.
//
// Thread-compatible: one Transformer per generation; several may share a backend.
#ifndef HEADWISE_CLIENTS_LLAMA2_TRANSFORMER_H_
#define HEADWISE_CLIENTS_LLAMA2_TRANSFORMER_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cachesvc/base/ids.h"
#include "cachesvc/base/layout.h"
#include "clients/llama2/checkpoint.h"
#include "clients/llama2/kv_backend.h"
#include "clients/llama2/sampler.h"
#include "clients/llama2/tokenizer.h"
#include "headwise/v1/policy.pb.h"

namespace headwise::llama2 {

struct TransformerOptions {
  // Tokens per KV page in the backend; a power of two (ModelLayout). Transformers sharing a
  // backend may differ (an engine serves layouts of several page sizes). Default: 16.
  int page_tokens = 16;
  // The sequence's policy (placement, eviction such as StreamingLLM). Default: keep everything.
  headwise::v1::PolicySpec policy;
};

// A PolicySpec with StreamingLLM eviction keeping `sink_tokens` + `recent_tokens` (page aligned;
// see policy.proto).
headwise::v1::PolicySpec StreamingLlmPolicy(int64_t sink_tokens, int64_t recent_tokens);

// The ModelLayout (f32 KV, head_dim = head size) of `config` with `page_tokens`.
ModelLayout LayoutFor(const ModelConfig& config, int page_tokens);

class Transformer {
 public:
  // Registers the model's layout with `backend` and creates a sequence. `checkpoint` and
  // `backend` are not owned and must outlive the Transformer. The backend's errors (e.g.
  // INVALID_ARGUMENT for an unsupported head size or page size).
  static absl::StatusOr<std::unique_ptr<Transformer>> Create(const Checkpoint* checkpoint,
                                                             KvBackend* backend,
                                                             const TransformerOptions& options);
  // Releases the sequence.
  ~Transformer();
  Transformer(const Transformer&) = delete;
  Transformer& operator=(const Transformer&) = delete;

  // Runs `token` at position pos() (then pos() advances) and returns the vocab_size logits,
  // valid until the next call. INVALID_ARGUMENT for a token outside the vocabulary;
  // OUT_OF_RANGE once pos() reaches the model's seq_len; the backend's errors (after which the
  // sequence is in an unknown state: Reset() it).
  absl::StatusOr<absl::Span<float>> Forward(int token);

  // Releases the sequence and starts a fresh one at position 0.
  absl::Status Reset();

  int pos() const { return pos_; }
  const ModelConfig& config() const { return checkpoint_->config; }
  const ModelLayout& layout() const { return layout_; }
  const SequenceId& sequence() const { return sequence_; }
  KvBackend& backend() { return *backend_; }

 private:
  Transformer(const Checkpoint* checkpoint, KvBackend* backend, const TransformerOptions& options);

  const Checkpoint* const checkpoint_;
  KvBackend* const backend_;
  const TransformerOptions options_;
  ModelLayout layout_;
  std::string layout_name_;
  SequenceId sequence_;
  bool has_sequence_ = false;
  int pos_ = 0;
  // Activations (run.c's RunState without its KV cache).
  std::vector<float> x_, xb_, xb2_, hb_, hb2_, q_, k_, v_, lse_, logits_;
};

struct GenerationResult {
  std::vector<int> prompt_tokens;  // Encoded prompt, BOS first.
  // The token fed at each position (tokens[0] is BOS) followed by the last one produced; the
  // input at position p is tokens[p] and the output tokens[p + 1].
  std::vector<int> tokens;
  std::string text;    // Decoded output (run.c's printed text, without the unprintable bytes).
  int positions = 0;   // Forward passes run.
  double seconds = 0;  // From the end of the first forward pass to the end, as run.c times it.
  // (positions - 1) / seconds, run.c's "achieved tok/s"; 0 when fewer than 2 positions ran.
  double tokens_per_second = 0;
};

// run.c's generate: encodes `prompt` with BOS, runs up to `steps` positions (capped at seq_len),
// forcing prompt tokens and sampling the rest, stopping early when BOS is produced. Each printable
// piece is passed to `on_piece` as it is produced. FAILED_PRECONDITION unless the Transformer is
// at position 0 (call Reset() between generations); Forward's errors.
absl::StatusOr<GenerationResult> Generate(
    Transformer& transformer, const Tokenizer& tokenizer, Sampler& sampler, std::string_view prompt,
    int steps, absl::FunctionRef<void(std::string_view)> on_piece = [](std::string_view) {});

}  // namespace headwise::llama2

#endif  // HEADWISE_CLIENTS_LLAMA2_TRANSFORMER_H_
