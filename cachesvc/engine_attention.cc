// The read path of the engine: decode attention in every placement (whole layer, or head by
// head with parts merged exactly), statistics fed back to the policy stack, chunked prefill and
// the atomic decode step (engine.h; docs/engine.md).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/cancellation.h"
#include "cachesvc/base/status_macros.h"
#include "cachesvc/engine.h"
#include "cachesvc/engine_internal.h"
#include "kernels/attention.h"

namespace headwise {
// ---------------------------------------------------------------------------------------------
// Attention.

kernels::PagedKvView Engine::ViewOf(const PagePool& device, const ModelLayout& layout,
                                    const Staging& staged, int num_heads) {
  kernels::PagedKvView kv;
  kv.pool = device.base();
  kv.indptr = staged.indptr.data();
  kv.indices = staged.indices.data();
  kv.last_page_len = staged.last_page_len.data();
  kv.page_len = staged.page_len.empty() ? nullptr : staged.page_len.data();
  kv.page_bias = staged.page_bias.empty() ? nullptr : staged.page_bias.data();
  kv.num_slots = static_cast<int64_t>(device.num_slots());
  kv.num_kv_heads = num_heads;
  kv.page_tokens = layout.page_tokens;
  kv.head_dim = layout.head_dim;
  kv.dtype = layout.dtype;
  return kv;
}

// The page lists attention reads: every page of each head minus the whole pages `pending` is
// about to drop. Null (every page) when nothing is pending.
const Engine::PageLists* Engine::AttendedPages(Sequence& s, int layer,
                                               const std::vector<HeadActions>* pending,
                                               PageLists& storage) {
  s.mu.AssertHeld();
  if (pending == nullptr) return nullptr;
  bool any = false;
  for (const HeadActions& a : *pending) any = any || !a.drop_pages.empty();
  if (!any) return nullptr;
  const int H = s.layout().num_kv_heads;
  storage.assign(H, {});
  for (int h = 0; h < H; ++h) {
    const HeadTable& t = s.table(layer, h);
    const std::vector<int32_t>& drop = (*pending)[h].drop_pages;
    size_t d = 0;
    for (size_t i = 0; i < t.meta.size(); ++i) {
      if (d < drop.size() && drop[d] == static_cast<int32_t>(i)) {
        ++d;
        continue;
      }
      storage[h].push_back(static_cast<int32_t>(i));
    }
  }
  return &storage;
}

// The pages the PageSelector picks for this query, among `base` (null: every page): per head, the
// selector's ordinals that are also in the base list, in order.
const Engine::PageLists* Engine::SelectPages(Sequence& s, int layer, const float* q,
                                             const PageLists* base, PageLists& out) {
  s.mu.AssertHeld();
  const ModelLayout& layout = s.layout();
  const int g = layout.group_size();
  const int D = layout.head_dim;
  out.assign(layout.num_kv_heads, {});
  std::vector<int32_t> picked;
  for (int h = 0; h < layout.num_kv_heads; ++h) {
    const HeadTable& t = s.table(layer, h);
    const HeadContext head = SelectorContext(s, layer, h);
    picked.clear();
    s.stack->selector().Select(head, absl::MakeConstSpan(q + int64_t{h} * g * D, g * D), g,
                               &picked);
    std::sort(picked.begin(), picked.end());
    picked.erase(std::unique(picked.begin(), picked.end()), picked.end());
    if (base == nullptr) {
      for (int32_t p : picked) {
        if (p >= 0 && static_cast<size_t>(p) < t.meta.size()) out[h].push_back(p);
      }
    } else {
      std::set_intersection(picked.begin(), picked.end(), (*base)[h].begin(), (*base)[h].end(),
                            std::back_inserter(out[h]));
    }
  }
  return &out;
}

// Feeds one kernel call's statistics to the stack: per-token probabilities into the token
// scores (TokenScorer::Accumulate) and per-page mass into PageMeta::attention_mass. `staged`
// covers heads [h_begin, h_end) of `layer` through `lists` (null: every page).
void Engine::FeedStats(Sequence& s, int layer, const Staging& staged, const PageLists* lists,
                       size_t page_begin) {
  s.mu.AssertHeld();
  const TokenScorer* scorer = s.stack->scorer();
  const int P = s.layout().page_tokens;
  for (int h = staged.h_begin; h < staged.h_end; ++h) {
    HeadTable& t = s.table(layer, h);
    const int k = h - staged.h_begin;
    for (int32_t j = staged.indptr[k]; j < staged.indptr[k + 1]; ++j) {
      const size_t entry = page_begin + static_cast<size_t>(j - staged.indptr[k]);
      const size_t page = lists == nullptr ? entry : static_cast<size_t>((*lists)[h][entry]);
      t.meta[page].attention_mass += s.mass_scratch[j];
      if (scorer != nullptr) {
        scorer->Accumulate(absl::MakeConstSpan(s.probs_scratch.data() + int64_t{j} * P, P),
                           absl::MakeSpan(t.scores.data() + page * P, P));
      }
    }
  }
}

absl::Status Engine::AttendLocked(Sequence& s, int layer, const float* q, float* o, float* lse,
                                  const std::vector<HeadActions>* pending) {
  s.mu.AssertHeld();
  const ModelLayout& layout = s.layout();
  const int H = layout.num_kv_heads;
  PageLists storage;
  const PageLists* lists = AttendedPages(s, layer, pending, storage);
  PageLists selected;
  if (!s.stack->selector().selects_all()) {
    lists = SelectPages(s, layer, q, lists, selected);
    // The proxy this layer's next pages are predicted from (PredictPages).
    s.query_proxy.resize(layout.num_layers);
    s.query_proxy[layer].assign(q, q + int64_t{layout.num_q_heads} * layout.head_dim);
  }
  if (s.placement.mode != PlacementMode::kHeadOffload) {
    Staging staged;
    const bool kept =
        static_cast<size_t>(layer) < s.layer_stage.size() && s.layer_stage[layer].active;
    absl::Status st = kept ? Restage(s, layer, s.layer_stage[layer], lists, staged)
                           : Stage(s, layer, 0, H, CopyPriority::kDemandFetch, 0, staged, lists);
    if (!st.ok()) {
      Unstage(staged);  // Whatever a failed staging still holds (nothing, by contract).
      return st;
    }
    if (!kept) {
      const int64_t n = static_cast<int64_t>(staged.sources.size());
      CountPrefetch(s, 0, 0, n, n);
    }
    st = WaitStaged(staged);
    if (st.ok()) {
      // layer_offload: the next layers (or their predicted pages) are copied while this one
      // computes.
      PrefetchLayers(s, layer, q);
      st = RunDecode(s, staged, q, layout.num_q_heads, o, lse, H);
      if (st.ok() && s.wants_stats) FeedStats(s, layer, staged, lists, 0);
    }
    Unstage(staged);
    return st;
  }
  return AttendHeadwise(s, layer, q, o, lse, lists);
}

absl::Status Engine::RunDecode(Sequence& s, const Staging& staged, const float* q, int num_q_heads,
                               float* o, float* lse, int num_heads) {
  s.mu.AssertHeld();
  kernels::DecodeArgs args;
  args.q = q;
  args.num_q_heads = num_q_heads;
  args.o = o;
  args.lse = lse;
  args.num_threads = options_.compute_threads;
  if (s.wants_stats) {
    // Scratch kept with the sequence: no allocation per call once it has grown.
    const size_t pages = static_cast<size_t>(staged.indptr.back());
    s.probs_scratch.resize(std::max<size_t>(1, pages * s.layout().page_tokens));
    s.mass_scratch.resize(std::max<size_t>(1, pages));
    args.token_probs = s.probs_scratch.data();
    args.page_mass = s.mass_scratch.data();
  }
  return kernels::DecodeAttention(ViewOf(*s.pools().device, s.layout(), staged, num_heads), args);
}

// HeadInfer: the layer is attended in parts, part i computing while parts i+1 .. i+ahead are
// being copied in. A part is one head, or, for a head longer than a device share of
// capacity / (1 + ahead) slots, one of the consecutive page ranges it is cut into; the parts
// of such a head are merged exactly (MergeAttentionStates).
absl::Status Engine::AttendHeadwise(Sequence& s, int layer, const float* q, float* o, float* lse,
                                    const PageLists* lists) {
  s.mu.AssertHeld();
  const ModelLayout& layout = s.layout();
  const int H = layout.num_kv_heads;
  const int g = layout.group_size();
  const int D = layout.head_dim;
  const int ahead = s.placement.heads_ahead();
  const size_t share =
      std::max<size_t>(1, s.pools().device->num_slots() / (1 + static_cast<size_t>(ahead)));
  struct Part {
    int head;
    size_t page_begin;
    size_t page_end;
  };
  std::vector<Part> parts;
  for (int h = 0; h < H; ++h) {
    const size_t n = lists == nullptr ? s.table(layer, h).phys.size() : (*lists)[h].size();
    const size_t cuts = std::max<size_t>(1, (n + share - 1) / share);
    if (cuts > 1 && s.wants_stats) {
      return absl::FailedPreconditionError(
          absl::StrCat("head ", h, " of layer ", layer, " is longer than the device share (", share,
                       " pages): attention statistics across a split head are not supported"));
    }
    for (size_t c = 0; c < cuts; ++c) parts.push_back(Part{h, n * c / cuts, n * (c + 1) / cuts});
  }
  std::vector<Staging> staged(parts.size());
  std::vector<float> part_o, part_lse;  // [parts of the current head][g][D] / [g].
  absl::Status st;
  for (size_t i = 0; i < parts.size() && st.ok(); ++i) {
    const Part& p = parts[i];
    const int64_t prefetched =
        staged[i].active ? static_cast<int64_t>(staged[i].sources.size()) : 0;
    if (!staged[i].active) {
      st = Stage(s, layer, p.head, p.head + 1, CopyPriority::kDemandFetch, p.head, staged[i], lists,
                 p.page_begin, p.page_end);
      if (!st.ok()) break;
    }
    const int64_t needed = static_cast<int64_t>(staged[i].sources.size());
    CountPrefetch(s, 0, prefetched, needed, needed - prefetched);
    // Best effort: a prefetch that does not fit (or fails) is staged on demand later.
    for (size_t j = i + 1; j < parts.size() && j <= i + ahead; ++j) {
      if (staged[j].active) continue;
      if (!Stage(s, layer, parts[j].head, parts[j].head + 1, CopyPriority::kPrefetch, p.head,
                 staged[j], lists, parts[j].page_begin, parts[j].page_end)
               .ok()) {
        break;
      }
      CountPrefetch(s, static_cast<int64_t>(staged[j].sources.size()), 0, 0, 0);
    }
    st = WaitStaged(staged[i]);
    if (!st.ok()) break;
    const bool first = i == 0 || parts[i - 1].head != p.head;
    const bool last = i + 1 == parts.size() || parts[i + 1].head != p.head;
    if (first) {
      part_o.clear();
      part_lse.clear();
    }
    float* head_o = o + int64_t{p.head} * g * D;
    float* head_lse = lse == nullptr ? nullptr : lse + int64_t{p.head} * g;
    if (!(first && last)) {
      part_o.resize(part_o.size() + static_cast<size_t>(g) * D);
      part_lse.resize(part_lse.size() + g);
      head_o = part_o.data() + part_o.size() - static_cast<size_t>(g) * D;
      head_lse = part_lse.data() + part_lse.size() - g;
    }
    st = RunDecode(s, staged[i], q + int64_t{p.head} * g * D, g, head_o, head_lse, 1);
    if (st.ok() && s.wants_stats) FeedStats(s, layer, staged[i], lists, p.page_begin);
    Unstage(staged[i]);
    if (st.ok() && last && !first) st = MergeParts(part_o, part_lse, g, D, p.head, o, lse);
  }
  for (Staging& x : staged) Unstage(x);
  return st;
}

absl::Status Engine::MergeParts(const std::vector<float>& part_o,
                                const std::vector<float>& part_lse, int g, int D, int head,
                                float* o, float* lse) {
  const int n = static_cast<int>(part_lse.size() / g);
  std::vector<const float*> op(n), lp(n);
  for (int k = 0; k < n; ++k) {
    op[k] = part_o.data() + int64_t{k} * g * D;
    lp[k] = part_lse.data() + int64_t{k} * g;
  }
  std::vector<float> merged_lse(g);
  RETURN_IF_ERROR(kernels::MergeAttentionStates(op.data(), lp.data(), n, g, D,
                                                o + int64_t{head} * g * D, merged_lse.data()));
  if (lse != nullptr) std::copy(merged_lse.begin(), merged_lse.end(), lse + int64_t{head} * g);
  return absl::OkStatus();
}

absl::Status Engine::Attend(const SequenceId& seq, LayerId layer, absl::Span<const float> q,
                            absl::Span<float> o, absl::Span<float> lse) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> s, Find(seq));
  MutexLock lock(&s->mu);
  RETURN_IF_ERROR(CheckLive(*s));
  const ModelLayout& layout = s->layout();
  if (layer.value() < 0 || layer.value() >= layout.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer.value(), " out of range [0, ", layout.num_layers, ")"));
  }
  const size_t qsize = static_cast<size_t>(layout.num_q_heads) * layout.head_dim;
  if (q.size() != qsize || o.size() != qsize ||
      lse.size() != static_cast<size_t>(layout.num_q_heads)) {
    return absl::InvalidArgumentError(absl::StrCat("q and o must hold ", qsize, " floats and lse ",
                                                   layout.num_q_heads, "; got ", q.size(), ", ",
                                                   o.size(), ", ", lse.size()));
  }
  return AttendLocked(*s, layer.value(), q.data(), o.data(), lse.data(), /*pending=*/nullptr);
}

absl::Status Engine::PrefillLocked(Sequence& s, int layer, const float* q, const std::byte* k,
                                   const std::byte* v, int num_tokens, float* o, float* lse,
                                   const CommitHook* before_commit) {
  s.mu.AssertHeld();
  const ModelLayout& layout = s.layout();
  const int H = layout.num_kv_heads;
  const int Hq = layout.num_q_heads;
  const int g = layout.group_size();
  const int D = layout.head_dim;
  const int64_t T = num_tokens;
  // SnapKV: the chunk's last queries vote over what this prefill attends (ComputeWindowVotes).
  const bool vote = s.stack->actions().window_tokens() > 0;
  WindowVotes votes;
  absl::Status st;
  if (s.placement.mode != PlacementMode::kHeadOffload) {
    Staging staged;
    RETURN_IF_ERROR(Stage(s, layer, 0, H, CopyPriority::kDemandFetch, 0, staged));
    st = WaitStaged(staged);
    if (st.ok()) {
      kernels::PrefillArgs args;
      args.num_tokens = num_tokens;
      args.q = q;
      args.k_new = k;
      args.v_new = v;
      args.num_q_heads = Hq;
      args.o = o;
      args.lse = lse;
      args.num_threads = options_.compute_threads;
      args.cancel = CurrentCancellation();
      st = kernels::PrefillAttention(ViewOf(*s.pools().device, layout, staged, H), args);
      if (st.ok() && vote) st = ComputeWindowVotes(s, staged, q, k, num_tokens, Hq, votes);
    }
    Unstage(staged);
  } else {
    // Per head: gather the group's queries and the head's chunk K/V, compute, scatter.
    const int64_t row = int64_t{D} * DTypeSize(layout.dtype);
    std::vector<float> qh(T * g * D), oh(T * g * D), lh(T * g);
    std::vector<std::byte> kh(T * row), vh(T * row);
    Staging next_staged;
    for (int h = 0; h < H && st.ok(); ++h) {
      Staging cur;
      if (h == 0 || !next_staged.active) {
        st = Stage(s, layer, h, h + 1, CopyPriority::kDemandFetch, h, cur);
      } else {
        cur = std::move(next_staged);
        next_staged = Staging();
      }
      if (!st.ok()) break;
      if (h + 1 < H && s.placement.heads_ahead() > 0) {
        // Best effort: a prefetch that does not fit is staged on demand instead.
        if (!Stage(s, layer, h + 1, h + 2, CopyPriority::kPrefetch, h, next_staged).ok()) {
          next_staged = Staging();
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        std::memcpy(&qh[(t * g) * D], q + (t * Hq + int64_t{h} * g) * D, sizeof(float) * g * D);
        std::memcpy(&kh[t * row], k + (t * H + h) * row, row);
        std::memcpy(&vh[t * row], v + (t * H + h) * row, row);
      }
      st = WaitStaged(cur);
      if (st.ok()) {
        kernels::PrefillArgs args;
        args.num_tokens = num_tokens;
        args.q = qh.data();
        args.k_new = kh.data();
        args.v_new = vh.data();
        args.num_q_heads = g;
        args.o = oh.data();
        args.lse = lh.data();
        args.num_threads = options_.compute_threads;
        args.cancel = CurrentCancellation();
        st = kernels::PrefillAttention(ViewOf(*s.pools().device, layout, cur, 1), args);
        if (st.ok() && vote) {
          st = ComputeWindowVotes(s, cur, qh.data(), kh.data(), num_tokens, g, votes);
        }
      }
      Unstage(cur);
      if (!st.ok()) break;
      for (int64_t t = 0; t < T; ++t) {
        std::memcpy(o + (t * Hq + int64_t{h} * g) * D, &oh[(t * g) * D], sizeof(float) * g * D);
        if (lse != nullptr) {
          std::memcpy(lse + t * Hq + int64_t{h} * g, &lh[t * g], sizeof(float) * g);
        }
      }
    }
    Unstage(next_staged);
  }
  RETURN_IF_ERROR(st);
  // The last point a cancel stops the call: nothing has changed yet.
  if (CallCancelled()) return absl::CancelledError("prefill cancelled before its append");
  return AppendLocked(s, layer, k, v, num_tokens, before_commit, vote ? &votes : nullptr);
}

absl::Status Engine::Prefill(const SequenceId& seq, LayerId layer, absl::Span<const float> q,
                             absl::Span<const std::byte> k, absl::Span<const std::byte> v,
                             int num_tokens, DType dtype, absl::Span<float> o,
                             absl::Span<float> lse, const CommitHook* before_commit) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> s, Find(seq));
  MutexLock lock(&s->mu);
  RETURN_IF_ERROR(CheckLive(*s));
  RETURN_IF_ERROR(ValidateAppend(*s, layer.value(), static_cast<int64_t>(k.size()),
                                 static_cast<int64_t>(v.size()), num_tokens, dtype));
  const ModelLayout& layout = s->layout();
  const size_t qsize = static_cast<size_t>(num_tokens) * layout.num_q_heads * layout.head_dim;
  const size_t lsize = static_cast<size_t>(num_tokens) * layout.num_q_heads;
  if (q.size() != qsize || o.size() != qsize || (!lse.empty() && lse.size() != lsize)) {
    return absl::InvalidArgumentError(absl::StrCat("q and o must hold ", qsize,
                                                   " floats and lse 0 or ", lsize, "; got ",
                                                   q.size(), ", ", o.size(), ", ", lse.size()));
  }
  return PrefillLocked(*s, layer.value(), q.data(), k.data(), v.data(), num_tokens, o.data(),
                       lse.empty() ? nullptr : lse.data(), before_commit);
}

absl::Status Engine::DecodeStepLocked(Sequence& s, int layer, absl::Span<const float> q,
                                      absl::Span<const std::byte> k, absl::Span<const std::byte> v,
                                      DType dtype, absl::Span<float> o, absl::Span<float> lse,
                                      int64_t* layer_length, const CommitHook* before_commit) {
  s.mu.AssertHeld();
  RETURN_IF_ERROR(CheckLive(s));
  RETURN_IF_ERROR(ValidateAppend(s, layer, static_cast<int64_t>(k.size()),
                                 static_cast<int64_t>(v.size()), /*num_tokens=*/1, dtype));
  const ModelLayout& layout = s.layout();
  const size_t qsize = static_cast<size_t>(layout.num_q_heads) * layout.head_dim;
  if (q.size() != qsize || o.size() != qsize ||
      lse.size() != static_cast<size_t>(layout.num_q_heads)) {
    return absl::InvalidArgumentError(absl::StrCat("q and o must hold ", qsize, " floats and lse ",
                                                   layout.num_q_heads, "; got ", q.size(), ", ",
                                                   o.size(), ", ", lse.size()));
  }
  // Plan, apply, attend, then commit the stack's actions; a failure anywhere before the commit
  // undoes the append, so a refused step leaves the sequence exactly as it was. Position-only
  // policies (windows) decide before the attention, which then skips the pages they drop, as
  // Append + Attend would; score policies (H2O) decide after it, on scores that include it.
  AppendPlan plan;
  RETURN_IF_ERROR(PlanAppend(s, layer, /*num_tokens=*/1, plan));
  ApplyAppend(s, plan, k.data(), v.data());
  std::vector<HeadActions> actions;
  // A merge stage also decides after the attention: its merges then apply with the drops.
  const bool decide_after = s.stack->actions().uses_scores() || s.stack->merger() != nullptr;
  absl::Status st = decide_after ? absl::OkStatus() : DecideActions(s, layer, actions);
  if (st.ok()) {
    st = AttendLocked(s, layer, q.data(), o.data(), lse.data(), decide_after ? nullptr : &actions);
  }
  if (st.ok() && decide_after) st = DecideActions(s, layer, actions);
  RETURN_IF_ERROR(FinishAppend(s, plan, st, actions, before_commit));
  if (layer_length != nullptr) *layer_length = s.layer_len[layer];
  return absl::OkStatus();
}

absl::Status Engine::DecodeStep(const SequenceId& seq, LayerId layer, absl::Span<const float> q,
                                absl::Span<const std::byte> k, absl::Span<const std::byte> v,
                                DType dtype, absl::Span<float> o, absl::Span<float> lse,
                                int64_t* layer_length, const CommitHook* before_commit) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> s, Find(seq));
  MutexLock lock(&s->mu);
  return DecodeStepLocked(*s, layer.value(), q, k, v, dtype, o, lse, layer_length, before_commit);
}

absl::Status Engine::DecodeStepBatch(LayerId layer, DType dtype, absl::Span<DecodeItem> items) {
  // Lock order: ascending handle, so that two batches over overlapping sequences cannot deadlock.
  std::vector<size_t> order(items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return items[a].seq < items[b].seq; });
  for (size_t i = 1; i < order.size(); ++i) {
    if (items[order[i]].seq == items[order[i - 1]].seq) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", items[order[i]].seq.ToHex(), " appears twice in one batch"));
    }
  }
  std::vector<std::shared_ptr<Sequence>> seqs(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    absl::StatusOr<std::shared_ptr<Sequence>> s = Find(items[i].seq);
    items[i].status = s.status();
    if (s.ok()) seqs[i] = *std::move(s);
  }
  std::vector<std::unique_ptr<MutexLock>> locks;
  locks.reserve(items.size());
  for (size_t i : order) {
    if (seqs[i] != nullptr) locks.push_back(std::make_unique<MutexLock>(&seqs[i]->mu));
  }
  for (size_t i = 0; i < items.size(); ++i) {
    if (seqs[i] == nullptr) continue;
    DecodeItem& item = items[i];
    item.status = DecodeStepLocked(*seqs[i], layer.value(), item.q, item.k, item.v, dtype, item.o,
                                   item.lse, &item.layer_length, item.before_commit);
  }
  return absl::OkStatus();
}

}  // namespace headwise
