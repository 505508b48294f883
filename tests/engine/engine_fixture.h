// Test helpers for the engine: random K/V streams kept alongside the engine (as the stored,
// dtype-rounded values) and float64 reference attention over any subset of a head's tokens.
#ifndef HEADWISE_TESTS_ENGINE_ENGINE_FIXTURE_H_
#define HEADWISE_TESTS_ENGINE_ENGINE_FIXTURE_H_

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "cachesvc/base/dtype.h"
#include "cachesvc/base/layout.h"
#include "tests/kernels/paged_kv_fixture.h"

namespace headwise::testing {

using kernels::testing::MaxRelError;
using kernels::testing::RandomFloats;
using kernels::testing::ReferenceAttention;
using kernels::testing::ReferenceResult;

// One chunk of K and V: [T][num_kv_heads][head_dim] in the layout's dtype.
struct KvChunk {
  int num_tokens = 0;
  std::vector<std::byte> k;
  std::vector<std::byte> v;
};

// Everything appended to one sequence, per layer, as the stored (rounded) values.
class KvHistory {
 public:
  explicit KvHistory(const ModelLayout& layout)
      : layout_(layout), k_(layout.num_layers), v_(layout.num_layers) {}

  // Fresh random K/V of `num_tokens` tokens (never zeros).
  KvChunk MakeChunk(int num_tokens, uint32_t seed) const {
    KvChunk c;
    c.num_tokens = num_tokens;
    const int64_t n = int64_t{num_tokens} * layout_.num_kv_heads * layout_.head_dim;
    const std::vector<float> k = RandomFloats(n, seed);
    const std::vector<float> v = RandomFloats(n, seed ^ 0x9e3779b9u);
    c.k.resize(n * DTypeSize(layout_.dtype));
    c.v.resize(n * DTypeSize(layout_.dtype));
    for (int64_t i = 0; i < n; ++i) {
      StoreFromFloat(c.k.data(), layout_.dtype, i, k[i]);
      StoreFromFloat(c.v.data(), layout_.dtype, i, v[i]);
    }
    return c;
  }

  // Records `chunk` as appended to `layer`.
  void Record(int layer, const KvChunk& chunk) {
    const int64_t n = int64_t{chunk.num_tokens} * layout_.num_kv_heads * layout_.head_dim;
    for (int64_t i = 0; i < n; ++i) {
      k_[layer].push_back(LoadAsFloat(chunk.k.data(), layout_.dtype, i));
      v_[layer].push_back(LoadAsFloat(chunk.v.data(), layout_.dtype, i));
    }
  }

  void Truncate(int64_t new_length) {
    const int64_t per_token = int64_t{layout_.num_kv_heads} * layout_.head_dim;
    for (int l = 0; l < layout_.num_layers; ++l) {
      k_[l].resize(new_length * per_token);
      v_[l].resize(new_length * per_token);
    }
  }

  int64_t length(int layer) const {
    return static_cast<int64_t>(k_[layer].size()) / (layout_.num_kv_heads * layout_.head_dim);
  }

  float K(int layer, int head, int64_t pos, int c) const {
    return k_[layer][(pos * layout_.num_kv_heads + head) * layout_.head_dim + c];
  }
  float V(int layer, int head, int64_t pos, int c) const {
    return v_[layer][(pos * layout_.num_kv_heads + head) * layout_.head_dim + c];
  }

  // Reference decode of every query head of `layer` over the positions of each KV head for
  // which keep(head, pos) holds (all positions when keep is empty). o: [Hq][D], lse: [Hq].
  void Reference(int layer, const std::vector<float>& q, std::vector<double>* o,
                 std::vector<double>* lse,
                 const std::function<bool(int, int64_t)>& keep = nullptr) const {
    const int d = layout_.head_dim;
    o->assign(static_cast<size_t>(layout_.num_q_heads) * d, 0.0);
    lse->assign(layout_.num_q_heads, 0.0);
    for (int qh = 0; qh < layout_.num_q_heads; ++qh) {
      const int h = qh / layout_.group_size();
      std::vector<int64_t> pos;
      for (int64_t p = 0; p < length(layer); ++p) {
        if (!keep || keep(h, p)) pos.push_back(p);
      }
      const ReferenceResult r = ReferenceAttention(
          q.data() + int64_t{qh} * d, d, 1.0 / std::sqrt(double(d)),
          static_cast<int64_t>(pos.size()),
          [&](int64_t i, int c) { return double{K(layer, h, pos[i], c)}; },
          [&](int64_t i, int c) { return double{V(layer, h, pos[i], c)}; },
          [](int64_t) { return 0.0; });
      for (int c = 0; c < d; ++c) (*o)[qh * d + c] = r.o[c];
      (*lse)[qh] = r.lse;
    }
  }

 private:
  ModelLayout layout_;
  std::vector<std::vector<float>> k_, v_;  // Per layer: [pos][head][dim].
};

// max |a - b| / max |b| over float outputs of two runs.
inline double MaxRelDiff(const std::vector<float>& a, const std::vector<float>& b) {
  std::vector<double> bd(b.begin(), b.end());
  return MaxRelError(a.data(), bd);
}

}  // namespace headwise::testing

#endif  // HEADWISE_TESTS_ENGINE_ENGINE_FIXTURE_H_
