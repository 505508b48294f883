#include "cachesvc/prefix/sequence_tokens.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace headwise {

absl::Status SequenceTokens::Check(int64_t start, absl::Span<const int32_t> ids,
                                   int64_t num_tokens) const {
  if (ids.empty()) return absl::OkStatus();
  if (static_cast<int64_t>(ids.size()) != num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("token_ids holds ", ids.size(),
                                                   " ids for a chunk of ", num_tokens, " tokens"));
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t position = start + static_cast<int64_t>(i);
    if (ids[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", ids[i], " at position ", position, " is negative"));
    }
    if (position < size() && ids_[static_cast<size_t>(position)] != ids[i]) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", ids[i], " at position ", position, " differs from the ",
                       ids_[static_cast<size_t>(position)], " recorded there by another layer"));
    }
  }
  return absl::OkStatus();
}

void SequenceTokens::Record(int64_t start, absl::Span<const int32_t> ids) {
  if (ids.empty() || start > size()) return;
  const auto known = static_cast<size_t>(size() - start);
  if (known >= ids.size()) return;
  ids_.insert(ids_.end(), ids.begin() + static_cast<std::ptrdiff_t>(known), ids.end());
}

void SequenceTokens::Truncate(int64_t length) {
  if (length < size()) ids_.resize(static_cast<size_t>(std::max<int64_t>(0, length)));
}

}  // namespace headwise
