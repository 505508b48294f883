#include "cachesvc/planner/byte_size.h"

#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"

namespace headwise {

absl::StatusOr<int64_t> ParseByteSize(std::string_view text) {
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("bad byte size '", std::string(text), "': ", why,
                                                   " (examples: 1GiB, 512MiB, 1.5GB, 4096)"));
  };
  const absl::string_view s =
      absl::StripAsciiWhitespace(absl::string_view(text.data(), text.size()));
  size_t i = 0;
  bool seen_dot = false, seen_digit = false;
  for (; i < s.size(); ++i) {
    if (absl::ascii_isdigit(static_cast<unsigned char>(s[i]))) {
      seen_digit = true;
    } else if (s[i] == '.' && !seen_dot) {
      seen_dot = true;
    } else {
      break;
    }
  }
  if (!seen_digit) return bad("expected a non-negative number");
  // The mantissa is parsed as integer and fraction digits separately so that "1.5GB" is exact.
  const absl::string_view number = s.substr(0, i);
  const std::string unit = absl::AsciiStrToLower(absl::StripLeadingAsciiWhitespace(s.substr(i)));
  long double multiplier = 0;
  const struct {
    const char* name;
    long double value;
  } units[] = {{"", 1},
               {"b", 1},
               {"kb", 1e3L},
               {"mb", 1e6L},
               {"gb", 1e9L},
               {"tb", 1e12L},
               {"kib", 1024.0L},
               {"mib", 1048576.0L},
               {"gib", 1073741824.0L},
               {"tib", 1099511627776.0L}};
  for (const auto& u : units) {
    if (unit == u.name) multiplier = u.value;
  }
  if (multiplier == 0) return bad(absl::StrCat("unknown unit '", unit, "'"));
  long double value = 0;
  long double scale = 1;
  bool fraction = false;
  for (char c : number) {
    if (c == '.') {
      fraction = true;
      continue;
    }
    if (fraction) {
      scale /= 10;
      value += (c - '0') * scale;
    } else {
      value = value * 10 + (c - '0');
    }
    if (value > 1e30L) return bad("too large");
  }
  const long double bytes = std::floor(value * multiplier + 1e-6L);
  if (bytes > 9.2233720368547758e18L) return bad("too large");
  return static_cast<int64_t>(bytes);
}

std::string FormatBytes(int64_t bytes) {
  const char* units[] = {"KiB", "MiB", "GiB", "TiB", "PiB"};
  if (bytes < 1024 && bytes > -1024) return absl::StrCat(bytes, " B");
  double value = static_cast<double>(bytes) / 1024;
  int u = 0;
  while (std::fabs(value) >= 1024 && u < 4) {
    value /= 1024;
    ++u;
  }
  return absl::StrFormat("%.2f %s", value, units[u]);
}

std::string FormatRate(double bytes_per_s) {
  const char* units[] = {"B/s", "KB/s", "MB/s", "GB/s", "TB/s", "PB/s"};
  int u = 0;
  while (bytes_per_s >= 1000 && u < 5) {
    bytes_per_s /= 1000;
    ++u;
  }
  return absl::StrFormat("%.3g %s", bytes_per_s, units[u]);
}

}  // namespace headwise
