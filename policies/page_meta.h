// Per-page metadata, as policies see it. The engine keeps one PageMeta per page in host memory
// (it is small) and hands a policy read-only views of it; policies never touch page payloads.
#ifndef HEADWISE_POLICIES_PAGE_META_H_
#define HEADWISE_POLICIES_PAGE_META_H_

#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/types/span.h"
#include "cachesvc/base/ids.h"

namespace headwise {

// At what precision a page's payload is stored. kNative is the layout's dtype (f32/f16/bf16);
// the others are KIVI-style quantized pages (kernels/attention.h QuantParams::bits).
enum class PagePrecision : uint8_t { kNative = 0, kInt8 = 1, kInt4 = 2, kInt2 = 3 };

// "native", "int8", "int4", "int2".
std::string_view PagePrecisionName(PagePrecision precision);

// Metadata of one page of one (layer, kv head). Plain data; the engine owns and updates it.
struct PageMeta {
  // Where the payload lives: tier and slot within that tier's pool.
  PageId id;
  // Storage precision of the payload. Default: kNative.
  PagePrecision precision = PagePrecision::kNative;
  // Valid tokens in the page: 1..page_tokens (only the last page of a head may be partial).
  int32_t token_count = 0;
  // Position of the page's first token. An unmerged page holds the contiguous positions
  // [first_position, first_position + token_count).
  int64_t first_position = 0;
  // Per-channel key minimum and maximum over the page's tokens (Quest bounds, policies.md §7.1):
  // head_dim floats each, or both empty when not computed.
  std::vector<float> key_min;
  std::vector<float> key_max;
  // Attention probability mass the page has received, summed over query heads of the group and
  // over steps (H2O-style accumulator, fp32 as policies.md §11.5 asks). Default: 0.
  float attention_mass = 0.0f;
  // Engine step at which the page was last written or attended. Default: 0.
  int64_t last_touched_step = 0;
  // How many merge operations folded tokens into this page (0 = never merged). A merged page's
  // positions are not contiguous; first_position is then its smallest position.
  int32_t merged_count = 0;

  // One past the last position of an unmerged page.
  int64_t end_position() const { return first_position + token_count; }
};

// Read-only view of the page list of one (layer, kv head) of one sequence, in position order
// (page ordinal 0 first). Ordinals index `pages`; after an eviction the survivors are
// renumbered, so ordinals are not position / page_tokens. The view does not own the pages; it is
// valid only while the engine holds the sequence's lock.
struct HeadPagesView {
  LayerId layer;
  HeadId kv_head;
  // Tokens per full page (the layout's page_tokens).
  int32_t page_tokens = 0;
  absl::Span<const PageMeta> pages;
};

}  // namespace headwise

#endif  // HEADWISE_POLICIES_PAGE_META_H_
