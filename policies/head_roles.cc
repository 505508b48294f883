#include "policies/head_roles.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <random>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cachesvc/base/bounded_file.h"
#include "cachesvc/base/status_macros.h"
#include "policies/pattern_directory.h"
#include "policies/retrieval_roles.h"

namespace headwise {

std::string_view HeadRoleName(HeadRole role) {
  switch (role) {
    case HeadRole::kRetrieval:
      return "retrieval";
    case HeadRole::kStreaming:
      return "streaming";
  }
  return "unknown";
}

HeadRoles::HeadRoles(int num_layers, int num_kv_heads, HeadRole role)
    : num_layers_(num_layers),
      num_kv_heads_(num_kv_heads),
      roles_(static_cast<size_t>(num_layers) * num_kv_heads, role) {}

int HeadRoles::Count(HeadRole role) const {
  return static_cast<int>(std::count(roles_.begin(), roles_.end(), role));
}

double HeadRoles::RetrievalFraction() const {
  if (roles_.empty()) return 0.0;
  return static_cast<double>(Count(HeadRole::kRetrieval)) / static_cast<double>(roles_.size());
}

std::string HeadRoles::DebugString() const {
  std::string out;
  for (int l = 0; l < num_layers_; ++l) {
    for (int h = 0; h < num_kv_heads_; ++h) {
      out.push_back(role(LayerId(l), HeadId(h)) == HeadRole::kRetrieval ? 'R' : 's');
    }
    out.push_back('\n');
  }
  return out;
}

HeadRoles UniformRoles(const ModelLayout& layout, HeadRole role) {
  return HeadRoles(layout.num_layers, layout.num_kv_heads, role);
}

namespace {

// Checks one gate and clips it into [0, 1]. `where` prefixes the error message, which does not
// quote the value (it may come from a file whose bytes the caller must not see).
absl::StatusOr<double> CheckGate(double value, std::string_view where) {
  if (!std::isfinite(value) || value < -kGateClipTolerance || value > 1.0 + kGateClipTolerance) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: expected a gate in [0, 1] (values within %g outside are clipped); this one is "
        "not finite or further out",
        where, kGateClipTolerance));
  }
  return std::clamp(value, 0.0, 1.0);
}

// Without leading and trailing spaces, tabs and carriage returns. (Abseil's StripAsciiWhitespace
// takes absl::string_view, which this Abseil build does not alias to std::string_view.)
std::string_view StripWhitespace(std::string_view s) {
  constexpr std::string_view kWhitespace = " \t\r\v\f";
  const size_t begin = s.find_first_not_of(kWhitespace);
  if (begin == std::string_view::npos) return {};
  return s.substr(begin, s.find_last_not_of(kWhitespace) - begin + 1);
}

}  // namespace

absl::StatusOr<DuoAttentionGates> GatesFromMatrix(int num_layers, int num_kv_heads,
                                                  absl::Span<const double> values) {
  if (num_layers <= 0 || num_kv_heads <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "gate matrix must have positive rows and columns, got %d x %d", num_layers, num_kv_heads));
  }
  if (values.size() != static_cast<size_t>(num_layers) * num_kv_heads) {
    // The product in 64 bits: two int32 sizes may overflow an int.
    return absl::InvalidArgumentError(
        absl::StrFormat("gate matrix %d x %d needs %d values, got %d", num_layers, num_kv_heads,
                        static_cast<int64_t>(num_layers) * num_kv_heads, values.size()));
  }
  DuoAttentionGates gates;
  gates.num_layers = num_layers;
  gates.num_kv_heads = num_kv_heads;
  gates.alpha.reserve(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    ASSIGN_OR_RETURN(double gate,
                     CheckGate(values[i], absl::StrFormat("layer %d, kv head %d", i / num_kv_heads,
                                                          i % num_kv_heads)));
    gates.alpha.push_back(gate);
  }
  return gates;
}

absl::StatusOr<DuoAttentionGates> ParseDuoAttentionGates(std::string_view tsv_text,
                                                         std::string_view source_name) {
  DuoAttentionGates gates;
  int line_number = 0;
  int first_row_line = 0;
  for (std::string_view rest = tsv_text; !rest.empty();) {
    const size_t newline = rest.find('\n');
    std::string_view line = rest.substr(0, newline);
    rest = newline == std::string_view::npos ? std::string_view() : rest.substr(newline + 1);
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (StripWhitespace(line).empty() || line.front() == '#') continue;
    int column = 0;
    for (size_t start = 0; start <= line.size();) {
      const size_t tab = std::min(line.find('\t', start), line.size());
      const std::string_view field = StripWhitespace(line.substr(start, tab - start));
      start = tab + 1;
      ++column;
      const std::string where =
          absl::StrFormat("%s:%d: column %d", source_name, line_number, column);
      if (field.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": empty field; expected a number (fields are tab-separated)"));
      }
      double value = 0.0;
      const auto [end, ec] = std::from_chars(field.data(), field.data() + field.size(), value);
      if (ec != std::errc() || end != field.data() + field.size()) {
        return absl::InvalidArgumentError(absl::StrCat(
            where,
            ": expected a decimal number (fields are tab-separated); this field is not one"));
      }
      ASSIGN_OR_RETURN(double gate, CheckGate(value, where));
      gates.alpha.push_back(gate);
    }
    if (gates.num_layers == 0) {
      gates.num_kv_heads = column;
      first_row_line = line_number;
    } else if (column != gates.num_kv_heads) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s:%d: row has %d columns, but the first row (line %d) has %d; the matrix must be "
          "rectangular (rows = layers, columns = kv heads)",
          source_name, line_number, column, first_row_line, gates.num_kv_heads));
    }
    ++gates.num_layers;
  }
  if (gates.num_layers == 0) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(source_name), ": no rows of gates"));
  }
  return gates;
}

absl::StatusOr<DuoAttentionGates> LoadDuoAttentionGates(const std::string& path,
                                                        uint64_t max_bytes) {
  BoundedReadOptions options;
  options.max_bytes = max_bytes;
  options.follow_final_symlink = true;  // The user names the file on their own machine.
  ASSIGN_OR_RETURN(const std::string text, ReadBoundedFile(path, options));
  return ParseDuoAttentionGates(text, path);
}

double LinearQuantile(absl::Span<const double> values, double q) {
  std::vector<double> sorted(values.begin(), values.end());
  std::sort(sorted.begin(), sorted.end());
  const double h = q * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(h));
  if (lo + 1 >= sorted.size()) return sorted.back();
  const double t = h - static_cast<double>(lo);
  const double a = sorted[lo];
  const double b = sorted[lo + 1];
  // numpy's _lerp: interpolate from the nearer end, so that t = 1 gives exactly b.
  const double diff = b - a;
  return t >= 0.5 ? b - diff * (1.0 - t) : a + diff * t;
}

absl::StatusOr<HeadRoles> RolesForSparsity(const DuoAttentionGates& gates, double sparsity,
                                           const RoleSelectionOptions& options) {
  if (!(sparsity >= 0.0 && sparsity <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("sparsity must be in [0, 1], got %g", sparsity));
  }
  if (gates.num_layers <= 0 || gates.num_kv_heads <= 0 ||
      gates.alpha.size() != static_cast<size_t>(gates.num_layers) * gates.num_kv_heads) {
    return absl::InvalidArgumentError(
        absl::StrFormat("gates are empty or not %d x %d", gates.num_layers, gates.num_kv_heads));
  }
  if (!(options.tie_break_noise >= 0.0) || !std::isfinite(options.tie_break_noise)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tie_break_noise must be finite and >= 0, got %g", options.tie_break_noise));
  }
  std::vector<double> noisy = gates.alpha;
  if (options.tie_break_noise > 0.0) {
    std::mt19937_64 rng(options.seed);
    for (double& a : noisy) {
      // 53 random bits -> a uniform double in [0, 1); portable, unlike the std distributions.
      const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53;
      a += options.tie_break_noise * u;
    }
  }
  double threshold;
  if (sparsity >= 1.0) {
    threshold = 2.0;
  } else if (sparsity <= 0.0) {
    threshold = -1.0;
  } else {
    threshold = LinearQuantile(noisy, sparsity);
  }
  HeadRoles roles(gates.num_layers, gates.num_kv_heads, HeadRole::kStreaming);
  for (int l = 0; l < gates.num_layers; ++l) {
    for (int h = 0; h < gates.num_kv_heads; ++h) {
      if (noisy[static_cast<size_t>(l) * gates.num_kv_heads + h] >= threshold) {
        roles.set_role(LayerId(l), HeadId(h), HeadRole::kRetrieval);
      }
    }
  }
  return roles;
}

absl::StatusOr<HeadRoles> ResolveHeadRoles(const headwise::v1::HeadRolesSource& source,
                                           const ModelLayout& layout,
                                           const PatternDirectory* patterns) {
  switch (source.source_case()) {
    case headwise::v1::HeadRolesSource::SOURCE_NOT_SET:
    case headwise::v1::HeadRolesSource::kUniform:
      return UniformRoles(layout);
    case headwise::v1::HeadRolesSource::kRetrievalScores:
      return RetrievalScoreRoleSource(source.retrieval_scores(), patterns).Resolve(layout);
    case headwise::v1::HeadRolesSource::kDuoAttention:
      break;
  }
  const headwise::v1::DuoAttentionRoles& duo = source.duo_attention();
  DuoAttentionGates gates;
  switch (duo.gates_source_case()) {
    case headwise::v1::DuoAttentionRoles::kPatternName: {
      if (patterns == nullptr) {
        return absl::FailedPreconditionError(
            "duo_attention.pattern_name needs a pattern directory, and none is configured (set "
            "pattern_dir in the daemon's config, or send inline_gates)");
      }
      ASSIGN_OR_RETURN(gates, patterns->LoadGates(duo.pattern_name()));
      break;
    }
    case headwise::v1::DuoAttentionRoles::kInlineGates: {
      const headwise::v1::InlineGates& in = duo.inline_gates();
      ASSIGN_OR_RETURN(gates, GatesFromMatrix(in.num_layers(), in.num_kv_heads(), in.gates()));
      break;
    }
    case headwise::v1::DuoAttentionRoles::GATES_SOURCE_NOT_SET:
      return absl::InvalidArgumentError(
          "duo_attention head roles need gates: set pattern_name or inline_gates");
  }
  if (gates.num_layers != layout.num_layers || gates.num_kv_heads != layout.num_kv_heads) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "DuoAttention gates are %d layers x %d kv heads but the model has %d x %d",
        gates.num_layers, gates.num_kv_heads, layout.num_layers, layout.num_kv_heads));
  }
  const double sparsity = duo.has_sparsity() ? duo.sparsity() : kDefaultDuoAttentionSparsity;
  RoleSelectionOptions options;
  options.seed = duo.tie_break_seed();
  return RolesForSparsity(gates, sparsity, options);
}

}  // namespace headwise
