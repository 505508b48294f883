#include "clients/llama2/transformer.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"

namespace headwise::llama2 {
namespace {

// run.c's rmsnorm (eps 1e-5), float accumulation in index order.
void RmsNorm(float* out, const float* x, const float* weight, int size) {
  float ss = 0.0f;
  for (int j = 0; j < size; ++j) ss += x[j] * x[j];
  ss /= static_cast<float>(size);
  ss += 1e-5f;
  ss = 1.0f / std::sqrt(ss);
  for (int j = 0; j < size; ++j) out[j] = weight[j] * (ss * x[j]);
}

// run.c's matmul: out[d] = W[d][n] @ x[n], float accumulation in index order.
void MatMul(float* out, const float* x, const float* w, int n, int d) {
  for (int i = 0; i < d; ++i) {
    const float* row = w + static_cast<int64_t>(i) * n;
    float val = 0.0f;
    for (int j = 0; j < n; ++j) val += row[j] * x[j];
    out[i] = val;
  }
}

}  // namespace

headwise::v1::PolicySpec StreamingLlmPolicy(int64_t sink_tokens, int64_t recent_tokens) {
  headwise::v1::PolicySpec spec;
  auto* streaming = spec.mutable_eviction()->mutable_streaming_llm();
  streaming->set_sink_tokens(sink_tokens);
  streaming->set_recent_tokens(recent_tokens);
  return spec;
}

ModelLayout LayoutFor(const ModelConfig& config, int page_tokens) {
  ModelLayout layout;
  layout.num_layers = config.n_layers;
  layout.num_q_heads = config.n_heads;
  layout.num_kv_heads = config.n_kv_heads;
  layout.head_dim = config.head_size();
  layout.dtype = DType::kF32;
  layout.page_tokens = page_tokens;
  return layout;
}

Transformer::Transformer(const Checkpoint* checkpoint, KvBackend* backend,
                         const TransformerOptions& options)
    : checkpoint_(checkpoint),
      backend_(backend),
      options_(options),
      layout_(LayoutFor(checkpoint->config, options.page_tokens)) {
  const ModelConfig& c = checkpoint->config;
  layout_name_ = absl::StrCat("llama2-d", c.dim, "-l", c.n_layers, "-h", c.n_heads, "-kv",
                              c.n_kv_heads, "-p", options.page_tokens, "-f32");
  x_.resize(c.dim);
  xb_.resize(c.dim);
  xb2_.resize(c.dim);
  hb_.resize(c.hidden_dim);
  hb2_.resize(c.hidden_dim);
  q_.resize(c.dim);
  k_.resize(c.kv_dim());
  v_.resize(c.kv_dim());
  lse_.resize(c.n_heads);
  logits_.resize(c.vocab_size);
}

absl::StatusOr<std::unique_ptr<Transformer>> Transformer::Create(
    const Checkpoint* checkpoint, KvBackend* backend, const TransformerOptions& options) {
  if (checkpoint == nullptr || backend == nullptr) {
    return absl::InvalidArgumentError("Transformer::Create: null checkpoint or backend");
  }
  std::unique_ptr<Transformer> t(new Transformer(checkpoint, backend, options));
  RETURN_IF_ERROR(backend->RegisterLayout(t->layout_name_, t->layout_));
  RETURN_IF_ERROR(t->Reset());
  return t;
}

Transformer::~Transformer() {
  if (has_sequence_) backend_->ReleaseSequence(sequence_).IgnoreError();
}

absl::Status Transformer::Reset() {
  if (has_sequence_) {
    has_sequence_ = false;
    RETURN_IF_ERROR(backend_->ReleaseSequence(sequence_));
  }
  ASSIGN_OR_RETURN(sequence_, backend_->CreateSequence(layout_name_, options_.policy));
  has_sequence_ = true;
  pos_ = 0;
  return absl::OkStatus();
}

absl::StatusOr<absl::Span<float>> Transformer::Forward(int token) {
  const ModelConfig& c = checkpoint_->config;
  const Checkpoint& w = *checkpoint_;
  if (token < 0 || token >= c.vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("token ", token, " outside the vocabulary [0, ", c.vocab_size, ")"));
  }
  if (pos_ >= c.seq_len) {
    return absl::OutOfRangeError(absl::StrCat("position ", pos_, " is past seq_len ", c.seq_len));
  }
  const int dim = c.dim, kv_dim = c.kv_dim(), hidden = c.hidden_dim, head_size = c.head_size();
  const int64_t dim2 = int64_t{dim} * dim, dim_kv = int64_t{dim} * kv_dim;
  const int64_t dim_hidden = int64_t{dim} * hidden;
  float* x = x_.data();
  std::memcpy(x, w.token_embedding + int64_t{token} * dim, dim * sizeof(float));

  for (int l = 0; l < c.n_layers; ++l) {
    RmsNorm(xb_.data(), x, w.rms_att + int64_t{l} * dim, dim);
    MatMul(q_.data(), xb_.data(), w.wq + l * dim2, dim, dim);
    MatMul(k_.data(), xb_.data(), w.wk + l * dim_kv, dim, kv_dim);
    MatMul(v_.data(), xb_.data(), w.wv + l * dim_kv, dim, kv_dim);

    // RoPE exactly as run.c: rotate pairs (i, i+1) of q (and of k while i < kv_dim) by pos * freq,
    // freq = 1 / 10000^(index within head / head_size).
    for (int i = 0; i < dim; i += 2) {
      const int head_dim = i % head_size;
      const float freq = 1.0f / std::pow(10000.0f, head_dim / static_cast<float>(head_size));
      const float val = static_cast<float>(pos_) * freq;
      const float fcr = std::cos(val);
      const float fci = std::sin(val);
      const int rotations = i < kv_dim ? 2 : 1;
      for (int r = 0; r < rotations; ++r) {
        float* vec = r == 0 ? q_.data() : k_.data();
        const float v0 = vec[i];
        const float v1 = vec[i + 1];
        vec[i] = v0 * fcr - v1 * fci;
        vec[i + 1] = v0 * fci + v1 * fcr;
      }
    }

    // Attention over the backend's cache; the output lands in xb.
    RETURN_IF_ERROR(backend_->AppendAndAttend(sequence_, LayerId(l), q_, k_, v_,
                                              absl::MakeSpan(xb_), absl::MakeSpan(lse_)));

    MatMul(xb2_.data(), xb_.data(), w.wo + l * dim2, dim, dim);
    for (int i = 0; i < dim; ++i) x[i] += xb2_[i];

    RmsNorm(xb_.data(), x, w.rms_ffn + int64_t{l} * dim, dim);
    MatMul(hb_.data(), xb_.data(), w.w1 + l * dim_hidden, dim, hidden);
    MatMul(hb2_.data(), xb_.data(), w.w3 + l * dim_hidden, dim, hidden);
    for (int i = 0; i < hidden; ++i) {
      float val = hb_[i];
      val *= (1.0f / (1.0f + std::exp(-val)));  // SiLU
      val *= hb2_[i];
      hb_[i] = val;
    }
    MatMul(xb_.data(), hb_.data(), w.w2 + l * dim_hidden, hidden, dim);
    for (int i = 0; i < dim; ++i) x[i] += xb_[i];
  }

  RmsNorm(x, x, w.rms_final, dim);
  MatMul(logits_.data(), x, w.wcls, dim, c.vocab_size);
  ++pos_;
  return absl::MakeSpan(logits_);
}

absl::StatusOr<GenerationResult> Generate(Transformer& transformer, const Tokenizer& tokenizer,
                                          Sampler& sampler, std::string_view prompt, int steps,
                                          absl::FunctionRef<void(std::string_view)> on_piece) {
  if (transformer.pos() != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Generate needs a fresh sequence; the transformer is at position ", transformer.pos()));
  }
  const int seq_len = transformer.config().seq_len;
  if (steps <= 0 || steps > seq_len) steps = seq_len;  // run.c's rule.
  GenerationResult result;
  result.prompt_tokens = tokenizer.Encode(prompt, /*bos=*/true, /*eos=*/false);
  const std::vector<int>& prompt_tokens = result.prompt_tokens;

  using Clock = std::chrono::steady_clock;
  Clock::time_point start;
  bool started = false;
  int token = prompt_tokens[0];
  result.tokens.push_back(token);
  int pos = 0;
  while (pos < steps) {
    ASSIGN_OR_RETURN(absl::Span<float> logits, transformer.Forward(token));
    int next;
    if (pos < static_cast<int>(prompt_tokens.size()) - 1) {
      next = prompt_tokens[pos + 1];
    } else {
      next = sampler.Sample(logits);
    }
    ++pos;
    if (next == kBosToken) break;  // BOS delimits sequences.
    result.tokens.push_back(next);
    const std::string piece = tokenizer.Decode(token, next);
    if (Tokenizer::IsPrintable(piece)) {
      result.text += piece;
      on_piece(piece);
    }
    token = next;
    if (!started) {
      start = Clock::now();
      started = true;
    }
  }
  result.positions = pos;
  if (pos > 1 && started) {
    result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    if (result.seconds > 0) result.tokens_per_second = (pos - 1) / result.seconds;
  }
  return result;
}

}  // namespace headwise::llama2
