// Extent: a run of consecutive page slots in one pool.
#ifndef HEADWISE_OFFLOAD_EXTENT_H_
#define HEADWISE_OFFLOAD_EXTENT_H_

#include <compare>
#include <cstdint>

namespace headwise {

// Slots [first_slot, first_slot + num_slots) of one pool. A value type; owns nothing.
struct Extent {
  uint64_t first_slot = 0;
  uint64_t num_slots = 0;

  uint64_t end_slot() const { return first_slot + num_slots; }
  auto operator<=>(const Extent&) const = default;
};

}  // namespace headwise

#endif  // HEADWISE_OFFLOAD_EXTENT_H_
