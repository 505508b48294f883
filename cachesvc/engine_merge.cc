// Merging (policies.md §6; policies/merge.h): the stack's MergePolicy plans, after the action
// policy decided what to drop, which dropped tokens fold into which kept ones; the engine checks
// the plan, keeps the merges it can apply now, and applies them before the drops: weighted sums
// of K/V rows in f32, stored in the layout's dtype, and the logit bias of count-biased rows,
// which the kernels add through PagedKvView::page_bias (engine_staging.cc DescribeView).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/dtype.h"
#include "cachesvc/base/status_macros.h"
#include "cachesvc/engine.h"
#include "cachesvc/engine_internal.h"

namespace headwise {
namespace {

// The tokens `a` drops, as a set test on (page, row).
class DropSet {
 public:
  DropSet(const HeadActions& a, const std::vector<PageMeta>& meta) : pages_(meta.size(), false) {
    for (int32_t p : a.drop_pages) pages_[p] = true;
    tokens_ = a.drop_tokens;
  }
  bool Contains(TokenRef t) const {
    return pages_[t.page] || std::binary_search(tokens_.begin(), tokens_.end(), t, Less);
  }

 private:
  static bool Less(const TokenRef& x, const TokenRef& y) {
    return std::make_pair(x.page, x.row) < std::make_pair(y.page, y.row);
  }
  std::vector<bool> pages_;
  std::vector<TokenRef> tokens_;
};

bool HeldRow(const std::vector<PageMeta>& meta, TokenRef t) {
  return t.page >= 0 && static_cast<size_t>(t.page) < meta.size() && t.row >= 0 &&
         t.row < meta[t.page].token_count;
}

}  // namespace

void Engine::HeldKeys(Sequence& s, const HeadTable& t, std::vector<float>& keys) {
  s.mu.AssertHeld();
  const ModelLayout& layout = s.layout();
  const int P = layout.page_tokens;
  const int D = layout.head_dim;
  keys.assign(t.meta.size() * P * D, std::numeric_limits<float>::quiet_NaN());
  for (size_t i = 0; i < t.meta.size(); ++i) {
    const PhysPage* p = t.phys[i];
    if (p->tier == Tier::kDisk) continue;
    const std::byte* page = s.pools().Pool(p->tier)->SlotAddress(p->slot);
    float* out = keys.data() + i * P * D;
    for (size_t e = 0; e < static_cast<size_t>(t.meta[i].token_count) * D; ++e) {
      out[e] = LoadAsFloat(page, layout.dtype, e);
    }
  }
}

absl::Status Engine::PlanMerges(Sequence& s, const HeadTable& t, HeadContext& head,
                                HeadActions& a) {
  s.mu.AssertHeld();
  const MergePolicy* merger = s.stack->merger();
  if (merger == nullptr || a.empty()) return absl::OkStatus();
  std::vector<float> keys;
  if (merger->needs_keys()) {
    HeldKeys(s, t, keys);
    head.keys = keys;
    head.head_dim = s.layout().head_dim;
  }
  head.merge_state = t.merge_state;
  ASSIGN_OR_RETURN(a.merges, merger->Plan(head, a));
  head.keys = {};
  // Checked before anything is applied, like the drops: a policy cannot corrupt the table.
  const DropSet dropped(a, t.meta);
  const auto bad = [&](const char* what) {
    return absl::InternalError(absl::StrCat("merge policy '", std::string(merger->name()),
                                            "' chose ", what, " for head ", head.kv_head.value()));
  };
  const MergeGroup* prev = nullptr;
  for (const MergeGroup& g : a.merges.groups) {
    if (!HeldRow(t.meta, g.into) || dropped.Contains(g.into)) return bad("a target it drops");
    if (prev != nullptr && std::make_pair(g.into.page, g.into.row) <=
                               std::make_pair(prev->into.page, prev->into.row)) {
      return bad("targets out of order");
    }
    if (!std::isfinite(g.k_self) || !std::isfinite(g.v_self) || g.sources.empty()) {
      return bad("an empty or non-finite group");
    }
    for (const MergeSource& src : g.sources) {
      if (!HeldRow(t.meta, src.from) || !dropped.Contains(src.from)) {
        return bad("a source it keeps");
      }
      if (!std::isfinite(src.k_weight) || !std::isfinite(src.v_weight)) {
        return bad("a non-finite weight");
      }
    }
    prev = &g;
  }
  return absl::OkStatus();
}

void Engine::KeepApplicableMerges(Sequence& s, int layer, std::vector<HeadActions>& actions) {
  s.mu.AssertHeld();
  for (int h = 0; h < s.layout().num_kv_heads; ++h) {
    HeadActions& a = actions[h];
    if (a.merges.groups.empty()) continue;
    const HeadTable& t = s.table(layer, h);
    // A source must be readable and really dropped (KeepApplicable may have kept it); a target
    // must be private and in memory. A group that loses any part is skipped whole, so no weight
    // is ever applied without the others it was planned with.
    const DropSet dropped(a, t.meta);
    auto& groups = a.merges.groups;
    groups.erase(std::remove_if(groups.begin(), groups.end(),
                                [&](const MergeGroup& g) {
                                  const PhysPage* into = t.phys[g.into.page];
                                  if (!into->exclusive() || into->tier == Tier::kDisk) return true;
                                  for (const MergeSource& src : g.sources) {
                                    if (t.phys[src.from.page]->tier == Tier::kDisk ||
                                        !dropped.Contains(src.from)) {
                                      return true;
                                    }
                                  }
                                  return false;
                                }),
                 groups.end());
  }
}

void Engine::ApplyMerges(Sequence& s, HeadTable& t, const HeadMerges& merges) {
  s.mu.AssertHeld();
  if (merges.set_state) t.merge_state = merges.state;
  if (merges.groups.empty()) return;
  const ModelLayout& layout = s.layout();
  const int P = layout.page_tokens;
  const int D = layout.head_dim;
  const DType dtype = layout.dtype;
  std::vector<float> k(D), v(D);
  std::vector<TokenRef> sources;
  // Sources are dropped and targets kept, so no group reads a row another group writes.
  for (const MergeGroup& g : merges.groups) {
    PhysPage* into = t.phys[g.into.page];
    std::byte* dst = s.pools().Pool(into->tier)->SlotAddress(into->slot);
    const size_t krow = static_cast<size_t>(g.into.row) * D;
    const size_t vrow = (static_cast<size_t>(P) + g.into.row) * D;
    for (int d = 0; d < D; ++d) {
      k[d] = g.k_self * LoadAsFloat(dst, dtype, krow + d);
      v[d] = g.v_self * LoadAsFloat(dst, dtype, vrow + d);
    }
    double count = std::exp(double{t.meta[g.into.page].row_bias(g.into.row)});
    for (const MergeSource& src : g.sources) {
      const PhysPage* from = t.phys[src.from.page];
      const std::byte* page = s.pools().Pool(from->tier)->SlotAddress(from->slot);
      const size_t fk = static_cast<size_t>(src.from.row) * D;
      const size_t fv = (static_cast<size_t>(P) + src.from.row) * D;
      for (int d = 0; d < D; ++d) {
        k[d] += src.k_weight * LoadAsFloat(page, dtype, fk + d);
        v[d] += src.v_weight * LoadAsFloat(page, dtype, fv + d);
      }
      count += std::exp(double{t.meta[src.from.page].row_bias(src.from.row)});
      sources.push_back(src.from);
    }
    for (int d = 0; d < D; ++d) {
      StoreFromFloat(dst, dtype, krow + d, k[d]);
      StoreFromFloat(dst, dtype, vrow + d, v[d]);
    }
    PageMeta& m = t.meta[g.into.page];
    if (g.count_bias) {
      if (m.bias.empty()) m.bias.assign(m.token_count, 0.0f);
      m.bias[g.into.row] = static_cast<float>(std::log(count));
    }
    m.rewritten = true;
    into->version = NextVersion();
  }
  // A CaM source feeds several targets: count each merged token once.
  std::sort(sources.begin(), sources.end(), [](const TokenRef& x, const TokenRef& y) {
    return std::make_pair(x.page, x.row) < std::make_pair(y.page, y.row);
  });
  const auto n =
      static_cast<int64_t>(std::unique(sources.begin(), sources.end()) - sources.begin());
  s.merged_tokens += n;
  merged_tokens_.fetch_add(n, std::memory_order_relaxed);
}

}  // namespace headwise
