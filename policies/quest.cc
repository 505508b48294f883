#include "policies/quest.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace headwise {

double QuestUpperBound(const float* q, const float* kmin, const float* kmax, int head_dim) {
  double u = 0.0;
  for (int i = 0; i < head_dim; ++i) {
    // max(q m, q M) = q M for q > 0 and q m for q < 0 (M >= m); q = 0 adds nothing.
    if (q[i] > 0.0f) {
      u += static_cast<double>(q[i]) * kmax[i];
    } else if (q[i] < 0.0f) {
      u += static_cast<double>(q[i]) * kmin[i];
    }
  }
  return u;
}

absl::StatusOr<std::unique_ptr<QuestSelector>> QuestSelector::Create(const Options& options) {
  if (options.token_budget < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("quest.token_budget must be >= 1, got ", options.token_budget));
  }
  if (options.dense_layers < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("quest.dense_layers must be >= 0, got ", options.dense_layers));
  }
  return std::unique_ptr<QuestSelector>(new QuestSelector(options));
}

absl::StatusOr<std::unique_ptr<QuestSelector>> QuestSelector::FromSpec(
    const headwise::v1::PolicySpec& spec) {
  const headwise::v1::QuestSelection& q = spec.selection().quest();
  Options o;
  if (q.has_token_budget()) o.token_budget = q.token_budget();
  if (q.has_dense_layers()) o.dense_layers = q.dense_layers();
  if (q.reduction() == headwise::v1::GROUP_REDUCTION_MEAN) o.reduction = Reduction::kSum;
  return Create(o);
}

std::unique_ptr<PageSelector> QuestSelector::Clone() const {
  return std::unique_ptr<PageSelector>(new QuestSelector(options_));
}

int64_t QuestSelector::PageBudget(int page_tokens) const {
  return std::max<int64_t>(3, options_.token_budget / std::max(1, page_tokens));
}

void QuestSelector::PageScores(const HeadContext& head, absl::Span<const float> q, int group,
                               std::vector<double>* out) const {
  const int D = head.head_dim;
  out->assign(head.pages.size(), 0.0);
  for (size_t p = 0; p < head.pages.size(); ++p) {
    const float* kmin = head.key_bounds.data() + p * 2 * D;
    double score = options_.reduction == Reduction::kMax ? -1e300 : 0.0;
    for (int r = 0; r < group; ++r) {
      const double u = QuestUpperBound(q.data() + static_cast<size_t>(r) * D, kmin, kmin + D, D);
      score = options_.reduction == Reduction::kMax ? std::max(score, u) : score + u;
    }
    (*out)[p] = score;
  }
}

std::vector<int32_t> TopPages(const std::vector<double>& scores, int64_t k, int32_t exclude) {
  std::vector<int32_t> order;
  order.reserve(scores.size());
  for (size_t i = 0; i < scores.size(); ++i) {
    if (static_cast<int32_t>(i) != exclude) order.push_back(static_cast<int32_t>(i));
  }
  const auto better = [&](int32_t a, int32_t b) {
    return scores[a] != scores[b] ? scores[a] > scores[b] : a < b;
  };
  const size_t n = std::min<size_t>(order.size(), static_cast<size_t>(std::max<int64_t>(0, k)));
  std::partial_sort(order.begin(), order.begin() + n, order.end(), better);
  order.resize(n);
  return order;
}

void QuestSelector::Select(const HeadContext& head, absl::Span<const float> q, int group,
                           std::vector<int32_t>* pages) const {
  const size_t first = pages->size();
  Rank(head, q, group, pages);
  std::sort(pages->begin() + first, pages->end());
}

void QuestSelector::Rank(const HeadContext& head, absl::Span<const float> q, int group,
                         std::vector<int32_t>* pages) const {
  const int64_t n = static_cast<int64_t>(head.pages.size());
  const int64_t budget = PageBudget(head.page_tokens);
  const bool bounds_ok = head.head_dim > 0 &&
                         head.key_bounds.size() == static_cast<size_t>(n) * 2 * head.head_dim &&
                         q.size() >= static_cast<size_t>(group) * head.head_dim;
  if (n == 0) return;
  pages->push_back(static_cast<int32_t>(n - 1));
  if (dense(head.layer) || n <= budget || !bounds_ok) {
    for (int64_t i = 0; i + 1 < n; ++i) pages->push_back(static_cast<int32_t>(i));
    return;
  }
  std::vector<double> scores;
  PageScores(head, q, group, &scores);
  const std::vector<int32_t> top = TopPages(scores, budget - 1, static_cast<int32_t>(n - 1));
  pages->insert(pages->end(), top.begin(), top.end());
}

}  // namespace headwise
