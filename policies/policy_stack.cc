#include "policies/policy_stack.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"
#include "policies/basic_stages.h"
#include "policies/budgets.h"
#include "policies/eviction.h"
#include "policies/merge.h"
#include "policies/quest.h"
#include "policies/retrieval_roles.h"
#include "policies/score_eviction.h"

namespace headwise {
namespace {

using headwise::v1::PolicySpec;

void RegisterBuiltins(PolicyRegistry& r) {
  (void)r.Register<RoleSource>(
      "uniform",
      [](const PolicySpec&, const StackEnv&) -> absl::StatusOr<std::unique_ptr<RoleSource>> {
        return std::make_unique<UniformRoleSource>();
      });
  (void)r.Register<RoleSource>(
      "duo_attention",
      [](const PolicySpec& spec,
         const StackEnv& env) -> absl::StatusOr<std::unique_ptr<RoleSource>> {
        return std::make_unique<DuoAttentionRoleSource>(spec.head_roles(), env.patterns);
      });
  (void)r.Register<RoleSource>(
      "retrieval_scores",
      [](const PolicySpec& spec,
         const StackEnv& env) -> absl::StatusOr<std::unique_ptr<RoleSource>> {
        return std::make_unique<RetrievalScoreRoleSource>(spec.head_roles().retrieval_scores(),
                                                          env.patterns);
      });
  // Every budget is built from PolicySpec.budget (the name only picks the entry).
  for (const char* name : {"uniform", "pyramid_kv", "ada_kv", "head_kv"}) {
    (void)r.Register<BudgetAllocator>(
        name,
        [](const PolicySpec& spec,
           const StackEnv& env) -> absl::StatusOr<std::unique_ptr<BudgetAllocator>> {
          return CreateBudgetAllocator(spec, *env.layout, env.patterns);
        });
  }
  (void)r.Register<TokenScorer>(
      "accumulated_attention",
      [](const PolicySpec&, const StackEnv&) -> absl::StatusOr<std::unique_ptr<TokenScorer>> {
        return std::make_unique<AccumulatedAttentionScorer>();
      });
  (void)r.Register<TokenScorer>(
      "last_attention",
      [](const PolicySpec&, const StackEnv&) -> absl::StatusOr<std::unique_ptr<TokenScorer>> {
        return std::make_unique<LastAttentionScorer>();
      });
  (void)r.Register<TokenScorer>(
      "key_norm",
      [](const PolicySpec&, const StackEnv&) -> absl::StatusOr<std::unique_ptr<TokenScorer>> {
        return std::make_unique<KeyNormScorer>();
      });
  (void)r.Register<TokenScorer>(
      "unimportance_count",
      [](const PolicySpec& spec, const StackEnv&) -> absl::StatusOr<std::unique_ptr<TokenScorer>> {
        ASSIGN_OR_RETURN(const EvictionSpec e, ResolveEvictionSpec(spec));
        ASSIGN_OR_RETURN(auto scorer, UnimportanceScorer::Create(
                                          {.history_window = e.scissorhands_history_window,
                                           .threshold_tokens = e.scissorhands_threshold_tokens}));
        return std::unique_ptr<TokenScorer>(std::move(scorer));
      });
  for (const char* name : {"none", "streaming_llm", "duo_attention", "h2o", "tova", "key_norm",
                           "scissorhands", "snapkv"}) {
    (void)r.Register<ActionPolicy>(
        name,
        [](const PolicySpec& spec, const StackEnv&)
            -> absl::StatusOr<std::unique_ptr<ActionPolicy>> { return CreateActionPolicy(spec); });
  }
  for (const char* name : {"cam", "d2o", "mean"}) {
    (void)r.Register<MergePolicy>(
        name,
        [](const PolicySpec& spec,
           const StackEnv&) -> absl::StatusOr<std::unique_ptr<MergePolicy>> {
          ASSIGN_OR_RETURN(const MergeSpec m, ResolveMergeSpec(spec));
          switch (m.method) {
            case MergeSpec::Method::kCam:
              return std::make_unique<CamMergePolicy>(m);
            case MergeSpec::Method::kD2o:
              return std::make_unique<D2oMergePolicy>(m);
            case MergeSpec::Method::kMean:
              return std::make_unique<MeanMergePolicy>();
            case MergeSpec::Method::kNone:
              break;
          }
          return absl::InternalError("merge factory called without a merge method");
        });
  }
  (void)r.Register<PageSelector>(
      "all",
      [](const PolicySpec&, const StackEnv&) -> absl::StatusOr<std::unique_ptr<PageSelector>> {
        return std::make_unique<AllPagesSelector>();
      });
  (void)r.Register<PageSelector>(
      "quest",
      [](const PolicySpec& spec, const StackEnv&) -> absl::StatusOr<std::unique_ptr<PageSelector>> {
        ASSIGN_OR_RETURN(auto quest, QuestSelector::FromSpec(spec));
        return std::unique_ptr<PageSelector>(std::move(quest));
      });
  (void)r.Register<Prefetcher>(
      "next_units",
      [](const PolicySpec& spec, const StackEnv&) -> absl::StatusOr<std::unique_ptr<Prefetcher>> {
        const int depth =
            spec.placement().has_prefetch_depth() ? spec.placement().prefetch_depth() : 1;
        const int groups =
            spec.placement().has_device_head_groups() ? spec.placement().device_head_groups() : 2;
        int64_t pages = -1;
        if (spec.selection().has_prefetch_pages_per_layer()) {
          pages = spec.selection().prefetch_pages_per_layer();
          if (pages < 0) {
            return absl::InvalidArgumentError(
                absl::StrCat("selection.prefetch_pages_per_layer must be >= 0, got ", pages));
          }
        }
        return std::make_unique<NextUnitsPrefetcher>(depth, std::min(groups - 1, depth), pages);
      });
}

}  // namespace

PolicyRegistry& PolicyRegistry::Global() {
  static PolicyRegistry* registry = [] {
    auto* r = new PolicyRegistry;
    RegisterBuiltins(*r);
    return r;
  }();
  return *registry;
}

template <typename Stage>
absl::flat_hash_map<std::string, PolicyRegistry::Factory<Stage>>& PolicyRegistry::Table() const {
  static auto* table = new absl::flat_hash_map<std::string, Factory<Stage>>;
  return *table;
}

template <typename Stage>
absl::Status PolicyRegistry::Register(const std::string& name, Factory<Stage> factory) {
  MutexLock lock(&mu_);
  if (!Table<Stage>().emplace(name, std::move(factory)).second) {
    return absl::AlreadyExistsError(absl::StrCat("a stage named '", name, "' is registered"));
  }
  return absl::OkStatus();
}

template <typename Stage>
absl::StatusOr<std::unique_ptr<Stage>> PolicyRegistry::Create(const std::string& name,
                                                              const PolicySpec& spec,
                                                              const StackEnv& env) const {
  Factory<Stage> factory;
  {
    MutexLock lock(&mu_);
    auto it = Table<Stage>().find(name);
    if (it == Table<Stage>().end()) {
      return absl::NotFoundError(absl::StrCat("no policy stage named '", name, "'"));
    }
    factory = it->second;
  }
  return factory(spec, env);
}

#define HEADWISE_INSTANTIATE_STAGE(Stage)                                                \
  template absl::Status PolicyRegistry::Register<Stage>(const std::string&,              \
                                                        PolicyRegistry::Factory<Stage>); \
  template absl::StatusOr<std::unique_ptr<Stage>> PolicyRegistry::Create<Stage>(         \
      const std::string&, const PolicySpec&, const StackEnv&) const;
HEADWISE_INSTANTIATE_STAGE(RoleSource)
HEADWISE_INSTANTIATE_STAGE(BudgetAllocator)
HEADWISE_INSTANTIATE_STAGE(TokenScorer)
HEADWISE_INSTANTIATE_STAGE(ActionPolicy)
HEADWISE_INSTANTIATE_STAGE(MergePolicy)
HEADWISE_INSTANTIATE_STAGE(PageSelector)
HEADWISE_INSTANTIATE_STAGE(Prefetcher)
#undef HEADWISE_INSTANTIATE_STAGE

absl::StatusOr<std::unique_ptr<PolicyStack>> PolicyStack::Create(const PolicySpec& spec,
                                                                 const StackEnv& env) {
  if (env.layout == nullptr) return absl::InvalidArgumentError("StackEnv.layout is required");
  const PolicyRegistry& r = PolicyRegistry::Global();
  ASSIGN_OR_RETURN(const EvictionSpec eviction, ResolveEvictionSpec(spec));
  std::string roles_name = "uniform";
  if (spec.head_roles().has_duo_attention()) roles_name = "duo_attention";
  if (spec.head_roles().has_retrieval_scores()) roles_name = "retrieval_scores";
  std::unique_ptr<PolicyStack> stack(new PolicyStack);
  ASSIGN_OR_RETURN(stack->roles_source_, r.Create<RoleSource>(roles_name, spec, env));
  ASSIGN_OR_RETURN(stack->roles_, stack->roles_source_->Resolve(*env.layout));
  ASSIGN_OR_RETURN(stack->budgets_,
                   r.Create<BudgetAllocator>(std::string(BudgetAllocatorName(spec)), spec, env));
  ASSIGN_OR_RETURN(
      stack->actions_,
      r.Create<ActionPolicy>(std::string(EvictionMethodName(eviction.method)), spec, env));
  if (stack->actions_->uses_scores()) {
    ASSIGN_OR_RETURN(stack->scorer_,
                     r.Create<TokenScorer>(std::string(ScorerNameFor(eviction.method)), spec, env));
  }
  ASSIGN_OR_RETURN(const MergeSpec merge, ResolveMergeSpec(spec));
  if (merge.method != MergeSpec::Method::kNone) {
    if (eviction.method == EvictionSpec::Method::kNone) {
      return absl::InvalidArgumentError(
          "merge needs an eviction method: it merges the tokens the eviction drops");
    }
    ASSIGN_OR_RETURN(stack->merger_,
                     r.Create<MergePolicy>(std::string(MergeMethodName(merge.method)), spec, env));
    // CaM reads attention scores; an eviction that keeps none gets accumulated attention.
    if (stack->merger_->uses_scores() && stack->scorer_ == nullptr) {
      ASSIGN_OR_RETURN(stack->scorer_, r.Create<TokenScorer>("accumulated_attention", spec, env));
    }
  }
  std::string selector = spec.selection().selector();
  if (selector.empty()) selector = spec.selection().has_quest() ? "quest" : "all";
  ASSIGN_OR_RETURN(stack->selector_, r.Create<PageSelector>(selector, spec, env));
  ASSIGN_OR_RETURN(stack->prefetcher_, r.Create<Prefetcher>("next_units", spec, env));
  return stack;
}

std::unique_ptr<PolicyStack> PolicyStack::Clone() const {
  std::unique_ptr<PolicyStack> copy(new PolicyStack);
  copy->roles_ = roles_;
  copy->roles_source_ = roles_source_->Clone();
  copy->budgets_ = budgets_->Clone();
  if (scorer_ != nullptr) copy->scorer_ = scorer_->Clone();
  copy->actions_ = actions_->Clone();
  if (merger_ != nullptr) copy->merger_ = merger_->Clone();
  copy->selector_ = selector_->Clone();
  copy->prefetcher_ = prefetcher_->Clone();
  return copy;
}

std::string PolicyStack::Describe() const {
  std::string out;
  const auto add = [&out](std::string_view key, std::string_view value) {
    if (!out.empty()) out += ' ';
    out.append(key).append("=").append(value);
  };
  add("roles", roles_source_->name());
  add("budget", budgets_->name());
  add("scorer", scorer_ == nullptr ? "none" : scorer_->name());
  add("action", actions_->name());
  if (merger_ != nullptr) add("merge", merger_->name());
  add("selector", selector_->name());
  add("prefetch", prefetcher_->name());
  return out;
}

}  // namespace headwise
