#include "cachesvc/replay/request_trace.h"

#include <cmath>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "cachesvc/base/bounded_file.h"
#include "cachesvc/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace headwise {
namespace {

using json = nlohmann::json;

// Largest Mooncake timestamp accepted, in ms (about 31 years).
constexpr double kMaxTimestampMs = 1e12;

class LineError {
 public:
  LineError(absl::string_view source, int64_t line) : source_(source), line_(line) {}
  absl::Status operator()(absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, " line ", line_, ": ", what));
  }

 private:
  std::string source_;
  int64_t line_;
};

// Calls `fn(line_number, line)` for every line of `text` (a final line without '\n' included,
// '\r' before '\n' dropped), stopping at the first error.
template <typename Fn>
absl::Status ForEachLine(absl::string_view text, absl::string_view source,
                         const RequestTraceLimits& limits, Fn fn) {
  int64_t number = 0;
  while (!text.empty()) {
    ++number;
    const size_t end = text.find('\n');
    absl::string_view line = text.substr(0, end);
    text = end == absl::string_view::npos ? absl::string_view() : text.substr(end + 1);
    if (static_cast<int64_t>(line.size()) > limits.max_line_bytes) {
      return LineError(source,
                       number)(absl::StrCat("line longer than ", limits.max_line_bytes, " bytes"));
    }
    if (absl::EndsWith(line, "\r")) line.remove_suffix(1);
    RETURN_IF_ERROR(fn(number, line));
  }
  return absl::OkStatus();
}

// A required non-negative integer field of at most `max`.
absl::StatusOr<int64_t> IntField(const json& object, const char* key, int64_t max,
                                 const LineError& error) {
  const auto it = object.find(key);
  if (it == object.end()) return error(absl::StrCat("missing field \"", key, "\""));
  if (!it->is_number_integer()) return error(absl::StrCat("\"", key, "\" is not an integer"));
  if (it->is_number_unsigned() ? it->get<uint64_t>() > static_cast<uint64_t>(max)
                               : (it->get<int64_t>() < 0 || it->get<int64_t>() > max)) {
    return error(absl::StrCat("\"", key, "\" must be in [0, ", max, "]"));
  }
  return it->get<int64_t>();
}

absl::StatusOr<TraceRequest> ParseMooncakeLine(absl::string_view line, const LineError& error,
                                               const RequestTraceLimits& limits) {
  const json object = json::parse(line.data(), line.data() + line.size(), /*cb=*/nullptr,
                                  /*allow_exceptions=*/false);
  if (object.is_discarded()) return error("not valid JSON (truncated?)");
  if (!object.is_object()) return error("not a JSON object");
  TraceRequest request;
  const auto ts = object.find("timestamp");
  if (ts == object.end()) return error("missing field \"timestamp\"");
  if (!ts->is_number()) return error("\"timestamp\" is not a number");
  const double ms = ts->get<double>();
  if (!(ms >= 0 && ms <= kMaxTimestampMs)) {
    return error(absl::StrCat("\"timestamp\" must be in [0, ", kMaxTimestampMs, "] ms"));
  }
  request.arrival_s = ms / 1000;
  ASSIGN_OR_RETURN(request.input_tokens,
                   IntField(object, "input_length", limits.max_tokens, error));
  ASSIGN_OR_RETURN(request.output_tokens,
                   IntField(object, "output_length", limits.max_tokens, error));
  const auto ids = object.find("hash_ids");
  if (ids == object.end()) return error("missing field \"hash_ids\"");
  if (!ids->is_array()) return error("\"hash_ids\" is not an array");
  const int64_t max_blocks = (request.input_tokens + limits.block_tokens - 1) / limits.block_tokens;
  if (static_cast<int64_t>(ids->size()) > max_blocks) {
    return error(absl::StrCat("\"hash_ids\" has ", ids->size(), " ids but input_length ",
                              request.input_tokens, " makes only ", max_blocks, " blocks of ",
                              limits.block_tokens, " tokens"));
  }
  request.blocks.reserve(ids->size());
  for (const json& id : *ids) {
    if (!id.is_number_unsigned()) {
      return error(
          absl::StrCat("\"hash_ids\"[", request.blocks.size(), "] is not a non-negative integer"));
    }
    request.blocks.push_back(id.get<uint64_t>());
  }
  return request;
}

absl::Status ParseMooncake(absl::string_view text, const RequestTraceLimits& limits,
                           RequestTrace* trace) {
  return ForEachLine(text, trace->source, limits, [&](int64_t number, absl::string_view line) {
    if (absl::StripAsciiWhitespace(line).empty()) return absl::OkStatus();
    ASSIGN_OR_RETURN(TraceRequest request,
                     ParseMooncakeLine(line, LineError(trace->source, number), limits));
    trace->requests.push_back(std::move(request));
    return absl::OkStatus();
  });
}

constexpr absl::string_view kAzureHeader = "TIMESTAMP,ContextTokens,GeneratedTokens";

absl::StatusOr<int64_t> CsvInt(absl::string_view field, const char* name, int64_t max,
                               const LineError& error) {
  int64_t value = 0;
  if (!absl::SimpleAtoi(field, &value) || value < 0 || value > max) {
    return error(absl::StrCat(name, " must be an integer in [0, ", max, "]"));
  }
  return value;
}

absl::Status ParseAzure(absl::string_view text, const RequestTraceLimits& limits,
                        RequestTrace* trace) {
  bool header = false;
  absl::Time first;
  return ForEachLine(text, trace->source, limits, [&](int64_t number, absl::string_view line) {
    const LineError error(trace->source, number);
    if (!header) {
      if (absl::StripAsciiWhitespace(line) != kAzureHeader) {
        return error(absl::StrCat("expected the header \"", kAzureHeader, "\""));
      }
      header = true;
      return absl::OkStatus();
    }
    if (absl::StripAsciiWhitespace(line).empty()) return absl::OkStatus();
    const std::vector<absl::string_view> fields = absl::StrSplit(line, ',');
    if (fields.size() != 3) {
      return error(absl::StrCat("expected 3 comma-separated fields, got ", fields.size()));
    }
    absl::Time time;
    std::string why;
    if (!absl::ParseTime("%Y-%m-%d %H:%M:%E*S", absl::StripAsciiWhitespace(fields[0]),
                         absl::UTCTimeZone(), &time, &why)) {
      return error("TIMESTAMP is not \"YYYY-MM-DD HH:MM:SS[.fraction]\"");
    }
    if (trace->requests.empty()) first = time;
    TraceRequest request;
    request.arrival_s = absl::ToDoubleSeconds(time - first);
    ASSIGN_OR_RETURN(request.input_tokens, CsvInt(absl::StripAsciiWhitespace(fields[1]),
                                                  "ContextTokens", limits.max_tokens, error));
    ASSIGN_OR_RETURN(request.output_tokens, CsvInt(absl::StripAsciiWhitespace(fields[2]),
                                                   "GeneratedTokens", limits.max_tokens, error));
    trace->requests.push_back(std::move(request));
    return absl::OkStatus();
  });
}

}  // namespace

absl::StatusOr<RequestTrace> ParseRequestTrace(std::string_view text_std, RequestTraceFormat format,
                                               std::string_view source,
                                               const RequestTraceLimits& limits) {
  if (limits.block_tokens < 1 || limits.max_tokens < 0 || limits.max_line_bytes < 1) {
    return absl::InvalidArgumentError("request trace limits must be positive");
  }
  const absl::string_view text(text_std.data(), text_std.size());
  RequestTrace trace;
  trace.format = format;
  trace.source = std::string(source);
  trace.block_tokens = limits.block_tokens;
  if (format == RequestTraceFormat::kMooncake) {
    RETURN_IF_ERROR(ParseMooncake(text, limits, &trace));
  } else {
    RETURN_IF_ERROR(ParseAzure(text, limits, &trace));
  }
  if (trace.requests.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(source), ": no requests"));
  }
  return trace;
}

absl::StatusOr<RequestTraceFormat> ParseRequestTraceFormat(std::string_view name) {
  if (name == "mooncake") return RequestTraceFormat::kMooncake;
  if (name == "azure") return RequestTraceFormat::kAzure;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown trace format '", std::string(name), "'; known: mooncake, azure"));
}

absl::StatusOr<RequestTraceFormat> RequestTraceFormatForPath(std::string_view path_std) {
  const absl::string_view path(path_std.data(), path_std.size());
  if (absl::EndsWith(path, ".jsonl") || absl::EndsWith(path, ".json")) {
    return RequestTraceFormat::kMooncake;
  }
  if (absl::EndsWith(path, ".csv")) return RequestTraceFormat::kAzure;
  return absl::InvalidArgumentError(
      absl::StrCat("cannot tell the format of '", std::string(path),
                   "' from its extension; name it (mooncake or azure)"));
}

absl::StatusOr<RequestTrace> LoadRequestTrace(const std::string& path, RequestTraceFormat format,
                                              const RequestTraceLimits& limits) {
  BoundedReadOptions options;
  options.max_bytes = limits.max_file_bytes;
  options.follow_final_symlink = true;
  options.description = absl::StrCat("trace file '", path, "'");
  ASSIGN_OR_RETURN(const std::string text, ReadBoundedFile(path, options));
  return ParseRequestTrace(text, format, path, limits);
}

}  // namespace headwise
