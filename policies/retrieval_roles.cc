#include "policies/retrieval_roles.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cachesvc/base/status_macros.h"
#include "google/protobuf/struct.pb.h"
#include "nlohmann/json.hpp"
#include "policies/budgets.h"
#include "policies/pattern_directory.h"

namespace headwise {
namespace {

using headwise::v1::GroupReduction;
using headwise::v1::InlineHeadScores;
using headwise::v1::RetrievalScoreRoles;

absl::Status EntryError(std::string_view source, int entry, std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat(std::string(source), ": entry ", entry, " ", std::string(what)));
}

// "<layer>-<head>" as two decimal numbers; false otherwise.
bool ParseKey(const std::string& key, int* layer, int* head) {
  const size_t dash = key.find('-');
  if (dash == std::string::npos || dash == 0 || dash + 1 == key.size()) return false;
  for (size_t i = 0; i < key.size(); ++i) {
    if (i != dash && (key[i] < '0' || key[i] > '9')) return false;
  }
  return absl::SimpleAtoi(key.substr(0, dash), layer) &&
         absl::SimpleAtoi(key.substr(dash + 1), head);
}

// The mean of a number or a list of numbers (0 for an empty list); false when not numbers.
bool MeanOf(const nlohmann::json& value, double* mean) {
  if (value.is_number()) {
    *mean = value.get<double>();
    return true;
  }
  if (!value.is_array()) return false;
  double sum = 0;
  for (const nlohmann::json& v : value) {
    if (!v.is_number()) return false;
    sum += v.get<double>();
  }
  *mean = value.empty() ? 0.0 : sum / static_cast<double>(value.size());
  return true;
}

}  // namespace

absl::StatusOr<InlineHeadScores> ParseRetrievalScores(std::string_view text,
                                                      const ModelLayout& layout,
                                                      std::string_view source) {
  // Parsed without exceptions; the parser's own message may quote the input, so none is passed
  // on. (nlohmann-json, as the rest of the tree: protobuf's JSON parser misread numbers under
  // ThreadSanitizer builds.)
  const nlohmann::json root = nlohmann::json::parse(text.begin(), text.end(), /*cb=*/nullptr,
                                                    /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(source), " is not a JSON object of \"<layer>-<head>\": [scores]"));
  }
  InlineHeadScores out;
  out.set_num_layers(layout.num_layers);
  out.set_num_heads(layout.num_q_heads);
  out.mutable_scores()->Resize(layout.num_layers * layout.num_q_heads, 0.0);
  std::vector<bool> seen(out.scores_size(), false);
  // Struct's map has no order; sort the keys so the first error is the same on every run.
  std::vector<std::string> keys;
  for (const auto& [key, value] : root.items()) keys.push_back(key);
  std::sort(keys.begin(), keys.end());
  for (int entry = 0; entry < static_cast<int>(keys.size()); ++entry) {
    int layer = 0, head = 0;
    if (!ParseKey(keys[entry], &layer, &head)) {
      return EntryError(source, entry, "(in key order): the key is not <layer>-<head>");
    }
    if (layer >= layout.num_layers || head >= layout.num_q_heads) {
      return EntryError(source, entry,
                        absl::StrFormat("(in key order): layer %d head %d is outside the "
                                        "layout's %d layers x %d query heads",
                                        layer, head, layout.num_layers, layout.num_q_heads));
    }
    const int index = layer * layout.num_q_heads + head;
    if (seen[index]) return EntryError(source, entry, "(in key order) repeats a head");
    seen[index] = true;
    double mean = 0;
    if (!MeanOf(root.at(keys[entry]), &mean) || !std::isfinite(mean) || mean < 0) {
      return EntryError(source, entry,
                        absl::StrFormat("(layer %d head %d): expected a number or a list of "
                                        "numbers with a finite mean >= 0",
                                        layer, head));
    }
    out.set_scores(index, mean);
  }
  return out;
}

absl::StatusOr<InlineHeadScores> LoadRetrievalScores(const PatternDirectory* patterns,
                                                     const std::string& name,
                                                     const ModelLayout& layout) {
  if (patterns == nullptr) {
    return absl::FailedPreconditionError(
        "head scores name a pattern but the daemon has no pattern directory (set pattern_dir in "
        "its config, or send the scores inline)");
  }
  ASSIGN_OR_RETURN(const std::string text, patterns->ReadPatternFile(name, kRetrievalScoresFileName,
                                                                     kMaxRetrievalScoresBytes));
  return ParseRetrievalScores(
      text, layout, absl::StrCat("pattern '", name, "' (", kRetrievalScoresFileName, ")"));
}

std::vector<double> KvHeadScores(const InlineHeadScores& scores, const ModelLayout& layout,
                                 GroupReduction reduction, GroupReduction fallback) {
  if (reduction == headwise::v1::GROUP_REDUCTION_UNSPECIFIED) reduction = fallback;
  const int per_kv = scores.num_heads() / layout.num_kv_heads;
  std::vector<double> out(static_cast<size_t>(layout.num_layers) * layout.num_kv_heads, 0.0);
  for (int l = 0; l < layout.num_layers; ++l) {
    for (int kv = 0; kv < layout.num_kv_heads; ++kv) {
      double acc = reduction == headwise::v1::GROUP_REDUCTION_MEAN ? 0.0 : -INFINITY;
      for (int j = 0; j < per_kv; ++j) {
        const double s = scores.scores(l * scores.num_heads() + kv * per_kv + j);
        acc = reduction == headwise::v1::GROUP_REDUCTION_MEAN ? acc + s / per_kv : std::max(acc, s);
      }
      out[static_cast<size_t>(l) * layout.num_kv_heads + kv] = acc;
    }
  }
  return out;
}

absl::StatusOr<HeadRoles> SelectRetrievalHeads(const std::vector<double>& kv_scores,
                                               const ModelLayout& layout,
                                               const RetrievalScoreRoles& config) {
  HeadRoles roles(layout.num_layers, layout.num_kv_heads, HeadRole::kStreaming);
  const auto set = [&](size_t i) {
    roles.set_role(LayerId(static_cast<int>(i / layout.num_kv_heads)),
                   HeadId(static_cast<int>(i % layout.num_kv_heads)), HeadRole::kRetrieval);
  };
  if (config.selection_case() == RetrievalScoreRoles::kTopFraction) {
    const double f = config.top_fraction();
    if (!(f >= 0.0 && f <= 1.0)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("retrieval_scores top_fraction must be in [0, 1], got %g", f));
    }
    std::vector<size_t> order(kv_scores.size());
    std::iota(order.begin(), order.end(), size_t{0});
    // Stable: equal scores keep layer-major order, so the lower (layer, head) wins a tie.
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return kv_scores[a] > kv_scores[b]; });
    const size_t k = static_cast<size_t>(std::ceil(f * static_cast<double>(order.size()) - 1e-9));
    for (size_t i = 0; i < k && i < order.size(); ++i) set(order[i]);
    return roles;
  }
  const double threshold = config.selection_case() == RetrievalScoreRoles::kThreshold
                               ? config.threshold()
                               : kDefaultRetrievalThreshold;
  if (!std::isfinite(threshold)) {
    return absl::InvalidArgumentError("retrieval_scores threshold must be finite");
  }
  for (size_t i = 0; i < kv_scores.size(); ++i) {
    if (kv_scores[i] > threshold) set(i);
  }
  return roles;
}

std::unique_ptr<RoleSource> RetrievalScoreRoleSource::Clone() const {
  return std::make_unique<RetrievalScoreRoleSource>(config_, patterns_);
}

absl::StatusOr<HeadRoles> RetrievalScoreRoleSource::Resolve(const ModelLayout& layout) const {
  InlineHeadScores scores;
  switch (config_.scores_source_case()) {
    case RetrievalScoreRoles::kInlineScores:
      scores = config_.inline_scores();
      RETURN_IF_ERROR(ValidateInlineScores(scores, layout, "retrieval_scores inline scores"));
      break;
    case RetrievalScoreRoles::kPatternName: {
      ASSIGN_OR_RETURN(scores, LoadRetrievalScores(patterns_, config_.pattern_name(), layout));
      break;
    }
    case RetrievalScoreRoles::SCORES_SOURCE_NOT_SET:
      return absl::InvalidArgumentError("retrieval_scores needs pattern_name or inline_scores");
  }
  const std::vector<double> kv =
      KvHeadScores(scores, layout, config_.reduction(), headwise::v1::GROUP_REDUCTION_MAX);
  return SelectRetrievalHeads(kv, layout, config_);
}

}  // namespace headwise
