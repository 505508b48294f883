// Request-level traces: one record per inference request (arrival, prompt and output lengths
// and, where the trace has them, the prompt's prefix block ids). Two public formats are read:
//
//   Mooncake JSONL (FAST'25 traces): one JSON object per line with the integer fields
//     "timestamp" (ms since the trace start), "input_length", "output_length" (tokens) and
//     "hash_ids" (an array of non-negative integer block ids, one per block of
//     `block_tokens` prompt tokens, the last block possibly partial; two requests share a cached
//     prefix while their leading ids agree). Other keys are ignored. Blank lines are skipped.
//   Azure LLM inference trace CSV (2023/2024): a header "TIMESTAMP,ContextTokens,GeneratedTokens"
//     then one line per request, the timestamp as "YYYY-MM-DD HH:MM:SS[.fraction]" (UTC). No
//     prefix ids: reuse cannot be computed from it.
//
// Every error is INVALID_ARGUMENT (or the file errors of ReadBoundedFile) and names the source
// and the 1-based line: a truncated or malformed line, a missing field, a field of the wrong type
// or out of its range, more block ids than the prompt has blocks, a line or a file over its
// limit. Nothing is returned on error.
#ifndef HEADWISE_CACHESVC_REPLAY_REQUEST_TRACE_H_
#define HEADWISE_CACHESVC_REPLAY_REQUEST_TRACE_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "cachesvc/replay/block_cache.h"

namespace headwise {

enum class RequestTraceFormat { kMooncake, kAzure };

struct TraceRequest {
  // Arrival, seconds since the first request of the trace (Mooncake: timestamp / 1000; Azure:
  // the timestamp minus the first line's).
  double arrival_s = 0;
  int64_t input_tokens = 0;
  int64_t output_tokens = 0;
  // The prompt's prefix block ids in prompt order; empty for Azure.
  std::vector<BlockId> blocks;
};

struct RequestTrace {
  RequestTraceFormat format = RequestTraceFormat::kMooncake;
  // Where it came from, as given to the reader (a path or a test's name).
  std::string source;
  // Tokens per block of `blocks` (the last block of a prompt may hold fewer).
  int64_t block_tokens = 512;
  // In file order (the replay order).
  std::vector<TraceRequest> requests;

  // Whether the trace carries prefix block ids (Mooncake), so that reuse can be replayed.
  bool has_blocks() const { return format == RequestTraceFormat::kMooncake; }
};

struct RequestTraceLimits {
  // Largest trace file read. Default: 1 GiB.
  uint64_t max_file_bytes = uint64_t{1} << 30;
  // Longest line. Default: 4 MiB.
  int64_t max_line_bytes = int64_t{4} << 20;
  // Largest input_length / output_length (tokens). Default: 2^30.
  int64_t max_tokens = int64_t{1} << 30;
  // Tokens per block of "hash_ids". Default: 512 (Mooncake's).
  int64_t block_tokens = 512;
};

// Parses `text` in `format`. `source` names it in errors.
absl::StatusOr<RequestTrace> ParseRequestTrace(std::string_view text, RequestTraceFormat format,
                                               std::string_view source,
                                               const RequestTraceLimits& limits = {});

// "mooncake" or "azure"; INVALID_ARGUMENT otherwise.
absl::StatusOr<RequestTraceFormat> ParseRequestTraceFormat(std::string_view name);

// The format a path's extension suggests: ".jsonl" (or ".json") Mooncake, ".csv" Azure;
// INVALID_ARGUMENT otherwise (pass the format explicitly).
absl::StatusOr<RequestTraceFormat> RequestTraceFormatForPath(std::string_view path);

// Reads the regular file at `path` (at most limits.max_file_bytes, through ReadBoundedFile) and
// parses it.
absl::StatusOr<RequestTrace> LoadRequestTrace(const std::string& path, RequestTraceFormat format,
                                              const RequestTraceLimits& limits = {});

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_REPLAY_REQUEST_TRACE_H_
