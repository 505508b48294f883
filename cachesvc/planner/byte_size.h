// Byte counts as people write them ("1GiB", "512MiB", "1.5GB", "4096") and back.
#ifndef HEADWISE_CACHESVC_PLANNER_BYTE_SIZE_H_
#define HEADWISE_CACHESVC_PLANNER_BYTE_SIZE_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace headwise {

// Parses a non-negative decimal number (digits with at most one '.') followed by an optional
// unit, case-insensitive, optionally separated by spaces: none or "B" (bytes), "KB" "MB" "GB"
// "TB" (powers of 1000), "KiB" "MiB" "GiB" "TiB" (powers of 1024). The result is rounded down
// to whole bytes. INVALID_ARGUMENT, quoting `text`, for anything else (an empty string, a sign,
// an exponent, an unknown unit) or a value above 2^63 - 1.
absl::StatusOr<int64_t> ParseByteSize(std::string_view text);

// Binary units, 2 decimals: "1.00 GiB", "512.00 MiB", "37 B".
std::string FormatBytes(int64_t bytes);

// Decimal rate units: "3.35 TB/s", "55.0 GB/s".
std::string FormatRate(double bytes_per_s);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_PLANNER_BYTE_SIZE_H_
