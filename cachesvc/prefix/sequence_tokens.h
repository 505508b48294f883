// SequenceTokens: the token ids a client has told the daemon for one sequence (Append, Prefill and
// AppendLayers token_ids; CreateSequence prefix_token_ids), position by position, from which
// the prefix cache hashes its full blocks. Optional for clients: chunks sent without ids leave a
// gap, and nothing after a gap is recorded (a block's hash needs every token before it).
//
// Thread-safety: none (the daemon guards it with the sequence's lock).
#ifndef HEADWISE_CACHESVC_PREFIX_SEQUENCE_TOKENS_H_
#define HEADWISE_CACHESVC_PREFIX_SEQUENCE_TOKENS_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace headwise {

class SequenceTokens {
 public:
  // Most ids one call may carry and one sequence may hold (the engine's length limit).
  static constexpr int64_t kMaxTokens = (int64_t{1} << 31) - 1;

  // Whether `ids` may be recorded for the chunk of `num_tokens` tokens that starts at `start`:
  // OK for no ids at all; INVALID_ARGUMENT (naming the first bad one) when there are ids but not
  // exactly num_tokens, when an id is negative, or when an id differs from the one already
  // recorded at its position (another layer of the same step said otherwise). Changes nothing.
  absl::Status Check(int64_t start, absl::Span<const int32_t> ids, int64_t num_tokens) const;
  // Records `ids` (checked) for the chunk at `start`: positions already known are kept, new ones
  // are appended when the chunk continues the record; a chunk after a gap (start > size()) is
  // not recorded.
  void Record(int64_t start, absl::Span<const int32_t> ids);
  // Forgets every position >= length.
  void Truncate(int64_t length);

  int64_t size() const { return static_cast<int64_t>(ids_.size()); }
  absl::Span<const int32_t> ids() const { return ids_; }

 private:
  std::vector<int32_t> ids_;
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_PREFIX_SEQUENCE_TOKENS_H_
