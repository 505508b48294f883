// Renders a Plan for people (a table) and for programs (JSON). The JSON fields are a stable
// interface of `headwise plan --json`; docs/planner.md lists them.
#ifndef HEADWISE_CACHESVC_PLANNER_PLAN_REPORT_H_
#define HEADWISE_CACHESVC_PLANNER_PLAN_REPORT_H_

#include <string>

#include "cachesvc/planner/planner.h"

namespace headwise {

// Names the inputs the Plan does not carry.
struct PlanLabels {
  // The layout preset name, or the layout file's path.
  std::string layout;
  // The policy name given to BuildPolicySpec (or any label).
  std::string policy;
};

// A multi-line, human-readable table ending in '\n'.
std::string FormatPlanTable(const Plan& plan, const PlanLabels& labels);

// One JSON object, pretty-printed with 2-space indent, ending in '\n'. Byte counts are
// integers; times in seconds; rates in bytes/s or FLOP/s. Unlimited budgets are null.
std::string FormatPlanJson(const Plan& plan, const PlanLabels& labels);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_PLANNER_PLAN_REPORT_H_
