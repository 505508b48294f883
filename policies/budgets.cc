#include "policies/budgets.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cachesvc/base/status_macros.h"
#include "policies/basic_stages.h"
#include "policies/retrieval_roles.h"

namespace headwise {
namespace {

using headwise::v1::InlineHeadScores;
using headwise::v1::PolicySpec;
using headwise::v1::TokenBudget;

absl::Status CheckTokens(std::string_view method, int64_t tokens) {
  if (tokens >= 1) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrFormat("%s budget tokens must be >= 1, got %d", std::string(method), tokens));
}

int64_t FloorDiv(int64_t tokens, double beta) {
  return static_cast<int64_t>(std::floor(static_cast<double>(tokens) / beta));
}

int64_t HeldCount(const HeadContext& head) {
  int64_t n = 0;
  for (const PageMeta& page : head.pages) n += page.token_count;
  return n;
}

}  // namespace

std::vector<int64_t> RoundWithinTotal(absl::Span<const double> exact, int64_t total) {
  std::vector<int64_t> out(exact.size());
  int64_t sum = 0;
  for (size_t i = 0; i < exact.size(); ++i) {
    out[i] = std::max<int64_t>(0, static_cast<int64_t>(std::floor(exact[i] + 0.5)));
    sum += out[i];
  }
  while (sum > total) {
    size_t worst = exact.size();
    for (size_t i = 0; i < exact.size(); ++i) {
      if (out[i] == 0) continue;
      if (worst == exact.size() || out[i] - exact[i] > out[worst] - exact[worst]) worst = i;
    }
    if (worst == exact.size()) break;
    --out[worst];
    --sum;
  }
  return out;
}

absl::Status ValidateInlineScores(const InlineHeadScores& scores, const ModelLayout& layout,
                                  std::string_view what) {
  if (scores.num_layers() != layout.num_layers ||
      (scores.num_heads() != layout.num_kv_heads && scores.num_heads() != layout.num_q_heads)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s are %d x %d; the layout needs %d layers x %d kv heads (or %d query heads)",
        std::string(what), scores.num_layers(), scores.num_heads(), layout.num_layers,
        layout.num_kv_heads, layout.num_q_heads));
  }
  if (static_cast<int64_t>(scores.scores_size()) !=
      int64_t{scores.num_layers()} * scores.num_heads()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s hold %d values, expected %d x %d",
                                                      std::string(what), scores.scores_size(),
                                                      scores.num_layers(), scores.num_heads()));
  }
  for (int i = 0; i < scores.scores_size(); ++i) {
    const double s = scores.scores(i);
    if (!std::isfinite(s) || s < 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: value %d (layer %d, head %d) must be finite and >= 0",
                          std::string(what), i, i / scores.num_heads(), i % scores.num_heads()));
    }
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<PyramidKvBudget>> PyramidKvBudget::Create(const Options& options) {
  RETURN_IF_ERROR(CheckTokens("pyramid_kv", options.tokens));
  if (!(options.beta >= 1.0) || !std::isfinite(options.beta)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("pyramid_kv beta must be finite and >= 1, got %g", options.beta));
  }
  return std::unique_ptr<PyramidKvBudget>(new PyramidKvBudget(options));
}

std::unique_ptr<BudgetAllocator> PyramidKvBudget::Clone() const {
  return std::unique_ptr<BudgetAllocator>(new PyramidKvBudget(options_));
}

std::vector<int64_t> PyramidKvBudget::LayerBudgets(int num_layers, int64_t seq_len) const {
  const int64_t b = options_.tokens;
  std::vector<int64_t> out(num_layers, b);
  if (num_layers <= 1 || seq_len < 2 * b) return out;
  int64_t min_num = FloorDiv(b, options_.beta);
  int64_t max_num = 2 * b - min_num;
  if (max_num >= seq_len) {
    max_num = seq_len;
    min_num = 2 * b - max_num;
  }
  const int64_t step = (max_num - min_num) / (num_layers - 1);
  int64_t sum = 0;
  for (int l = 0; l < num_layers; ++l) {
    out[l] = std::max<int64_t>(0, max_num - l * step);
    sum += out[l];
  }
  // Floor(step) leaves the pyramid above its mean: take the excess off the widest layers.
  for (int l = 0; sum > int64_t{num_layers} * b; l = (l + 1) % num_layers) {
    if (out[l] > 0) {
      --out[l];
      --sum;
    }
  }
  return out;
}

void PyramidKvBudget::Allocate(const ModelLayout& layout, const HeadRoles& /*roles*/, LayerId layer,
                               int64_t seq_len, absl::Span<const HeadContext> /*heads*/,
                               absl::Span<int64_t> out) const {
  const std::vector<int64_t> budgets = LayerBudgets(layout.num_layers, seq_len);
  std::fill(out.begin(), out.end(), budgets[layer.value()]);
}

// ---------------------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<AdaKvBudget>> AdaKvBudget::Create(const Options& options) {
  RETURN_IF_ERROR(CheckTokens("ada_kv", options.tokens));
  if (!(options.floor_alpha >= 0.0 && options.floor_alpha <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("ada_kv floor_alpha must be in [0, 1], got %g", options.floor_alpha));
  }
  return std::unique_ptr<AdaKvBudget>(new AdaKvBudget(options));
}

std::unique_ptr<BudgetAllocator> AdaKvBudget::Clone() const {
  return std::unique_ptr<BudgetAllocator>(new AdaKvBudget(options_));
}

void AdaKvBudget::Allocate(const ModelLayout& /*layout*/, const HeadRoles& /*roles*/,
                           LayerId /*layer*/, int64_t /*seq_len*/,
                           absl::Span<const HeadContext> heads, absl::Span<int64_t> out) const {
  const int64_t b = options_.tokens;
  const int64_t total = b * static_cast<int64_t>(out.size());
  const bool scored = heads.size() == out.size() &&
                      std::all_of(heads.begin(), heads.end(), [](const HeadContext& h) {
                        return h.token_scores.size() == h.pages.size() * size_t(h.page_tokens);
                      });
  if (!scored) {
    std::fill(out.begin(), out.end(), b);
    return;
  }
  // (score, head, held index): the layer's scored tokens, best first under a total order.
  // Tokens no statistic has reached yet (kUnscored) are kept by the policies anyway: they win
  // their own head's slots without competing (else a prefill's ties would all go to head 0).
  std::vector<std::tuple<float, int, int64_t>> tokens;
  std::vector<int64_t> winners(out.size(), 0);
  int64_t held = 0;
  for (size_t h = 0; h < heads.size(); ++h) {
    const HeadContext& head = heads[h];
    int64_t index = 0;
    for (size_t p = 0; p < head.pages.size(); ++p) {
      for (int r = 0; r < head.pages[p].token_count; ++r, ++index, ++held) {
        const float score = head.token_scores[p * head.page_tokens + r];
        if (score == kUnscored) {
          ++winners[h];
        } else {
          tokens.emplace_back(score, static_cast<int>(h), index);
        }
      }
    }
  }
  if (held <= total) {
    for (size_t h = 0; h < heads.size(); ++h) out[h] = HeldCount(heads[h]);
    return;
  }
  const int64_t open = std::min<int64_t>(static_cast<int64_t>(tokens.size()),
                                         std::max<int64_t>(0, total - (held - tokens.size())));
  const auto better = [](const auto& x, const auto& y) {
    if (std::get<0>(x) != std::get<0>(y)) return std::get<0>(x) > std::get<0>(y);
    return std::make_pair(std::get<1>(x), std::get<2>(x)) <
           std::make_pair(std::get<1>(y), std::get<2>(y));
  };
  if (open > 0) std::nth_element(tokens.begin(), tokens.begin() + (open - 1), tokens.end(), better);
  for (int64_t i = 0; i < open; ++i) ++winners[std::get<1>(tokens[i])];
  const double alpha = options_.floor_alpha;
  const double floor_part = std::floor(alpha * static_cast<double>(b));
  std::vector<double> exact(out.size());
  for (size_t h = 0; h < out.size(); ++h) {
    exact[h] = static_cast<double>(winners[h]) * (1.0 - alpha) + floor_part;
  }
  const std::vector<int64_t> caps = RoundWithinTotal(exact, total);
  std::copy(caps.begin(), caps.end(), out.begin());
}

// ---------------------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<HeadKvBudget>> HeadKvBudget::Create(const Options& options,
                                                                   const InlineHeadScores& scores,
                                                                   const ModelLayout& layout) {
  RETURN_IF_ERROR(CheckTokens("head_kv", options.tokens));
  if (!(options.beta >= 1.0) || !std::isfinite(options.beta)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("head_kv beta must be finite and >= 1, got %g", options.beta));
  }
  if (!(options.temperature > 0.0) || !std::isfinite(options.temperature)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("head_kv temperature must be finite and > 0, got %g", options.temperature));
  }
  RETURN_IF_ERROR(ValidateInlineScores(scores, layout, "head_kv scores"));
  const size_t n = static_cast<size_t>(scores.scores_size());
  double sum = 0;
  for (double s : scores.scores()) sum += s;
  if (!(sum > 0)) return absl::InvalidArgumentError("head_kv scores are all 0");
  std::vector<double> s(n);
  double sharp_sum = 0;
  for (size_t i = 0; i < n; ++i) {
    s[i] = std::pow(scores.scores(static_cast<int>(i)) / sum, options.temperature);
    sharp_sum += s[i];
  }
  const int64_t b = options.tokens;
  const int64_t floor_part = FloorDiv(b, options.beta);
  const double pool = static_cast<double>(floor_part) * static_cast<double>(n);
  const int per_kv = scores.num_heads() / layout.num_kv_heads;  // 1 or the group size.
  std::vector<double> exact(static_cast<size_t>(layout.num_layers) * layout.num_kv_heads, 0.0);
  for (size_t i = 0; i < n; ++i) {
    const double cap = s[i] / sharp_sum * pool + static_cast<double>(b - floor_part);
    const size_t layer = i / scores.num_heads();
    const size_t kv = (i % scores.num_heads()) / per_kv;
    exact[layer * layout.num_kv_heads + kv] += cap / per_kv;
  }
  std::vector<int64_t> caps =
      RoundWithinTotal(exact, b * int64_t{layout.num_layers} * layout.num_kv_heads);
  return std::unique_ptr<HeadKvBudget>(new HeadKvBudget(layout.num_kv_heads, std::move(caps)));
}

std::unique_ptr<BudgetAllocator> HeadKvBudget::Clone() const {
  return std::unique_ptr<BudgetAllocator>(new HeadKvBudget(num_kv_heads_, caps_));
}

void HeadKvBudget::Allocate(const ModelLayout& /*layout*/, const HeadRoles& /*roles*/,
                            LayerId layer, int64_t /*seq_len*/,
                            absl::Span<const HeadContext> /*heads*/,
                            absl::Span<int64_t> out) const {
  for (size_t h = 0; h < out.size(); ++h) {
    out[h] = caps_[static_cast<size_t>(layer.value()) * num_kv_heads_ + h];
  }
}

// ---------------------------------------------------------------------------------------------

std::string_view BudgetAllocatorName(const PolicySpec& spec) {
  switch (spec.budget().method_case()) {
    case TokenBudget::kPyramidKv:
      return "pyramid_kv";
    case TokenBudget::kAdaKv:
      return "ada_kv";
    case TokenBudget::kHeadKv:
      return "head_kv";
    default:
      return "uniform";
  }
}

absl::StatusOr<std::unique_ptr<BudgetAllocator>> CreateBudgetAllocator(
    const PolicySpec& spec, const ModelLayout& layout, const PatternDirectory* patterns) {
  const TokenBudget& budget = spec.budget();
  switch (budget.method_case()) {
    case TokenBudget::METHOD_NOT_SET:
      return std::make_unique<UniformBudget>();
    case TokenBudget::kUniform:
      RETURN_IF_ERROR(CheckTokens("uniform", budget.uniform().tokens()));
      return std::make_unique<UniformBudget>(budget.uniform().tokens());
    case TokenBudget::kPyramidKv: {
      PyramidKvBudget::Options options{.tokens = budget.pyramid_kv().tokens()};
      if (budget.pyramid_kv().has_beta()) options.beta = budget.pyramid_kv().beta();
      ASSIGN_OR_RETURN(auto allocator, PyramidKvBudget::Create(options));
      return std::unique_ptr<BudgetAllocator>(std::move(allocator));
    }
    case TokenBudget::kAdaKv: {
      AdaKvBudget::Options options{.tokens = budget.ada_kv().tokens()};
      options.floor_alpha = budget.ada_kv().has_floor_alpha() ? budget.ada_kv().floor_alpha()
                            : layout.num_q_heads > layout.num_kv_heads ? 0.2
                                                                       : 0.5;
      ASSIGN_OR_RETURN(auto allocator, AdaKvBudget::Create(options));
      return std::unique_ptr<BudgetAllocator>(std::move(allocator));
    }
    case TokenBudget::kHeadKv: {
      const headwise::v1::HeadKvBudget& h = budget.head_kv();
      HeadKvBudget::Options options{.tokens = h.tokens()};
      if (h.has_beta()) options.beta = h.beta();
      if (h.has_temperature()) options.temperature = h.temperature();
      InlineHeadScores scores = h.scores();
      if (!h.pattern_name().empty()) {
        if (h.has_scores()) {
          return absl::InvalidArgumentError("head_kv takes scores or pattern_name, not both");
        }
        ASSIGN_OR_RETURN(scores, LoadRetrievalScores(patterns, h.pattern_name(), layout));
      }
      ASSIGN_OR_RETURN(auto allocator, HeadKvBudget::Create(options, scores, layout));
      return std::unique_ptr<BudgetAllocator>(std::move(allocator));
    }
  }
  return absl::InvalidArgumentError("unknown budget method");
}

}  // namespace headwise
