#include "cachesvc/service/scheduler.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace headwise {

FairScheduler::FairScheduler(int num_threads, const AdmissionLimits& limits)
    : limits_(limits), bulk_slots_(std::max(1, num_threads - 1)) {
  threads_.reserve(num_threads);
  for (int i = 0; i < num_threads; ++i) threads_.emplace_back([this] { Loop(); });
}

FairScheduler::~FairScheduler() {
  std::vector<Queued> left;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    for (int lane = 0; lane < 2; ++lane) {
      while (!turns_[lane].empty()) left.push_back(PopLocked(lane));
    }
  }
  for (Queued& q : left) {
    q.job.drop(absl::UnavailableError("the daemon is shutting down"));
    absl::MutexLock lock(&mu_);
    FinishedLocked(q.job.tenant, q.job.bytes);
  }
  for (auto& thread : threads_) thread.join();
}

absl::StatusOr<FairScheduler::JobId> FairScheduler::Submit(Job job) {
  absl::MutexLock lock(&mu_);
  TenantQueues& t = tenants_[job.tenant];
  const int max_calls = job.max_calls > 0 ? job.max_calls : limits_.max_calls_per_tenant;
  const int64_t max_bytes = job.max_bytes > 0 ? job.max_bytes : limits_.max_bytes_per_tenant;
  absl::Status refused;
  if (stopping_) {
    refused = absl::UnavailableError("the daemon is shutting down");
  } else if (t.calls >= max_calls) {
    refused = absl::ResourceExhaustedError(absl::StrCat("the tenant already has ", t.calls,
                                                        " calls queued or running (limit ",
                                                        max_calls, "); retry later"));
  } else if (t.calls > 0 && t.bytes + job.bytes > max_bytes) {
    refused = absl::ResourceExhaustedError(
        absl::StrCat("the tenant's calls in flight hold ", t.bytes, " request bytes; this one (",
                     job.bytes, ") would pass the limit of ", max_bytes, "; retry later"));
  } else if (counters_.queued[0] + counters_.queued[1] >= limits_.max_queued) {
    refused = absl::ResourceExhaustedError(absl::StrCat(
        "the daemon's queue is full (", limits_.max_queued, " calls waiting); retry later"));
  }
  if (!refused.ok()) {
    ++counters_.rejected;
    if (t.calls == 0) tenants_.erase(job.tenant);
    return refused;
  }
  const int lane = static_cast<int>(job.lane);
  const JobId id = next_id_++;
  ++t.calls;
  t.bytes += job.bytes;
  if (t.lanes[lane].empty()) turns_[lane].push_back(job.tenant);
  where_[id] = {job.tenant, lane};
  t.lanes[lane].push_back(Queued{id, std::move(job)});
  ++counters_.queued[lane];
  return id;
}

bool FairScheduler::Cancel(JobId id, const absl::Status& status) {
  Queued found;
  {
    absl::MutexLock lock(&mu_);
    auto it = where_.find(id);
    if (it == where_.end()) return false;
    const auto [tenant, lane] = it->second;
    where_.erase(it);
    std::deque<Queued>& q = tenants_[tenant].lanes[lane];
    auto pos = std::find_if(q.begin(), q.end(), [id](const Queued& e) { return e.id == id; });
    found = std::move(*pos);
    q.erase(pos);
    if (q.empty()) {
      auto& turns = turns_[lane];
      turns.erase(std::find(turns.begin(), turns.end(), tenant));
    }
    --counters_.queued[lane];
    ++counters_.cancelled;
  }
  found.job.drop(status);
  absl::MutexLock lock(&mu_);
  FinishedLocked(found.job.tenant, found.job.bytes);
  return true;
}

FairScheduler::Counters FairScheduler::counters() const {
  absl::MutexLock lock(&mu_);
  return counters_;
}

int FairScheduler::ReadyLane() const {
  if (!turns_[0].empty()) return 0;
  if (!turns_[1].empty() && counters_.running[1] < bulk_slots_) return 1;
  return -1;
}

FairScheduler::Queued FairScheduler::PopLocked(int lane) {
  const TenantKey tenant = turns_[lane].front();
  turns_[lane].pop_front();
  std::deque<Queued>& q = tenants_[tenant].lanes[lane];
  Queued job = std::move(q.front());
  q.pop_front();
  if (!q.empty()) turns_[lane].push_back(tenant);  // Its next job waits for the others' turns.
  where_.erase(job.id);
  --counters_.queued[lane];
  return job;
}

void FairScheduler::FinishedLocked(TenantKey tenant, int64_t bytes) {
  auto it = tenants_.find(tenant);
  TenantQueues& t = it->second;
  --t.calls;
  t.bytes -= bytes;
  if (t.calls == 0) tenants_.erase(it);
}

void FairScheduler::Loop() {
  while (true) {
    Queued job;
    int lane = -1;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](FairScheduler* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu_) {
            return s->stopping_ || s->ReadyLane() >= 0;
          },
          this));
      lane = ReadyLane();
      if (lane < 0) return;  // Stopping; the destructor drops what is left.
      job = PopLocked(lane);
      ++counters_.running[lane];
    }
    job.job.run();
    absl::MutexLock lock(&mu_);
    --counters_.running[lane];
    FinishedLocked(job.job.tenant, job.job.bytes);
  }
}

}  // namespace headwise
