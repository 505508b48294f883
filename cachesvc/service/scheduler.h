// FairScheduler: the daemon's worker threads and the admission control in front of them.
//
// Every request is a Job of one tenant in one of two lanes:
//   - kInteractive: cheap calls (Stats, sequence lifecycle, single decode steps, small appends).
//   - kBulk: calls whose cost grows with their payload (Prefill, AppendLayers, anything whose
//     request is larger than kInteractiveBytes).
// Workers take interactive jobs first. Bulk jobs run on at most `num_threads - 1` workers at
// once (all of them when there is one thread), so one worker is always free for interactive
// work: a tenant flooding prefills cannot make another tenant's decode step wait for a prefill.
// Within a lane tenants take turns (round robin over the tenants with queued jobs), so one
// tenant's backlog does not delay another's jobs by more than one job per tenant.
//
// Admission (Submit): a job is refused with RESOURCE_EXHAUSTED, never queued, when
//   - its tenant already has `max_calls_per_tenant` jobs queued or running, or
//   - its tenant's queued and running jobs already hold `max_bytes_per_tenant` request bytes and
//     this one would pass it (a single job larger than the limit is admitted when the tenant has
//     nothing else in flight, so the limit never makes a legal call impossible), or
//   - `max_queued` jobs are waiting over all tenants.
// A queued job can be cancelled (its client went away or its deadline passed): it is removed
// from the queue and its `drop` runs with the given status instead of `run`, so it holds no
// payload and no worker.
#ifndef HEADWISE_CACHESVC_SERVICE_SCHEDULER_H_
#define HEADWISE_CACHESVC_SERVICE_SCHEDULER_H_

#include <array>
#include <cstdint>
#include <deque>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace headwise {

enum class Lane { kInteractive = 0, kBulk = 1 };

// Requests larger than this are bulk work whatever their RPC.
inline constexpr int64_t kInteractiveBytes = int64_t{256} << 10;

struct AdmissionLimits {
  // Jobs one tenant may have queued or running. >= 1.
  int max_calls_per_tenant = 64;
  // Request bytes one tenant's queued and running jobs may hold. >= 1.
  int64_t max_bytes_per_tenant = int64_t{256} << 20;
  // Jobs waiting over all tenants. >= 1.
  int max_queued = 1024;
};

class FairScheduler {
 public:
  using JobId = uint64_t;
  // Opaque tenant identity (the service passes its Tenant*).
  using TenantKey = const void*;

  struct Job {
    TenantKey tenant = nullptr;
    Lane lane = Lane::kInteractive;
    // What the request holds in memory while it waits (its message size).
    int64_t bytes = 0;
    // This tenant's own limits; 0: the scheduler's AdmissionLimits.
    int max_calls = 0;
    int64_t max_bytes = 0;
    // Runs on a worker.
    absl::AnyInvocable<void()> run;
    // Runs instead of `run` when the job is cancelled while queued (on the cancelling thread), or
    // when the scheduler is destroyed with the job still queued. Must finish the call.
    absl::AnyInvocable<void(absl::Status)> drop;
  };

  struct Counters {
    std::array<int64_t, 2> queued{};   // Waiting now, per lane.
    std::array<int64_t, 2> running{};  // Running now, per lane.
    int64_t rejected = 0;              // Refused by admission, ever.
    int64_t cancelled = 0;             // Removed from the queue by Cancel, ever.
  };

  // Starts `num_threads` (>= 1) workers. REQUIRES: every limit >= 1.
  FairScheduler(int num_threads, const AdmissionLimits& limits);
  // Stops taking jobs, drops every job still queued with UNAVAILABLE, waits for the running ones
  // and joins the workers.
  ~FairScheduler();
  FairScheduler(const FairScheduler&) = delete;
  FairScheduler& operator=(const FairScheduler&) = delete;

  // Queues `job` and returns its id, or RESOURCE_EXHAUSTED (naming the limit) without queuing it;
  // then neither `run` nor `drop` is ever called. Thread-safe.
  absl::StatusOr<JobId> Submit(Job job);

  // Removes job `id` from the queue and runs its `drop` with `status` (on this thread, no lock
  // held). False when the job is not queued (running, finished, or never submitted).
  bool Cancel(JobId id, const absl::Status& status);

  Counters counters() const;

 private:
  struct Queued {
    JobId id;
    Job job;
  };
  struct TenantQueues {
    std::array<std::deque<Queued>, 2> lanes;
    int calls = 0;      // Queued + running.
    int64_t bytes = 0;  // Of those.
  };

  void Loop();
  // The lane a worker may take a job from now, or -1.
  int ReadyLane() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  Queued PopLocked(int lane) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FinishedLocked(TenantKey tenant, int64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const AdmissionLimits limits_;
  const int bulk_slots_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<TenantKey, TenantQueues> tenants_ ABSL_GUARDED_BY(mu_);
  // Per lane: the tenants with queued jobs in it, in turn order (each at most once).
  std::array<std::deque<TenantKey>, 2> turns_ ABSL_GUARDED_BY(mu_);
  // Where each queued job waits (for Cancel).
  absl::flat_hash_map<JobId, std::pair<TenantKey, int>> where_ ABSL_GUARDED_BY(mu_);
  Counters counters_ ABSL_GUARDED_BY(mu_);
  JobId next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_SERVICE_SCHEDULER_H_
