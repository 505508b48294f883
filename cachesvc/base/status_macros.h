// RETURN_IF_ERROR / ASSIGN_OR_RETURN, which Abseil 20220623 does not ship. Defined once here.
#ifndef HEADWISE_CACHESVC_BASE_STATUS_MACROS_H_
#define HEADWISE_CACHESVC_BASE_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// Evaluates `expr` (an absl::Status) and returns it from the enclosing function when not OK.
#define RETURN_IF_ERROR(expr)                            \
  do {                                                   \
    ::absl::Status headwise_status_ = (expr);            \
    if (!headwise_status_.ok()) return headwise_status_; \
  } while (false)

#define HEADWISE_STATUS_CONCAT_INNER_(a, b) a##b
#define HEADWISE_STATUS_CONCAT_(a, b) HEADWISE_STATUS_CONCAT_INNER_(a, b)

// ASSIGN_OR_RETURN(lhs, expr): evaluates `expr` (an absl::StatusOr<T>); on error returns its
// status, otherwise moves the value into `lhs`, which may be a declaration (`auto x`).
#define ASSIGN_OR_RETURN(lhs, expr) \
  HEADWISE_ASSIGN_OR_RETURN_IMPL_(HEADWISE_STATUS_CONCAT_(headwise_statusor_, __LINE__), lhs, expr)

#define HEADWISE_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                                    \
  if (!statusor.ok()) return std::move(statusor).status();   \
  lhs = std::move(statusor).value()

#endif  // HEADWISE_CACHESVC_BASE_STATUS_MACROS_H_
