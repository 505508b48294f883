// The write path of the engine: appends planned then applied (all-or-nothing), and the policy
// stack's actions (page and token drops, compaction of partial pages).
#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"
#include "cachesvc/engine.h"
#include "cachesvc/engine_internal.h"

namespace headwise {
namespace {

int64_t PagesFor(int64_t tokens, int page_tokens) {
  return (tokens + page_tokens - 1) / page_tokens;
}

// Moves row `from` of page `src` to row `to` of page `dst` (K and V blocks of one page each).
void MoveRow(const std::byte* src, int from, std::byte* dst, int to, int page_tokens,
             int64_t row_bytes) {
  std::memmove(dst + to * row_bytes, src + from * row_bytes, row_bytes);
  std::memmove(dst + (int64_t{page_tokens} + to) * row_bytes,
               src + (int64_t{page_tokens} + from) * row_bytes, row_bytes);
}

// Copies n rows of row_bytes each from src (rows src_stride bytes apart) to dst (contiguous). The
// common row sizes get a constant-size memcpy the compiler inlines.
template <int64_t kRowBytes>
void CopyFixedRows(std::byte* dst, const std::byte* src, int n, int64_t src_stride) {
  for (int r = 0; r < n; ++r) std::memcpy(dst + r * kRowBytes, src + r * src_stride, kRowBytes);
}

void CopyRows(std::byte* dst, const std::byte* src, int n, int64_t src_stride, int64_t row_bytes) {
  switch (row_bytes) {
    case 128:
      return CopyFixedRows<128>(dst, src, n, src_stride);
    case 256:
      return CopyFixedRows<256>(dst, src, n, src_stride);
    case 512:
      return CopyFixedRows<512>(dst, src, n, src_stride);
    default:
      for (int r = 0; r < n; ++r) std::memcpy(dst + r * row_bytes, src + r * src_stride, row_bytes);
  }
}

}  // namespace

absl::Status Engine::Fault(std::string_view point) const {
  return options_.fault_hook ? options_.fault_hook(point) : absl::OkStatus();
}

absl::Status Engine::PlanAppend(Sequence& s, int layer, int num_tokens, AppendPlan& plan) {
  s.mu.AssertHeld();
  const ModelLayout& layout = s.layout();
  const int P = layout.page_tokens;
  const int H = layout.num_kv_heads;
  const PoolSet& pools = s.pools();
  plan.layer = layer;
  plan.num_tokens = num_tokens;
  plan.start = s.layer_len[layer];
  plan.home = s.placement.home_tier();
  plan.heads.assign(H, AppendPlan::Head{});
  SettleLayer(s, layer);  // No kept copy of this layer is still reading its pages.
  // Every slot is taken before anything is written. No copy is in flight and partial pages never
  // spill, so any full page may make room.
  absl::Status st;
  for (int h = 0; h < H && st.ok(); ++h) {
    HeadTable& t = s.table(layer, h);
    AppendPlan::Head& hp = plan.heads[h];
    hp.old_pages = t.meta.size();
    int64_t room = 0;
    if (!t.meta.empty()) {
      hp.old_tail_count = t.meta.back().token_count;
      if (hp.old_tail_count < P) {
        room = P - hp.old_tail_count;
        PhysPage* tail = t.phys.back();
        hp.copy_tail = !tail->exclusive() || tail->tier != plan.home;
      }
    }
    const int64_t need = PagesFor(std::max<int64_t>(0, num_tokens - room), P) + hp.copy_tail;
    for (int64_t i = 0; i < need && st.ok(); ++i) {
      absl::StatusOr<uint64_t> slot = TakeSlot(s, t, plan.home, /*protect_begin=*/0,
                                               /*protect_end=*/0);
      if (slot.ok()) {
        hp.slots.push_back(*slot);
      } else {
        st = slot.status();
      }
    }
    if (st.ok() && hp.copy_tail) {
      // The private copy of the tail is filled now: reading a spilled tail back may fail.
      PagePool* pool = pools.Pool(plan.home);
      std::byte* dst = pool->SlotAddress(hp.slots[0]);
      PhysPage* old = t.phys.back();
      if (old->tier == Tier::kDisk) {
        st = Fault("disk.get");
        if (st.ok()) st = disk_->GetPage(old->disk_key, absl::MakeSpan(dst, pool->slot_bytes()));
      } else {
        std::memcpy(dst, pools.Pool(old->tier)->SlotAddress(old->slot), pool->slot_bytes());
      }
    }
  }
  if (!st.ok()) {
    for (AppendPlan::Head& hp : plan.heads) {
      for (uint64_t slot : hp.slots) FreeSlot(pools, plan.home, slot);
      hp.slots.clear();
    }
  }
  return st;
}

void Engine::ApplyAppend(Sequence& s, AppendPlan& plan, const std::byte* k, const std::byte* v) {
  s.mu.AssertHeld();
  const ModelLayout& layout = s.layout();
  const int P = layout.page_tokens;
  const int H = layout.num_kv_heads;
  const int64_t row_bytes = int64_t{layout.head_dim} * DTypeSize(layout.dtype);
  PagePool* pool = s.pools().Pool(plan.home);
  const float initial = s.stack->scorer() == nullptr ? 0.0f : s.stack->scorer()->InitialScore();
  for (int h = 0; h < H; ++h) {
    HeadTable& t = s.table(plan.layer, h);
    AppendPlan::Head& hp = plan.heads[h];
    size_t next_slot = 0;
    if (hp.copy_tail) {
      hp.old_tail = t.phys.back();
      t.phys.back() = NewPage(plan.home, hp.slots[next_slot++]);
      s.Track(hp.old_tail->tier, -1);
      s.Track(plan.home, 1);
      cow_copies_.fetch_add(1, std::memory_order_relaxed);
    }
    // One run of rows per page: the page's bookkeeping once per run, then a tight row copy
    // (a source row every H rows).
    for (int64_t i = 0; i < plan.num_tokens;) {
      if (t.meta.empty() || t.meta.back().token_count == P) {
        t.phys.push_back(NewPage(plan.home, hp.slots[next_slot++]));
        s.Track(plan.home, 1);
        PageMeta m;
        m.first_position = plan.start + i;
        t.meta.push_back(std::move(m));
        if (s.stack->scorer() != nullptr) t.scores.resize(t.meta.size() * P, 0.0f);
      }
      PageMeta& m = t.meta.back();
      std::byte* page = pool->SlotAddress(t.phys.back()->slot);
      const int row = m.token_count;
      const int n = static_cast<int>(std::min<int64_t>(P - row, plan.num_tokens - i));
      t.phys.back()->version = NextVersion();  // The run starts at row 0 or at i == 0.
      const int64_t src = (i * H + h) * row_bytes;
      CopyRows(page + row * row_bytes, k + src, n, H * row_bytes, row_bytes);
      CopyRows(page + (int64_t{P} + row) * row_bytes, v + src, n, H * row_bytes, row_bytes);
      if (!m.positions.empty()) {
        for (int r = 0; r < n; ++r) m.positions.push_back(plan.start + i + r);
      }
      if (!m.bias.empty()) m.bias.resize(row + n, 0.0f);
      if (!t.scores.empty()) {
        std::fill_n(t.scores.begin() + (t.meta.size() - 1) * P + row, n, initial);
      }
      m.token_count += n;
      m.last_touched_step = s.step;
      i += n;
    }
    t.tokens += plan.num_tokens;
    if (!t.scores.empty() && s.stack->scorer()->needs().appended_keys) {
      ScoreAppendedKeys(s, t, h, plan.num_tokens, k);
    }
  }
  s.retained_tokens += int64_t{plan.num_tokens} * H;
  const int64_t before = s.length();
  s.layer_len[plan.layer] += plan.num_tokens;
  plan.completes_step = s.length() > before;
  if (plan.completes_step) s.step += s.length() - before;
  plan.applied = true;
}

// The scorer's scores of the `n` tokens just appended to head `h` (the last n held rows).
void Engine::ScoreAppendedKeys(Sequence& s, HeadTable& t, int h, int n, const std::byte* k) {
  s.mu.AssertHeld();
  const ModelLayout& layout = s.layout();
  const int D = layout.head_dim;
  const int P = layout.page_tokens;
  std::vector<float>& keys = s.probs_scratch;  // Free between decode calls.
  std::vector<float> scores(n);
  keys.resize(static_cast<size_t>(n) * D);
  for (int i = 0; i < n; ++i) {
    for (int c = 0; c < D; ++c) {
      keys[i * D + c] =
          LoadAsFloat(k, layout.dtype, (static_cast<size_t>(i) * layout.num_kv_heads + h) * D + c);
    }
  }
  s.stack->scorer()->ScoreAppended(absl::MakeConstSpan(keys.data(), keys.size()), D,
                                   absl::MakeSpan(scores));
  // Walk back over the last n rows of the head.
  int i = n - 1;
  for (size_t p = t.meta.size(); p-- > 0 && i >= 0;) {
    for (int r = t.meta[p].token_count - 1; r >= 0 && i >= 0; --r)
      t.scores[p * P + r] = scores[i--];
  }
}

void Engine::UndoAppend(Sequence& s, AppendPlan& plan) {
  s.mu.AssertHeld();
  if (!plan.applied) return;
  const int P = s.layout().page_tokens;
  const PoolSet& pools = s.pools();
  if (plan.completes_step) s.step -= plan.num_tokens;
  s.layer_len[plan.layer] -= plan.num_tokens;
  s.retained_tokens -= int64_t{plan.num_tokens} * s.layout().num_kv_heads;
  for (int h = 0; h < s.layout().num_kv_heads; ++h) {
    HeadTable& t = s.table(plan.layer, h);
    AppendPlan::Head& hp = plan.heads[h];
    while (t.meta.size() > hp.old_pages) {
      Unref(pools, t.phys.back());
      s.Track(plan.home, -1);
      t.phys.pop_back();
      t.meta.pop_back();
    }
    if (!t.scores.empty()) t.scores.resize(t.meta.size() * P);
    if (hp.old_pages > 0) {
      PageMeta& tail = t.meta.back();
      if (!tail.positions.empty()) tail.positions.resize(hp.old_tail_count);
      if (!tail.bias.empty()) tail.bias.resize(hp.old_tail_count);
      tail.token_count = hp.old_tail_count;
      if (hp.copy_tail) {
        Unref(pools, t.phys.back());
        s.Track(plan.home, -1);
        t.phys.back() = hp.old_tail;
        s.Track(hp.old_tail->tier, 1);
        cow_copies_.fetch_sub(1, std::memory_order_relaxed);
      }
    }
    t.tokens -= plan.num_tokens;
  }
  plan.applied = false;
}

void Engine::CommitAppend(Sequence& s, AppendPlan& plan) {
  s.mu.AssertHeld();
  for (AppendPlan::Head& hp : plan.heads) {
    if (hp.old_tail != nullptr) Unref(s.pools(), hp.old_tail);
    hp.old_tail = nullptr;
  }
  plan.applied = false;
}

absl::Status Engine::AppendLocked(Sequence& s, int layer, const std::byte* k, const std::byte* v,
                                  int num_tokens, const CommitHook* before_commit,
                                  WindowVotes* votes) {
  s.mu.AssertHeld();
  AppendPlan plan;
  RETURN_IF_ERROR(PlanAppend(s, layer, num_tokens, plan));
  ApplyAppend(s, plan, k, v);
  if (votes != nullptr) LayoutWindowVotes(s, plan, *votes);
  std::vector<HeadActions> actions;
  return FinishAppend(s, plan, DecideActions(s, layer, actions, votes), actions, before_commit);
}

absl::Status Engine::FinishAppend(Sequence& s, AppendPlan& plan, absl::Status st,
                                  std::vector<HeadActions>& actions,
                                  const CommitHook* before_commit) {
  s.mu.AssertHeld();
  if (st.ok()) {
    KeepApplicable(s, plan.layer, actions);
    KeepApplicableMerges(s, plan.layer, actions);
  }
  if (st.ok() && before_commit != nullptr) {
    st = (*before_commit)(LayerDropsOf(s, plan.layer, actions));
  }
  if (!st.ok()) {
    UndoAppend(s, plan);
    return st;
  }
  CommitAppend(s, plan);
  ApplyActions(s, plan.layer, actions);
  return absl::OkStatus();
}

void Engine::KeepApplicable(Sequence& s, int layer, std::vector<HeadActions>& actions) {
  s.mu.AssertHeld();
  for (int h = 0; h < s.layout().num_kv_heads; ++h) {
    const HeadTable& t = s.table(layer, h);
    std::vector<TokenRef>& drops = actions[h].drop_tokens;
    drops.erase(std::remove_if(drops.begin(), drops.end(),
                               [&](const TokenRef& r) {
                                 const PhysPage* p = t.phys[r.page];
                                 return !p->exclusive() || p->tier == Tier::kDisk;
                               }),
                drops.end());
  }
}

LayerDrops Engine::LayerDropsOf(Sequence& s, int layer, const std::vector<HeadActions>& actions) {
  s.mu.AssertHeld();
  LayerDrops out;
  out.positions.resize(s.layout().num_kv_heads);
  for (int h = 0; h < s.layout().num_kv_heads; ++h) {
    const HeadTable& t = s.table(layer, h);
    std::vector<int64_t>& p = out.positions[h];
    for (int32_t page : actions[h].drop_pages) {
      for (int r = 0; r < t.meta[page].token_count; ++r) p.push_back(t.meta[page].position(r));
    }
    for (const TokenRef& r : actions[h].drop_tokens) p.push_back(t.meta[r.page].position(r.row));
    std::sort(p.begin(), p.end());
  }
  return out;
}

absl::Status Engine::ActionsFor(Sequence& s, int layer, const LayerDrops& drops,
                                std::vector<HeadActions>& out) {
  s.mu.AssertHeld();
  const int H = s.layout().num_kv_heads;
  if (drops.positions.size() != static_cast<size_t>(H)) {
    return absl::InvalidArgumentError(
        absl::StrCat("drops name ", drops.positions.size(), " kv heads; the layout has ", H));
  }
  out.assign(H, HeadActions{});
  for (int h = 0; h < H; ++h) {
    const HeadTable& t = s.table(layer, h);
    const std::vector<int64_t>& want = drops.positions[h];
    size_t next = 0;
    for (size_t i = 0; i < t.meta.size() && next < want.size(); ++i) {
      const PageMeta& m = t.meta[i];
      std::vector<TokenRef> in_page;
      for (int r = 0; r < m.token_count && next < want.size(); ++r) {
        if (m.position(r) == want[next]) {
          in_page.push_back(TokenRef{static_cast<int32_t>(i), r});
          ++next;
        }
      }
      if (static_cast<int>(in_page.size()) == m.token_count && i + 1 < t.meta.size()) {
        out[h].drop_pages.push_back(static_cast<int32_t>(i));
      } else {
        out[h].drop_tokens.insert(out[h].drop_tokens.end(), in_page.begin(), in_page.end());
      }
    }
    const bool newest =
        !t.meta.empty() && !want.empty() && want.back() == t.meta.back().last_position();
    if (next != want.size() || newest || !std::is_sorted(want.begin(), want.end())) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer ", layer, " kv head ", h,
                       ": the drops to replay name a position it does not hold"));
    }
  }
  return absl::OkStatus();
}

absl::Status Engine::DecideActions(Sequence& s, int layer, std::vector<HeadActions>& out,
                                   const WindowVotes* votes) {
  s.mu.AssertHeld();
  out.assign(s.layout().num_kv_heads, HeadActions{});
  const PolicyStack& stack = *s.stack;
  if (!stack.may_drop()) return absl::OkStatus();
  const ModelLayout& layout = s.layout();
  std::vector<HeadContext> heads(layout.num_kv_heads);
  for (int h = 0; h < layout.num_kv_heads; ++h) {
    const HeadTable& t = s.table(layer, h);
    HeadContext& head = heads[h];
    head.layer = LayerId(layer);
    head.kv_head = HeadId(h);
    head.role = stack.roles().role(head.layer, head.kv_head);
    head.page_tokens = layout.page_tokens;
    head.seq_len = s.layer_len[layer];
    head.step = s.step;
    head.pages = t.meta;
    head.token_scores = t.scores;
    if (votes != nullptr) head.window_votes = votes->by_head[h];
  }
  std::vector<int64_t> budgets(layout.num_kv_heads);
  stack.budgets().Allocate(layout, stack.roles(), LayerId(layer), s.layer_len[layer], heads,
                           absl::MakeSpan(budgets));
  for (int h = 0; h < layout.num_kv_heads; ++h) {
    const HeadTable& t = s.table(layer, h);
    heads[h].budget_tokens = budgets[h];
    ASSIGN_OR_RETURN(out[h], stack.actions().Decide(heads[h]));
    // The decision is checked before anything is applied: a policy cannot corrupt the table.
    const size_t n = t.meta.size();
    const HeadActions& a = out[h];
    for (size_t i = 0; i < a.drop_pages.size(); ++i) {
      if (a.drop_pages[i] < 0 || static_cast<size_t>(a.drop_pages[i]) + 1 >= n ||
          (i > 0 && a.drop_pages[i] <= a.drop_pages[i - 1])) {
        return absl::InternalError(absl::StrCat("policy '", std::string(stack.actions().name()),
                                                "' chose an invalid page list for head ", h));
      }
    }
    for (size_t i = 0; i < a.drop_tokens.size(); ++i) {
      const TokenRef& r = a.drop_tokens[i];
      const bool newest =
          static_cast<size_t>(r.page) + 1 == n && r.row + 1 == t.meta.back().token_count;
      if (r.page < 0 || static_cast<size_t>(r.page) >= n || r.row < 0 ||
          r.row >= t.meta[r.page].token_count || newest ||
          (i > 0 && std::make_pair(r.page, r.row) <=
                        std::make_pair(a.drop_tokens[i - 1].page, a.drop_tokens[i - 1].row))) {
        return absl::InternalError(absl::StrCat("policy '", std::string(stack.actions().name()),
                                                "' chose an invalid token list for head ", h));
      }
    }
    RETURN_IF_ERROR(PlanMerges(s, t, heads[h], out[h]));
  }
  return absl::OkStatus();
}

void Engine::ApplyActions(Sequence& s, int layer, const std::vector<HeadActions>& actions) {
  s.mu.AssertHeld();
  const int P = s.layout().page_tokens;
  for (int h = 0; h < s.layout().num_kv_heads; ++h) {
    const HeadActions& a = actions[h];
    if (a.empty()) continue;
    HeadTable& t = s.table(layer, h);
    // Merges, then token drops, while page ordinals still match the decision.
    ApplyMerges(s, t, a.merges);
    if (!a.drop_tokens.empty()) DropTokens(s, t, a.drop_tokens);
    if (!a.drop_pages.empty()) {
      std::vector<bool> drop(t.meta.size(), false);
      for (int32_t d : a.drop_pages) drop[d] = true;
      size_t w = 0;
      for (size_t r = 0; r < t.meta.size(); ++r) {
        if (drop[r]) {
          t.tokens -= t.meta[r].token_count;
          s.retained_tokens -= t.meta[r].token_count;
          s.evicted_tokens += t.meta[r].token_count;
          s.Track(t.phys[r]->tier, -1);
          Unref(s.pools(), t.phys[r]);
          continue;
        }
        if (w != r) {
          t.meta[w] = std::move(t.meta[r]);
          t.phys[w] = t.phys[r];
          if (!t.scores.empty()) {
            std::copy_n(t.scores.begin() + r * P, P, t.scores.begin() + w * P);
          }
        }
        ++w;
      }
      t.meta.resize(w);
      t.phys.resize(w);
      if (!t.scores.empty()) t.scores.resize(w * P);
      s.evicted_pages += static_cast<int64_t>(a.drop_pages.size());
      evicted_pages_.fetch_add(static_cast<int64_t>(a.drop_pages.size()),
                               std::memory_order_relaxed);
    }
    if (!a.drop_tokens.empty()) MergePartialPages(s, t);
  }
}

// Removes single tokens from their pages, shifting the survivors down so a page's tokens stay
// rows 0 .. token_count - 1; the page then lists its positions. A page that is shared (fork) or
// not in memory keeps its tokens: the next decision will choose again.
void Engine::DropTokens(Sequence& s, HeadTable& t, const std::vector<TokenRef>& drops) {
  s.mu.AssertHeld();
  const ModelLayout& layout = s.layout();
  const int P = layout.page_tokens;
  const int64_t row_bytes = int64_t{layout.head_dim} * DTypeSize(layout.dtype);
  size_t i = 0;
  while (i < drops.size()) {
    const int32_t page = drops[i].page;
    size_t j = i;
    while (j < drops.size() && drops[j].page == page) ++j;
    PhysPage* phys = t.phys[page];
    if (!phys->exclusive() || phys->tier == Tier::kDisk) {
      i = j;
      continue;
    }
    PageMeta& m = t.meta[page];
    std::byte* base = s.pools().Pool(phys->tier)->SlotAddress(phys->slot);
    std::vector<int64_t> positions;
    positions.reserve(m.token_count - (j - i));
    int w = 0;
    size_t next = i;
    for (int r = 0; r < m.token_count; ++r) {
      if (next < j && drops[next].row == r) {
        ++next;
        continue;
      }
      if (w != r) {
        MoveRow(base, r, base, w, P, row_bytes);
        if (!t.scores.empty()) t.scores[page * P + w] = t.scores[page * P + r];
        if (!m.bias.empty()) m.bias[w] = m.bias[r];
      }
      positions.push_back(m.position(r));
      ++w;
    }
    if (!m.bias.empty()) m.bias.resize(w);
    phys->version = NextVersion();
    const int dropped = m.token_count - w;
    m.token_count = w;
    m.first_position = positions.front();
    m.positions = std::move(positions);
    t.tokens -= dropped;
    s.retained_tokens -= dropped;
    s.evicted_tokens += dropped;
    i = j;
  }
}

// Compaction: folds a partial page into the page before it when both fit one page, are private
// and live in the same memory tier. Positions stay increasing (the later page's tokens follow).
void Engine::MergePartialPages(Sequence& s, HeadTable& t) {
  s.mu.AssertHeld();
  const ModelLayout& layout = s.layout();
  const int P = layout.page_tokens;
  const int64_t row_bytes = int64_t{layout.head_dim} * DTypeSize(layout.dtype);
  size_t w = 0;
  for (size_t r = 1; r < t.meta.size(); ++r) {
    PageMeta& into = t.meta[w];
    PageMeta& from = t.meta[r];
    PhysPage* a = t.phys[w];
    PhysPage* b = t.phys[r];
    const bool fits = into.token_count + from.token_count <= P && a->exclusive() &&
                      b->exclusive() && a->tier == b->tier && a->tier != Tier::kDisk;
    if (fits) {
      std::byte* dst = s.pools().Pool(a->tier)->SlotAddress(a->slot);
      const std::byte* src = s.pools().Pool(b->tier)->SlotAddress(b->slot);
      std::vector<int64_t> positions;
      positions.reserve(into.token_count + from.token_count);
      for (int i = 0; i < into.token_count; ++i) positions.push_back(into.position(i));
      for (int i = 0; i < from.token_count; ++i) {
        MoveRow(src, i, dst, into.token_count + i, P, row_bytes);
        if (!t.scores.empty()) t.scores[w * P + into.token_count + i] = t.scores[r * P + i];
        positions.push_back(from.position(i));
      }
      a->version = NextVersion();
      if (!into.bias.empty() || !from.bias.empty()) {
        into.bias.resize(into.token_count, 0.0f);
        for (int i = 0; i < from.token_count; ++i) into.bias.push_back(from.row_bias(i));
      }
      into.rewritten = into.rewritten || from.rewritten;
      into.token_count += from.token_count;
      into.positions = std::move(positions);
      into.last_touched_step = std::max(into.last_touched_step, from.last_touched_step);
      into.attention_mass += from.attention_mass;
      s.Track(b->tier, -1);
      Unref(s.pools(), b);
      continue;
    }
    ++w;
    if (w != r) {
      t.meta[w] = std::move(t.meta[r]);
      t.phys[w] = t.phys[r];
      if (!t.scores.empty()) std::copy_n(t.scores.begin() + r * P, P, t.scores.begin() + w * P);
    }
  }
  if (!t.meta.empty()) {
    t.meta.resize(w + 1);
    t.phys.resize(w + 1);
    if (!t.scores.empty()) t.scores.resize((w + 1) * P);
  }
}

}  // namespace headwise
