// Observation-window statistics of a chunked prefill (SnapKV's vote, policies.md §5.5): only the
// chunk's last w query rows, each attending exactly as the prefill does (every cached token of
// its kv head plus the chunk up to itself; f32 dot products, softmax in double), probabilities
// averaged over the group's query heads and summed over the window rows. O(w · S · d · H_q)
// work; K is converted to f32 once per kv head.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/dtype.h"
#include "kernels/attention.h"

namespace headwise::kernels {
namespace {

// The keys (f32) and biases of every cached token of head h, then the chunk's, in attention
// order; `where[i]` is the cached token's CSR index j * page_tokens + row (or -1 for the chunk).
struct HeadKeys {
  std::vector<float> k;
  std::vector<float> bias;
  std::vector<int64_t> where;
};

void GatherKeys(const PagedKvView& kv, const WindowVoteArgs& a, int h, HeadKeys& out) {
  const int D = kv.head_dim;
  const int64_t page_bytes = PageBytes(kv.page_tokens, D, kv.dtype);
  out.k.clear();
  out.bias.clear();
  out.where.clear();
  for (int32_t j = kv.indptr[h]; j < kv.indptr[h + 1]; ++j) {
    const std::byte* page = kv.pool + kv.indices[j] * page_bytes;
    for (int r = 0; r < kv.PageTokens(h, j); ++r) {
      for (int c = 0; c < D; ++c) out.k.push_back(LoadAsFloat(page, kv.dtype, int64_t{r} * D + c));
      float bias = 0.0f;
      if (kv.page_bias != nullptr) bias = kv.page_bias[int64_t{j} * kv.page_tokens + r];
      if (kv.token_bias != nullptr)
        bias = kv.token_bias[int64_t{kv.indices[j]} * kv.page_tokens + r];
      out.bias.push_back(bias);
      out.where.push_back(int64_t{j} * kv.page_tokens + r);
    }
  }
  for (int t = 0; t < a.num_tokens; ++t) {
    for (int c = 0; c < D; ++c) {
      out.k.push_back(LoadAsFloat(a.k_new, kv.dtype, (int64_t{t} * kv.num_kv_heads + h) * D + c));
    }
    out.bias.push_back(0.0f);
    out.where.push_back(-1);
  }
}

void VoteHead(const PagedKvView& kv, const WindowVoteArgs& a, int h, const HeadKeys& keys) {
  const int D = kv.head_dim;
  const int g = a.num_q_heads / kv.num_kv_heads;
  const int64_t cached = static_cast<int64_t>(keys.where.size()) - a.num_tokens;
  const double scale = a.scale > 0.0f ? a.scale : 1.0 / std::sqrt(static_cast<double>(D));
  const int w = std::min(a.window, a.num_tokens);
  std::vector<double> s(keys.where.size());
  float* chunk_out = a.chunk_votes + int64_t{h} * a.num_tokens;
  for (int t = a.num_tokens - w; t < a.num_tokens; ++t) {
    const int64_t n = cached + t + 1;  // Causal: the chunk up to t.
    for (int r = 0; r < g; ++r) {
      const float* q = a.q + (int64_t{t} * a.num_q_heads + int64_t{h} * g + r) * D;
      double mx = -INFINITY;
      for (int64_t i = 0; i < n; ++i) {
        const float* k = keys.k.data() + i * D;
        float dot = 0.0f;
        for (int c = 0; c < D; ++c) dot += q[c] * k[c];
        s[i] = dot * scale + keys.bias[i];
        mx = std::max(mx, s[i]);
      }
      double sum = 0.0;
      for (int64_t i = 0; i < n; ++i) sum += (s[i] = std::exp(s[i] - mx));
      const double norm = 1.0 / (sum * g);
      for (int64_t i = 0; i < cached; ++i) {
        a.cached_votes[keys.where[i]] += static_cast<float>(s[i] * norm);
      }
      for (int64_t i = cached; i < n; ++i) {
        chunk_out[i - cached] += static_cast<float>(s[i] * norm);
      }
    }
  }
}

}  // namespace

absl::Status PrefillWindowVotes(const PagedKvView& kv, const WindowVoteArgs& args) {
  if (absl::Status st = ValidatePagedKvView(kv); !st.ok()) return st;
  const int H = kv.num_kv_heads;
  if (args.num_tokens < 1 || args.window < 1) {
    return absl::InvalidArgumentError(absl::StrCat("PrefillWindowVotes: num_tokens ",
                                                   args.num_tokens, " and window ", args.window,
                                                   " must be >= 1"));
  }
  if (args.num_q_heads <= 0 || args.num_q_heads % H != 0) {
    return absl::InvalidArgumentError(absl::StrCat("PrefillWindowVotes: num_q_heads ",
                                                   args.num_q_heads, " is not a multiple of ", H));
  }
  if (args.q == nullptr || args.k_new == nullptr || args.cached_votes == nullptr ||
      args.chunk_votes == nullptr) {
    return absl::InvalidArgumentError(
        "PrefillWindowVotes: q, k_new, cached_votes and chunk_votes are required");
  }
  std::fill_n(args.cached_votes, int64_t{kv.indptr[H]} * kv.page_tokens, 0.0f);
  std::fill_n(args.chunk_votes, int64_t{H} * args.num_tokens, 0.0f);
#pragma omp parallel for num_threads(std::max(1, args.num_threads)) schedule(dynamic, 1)
  for (int h = 0; h < H; ++h) {
    HeadKeys keys;
    GatherKeys(kv, args, h, keys);
    VoteHead(kv, args, h, keys);
  }
  return absl::OkStatus();
}

}  // namespace headwise::kernels
