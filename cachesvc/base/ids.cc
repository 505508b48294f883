#include "cachesvc/base/ids.h"

#include "absl/strings/str_format.h"

namespace headwise {

std::string SequenceId::ToHex() const { return absl::StrFormat("%016x%016x", hi_, lo_); }

}  // namespace headwise
