// WorkerPool: a fixed set of threads running queued closures in FIFO order. gRPC reactors hand
// every request to it, so no reactor ever runs engine work or waits on a lock.
#ifndef HEADWISE_CACHESVC_SERVICE_WORKER_POOL_H_
#define HEADWISE_CACHESVC_SERVICE_WORKER_POOL_H_

#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace headwise {

class WorkerPool {
 public:
  // Starts `num_threads` (>= 1) threads.
  explicit WorkerPool(int num_threads);
  // Runs every closure already queued, then joins the threads.
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Queues `fn`; it runs on one of the pool's threads. Thread-safe. REQUIRES: the pool is not
  // being destroyed.
  void Schedule(std::function<void()> fn);

 private:
  void Loop();

  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_SERVICE_WORKER_POOL_H_
