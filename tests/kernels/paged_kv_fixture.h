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
#include <utility>
#include <vector>

#include "cachesvc/base/dtype.h"
#include "kernels/attention.h"

namespace headwise::kernels::testing {

// Page lengths of dense heads: full pages of `page_tokens`, the last holding the rest.
inline std::vector<std::vector<int32_t>> DensePageLens(const std::vector<int64_t>& tokens,
                                                       int page_tokens) {
  std::vector<std::vector<int32_t>> lens(tokens.size());
  for (size_t h = 0; h < tokens.size(); ++h) {
    for (int64_t left = tokens[h]; left > 0; left -= page_tokens) {
      lens[h].push_back(static_cast<int32_t>(std::min<int64_t>(left, page_tokens)));
    }
  }
  return lens;
}

// Page lengths of sparse heads (after token-level eviction): `pages[h]` pages for head h, each
// holding a random count in 1..page_tokens, drawn independently for every page.
inline std::vector<std::vector<int32_t>> RandomPageLens(const std::vector<int>& pages,
                                                        int page_tokens, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> count(1, page_tokens);
  std::vector<std::vector<int32_t>> lens(pages.size());
  for (size_t h = 0; h < pages.size(); ++h) {
    for (int k = 0; k < pages[h]; ++k) lens[h].push_back(count(rng));
  }
  return lens;
}

// Arrays of a derived view (prefix or page subset); must outlive the view.
struct ViewStorage {
  std::vector<int32_t> indptr, indices, last_page_len, page_len;
};

// A paged KV cache for one layer, owning its pool and CSR arrays. Token i of head h is the
// i-th token in the head's page order (page k of a head holds its rows 0..len-1).
class RandomPagedKv {
 public:
  // Dense heads: `tokens_per_head[h]` tokens for each KV head, every page full but the last;
  // view() describes them with last_page_len. Pages are placed in random pool slots with
  // `spare_slots` unused slots mixed in. With `with_bias`, every token gets a random bias in
  // [0, 2) (as merged tokens would).
  RandomPagedKv(DType dtype, int head_dim, int page_tokens, std::vector<int64_t> tokens_per_head,
                uint32_t seed, bool with_bias = false, int spare_slots = 3)
      : RandomPagedKv(dtype, head_dim, page_tokens, DensePageLens(tokens_per_head, page_tokens),
                      /*sparse=*/false, seed, with_bias, spare_slots) {}

  // Sparse heads: head h's k-th page holds page_lens[h][k] tokens (1..page_tokens), any page
  // partial; view() describes them with page_len and a null last_page_len.
  static RandomPagedKv WithPageLens(DType dtype, int head_dim, int page_tokens,
                                    std::vector<std::vector<int32_t>> page_lens, uint32_t seed,
                                    bool with_bias = false, int spare_slots = 3) {
    return RandomPagedKv(dtype, head_dim, page_tokens, std::move(page_lens), /*sparse=*/true, seed,
                         with_bias, spare_slots);
  }

  PagedKvView view() const {
    PagedKvView kv;
    kv.pool = pool_.data();
    kv.indptr = indptr_.data();
    kv.indices = indices_.data();
    if (sparse_) {
      kv.page_len = page_len_.data();
    } else {
      kv.last_page_len = last_page_len_.data();
    }
    kv.token_bias = bias_.empty() ? nullptr : bias_.data();
    kv.num_slots = num_slots_;
    kv.num_kv_heads = num_kv_heads();
    kv.page_tokens = page_tokens_;
    kv.head_dim = head_dim_;
    kv.dtype = dtype_;
    return kv;
  }

  // A view of only the first `n[h]` tokens of each head (n[h] <= tokens(h)): the head's first
  // pages, the last of them cut short. Same token-count mode as view().
  using PrefixStorage = ViewStorage;
  PagedKvView PrefixView(const std::vector<int64_t>& n, ViewStorage& storage) const {
    storage = ViewStorage{};
    storage.indptr.push_back(0);
    for (size_t h = 0; h < n.size(); ++h) {
      int64_t left = n[h];
      int32_t last = 0;
      for (int32_t j = indptr_[h]; j < indptr_[h + 1] && left > 0; ++j) {
        last = static_cast<int32_t>(std::min<int64_t>(left, page_len_[j]));
        left -= last;
        storage.indices.push_back(indices_[j]);
        storage.page_len.push_back(last);
      }
      storage.indptr.push_back(static_cast<int32_t>(storage.indices.size()));
      storage.last_page_len.push_back(last);
    }
    return Derived(storage, sparse_);
  }

  // A view of a subset of each head's pages, as a page selector would name them:
  // pages_of_head[h] lists CSR page positions of view() that belong to head h, in the order the
  // derived view keeps them. Always described with page_len.
  PagedKvView SubsetView(const std::vector<std::vector<int32_t>>& pages_of_head,
                         ViewStorage& storage) const {
    storage = ViewStorage{};
    storage.indptr.push_back(0);
    for (const std::vector<int32_t>& pages : pages_of_head) {
      for (int32_t j : pages) {
        storage.indices.push_back(indices_[j]);
        storage.page_len.push_back(page_len_[j]);
      }
      storage.indptr.push_back(static_cast<int32_t>(storage.indices.size()));
    }
    return Derived(storage, /*sparse=*/true);
  }

  int num_kv_heads() const { return static_cast<int>(tokens_.size()); }
  int64_t tokens(int h) const { return tokens_[h]; }
  int64_t total_pages() const { return indptr_.back(); }
  int page_tokens() const { return page_tokens_; }
  // CSR page positions of head h in view(): [first_page(h), first_page(h + 1)).
  int32_t first_page(int h) const { return indptr_[h]; }
  // Valid tokens of CSR page position j, and the head-token index of its first token.
  int32_t page_len(int32_t j) const { return page_len_[j]; }
  int64_t page_first_token(int32_t j) const { return page_first_[j]; }
  // CSR page position of token i of head h.
  int32_t PageOf(int h, int64_t i) const {
    const auto begin = page_first_.begin() + indptr_[h];
    const auto end = page_first_.begin() + indptr_[h + 1];
    return static_cast<int32_t>(std::upper_bound(begin, end, i) - page_first_.begin() - 1);
  }

  // Stored key/value element c of token i of head h, as float.
  float K(int h, int64_t i, int c) const { return Element(h, i, c, /*value=*/false); }
  float V(int h, int64_t i, int c) const { return Element(h, i, c, /*value=*/true); }
  float Bias(int h, int64_t i) const {
    if (bias_.empty()) return 0.0f;
    const int32_t j = PageOf(h, i);
    return bias_[int64_t{indices_[j]} * page_tokens_ + (i - page_first_[j])];
  }

 private:
  RandomPagedKv(DType dtype, int head_dim, int page_tokens,
                std::vector<std::vector<int32_t>> page_lens, bool sparse, uint32_t seed,
                bool with_bias, int spare_slots)
      : dtype_(dtype), head_dim_(head_dim), page_tokens_(page_tokens), sparse_(sparse) {
    std::mt19937_64 rng(seed);
    indptr_.push_back(0);
    for (const std::vector<int32_t>& lens : page_lens) {
      int64_t n = 0;
      for (int32_t len : lens) {
        page_first_.push_back(n);
        page_len_.push_back(len);
        n += len;
      }
      tokens_.push_back(n);
      indptr_.push_back(static_cast<int32_t>(page_len_.size()));
      last_page_len_.push_back(lens.empty() ? 0 : lens.back());
    }
    num_slots_ = indptr_.back() + spare_slots;
    std::vector<int32_t> slots(num_slots_);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), rng);
    indices_.assign(slots.begin(), slots.begin() + indptr_.back());
    pool_.resize(num_slots_ * PageBytes(page_tokens, head_dim, dtype));
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

  PagedKvView Derived(const ViewStorage& storage, bool sparse) const {
    PagedKvView kv = view();
    kv.indptr = storage.indptr.data();
    kv.indices = storage.indices.data();
    kv.last_page_len = sparse ? nullptr : storage.last_page_len.data();
    kv.page_len = sparse ? storage.page_len.data() : nullptr;
    return kv;
  }

  float Element(int h, int64_t i, int c, bool value) const {
    const int32_t j = PageOf(h, i);
    const int64_t elem = int64_t{indices_[j]} * 2 * page_tokens_ * head_dim_ +
                         (value ? int64_t{page_tokens_} * head_dim_ : 0) +
                         (i - page_first_[j]) * head_dim_ + c;
    return LoadAsFloat(pool_.data(), dtype_, elem);
  }

  DType dtype_;
  int head_dim_;
  int page_tokens_;
  bool sparse_;
  std::vector<int64_t> tokens_;
  // Per CSR page position: valid tokens and the head-token index of the first one.
  std::vector<int32_t> indptr_, indices_, page_len_, last_page_len_;
  std::vector<int64_t> page_first_;
  int64_t num_slots_ = 0;
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
