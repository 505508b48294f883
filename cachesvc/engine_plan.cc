// Costing a decode step without doing it (Engine::PlanDecodeStep): the same decisions the apply
// path makes (engine_append.cc, engine_staging.cc, engine_attention.cc), taken on a copy of the
// layer's page metadata. Nothing here changes the sequence or the tiers.
#include <algorithm>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"
#include "cachesvc/engine.h"
#include "cachesvc/engine_internal.h"

namespace headwise {
namespace {

constexpr int Purpose(CopyPriority p) { return static_cast<int>(p); }

}  // namespace

absl::StatusOr<StepPlan> Engine::PlanDecodeStep(const SequenceId& seq, LayerId layer) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> s, Find(seq));
  MutexLock lock(&s->mu);
  RETURN_IF_ERROR(CheckLive(*s));
  const ModelLayout& layout = s->layout();
  const int64_t row = int64_t{layout.num_kv_heads} * layout.head_dim * DTypeSize(layout.dtype);
  RETURN_IF_ERROR(ValidateAppend(*s, layer.value(), row, row, /*num_tokens=*/1, layout.dtype));
  StepPlan plan;
  std::vector<std::vector<PageMeta>> after;
  std::vector<std::vector<bool>> written;
  std::vector<std::vector<int32_t>> origin;
  RETURN_IF_ERROR(PlanAppendAndActions(*s, layer.value(), plan, after, written, origin));
  PlanStaging(*s, layer.value(), after, written, origin, plan);
  return plan;
}

// after[h][i]: page i of head h once the step's append and actions are applied; written[h][i]:
// whether the step writes that page (its staged copies are then stale); origin[h][i]: the
// ordinal of that page in the table now, or -1 for a page the step creates.
absl::Status Engine::PlanAppendAndActions(Sequence& s, int layer, StepPlan& plan,
                                          std::vector<std::vector<PageMeta>>& after,
                                          std::vector<std::vector<bool>>& written,
                                          std::vector<std::vector<int32_t>>& origin) {
  s.mu.AssertHeld();
  const ModelLayout& layout = s.layout();
  const int H = layout.num_kv_heads;
  const int P = layout.page_tokens;
  const Tier home = s.placement.home_tier();
  after.assign(H, {});
  written.assign(H, {});
  origin.assign(H, {});
  const int64_t seq_len = s.layer_len[layer] + 1;
  for (int h = 0; h < H; ++h) {
    const HeadTable& t = s.table(layer, h);
    after[h] = t.meta;
    written[h].assign(t.meta.size(), false);
    for (size_t i = 0; i < t.meta.size(); ++i) origin[h].push_back(static_cast<int32_t>(i));
    if (!t.meta.empty() && t.meta.back().token_count < P) {
      const PhysPage* tail = t.phys.back();
      if (!tail->exclusive() || tail->tier != home) {
        ++plan.cow_copies;
        ++plan.pages_allocated;
        origin[h].back() = -1;  // A new page replaces it.
      }
      PageMeta& m = after[h].back();
      if (!m.positions.empty()) m.positions.push_back(seq_len - 1);
      ++m.token_count;
      written[h].back() = true;
    } else {
      PageMeta m;
      m.first_position = seq_len - 1;
      m.token_count = 1;
      after[h].push_back(std::move(m));
      written[h].push_back(true);
      origin[h].push_back(-1);
      ++plan.pages_allocated;
    }
  }
  // Spill: the shortfall of free host slots, in the extents the engine spills by.
  if (home == Tier::kHost && disk_ != nullptr) {
    const uint64_t pb = static_cast<uint64_t>(layout.page_bytes());
    const uint64_t free_pages = (host_budget_.capacity() - host_budget_.used()) / pb;
    const uint64_t need = static_cast<uint64_t>(plan.pages_allocated);
    if (need > free_pages) {
      const uint64_t e = options_.extent_pages;
      plan.bytes[Purpose(CopyPriority::kWriteBack)] += (need - free_pages + e - 1) / e * e * pb;
    }
  }
  const PolicyStack& stack = *s.stack;
  if (!stack.may_drop()) return absl::OkStatus();
  if (stack.actions().uses_scores()) {
    plan.drops_known = false;
    return absl::OkStatus();
  }
  std::vector<HeadContext> heads(H);
  for (int h = 0; h < H; ++h) {
    HeadContext& head = heads[h];
    head.layer = LayerId(layer);
    head.kv_head = HeadId(h);
    head.role = stack.roles().role(head.layer, head.kv_head);
    head.page_tokens = P;
    head.seq_len = seq_len;
    head.step = s.step;
    head.pages = after[h];
  }
  std::vector<int64_t> budgets(H);
  stack.budgets().Allocate(layout, stack.roles(), LayerId(layer), seq_len, heads,
                           absl::MakeSpan(budgets));
  std::vector<HeadActions> decided(H);
  for (int h = 0; h < H; ++h) {
    heads[h].budget_tokens = budgets[h];
    ASSIGN_OR_RETURN(decided[h], stack.actions().Decide(heads[h]));
  }
  // Applied to the copies only after every head decided (the contexts point into them).
  for (int h = 0; h < H; ++h) {
    const HeadActions& actions = decided[h];
    plan.pages_dropped += static_cast<int64_t>(actions.drop_pages.size());
    for (auto it = actions.drop_pages.rbegin(); it != actions.drop_pages.rend(); ++it) {
      plan.tokens_dropped += after[h][*it].token_count;
      after[h].erase(after[h].begin() + *it);
      written[h].erase(written[h].begin() + *it);
      origin[h].erase(origin[h].begin() + *it);
    }
  }
  return absl::OkStatus();
}

void Engine::PlanStaging(Sequence& s, int layer, const std::vector<std::vector<PageMeta>>& after,
                         const std::vector<std::vector<bool>>& written,
                         const std::vector<std::vector<int32_t>>& origin, StepPlan& plan) {
  s.mu.AssertHeld();
  const ModelLayout& layout = s.layout();
  const int H = layout.num_kv_heads;
  const uint64_t pb = static_cast<uint64_t>(layout.page_bytes());
  for (const auto& pages : after) plan.pages_attended += static_cast<int64_t>(pages.size());
  if (s.placement.mode == PlacementMode::kDeviceOnly) return;
  // Pages on disk are read back first (demand).
  for (int h = 0; h < H; ++h) {
    const HeadTable& t = s.table(layer, h);
    for (int32_t o : origin[h]) {
      if (o >= 0 && t.phys[o]->tier == Tier::kDisk) {
        plan.bytes[Purpose(CopyPriority::kDemandFetch)] += pb;
      }
    }
  }
  if (s.placement.mode == PlacementMode::kHeadOffload) {
    // Part 0 is staged on demand; every later part is staged ahead while the one before it
    // computes (AttendHeadwise).
    const int ahead = s.placement.heads_ahead();
    const size_t share =
        std::max<size_t>(1, s.pools().device->num_slots() / (1 + static_cast<size_t>(ahead)));
    const size_t n0 = after[0].size();
    const size_t first = n0 / std::max<size_t>(1, (n0 + share - 1) / share);
    const uint64_t total = static_cast<uint64_t>(plan.pages_attended);
    plan.bytes[Purpose(CopyPriority::kDemandFetch)] += first * pb;
    plan.bytes[Purpose(CopyPriority::kPrefetch)] += (total - first) * pb;
    return;
  }
  // layer_offload: the kept copies of unchanged pages are reused (Restage), the rest copied.
  bool kept = static_cast<size_t>(layer) < s.layer_stage.size() && s.layer_stage[layer].active;
  if (kept) {
    // A kept staging whose copy failed is staged again (Restage), all on demand.
    Staging::CopyState& state = *s.layer_stage[layer].copy_state;
    MutexLock lock(&state.mu);
    kept = state.status.ok();
  }
  absl::flat_hash_map<const PhysPage*, uint64_t> copies;  // Kept copy's source -> version.
  if (kept) {
    const Staging& k = s.layer_stage[layer];
    for (size_t e = 0; e < k.sources.size(); ++e) copies.emplace(k.sources[e], k.versions[e]);
  }
  uint64_t demand_pages = 0;
  for (int h = 0; h < H; ++h) {
    const HeadTable& t = s.table(layer, h);
    for (size_t i = 0; i < after[h].size(); ++i) {
      bool reused = false;
      const int32_t o = origin[h][i];
      if (o >= 0 && !written[h][i]) {
        auto it = copies.find(t.phys[o]);
        reused = it != copies.end() && it->second == t.phys[o]->version;
      }
      demand_pages += reused ? 0 : 1;
    }
  }
  plan.bytes[Purpose(CopyPriority::kDemandFetch)] += demand_pages * pb;
  // Then the Prefetcher's layers, each staged whole while it fits beside this one.
  uint64_t free_bytes = device_budget_.capacity() - device_budget_.used();
  const uint64_t current = (kept ? demand_pages : static_cast<uint64_t>(plan.pages_attended)) * pb;
  free_bytes = free_bytes > current ? free_bytes - current : 0;
  for (int next : s.stack->prefetcher().LayersAhead(layer, layout.num_layers)) {
    if (next == layer ||
        (static_cast<size_t>(next) < s.layer_stage.size() && s.layer_stage[next].active)) {
      continue;
    }
    uint64_t pages = 0;
    for (int h = 0; h < H; ++h) pages += s.table(next, h).phys.size();
    if (pages * pb > free_bytes) break;
    free_bytes -= pages * pb;
    plan.bytes[Purpose(CopyPriority::kPrefetch)] += pages * pb;
  }
}

}  // namespace headwise
