// Typed ids: distinct types for layers, heads, pages and sequences, so that a layer index can
// never be passed where a head index is expected.
#ifndef HEADWISE_CACHESVC_BASE_IDS_H_
#define HEADWISE_CACHESVC_BASE_IDS_H_

#include <compare>
#include <cstdint>
#include <string>

#include "absl/hash/hash.h"
#include "absl/random/random.h"

namespace headwise {

// A strongly typed integer index. `Tag` only distinguishes the types.
template <typename Tag, typename Rep = int32_t>
class TypedIndex {
 public:
  constexpr TypedIndex() = default;
  constexpr explicit TypedIndex(Rep value) : value_(value) {}
  constexpr Rep value() const { return value_; }
  constexpr auto operator<=>(const TypedIndex&) const = default;
  template <typename H>
  friend H AbslHashValue(H h, TypedIndex id) {
    return H::combine(std::move(h), id.value_);
  }

 private:
  Rep value_ = 0;
};

using LayerId = TypedIndex<struct LayerTag>;
using HeadId = TypedIndex<struct HeadTag>;

// Where a page's payload lives. The order is "closest to compute first".
enum class Tier : uint8_t { kDevice = 0, kHost = 1, kDisk = 2 };

// A page slot: its tier in the top 8 bits, the slot index within that tier's pool below.
class PageId {
 public:
  constexpr PageId() = default;
  constexpr PageId(Tier tier, uint64_t slot)
      : bits_((static_cast<uint64_t>(tier) << 56) | (slot & kSlotMask)) {}
  constexpr Tier tier() const { return static_cast<Tier>(bits_ >> 56); }
  constexpr uint64_t slot() const { return bits_ & kSlotMask; }
  constexpr uint64_t bits() const { return bits_; }
  constexpr auto operator<=>(const PageId&) const = default;
  template <typename H>
  friend H AbslHashValue(H h, PageId id) {
    return H::combine(std::move(h), id.bits_);
  }

 private:
  static constexpr uint64_t kSlotMask = (uint64_t{1} << 56) - 1;
  uint64_t bits_ = 0;
};

// A 128-bit random, unguessable sequence handle.
class SequenceId {
 public:
  constexpr SequenceId() = default;
  constexpr SequenceId(uint64_t hi, uint64_t lo) : hi_(hi), lo_(lo) {}
  // Draws a fresh id from `bitgen` (pass a shared absl::BitGen; it is seeded from the OS).
  template <typename BitGen>
  static SequenceId Random(BitGen& bitgen) {
    return SequenceId(absl::Uniform<uint64_t>(bitgen), absl::Uniform<uint64_t>(bitgen));
  }
  uint64_t hi() const { return hi_; }
  uint64_t lo() const { return lo_; }
  constexpr auto operator<=>(const SequenceId&) const = default;
  // 32 lowercase hex digits.
  std::string ToHex() const;
  template <typename H>
  friend H AbslHashValue(H h, SequenceId id) {
    return H::combine(std::move(h), id.hi_, id.lo_);
  }

 private:
  uint64_t hi_ = 0;
  uint64_t lo_ = 0;
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_BASE_IDS_H_
