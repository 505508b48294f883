// FairScheduler: lanes, turns between tenants, admission limits, cancellation, shutdown. Jobs
// block on a gate the test opens, so every order asserted is forced, not timed.
#include "cachesvc/service/scheduler.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

namespace headwise {
namespace {

const int kAlice = 1, kBob = 2;

class SchedulerTest : public ::testing::Test {
 protected:
  FairScheduler::Job Job(const int* tenant, Lane lane, std::string name, int64_t bytes = 1) {
    FairScheduler::Job job;
    job.tenant = tenant;
    job.lane = lane;
    job.bytes = bytes;
    job.run = [this, name] {
      absl::MutexLock lock(&mu_);
      ran_.push_back(name);
    };
    job.drop = [this, name](absl::Status status) {
      absl::MutexLock lock(&mu_);
      dropped_.push_back(name + ":" + std::string(absl::StatusCodeToString(status.code())));
    };
    return job;
  }
  // A job that blocks its worker until `gate` is notified.
  FairScheduler::Job Blocker(const int* tenant, Lane lane, absl::Notification* gate,
                             absl::Notification* started) {
    FairScheduler::Job job = Job(tenant, lane, "blocker");
    job.run = [gate, started] {
      started->Notify();
      gate->WaitForNotification();
    };
    return job;
  }
  std::vector<std::string> Ran() {
    absl::MutexLock lock(&mu_);
    return ran_;
  }
  void AwaitRan(size_t n) {
    absl::MutexLock lock(&mu_);
    auto done = [this, n]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return ran_.size() >= n; };
    mu_.Await(absl::Condition(&done));
  }

  absl::Mutex mu_;
  std::vector<std::string> ran_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> dropped_ ABSL_GUARDED_BY(mu_);
};

TEST_F(SchedulerTest, InteractiveJobsRunBeforeQueuedBulkJobs) {
  FairScheduler s(1, AdmissionLimits{});
  absl::Notification gate, started;
  ASSERT_TRUE(s.Submit(Blocker(&kAlice, Lane::kInteractive, &gate, &started)).ok());
  started.WaitForNotification();
  ASSERT_TRUE(s.Submit(Job(&kAlice, Lane::kBulk, "bulk")).ok());
  ASSERT_TRUE(s.Submit(Job(&kBob, Lane::kInteractive, "step")).ok());
  gate.Notify();
  AwaitRan(2);
  EXPECT_EQ(Ran(), (std::vector<std::string>{"step", "bulk"}));
}

TEST_F(SchedulerTest, BulkLeavesOneWorkerForInteractiveWork) {
  FairScheduler s(2, AdmissionLimits{});
  absl::Notification gate, started;
  ASSERT_TRUE(s.Submit(Blocker(&kAlice, Lane::kBulk, &gate, &started)).ok());
  started.WaitForNotification();
  ASSERT_TRUE(s.Submit(Job(&kAlice, Lane::kBulk, "bulk2")).ok());
  ASSERT_TRUE(s.Submit(Job(&kBob, Lane::kInteractive, "step")).ok());
  AwaitRan(1);  // The free worker takes the step, never the second bulk job.
  EXPECT_EQ(Ran(), (std::vector<std::string>{"step"}));
  EXPECT_EQ(s.counters().queued[1], 1);
  EXPECT_EQ(s.counters().running[1], 1);
  gate.Notify();
  AwaitRan(2);
  EXPECT_EQ(Ran(), (std::vector<std::string>{"step", "bulk2"}));
}

TEST_F(SchedulerTest, TenantsTakeTurns) {
  FairScheduler s(1, AdmissionLimits{});
  absl::Notification gate, started;
  ASSERT_TRUE(s.Submit(Blocker(&kAlice, Lane::kBulk, &gate, &started)).ok());
  started.WaitForNotification();
  for (const char* name : {"a1", "a2", "a3"}) {
    ASSERT_TRUE(s.Submit(Job(&kAlice, Lane::kBulk, name)).ok());
  }
  ASSERT_TRUE(s.Submit(Job(&kBob, Lane::kBulk, "b1")).ok());
  ASSERT_TRUE(s.Submit(Job(&kBob, Lane::kBulk, "b2")).ok());
  gate.Notify();
  AwaitRan(5);
  EXPECT_EQ(Ran(), (std::vector<std::string>{"a1", "b1", "a2", "b2", "a3"}));
}

TEST_F(SchedulerTest, AdmissionLimits) {
  AdmissionLimits limits;
  limits.max_calls_per_tenant = 3;
  limits.max_bytes_per_tenant = 100;
  limits.max_queued = 4;
  FairScheduler s(1, limits);
  absl::Notification gate, started;
  ASSERT_TRUE(s.Submit(Blocker(&kAlice, Lane::kBulk, &gate, &started)).ok());  // 1 byte.
  started.WaitForNotification();
  ASSERT_TRUE(s.Submit(Job(&kAlice, Lane::kBulk, "a60", 60)).ok());
  // 1 + 60 + 50 > 100.
  absl::StatusOr<FairScheduler::JobId> over = s.Submit(Job(&kAlice, Lane::kBulk, "a50", 50));
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(s.Submit(Job(&kAlice, Lane::kBulk, "a39", 39)).ok());
  // Three calls in flight: the fourth is refused whatever its size.
  EXPECT_EQ(s.Submit(Job(&kAlice, Lane::kInteractive, "a0", 0)).status().code(),
            absl::StatusCode::kResourceExhausted);
  // Bob alone may send one call bigger than the byte limit.
  ASSERT_TRUE(s.Submit(Job(&kBob, Lane::kBulk, "b500", 500)).ok());
  // A tenant's own limit replaces the default.
  FairScheduler::Job small = Job(&kBob, Lane::kBulk, "b1", 1);
  small.max_calls = 1;
  EXPECT_EQ(s.Submit(std::move(small)).status().code(), absl::StatusCode::kResourceExhausted);
  // Four waiting over all tenants.
  const int carol = 3;
  ASSERT_TRUE(s.Submit(Job(&carol, Lane::kBulk, "c1")).ok());
  EXPECT_EQ(s.Submit(Job(&carol, Lane::kBulk, "c2")).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.counters().rejected, 4);
  gate.Notify();
  AwaitRan(4);
  // Refused jobs neither ran nor were dropped.
  absl::MutexLock lock(&mu_);
  EXPECT_EQ(ran_.size(), 4u);
  EXPECT_TRUE(dropped_.empty());
}

TEST_F(SchedulerTest, CancelRemovesAQueuedJobOnly) {
  FairScheduler s(1, AdmissionLimits{});
  absl::Notification gate, started;
  absl::StatusOr<FairScheduler::JobId> blocker =
      s.Submit(Blocker(&kAlice, Lane::kBulk, &gate, &started));
  ASSERT_TRUE(blocker.ok());
  started.WaitForNotification();
  absl::StatusOr<FairScheduler::JobId> queued = s.Submit(Job(&kAlice, Lane::kBulk, "queued"));
  ASSERT_TRUE(queued.ok());
  ASSERT_TRUE(s.Submit(Job(&kAlice, Lane::kBulk, "kept")).ok());
  EXPECT_FALSE(s.Cancel(*blocker, absl::CancelledError("")));  // Running: not cancellable here.
  EXPECT_TRUE(s.Cancel(*queued, absl::CancelledError("")));
  EXPECT_FALSE(s.Cancel(*queued, absl::CancelledError("")));  // Only once.
  EXPECT_EQ(s.counters().cancelled, 1);
  EXPECT_EQ(s.counters().queued[1], 1);
  gate.Notify();
  AwaitRan(1);
  EXPECT_EQ(Ran(), (std::vector<std::string>{"kept"}));
  absl::MutexLock lock(&mu_);
  EXPECT_EQ(dropped_, (std::vector<std::string>{"queued:CANCELLED"}));
}

TEST_F(SchedulerTest, ShutdownDropsQueuedJobs) {
  absl::Notification gate, started;
  {
    FairScheduler s(1, AdmissionLimits{});
    ASSERT_TRUE(s.Submit(Blocker(&kAlice, Lane::kBulk, &gate, &started)).ok());
    started.WaitForNotification();
    ASSERT_TRUE(s.Submit(Job(&kBob, Lane::kInteractive, "late")).ok());
    gate.Notify();  // The destructor may race the worker for "late": either runs it or drops it.
  }
  absl::MutexLock lock(&mu_);
  EXPECT_EQ(ran_.size() + dropped_.size(), 1u);
  if (!dropped_.empty()) {
    EXPECT_EQ(dropped_[0], "late:UNAVAILABLE");
  }
}

}  // namespace
}  // namespace headwise
