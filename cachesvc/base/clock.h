// An injectable clock: production code asks a Clock for the time, tests pass a FakeClock.
#ifndef HEADWISE_CACHESVC_BASE_CLOCK_H_
#define HEADWISE_CACHESVC_BASE_CLOCK_H_

#include "absl/base/thread_annotations.h"
#include "cachesvc/base/mutex.h"
#include "absl/time/time.h"

namespace headwise {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
  // The process-wide real clock. Never null; never destroyed.
  static Clock* Real();
};

// A clock that moves only when told to. Thread-safe.
class FakeClock : public Clock {
 public:
  explicit FakeClock(absl::Time start = absl::UnixEpoch()) : now_(start) {}
  absl::Time Now() const override;
  void Advance(absl::Duration d);

 private:
  mutable Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_);
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_BASE_CLOCK_H_
