// headwise::Mutex, MutexLock and CondVar: absl's in normal builds; std::mutex-based stand-ins
// with the same interface in ThreadSanitizer builds.
//
// Why: Debian's Abseil is not compiled with -fsanitize=thread, so TSan cannot see the
// happens-before edges of absl::Mutex (its lock paths live in the uninstrumented library) and
// reports every guarded access as a race. std::mutex goes through pthread, which TSan
// intercepts. Code uses these names so that `scripts/test.sh --tsan` checks our own locking.
// Annotations (ABSL_GUARDED_BY, ABSL_EXCLUSIVE_LOCKS_REQUIRED) work with both.
#ifndef HEADWISE_CACHESVC_BASE_MUTEX_H_
#define HEADWISE_CACHESVC_BASE_MUTEX_H_

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

#if defined(__SANITIZE_THREAD__)
#define HEADWISE_STD_MUTEX 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define HEADWISE_STD_MUTEX 1
#endif
#endif

#ifdef HEADWISE_STD_MUTEX
#include <condition_variable>
#include <mutex>
#endif

namespace headwise {

#ifndef HEADWISE_STD_MUTEX

using Mutex = absl::Mutex;
using MutexLock = absl::MutexLock;
using CondVar = absl::CondVar;

#else  // ThreadSanitizer build.

class ABSL_LOCKABLE Mutex {
 public:
  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void Unlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }
  void AssertHeld() const ABSL_ASSERT_EXCLUSIVE_LOCK() {}
  std::mutex& native() { return mu_; }

 private:
  std::mutex mu_;
};

class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) { mu_->Lock(); }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* const mu_;
};

class CondVar {
 public:
  // REQUIRES: mu held.
  void Wait(Mutex* mu) {
    std::unique_lock<std::mutex> lock(mu->native(), std::adopt_lock);
    cv_.wait(lock);
    lock.release();  // Still held, as absl::CondVar::Wait leaves it.
  }
  void Signal() { cv_.notify_one(); }
  void SignalAll() { cv_.notify_all(); }

 private:
  std::condition_variable cv_;
};

#endif  // HEADWISE_STD_MUTEX

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_BASE_MUTEX_H_
