// Merge policies (merge.h; policies.md §6).
#include "policies/merge.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace headwise {
namespace {

using headwise::v1::PolicySpec;

float ScoreOf(const HeadContext& head, TokenRef t) {
  return head.token_scores[static_cast<size_t>(t.page) * head.page_tokens + t.row];
}

const float* KeyOf(const HeadContext& head, TokenRef t) {
  return head.keys.data() +
         (static_cast<size_t>(t.page) * head.page_tokens + t.row) * head.head_dim;
}

// A dropped token's most similar kept key: the kept token and the similarity; kept = -1 when no
// readable pair exists. Ties go to the earlier kept token.
struct Match {
  TokenRef dropped;
  int32_t kept = -1;
  float similarity = 0.0f;
};

std::vector<Match> MatchDropped(const HeadContext& head, const HeadSplit& split) {
  std::vector<Match> out;
  out.reserve(split.dropped.size());
  for (const TokenRef& e : split.dropped) {
    Match m{e, -1, -std::numeric_limits<float>::infinity()};
    for (size_t c = 0; c < split.kept.size(); ++c) {
      const float sim = KeyCosine(head, e, split.kept[c]);
      if (sim > m.similarity) {  // NaN (unreadable) never wins.
        m.similarity = sim;
        m.kept = static_cast<int32_t>(c);
      }
    }
    if (m.kept >= 0) out.push_back(m);
  }
  return out;
}

absl::Status RequireKeys(const HeadContext& head, const char* who) {
  const size_t rows = head.pages.size() * static_cast<size_t>(head.page_tokens);
  if (head.head_dim <= 0 || head.keys.size() != rows * head.head_dim) {
    return absl::FailedPreconditionError(absl::StrCat(
        who, " needs every held key: got ", head.keys.size(), " floats for ", rows, " rows"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<MergeSpec> ResolveMergeSpec(const PolicySpec& spec) {
  MergeSpec out;
  const headwise::v1::Merge& m = spec.merge();
  switch (m.method_case()) {
    case headwise::v1::Merge::kCam:
      out.method = MergeSpec::Method::kCam;
      if (m.cam().has_span()) out.cam_span = m.cam().span();
      if (out.cam_span < 1 || out.cam_span > 4096) {
        return absl::InvalidArgumentError(
            absl::StrCat("merge.cam.span must be in 1..4096, got ", out.cam_span));
      }
      out.cam_seed = m.cam().seed();
      break;
    case headwise::v1::Merge::kD2O:
      out.method = MergeSpec::Method::kD2o;
      if (m.d2o().has_alpha()) out.d2o_alpha = m.d2o().alpha();
      if (m.d2o().has_beta()) out.d2o_beta = m.d2o().beta();
      for (auto [name, value] : {std::pair{"alpha", out.d2o_alpha}, {"beta", out.d2o_beta}}) {
        if (!(value >= 0.0 && value <= 1.0)) {
          return absl::InvalidArgumentError(
              absl::StrCat("merge.d2o.", name, " must be in [0, 1], got ", value));
        }
      }
      break;
    case headwise::v1::Merge::kMean:
      out.method = MergeSpec::Method::kMean;
      break;
    case headwise::v1::Merge::kNone:
    case headwise::v1::Merge::METHOD_NOT_SET:
      break;
  }
  return out;
}

std::string_view MergeMethodName(MergeSpec::Method method) {
  switch (method) {
    case MergeSpec::Method::kCam:
      return "cam";
    case MergeSpec::Method::kD2o:
      return "d2o";
    case MergeSpec::Method::kMean:
      return "mean";
    case MergeSpec::Method::kNone:
      break;
  }
  return "none";
}

HeadSplit SplitByDrops(const HeadContext& head, const HeadActions& drops) {
  HeadSplit out;
  size_t dp = 0;
  size_t dt = 0;
  for (size_t i = 0; i < head.pages.size(); ++i) {
    const int32_t page = static_cast<int32_t>(i);
    const bool whole = dp < drops.drop_pages.size() && drops.drop_pages[dp] == page;
    if (whole) ++dp;
    for (int r = 0; r < head.pages[i].token_count; ++r) {
      const TokenRef t{page, r};
      const bool dropped = whole || (dt < drops.drop_tokens.size() && drops.drop_tokens[dt] == t);
      if (!whole && dropped) ++dt;
      (dropped ? out.dropped : out.kept).push_back(t);
    }
  }
  return out;
}

float KeyCosine(const HeadContext& head, TokenRef a, TokenRef b) {
  const float* x = KeyOf(head, a);
  const float* y = KeyOf(head, b);
  double dot = 0.0;
  double nx = 0.0;
  double ny = 0.0;
  for (int d = 0; d < head.head_dim; ++d) {
    dot += double{x[d]} * y[d];
    nx += double{x[d]} * x[d];
    ny += double{y[d]} * y[d];
  }
  if (std::isnan(dot) || std::isnan(nx) || std::isnan(ny)) {
    return std::numeric_limits<float>::quiet_NaN();
  }
  if (nx == 0.0 || ny == 0.0) return 0.0f;
  return static_cast<float>(dot / std::sqrt(nx * ny));
}

float CamMergeProbability(float dropped, float kept_max) {
  if (std::isinf(dropped) && dropped > 0) return 1.0f;
  if (!(kept_max > 0.0f)) return 0.0f;
  return std::clamp(dropped / kept_max, 0.0f, 1.0f);
}

double CamDraw(uint64_t seed, int32_t layer, int32_t kv_head, int64_t position) {
  // SplitMix64 over the mixed inputs.
  uint64_t z = seed ^ (static_cast<uint64_t>(static_cast<uint32_t>(layer)) << 48) ^
               (static_cast<uint64_t>(static_cast<uint32_t>(kv_head)) << 32) ^
               static_cast<uint64_t>(position) * 0x9e3779b97f4a7c15ULL;
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

// ---------------------------------------------------------------------------------------------

std::unique_ptr<MergePolicy> CamMergePolicy::Clone() const {
  return std::make_unique<CamMergePolicy>(*this);
}

absl::StatusOr<HeadMerges> CamMergePolicy::Plan(const HeadContext& head,
                                                const HeadActions& drops) const {
  const size_t rows = head.pages.size() * static_cast<size_t>(head.page_tokens);
  if (head.token_scores.size() != rows) {
    return absl::FailedPreconditionError("cam needs token scores (accumulated attention)");
  }
  const HeadSplit split = SplitByDrops(head, drops);
  HeadMerges out;
  if (split.kept.empty()) return out;
  float kept_max = 0.0f;
  std::vector<int64_t> kept_pos;
  kept_pos.reserve(split.kept.size());
  for (const TokenRef& t : split.kept) {
    const float s = ScoreOf(head, t);
    if (std::isfinite(s)) kept_max = std::max(kept_max, s);
    kept_pos.push_back(head.pages[t.page].position(t.row));
  }
  // Sources per kept token (index into split.kept), in the order the dropped tokens come.
  std::map<size_t, std::vector<MergeSource>> by_target;
  for (const TokenRef& p : split.dropped) {
    const int64_t pos = head.pages[p.page].position(p.row);
    const float prob = CamMergeProbability(ScoreOf(head, p), kept_max);
    if (!(CamDraw(spec_.cam_seed, head.layer.value(), head.kv_head.value(), pos) < prob)) continue;
    const size_t first = std::upper_bound(kept_pos.begin(), kept_pos.end(), pos) - kept_pos.begin();
    const size_t m = std::min<size_t>(spec_.cam_span, split.kept.size() - first);
    for (size_t j = first; j < first + m; ++j) {
      by_target[j].push_back(MergeSource{p, 0.0f, 1.0f / static_cast<float>(m)});
    }
  }
  for (auto& [j, sources] : by_target) {
    MergeGroup g;
    g.into = split.kept[j];
    g.sources = std::move(sources);
    out.groups.push_back(std::move(g));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

std::unique_ptr<MergePolicy> D2oMergePolicy::Clone() const {
  return std::make_unique<D2oMergePolicy>(*this);
}

absl::StatusOr<HeadMerges> D2oMergePolicy::Plan(const HeadContext& head,
                                                const HeadActions& drops) const {
  if (absl::Status st = RequireKeys(head, "d2o"); !st.ok()) return st;
  const HeadSplit split = SplitByDrops(head, drops);
  const std::vector<Match> matches = MatchDropped(head, split);
  HeadMerges out;
  if (matches.empty()) return out;
  double mean = 0.0;
  for (const Match& m : matches) mean += m.similarity;
  mean /= static_cast<double>(matches.size());
  const double tau = head.merge_state.empty()
                         ? mean
                         : spec_.d2o_alpha * head.merge_state[0] + spec_.d2o_beta * mean;
  out.state = {static_cast<float>(tau)};
  out.set_state = true;
  std::map<int32_t, std::vector<const Match*>> by_target;
  for (const Match& m : matches) {
    if (m.similarity >= tau) by_target[m.kept].push_back(&m);
  }
  for (const auto& [c, members] : by_target) {
    const float inv = 1.0f / (1.0f + static_cast<float>(members.size()));
    MergeGroup g;
    g.into = split.kept[c];
    g.k_self = inv;
    g.v_self = inv;
    for (const Match* m : members) {
      g.sources.push_back(MergeSource{m->dropped, m->similarity * inv, m->similarity * inv});
    }
    out.groups.push_back(std::move(g));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

std::unique_ptr<MergePolicy> MeanMergePolicy::Clone() const {
  return std::make_unique<MeanMergePolicy>(*this);
}

absl::StatusOr<HeadMerges> MeanMergePolicy::Plan(const HeadContext& head,
                                                 const HeadActions& drops) const {
  if (absl::Status st = RequireKeys(head, "mean"); !st.ok()) return st;
  const HeadSplit split = SplitByDrops(head, drops);
  const std::vector<Match> matches = MatchDropped(head, split);
  auto count = [&](TokenRef t) { return std::exp(head.pages[t.page].row_bias(t.row)); };
  std::map<int32_t, std::vector<const Match*>> by_target;
  for (const Match& m : matches) by_target[m.kept].push_back(&m);
  HeadMerges out;
  for (const auto& [c, members] : by_target) {
    const TokenRef into = split.kept[c];
    double total = count(into);
    for (const Match* m : members) total += count(m->dropped);
    MergeGroup g;
    g.into = into;
    g.count_bias = true;
    g.k_self = g.v_self = static_cast<float>(count(into) / total);
    for (const Match* m : members) {
      const float w = static_cast<float>(count(m->dropped) / total);
      g.sources.push_back(MergeSource{m->dropped, w, w});
    }
    out.groups.push_back(std::move(g));
  }
  return out;
}

}  // namespace headwise
