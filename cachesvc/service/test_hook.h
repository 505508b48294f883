// TestHook: a process-wide, thread-safe slot for one test callback (fault injection, sync
// points). Unset (the default) it costs one uncontended lock per call site. Not for production
// logic.
#ifndef HEADWISE_CACHESVC_SERVICE_TEST_HOOK_H_
#define HEADWISE_CACHESVC_SERVICE_TEST_HOOK_H_

#include <functional>
#include <memory>
#include <type_traits>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace headwise {

template <typename Result, typename... Args>
class TestHook {
 public:
  // Installs `hook` (nullptr clears it).
  void Set(std::function<Result(Args...)> hook) {
    auto next = hook == nullptr ? nullptr
                                : std::make_shared<std::function<Result(Args...)>>(std::move(hook));
    absl::MutexLock lock(&mu_);
    hook_ = std::move(next);
  }
  // Calls the hook, or returns `fallback` when none is set. The hook runs without the lock.
  template <typename R = Result, typename = std::enable_if_t<!std::is_void_v<R>>>
  R Call(R fallback, Args... args) const {
    auto hook = Get();
    return hook == nullptr ? fallback : (*hook)(std::forward<Args>(args)...);
  }
  // Calls the hook when set (its result, if any, is dropped).
  void Call(Args... args) const {
    if (auto hook = Get(); hook != nullptr) (*hook)(std::forward<Args>(args)...);
  }

 private:
  std::shared_ptr<std::function<Result(Args...)>> Get() const {
    absl::MutexLock lock(&mu_);
    return hook_;
  }

  mutable absl::Mutex mu_;
  std::shared_ptr<std::function<Result(Args...)>> hook_ ABSL_GUARDED_BY(mu_);
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_SERVICE_TEST_HOOK_H_
