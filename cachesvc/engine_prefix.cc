// Engine: prefix blocks pinned for the prefix cache (engine.h, "Prefix blocks"). A pin is one
// reference on each page of a block, exactly as a fork holds its parent's pages, so everything
// the engine does with shared pages (copy-on-write, deferred token drops, no spill) applies.
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"
#include "cachesvc/engine.h"
#include "cachesvc/engine_internal.h"
#include "cachesvc/placement.h"

namespace headwise {
namespace {

absl::Status CheckBlockTokens(const ModelLayout& layout, int64_t tokens) {
  if (tokens < 1 || tokens % layout.page_tokens != 0) {
    return absl::InvalidArgumentError(absl::StrCat("block tokens ", tokens,
                                                   " must be a positive multiple of the page's ",
                                                   layout.page_tokens, " tokens"));
  }
  return absl::OkStatus();
}

bool SamePageLayout(const ModelLayout& a, const ModelLayout& b) {
  return a.num_layers == b.num_layers && a.num_kv_heads == b.num_kv_heads &&
         a.head_dim == b.head_dim && a.dtype == b.dtype && a.page_tokens == b.page_tokens;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const Engine::LayoutEntry>> Engine::FindLayout(
    const std::string& name) const {
  MutexLock lock(&layouts_mu_);
  auto it = layouts_.find(name);
  if (it == layouts_.end())
    return absl::NotFoundError(absl::StrCat("no layout named '", name, "'"));
  return it->second;
}

BlockPagesId Engine::AddPinned(std::unique_ptr<PinnedPages> pinned) {
  MutexLock lock(&blocks_mu_);
  const uint64_t id = next_block_id_++;
  blocks_.emplace(id, std::move(pinned));
  return BlockPagesId(id);
}

void Engine::ReleasePinned(PinnedPages& pinned) {
  for (PhysPage* p : pinned.pages) Unref(*pinned.layout_entry->pools, p);
  pinned.pages.clear();
}

std::unique_ptr<Engine::PinnedPages> Engine::PinDense(Sequence& s, int64_t first, int64_t tokens) {
  s.mu.AssertHeld();
  const ModelLayout& layout = s.layout();
  const int P = layout.page_tokens;
  const auto per_head = static_cast<size_t>(tokens / P);
  const auto first_page = static_cast<size_t>(first / P);
  auto pinned = std::make_unique<PinnedPages>();
  pinned->layout_entry = s.layout_entry;
  pinned->first_position = first;
  pinned->tokens = tokens;
  pinned->pages.reserve(s.heads.size() * per_head);
  bool tier_set = false;
  // Page ordinal i always starts at or after position i * P (pages hold at most P increasing
  // positions), with equality only when every page before it is full and contiguous; so these
  // checks also prove the head holds every position before the block.
  for (const HeadTable& t : s.heads) {
    if (t.meta.size() < first_page + per_head) return nullptr;
    for (size_t j = 0; j < per_head; ++j) {
      const PageMeta& m = t.meta[first_page + j];
      PhysPage* p = t.phys[first_page + j];
      if (m.first_position != first + static_cast<int64_t>(j) * P || m.token_count != P ||
          !m.contiguous() || m.rewritten || p->tier == Tier::kDisk ||
          (tier_set && p->tier != pinned->tier)) {
        return nullptr;
      }
      pinned->tier = p->tier;
      tier_set = true;
      pinned->pages.push_back(p);
    }
  }
  for (PhysPage* p : pinned->pages) p->refs.fetch_add(1, std::memory_order_relaxed);
  return pinned;
}

absl::StatusOr<std::vector<PinnedBlock>> Engine::PinBlocks(const SequenceId& seq,
                                                           int64_t block_tokens,
                                                           int64_t first_block,
                                                           int64_t max_blocks) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> s, Find(seq));
  if (first_block < 0) return absl::InvalidArgumentError("first_block must be >= 0");
  std::vector<std::unique_ptr<PinnedPages>> pins;
  {
    MutexLock lock(&s->mu);
    RETURN_IF_ERROR(CheckLive(*s));
    RETURN_IF_ERROR(CheckBlockTokens(s->layout(), block_tokens));
    for (int64_t b = first_block; b < first_block + max_blocks; ++b) {
      const int64_t first = b * block_tokens;
      if (first + block_tokens > s->length()) break;
      std::unique_ptr<PinnedPages> pinned = PinDense(*s, first, block_tokens);
      if (pinned == nullptr) break;
      pins.push_back(std::move(pinned));
    }
  }
  // blocks_mu_ is taken after (never under) a sequence lock is released, as in
  // CreateSequenceFromBlocks, which takes a sequence lock under it.
  std::vector<PinnedBlock> out;
  const int64_t page_bytes = s->layout().page_bytes();
  for (std::unique_ptr<PinnedPages>& pinned : pins) {
    PinnedBlock info;
    info.tier = pinned->tier;
    info.first_position = pinned->first_position;
    info.tokens = block_tokens;
    info.bytes = static_cast<int64_t>(pinned->pages.size()) * page_bytes;
    info.id = AddPinned(std::move(pinned));
    out.push_back(info);
  }
  return out;
}

absl::Status Engine::UnpinBlock(BlockPagesId id) {
  std::unique_ptr<PinnedPages> pinned;
  {
    MutexLock lock(&blocks_mu_);
    auto it = blocks_.find(id.value());
    if (it == blocks_.end()) return absl::NotFoundError(absl::StrCat("no block ", id.value()));
    pinned = std::move(it->second);
    blocks_.erase(it);
  }
  ReleasePinned(*pinned);
  return absl::OkStatus();
}

int64_t Engine::pinned_blocks() const {
  MutexLock lock(&blocks_mu_);
  return static_cast<int64_t>(blocks_.size());
}

absl::StatusOr<SequenceId> Engine::CreateSequenceFromBlocks(const std::string& layout_name,
                                                            const headwise::v1::PolicySpec& spec,
                                                            absl::Span<const BlockPagesId> blocks) {
  ASSIGN_OR_RETURN(std::shared_ptr<const LayoutEntry> entry, FindLayout(layout_name));
  ASSIGN_OR_RETURN(const PlacementSpec placement, ResolvePlacement(spec));
  ASSIGN_OR_RETURN(const SequenceId id, CreateSequence(layout_name, spec));
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> s, Find(id));
  const ModelLayout& layout = entry->layout;
  const int P = layout.page_tokens;
  absl::Status st;
  {
    MutexLock blocks_lock(&blocks_mu_);
    // Validate every block before the sequence takes a page.
    std::vector<const PinnedPages*> chosen;
    int64_t expect = 0;
    for (const BlockPagesId b : blocks) {
      auto it = blocks_.find(b.value());
      if (it == blocks_.end()) {
        st = absl::NotFoundError(absl::StrCat("no block ", b.value()));
        break;
      }
      const PinnedPages& p = *it->second;
      if (p.first_position != expect || p.layout_entry->pools != entry->pools ||
          !SamePageLayout(p.layout_entry->layout, layout) || p.tier != placement.home_tier()) {
        st = absl::InvalidArgumentError(
            absl::StrCat("block ", b.value(), " does not continue the prefix at position ", expect,
                         " in this layout's pages and the placement's home tier"));
        break;
      }
      expect += p.tokens;
      chosen.push_back(&p);
    }
    if (st.ok()) {
      MutexLock lock(&s->mu);
      const float initial =
          s->stack->scorer() == nullptr ? 0.0f : s->stack->scorer()->InitialScore();
      for (const PinnedPages* p : chosen) {
        const auto per_head = static_cast<size_t>(p->tokens / P);
        for (size_t h = 0; h < s->heads.size(); ++h) {
          HeadTable& t = s->heads[h];
          for (size_t j = 0; j < per_head; ++j) {
            PhysPage* page = p->pages[h * per_head + j];
            page->refs.fetch_add(1, std::memory_order_relaxed);
            t.phys.push_back(page);
            PageMeta m;
            m.first_position = p->first_position + static_cast<int64_t>(j) * P;
            m.token_count = P;
            t.meta.push_back(std::move(m));
            s->Track(p->tier, 1);
          }
          t.tokens += p->tokens;
          if (s->stack->scorer() != nullptr) t.scores.resize(t.meta.size() * P, initial);
        }
      }
      s->retained_tokens = expect * static_cast<int64_t>(s->heads.size());
      for (int64_t& len : s->layer_len) len = expect;
      s->step = expect;
    }
  }
  if (!st.ok()) {
    Release(id).IgnoreError();
    return st;
  }
  return id;
}

absl::StatusOr<std::string> Engine::ReadBlock(BlockPagesId id) {
  MutexLock lock(&blocks_mu_);
  auto it = blocks_.find(id.value());
  if (it == blocks_.end()) return absl::NotFoundError(absl::StrCat("no block ", id.value()));
  const PinnedPages& p = *it->second;
  const PagePool* pool = p.layout_entry->pools->Pool(p.tier);
  const auto page_bytes = static_cast<size_t>(pool->slot_bytes());
  std::string out(p.pages.size() * page_bytes, '\0');
  for (size_t i = 0; i < p.pages.size(); ++i) {
    std::memcpy(out.data() + i * page_bytes, pool->SlotAddress(p.pages[i]->slot), page_bytes);
  }
  return out;
}

absl::StatusOr<PinnedBlock> Engine::ImportBlock(const std::string& layout_name, Tier tier,
                                                int64_t first_position, int64_t tokens,
                                                absl::Span<const std::byte> payload) {
  ASSIGN_OR_RETURN(std::shared_ptr<const LayoutEntry> entry, FindLayout(layout_name));
  const ModelLayout& layout = entry->layout;
  RETURN_IF_ERROR(CheckBlockTokens(layout, tokens));
  if (tier == Tier::kDisk) return absl::InvalidArgumentError("blocks are imported into memory");
  if (first_position < 0 || first_position % tokens != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("first position ", first_position, " is not a multiple of ", tokens));
  }
  const int64_t pages =
      int64_t{layout.num_layers} * layout.num_kv_heads * (tokens / layout.page_tokens);
  const int64_t page_bytes = layout.page_bytes();
  if (static_cast<int64_t>(payload.size()) != pages * page_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block payload of ", payload.size(), " bytes; the layout's block is ", pages * page_bytes));
  }
  PagePool* pool = entry->pools->Pool(tier);
  auto pinned = std::make_unique<PinnedPages>();
  pinned->layout_entry = entry;
  pinned->tier = tier;
  pinned->first_position = first_position;
  pinned->tokens = tokens;
  std::vector<uint64_t> slots;
  absl::Status st = Fault(tier == Tier::kDevice ? "alloc.device" : "alloc.host");
  for (int64_t i = 0; st.ok() && i < pages; ++i) {
    absl::StatusOr<Extent> e = pool->AllocateExtent(1);
    if (!e.ok()) {
      st = e.status();
      break;
    }
    slots.push_back(e->first_slot);
  }
  if (!st.ok()) {
    for (uint64_t slot : slots) FreeSlot(*entry->pools, tier, slot);
    return st;
  }
  for (int64_t i = 0; i < pages; ++i) {
    std::memcpy(pool->SlotAddress(slots[i]), payload.data() + i * page_bytes,
                static_cast<size_t>(page_bytes));
    pinned->pages.push_back(NewPage(tier, slots[i]));
  }
  PinnedBlock info;
  info.tier = tier;
  info.first_position = first_position;
  info.tokens = tokens;
  info.bytes = pages * page_bytes;
  info.id = AddPinned(std::move(pinned));
  return info;
}

}  // namespace headwise
