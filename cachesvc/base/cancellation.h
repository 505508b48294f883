// Cancellation of the call a thread is working on.
//
// The daemon runs each request on one worker thread. While it does, a ScopedCancellation names
// the request's cancel flag (set when its client goes away or its deadline passes); long engine
// work (chunked prefill) reads CurrentCancellation() and stops between chunks, before it changes
// anything, answering CANCELLED. Code that runs outside a request sees nullptr and never stops.
#ifndef HEADWISE_CACHESVC_BASE_CANCELLATION_H_
#define HEADWISE_CACHESVC_BASE_CANCELLATION_H_

#include <atomic>

namespace headwise {

namespace internal {
inline thread_local const std::atomic<bool>* current_cancellation = nullptr;
}  // namespace internal

// The flag of the call running on this thread, or nullptr.
inline const std::atomic<bool>* CurrentCancellation() { return internal::current_cancellation; }

// True when this thread's call has been cancelled.
inline bool CallCancelled() {
  const std::atomic<bool>* flag = internal::current_cancellation;
  return flag != nullptr && flag->load(std::memory_order_relaxed);
}

// Makes `flag` this thread's cancel flag for the scope's lifetime (scopes nest).
class ScopedCancellation {
 public:
  explicit ScopedCancellation(const std::atomic<bool>* flag)
      : previous_(internal::current_cancellation) {
    internal::current_cancellation = flag;
  }
  ~ScopedCancellation() { internal::current_cancellation = previous_; }
  ScopedCancellation(const ScopedCancellation&) = delete;
  ScopedCancellation& operator=(const ScopedCancellation&) = delete;

 private:
  const std::atomic<bool>* const previous_;
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_BASE_CANCELLATION_H_
