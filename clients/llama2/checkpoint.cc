#include "clients/llama2/checkpoint.h"

#include <cstring>
#include <fstream>
#include <iterator>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace headwise::llama2 {
namespace {

constexpr int kHeaderInts = 7;
// Bounds that keep every size computation far from int64 overflow.
constexpr int64_t kMaxDimension = int64_t{1} << 20;
constexpr int64_t kMaxLayers = 4096;

absl::Status ValidateConfig(const ModelConfig& c) {
  const std::pair<const char*, int64_t> fields[] = {
      {"dim", c.dim},         {"hidden_dim", c.hidden_dim}, {"n_layers", c.n_layers},
      {"n_heads", c.n_heads}, {"n_kv_heads", c.n_kv_heads}, {"vocab_size", c.vocab_size},
      {"seq_len", c.seq_len}};
  for (const auto& [name, value] : fields) {
    if (value <= 0 || value > kMaxDimension) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint header: ", name, " = ", value,
                                                     " is out of range [1, ", kMaxDimension, "]"));
    }
  }
  if (c.n_layers > kMaxLayers) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint header: n_layers = ", c.n_layers));
  }
  if (c.dim % c.n_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint header: dim ", c.dim,
                                                   " is not a multiple of n_heads ", c.n_heads));
  }
  if (c.n_heads % c.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint header: n_heads ", c.n_heads,
                                                   " is not a multiple of n_kv_heads ",
                                                   c.n_kv_heads));
  }
  if (c.head_size() % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("checkpoint header: head size ", c.head_size(), " is odd (RoPE needs pairs)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> ReadFileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::DataLossError(absl::StrCat("read error on ", path));
  return bytes;
}

absl::StatusOr<Checkpoint> ParseCheckpoint(const std::string& bytes) {
  constexpr size_t kHeaderBytes = kHeaderInts * sizeof(int32_t);
  if (bytes.size() < kHeaderBytes) {
    return absl::DataLossError(absl::StrCat(
        "checkpoint has ", bytes.size(), " bytes, fewer than its ", kHeaderBytes, "-byte header"));
  }
  int32_t header[kHeaderInts];
  std::memcpy(header, bytes.data(), kHeaderBytes);
  Checkpoint ckpt;
  ModelConfig& c = ckpt.config;
  c.dim = header[0];
  c.hidden_dim = header[1];
  c.n_layers = header[2];
  c.n_heads = header[3];
  c.n_kv_heads = header[4];
  c.shared_classifier = header[5] > 0;
  // A negative vocab_size flags an unshared classifier; INT32_MIN has no magnitude: reject it.
  c.vocab_size = header[5] == INT32_MIN ? 0 : (header[5] < 0 ? -header[5] : header[5]);
  c.seq_len = header[6];
  if (absl::Status s = ValidateConfig(c); !s.ok()) return s;

  const int64_t dim = c.dim, hidden = c.hidden_dim, layers = c.n_layers, vocab = c.vocab_size;
  const int64_t kv_dim = c.kv_dim();
  const int64_t tensor_sizes[] = {
      vocab * dim,                            // token_embedding
      layers * dim,                           // rms_att
      layers * dim * dim,                     // wq
      layers * kv_dim * dim,                  // wk
      layers * kv_dim * dim,                  // wv
      layers * dim * dim,                     // wo
      layers * dim,                           // rms_ffn
      layers * hidden * dim,                  // w1
      layers * dim * hidden,                  // w2
      layers * hidden * dim,                  // w3
      dim,                                    // rms_final
      int64_t{c.seq_len} * c.head_size(),     // legacy RoPE tables (real and imaginary halves)
      c.shared_classifier ? 0 : vocab * dim,  // wcls
  };
  int64_t total_floats = 0;
  for (int64_t n : tensor_sizes) total_floats += n;
  const int64_t expected_bytes = static_cast<int64_t>(kHeaderBytes) + total_floats * 4;
  if (static_cast<int64_t>(bytes.size()) != expected_bytes) {
    return absl::DataLossError(absl::StrCat(
        "checkpoint has ", bytes.size(), " bytes but its header (dim ", c.dim, ", hidden ",
        c.hidden_dim, ", layers ", c.n_layers, ", heads ", c.n_heads, "/", c.n_kv_heads, ", vocab ",
        c.vocab_size, c.shared_classifier ? " shared" : " unshared", ", seq_len ", c.seq_len,
        ") implies ", expected_bytes,
        bytes.size() < static_cast<size_t>(expected_bytes) ? ": truncated" : ": trailing data"));
  }
  ckpt.storage.resize(static_cast<size_t>(total_floats));
  std::memcpy(ckpt.storage.data(), bytes.data() + kHeaderBytes, total_floats * sizeof(float));

  const float* p = ckpt.storage.data();
  const float** targets[] = {
      &ckpt.token_embedding, &ckpt.rms_att, &ckpt.wq, &ckpt.wk, &ckpt.wv,       &ckpt.wo,
      &ckpt.rms_ffn,         &ckpt.w1,      &ckpt.w2, &ckpt.w3, &ckpt.rms_final};
  for (size_t i = 0; i < std::size(targets); ++i) {
    *targets[i] = p;
    p += tensor_sizes[i];
  }
  p += tensor_sizes[11];  // Skip the legacy RoPE tables.
  ckpt.wcls = c.shared_classifier ? ckpt.token_embedding : p;
  return ckpt;
}

absl::StatusOr<Checkpoint> LoadCheckpoint(const std::string& path) {
  absl::StatusOr<std::string> bytes = ReadFileBytes(path);
  if (!bytes.ok()) return bytes.status();
  absl::StatusOr<Checkpoint> ckpt = ParseCheckpoint(*bytes);
  if (!ckpt.ok()) {
    return absl::Status(ckpt.status().code(), absl::StrCat(path, ": ", ckpt.status().message()));
  }
  return ckpt;
}

}  // namespace headwise::llama2
