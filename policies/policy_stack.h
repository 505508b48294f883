// PolicyStack: one sequence's policy stack, built by name from its PolicySpec through the stage
// registry (architecture.md "Policies"). The engine holds one stack per sequence and consults it;
// it never switches on policy kinds itself.
//
// Registry. Every stage implementation is registered under its name in PolicyRegistry::Global()
// (the built-ins on first use). A PolicySpec names each stage implicitly:
//   role source  head_roles oneof        "uniform" | "duo_attention" | "retrieval_scores"
//   budget       budget oneof            "uniform" (also when unset: unlimited) | "pyramid_kv" |
//                                        "ada_kv" | "head_kv"
//   scorer       what the action needs   "none" | "accumulated_attention" (h2o) |
//                (ScorerNameFor)         "last_attention" (tova) | "key_norm" |
//                                        "unimportance_count" (scissorhands)
//   action       eviction (resolved)     "none" | "streaming_llm" | "duo_attention" | "h2o" |
//                                        "tova" | "key_norm" | "scissorhands" | "snapkv"
//   merge        merge oneof (optional)  "cam" | "d2o" | "mean" (CaM adds the accumulated_attention
//                                        scorer when the action keeps no scores)
//   selector     selection.selector      "all" (default) | "quest" (also when selection.quest is
//                                        set) | any registered name
//   prefetcher   placement               "next_units"
// Tests and later methods register more factories under new names.
#ifndef HEADWISE_POLICIES_POLICY_STACK_H_
#define HEADWISE_POLICIES_POLICY_STACK_H_

#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "cachesvc/base/layout.h"
#include "cachesvc/base/mutex.h"
#include "headwise/v1/policy.pb.h"
#include "policies/stages.h"

namespace headwise {

class PatternDirectory;  // policies/pattern_directory.h

// What factories may read besides the spec. Not owned.
struct StackEnv {
  const ModelLayout* layout = nullptr;
  // Where named head patterns are looked up; may be null.
  const PatternDirectory* patterns = nullptr;
};

// Factories of each stage, by name. Thread-safe.
class PolicyRegistry {
 public:
  template <typename Stage>
  using Factory = std::function<absl::StatusOr<std::unique_ptr<Stage>>(
      const headwise::v1::PolicySpec&, const StackEnv&)>;

  // The process-wide registry, with the built-in stages registered.
  static PolicyRegistry& Global();

  // Registers `factory` under `name` for its stage. ALREADY_EXISTS for a taken name.
  template <typename Stage>
  absl::Status Register(const std::string& name, Factory<Stage> factory);
  // The stage named `name` built for `spec`. NOT_FOUND for an unknown name; the factory's
  // error otherwise.
  template <typename Stage>
  absl::StatusOr<std::unique_ptr<Stage>> Create(const std::string& name,
                                                const headwise::v1::PolicySpec& spec,
                                                const StackEnv& env) const;

 private:
  PolicyRegistry() = default;
  template <typename Stage>
  absl::flat_hash_map<std::string, Factory<Stage>>& Table() const;

  mutable Mutex mu_;
};

class PolicyStack {
 public:
  // The stack `spec` names for `env.layout`: every stage created and the roles resolved.
  // INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION as the stages' factories and the role
  // source say; FAILED_PRECONDITION when the action needs scores and no scorer exists.
  static absl::StatusOr<std::unique_ptr<PolicyStack>> Create(const headwise::v1::PolicySpec& spec,
                                                             const StackEnv& env);
  // An independent copy in the same state (fork).
  std::unique_ptr<PolicyStack> Clone() const;

  const HeadRoles& roles() const { return roles_; }
  const RoleSource& role_source() const { return *roles_source_; }
  const BudgetAllocator& budgets() const { return *budgets_; }
  // Null when the stack keeps no token scores.
  const TokenScorer* scorer() const { return scorer_.get(); }
  const ActionPolicy& actions() const { return *actions_; }
  // Null when the stack merges nothing.
  const MergePolicy* merger() const { return merger_.get(); }
  const PageSelector& selector() const { return *selector_; }
  const Prefetcher& prefetcher() const { return *prefetcher_; }

  // True when the action policy may drop anything (the engine skips Decide otherwise).
  bool may_drop() const { return actions_->name() != "none"; }
  // "roles=uniform budget=uniform scorer=none action=none selector=all prefetch=next_units".
  std::string Describe() const;

 private:
  PolicyStack() = default;

  HeadRoles roles_;
  std::unique_ptr<RoleSource> roles_source_;
  std::unique_ptr<BudgetAllocator> budgets_;
  std::unique_ptr<TokenScorer> scorer_;
  std::unique_ptr<ActionPolicy> actions_;
  std::unique_ptr<MergePolicy> merger_;
  std::unique_ptr<PageSelector> selector_;
  std::unique_ptr<Prefetcher> prefetcher_;
};

}  // namespace headwise

#endif  // HEADWISE_POLICIES_POLICY_STACK_H_
