// Test helpers: random paged KV caches laid out like the engine lays them out (pages of one
// head scattered through a pool, out of order), and a float64 reference attention computed
// from the same stored (dtype-rounded) values.
#ifndef HEADWISE_TESTS_KERNELS_PAGED_KV_FIXTURE_H_
#define HEADWISE_TESTS_KERNELS_PAGED_KV_FIXTURE_H_

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "cachesvc/base/dtype.h"
#include "kernels/attention.h"

namespace headwise::kernels::testing {

// A paged KV cache for one layer, owning its pool and CSR arrays. Token i of head h is the
// i-th token in the head's page order.
class RandomPagedKv {
 public:
  // `tokens_per_head[h]` tokens for each KV head; pages are placed in random pool slots with
  // `spare_slots` unused slots mixed in. With `with_bias`, every token gets a random bias in
  // [0, 2) (as merged tokens would).
  RandomPagedKv(DType dtype, int head_dim, int page_tokens, std::vector<int64_t> tokens_per_head,
                uint32_t seed, bool with_bias = false, int spare_slots = 3)
      : dtype_(dtype),
        head_dim_(head_dim),
        page_tokens_(page_tokens),
        tokens_(std::move(tokens_per_head)) {
    std::mt19937_64 rng(seed);
    const int heads = static_cast<int>(tokens_.size());
    indptr_.push_back(0);
    for (int h = 0; h < heads; ++h) {
      const int64_t pages = (tokens_[h] + page_tokens - 1) / page_tokens;
      indptr_.push_back(indptr_.back() + static_cast<int32_t>(pages));
      last_page_len_.push_back(
          pages == 0 ? 0 : static_cast<int32_t>(tokens_[h] - (pages - 1) * page_tokens));
    }
    num_slots_ = indptr_.back() + spare_slots;
    std::vector<int32_t> slots(num_slots_);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), rng);
    indices_.assign(slots.begin(), slots.begin() + indptr_.back());
    page_bytes_ = PageBytes(page_tokens, head_dim, dtype);
    pool_.resize(num_slots_ * page_bytes_);
    // Every element, used or not, is random: a kernel reading past a partial page or the wrong
    // slot produces a visibly wrong answer instead of a lucky zero.
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const int64_t elems = num_slots_ * 2 * int64_t{page_tokens} * head_dim;
    for (int64_t i = 0; i < elems; ++i) StoreFromFloat(pool_.data(), dtype, i, normal(rng));
    if (with_bias) {
      std::uniform_real_distribution<float> uniform(0.0f, 2.0f);
      bias_.resize(num_slots_ * page_tokens);
      for (float& b : bias_) b = uniform(rng);
    }
  }

  PagedKvView view() const {
    PagedKvView kv;
    kv.pool = pool_.data();
    kv.indptr = indptr_.data();
    kv.indices = indices_.data();
    kv.last_page_len = last_page_len_.data();
    kv.token_bias = bias_.empty() ? nullptr : bias_.data();
    kv.num_slots = num_slots_;
    kv.num_kv_heads = static_cast<int>(tokens_.size());
    kv.page_tokens = page_tokens_;
    kv.head_dim = head_dim_;
    kv.dtype = dtype_;
    return kv;
  }

  // A view of only the first `n[h]` tokens of each head (n[h] <= tokens(h)); the arrays it
  // points to live in `storage`, which must outlive the view.
  struct PrefixStorage {
    std::vector<int32_t> indptr, indices, last_page_len;
  };
  PagedKvView PrefixView(const std::vector<int64_t>& n, PrefixStorage& storage) const {
    storage.indptr.assign(1, 0);
    storage.last_page_len.clear();
    for (size_t h = 0; h < n.size(); ++h) {
      const int64_t pages = (n[h] + page_tokens_ - 1) / page_tokens_;
      storage.indptr.push_back(storage.indptr.back() + static_cast<int32_t>(pages));
      storage.last_page_len.push_back(
          pages == 0 ? 0 : static_cast<int32_t>(n[h] - (pages - 1) * page_tokens_));
    }
    // Head h's pages are a prefix of its pages in the full cache.
    storage.indices.clear();
    for (size_t h = 0; h < n.size(); ++h) {
      for (int32_t j = 0; j < storage.indptr[h + 1] - storage.indptr[h]; ++j) {
        storage.indices.push_back(indices_[indptr_[h] + j]);
      }
    }
    PagedKvView kv = view();
    kv.indptr = storage.indptr.data();
    kv.last_page_len = storage.last_page_len.data();
    kv.indices = storage.indices.data();
    return kv;
  }

  int num_kv_heads() const { return static_cast<int>(tokens_.size()); }
  int64_t tokens(int h) const { return tokens_[h]; }
  int64_t total_pages() const { return indptr_.back(); }

  // Stored key/value element c of token i of head h, as float.
  float K(int h, int64_t i, int c) const { return Element(h, i, c, /*value=*/false); }
  float V(int h, int64_t i, int c) const { return Element(h, i, c, /*value=*/true); }
  float Bias(int h, int64_t i) const {
    if (bias_.empty()) return 0.0f;
    return bias_[int64_t{Slot(h, i)} * page_tokens_ + i % page_tokens_];
  }

 private:
  int32_t Slot(int h, int64_t i) const { return indices_[indptr_[h] + i / page_tokens_]; }
  float Element(int h, int64_t i, int c, bool value) const {
    const int64_t elem = int64_t{Slot(h, i)} * 2 * page_tokens_ * head_dim_ +
                         (value ? int64_t{page_tokens_} * head_dim_ : 0) +
                         (i % page_tokens_) * head_dim_ + c;
    return LoadAsFloat(pool_.data(), dtype_, elem);
  }

  DType dtype_;
  int head_dim_;
  int page_tokens_;
  std::vector<int64_t> tokens_;
  std::vector<int32_t> indptr_, indices_, last_page_len_;
  int64_t num_slots_ = 0;
  int64_t page_bytes_ = 0;
  std::vector<std::byte> pool_;
  std::vector<float> bias_;
};

// Random vector of n floats from N(0, 1) (never all zeros).
inline std::vector<float> RandomFloats(int64_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// Float64 attention of one query over tokens given by accessors. Returns o (d values) and lse
// (-inf with o = 0 when there are no tokens); `probs` (optional) gets each token's probability.
struct ReferenceResult {
  std::vector<double> o;
  double lse = -std::numeric_limits<double>::infinity();
  std::vector<double> probs;
};

template <typename KFn, typename VFn, typename BiasFn>
ReferenceResult ReferenceAttention(const float* q, int d, double scale, int64_t n, KFn k, VFn v,
                                   BiasFn bias) {
  ReferenceResult r;
  r.o.assign(d, 0.0);
  if (n == 0) return r;
  std::vector<double> s(n);
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    double dot = 0.0;
    for (int c = 0; c < d; ++c) dot += double{q[c]} * k(i, c);
    s[i] = dot * scale + bias(i);
    mx = std::max(mx, s[i]);
  }
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    s[i] = std::exp(s[i] - mx);
    sum += s[i];
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int c = 0; c < d; ++c) r.o[c] += s[i] / sum * v(i, c);
  }
  r.lse = mx + std::log(sum);
  r.probs.resize(n);
  for (int64_t i = 0; i < n; ++i) r.probs[i] = s[i] / sum;
  return r;
}

// Reference decode of query head `qh` over the paged cache.
inline ReferenceResult ReferenceDecode(const RandomPagedKv& kv, const float* q, int num_q_heads,
                                       int qh, int d) {
  const int h = qh / (num_q_heads / kv.num_kv_heads());
  return ReferenceAttention(
      q + int64_t{qh} * d, d, 1.0 / std::sqrt(double(d)), kv.tokens(h),
      [&](int64_t i, int c) { return double{kv.K(h, i, c)}; },
      [&](int64_t i, int c) { return double{kv.V(h, i, c)}; },
      [&](int64_t i) { return double{kv.Bias(h, i)}; });
}

// max_i |a_i - b_i| / max(max_i |b_i|, tiny): error relative to the reference's scale.
inline double MaxRelError(const float* a, const std::vector<double>& b) {
  double err = 0.0, scale = 1e-30;
  for (size_t i = 0; i < b.size(); ++i) {
    err = std::max(err, std::abs(double{a[i]} - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return err / scale;
}

}  // namespace headwise::kernels::testing

#endif  // HEADWISE_TESTS_KERNELS_PAGED_KV_FIXTURE_H_
