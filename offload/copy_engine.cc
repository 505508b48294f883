#include "offload/copy_engine.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"

namespace headwise {
namespace {

uint64_t Nanos(std::chrono::steady_clock::duration d) {
  const int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(d).count();
  return ns > 0 ? static_cast<uint64_t>(ns) : 0;
}

PageKey KeyAt(const PageKey& first, uint32_t offset) {
  PageKey key = first;
  key.ordinal += offset;
  return key;
}

}  // namespace

std::string_view CopyDirectionName(CopyDirection direction) {
  switch (direction) {
#define HEADWISE_COPY_DIRECTION(name, str, src_tier, dst_tier) \
  case CopyDirection::name:                                    \
    return str;
#include "offload/copy_kinds.def"
  }
  return "unknown";
}

std::string_view CopyPriorityName(CopyPriority priority) {
  switch (priority) {
#define HEADWISE_COPY_PRIORITY(name, str) \
  case CopyPriority::name:                \
    return str;
#include "offload/copy_kinds.def"
  }
  return "unknown";
}

Tier SourceTier(CopyDirection direction) {
  switch (direction) {
#define HEADWISE_COPY_DIRECTION(name, str, src_tier, dst_tier) \
  case CopyDirection::name:                                    \
    return Tier::src_tier;
#include "offload/copy_kinds.def"
  }
  return Tier::kHost;
}

Tier DestinationTier(CopyDirection direction) {
  switch (direction) {
#define HEADWISE_COPY_DIRECTION(name, str, src_tier, dst_tier) \
  case CopyDirection::name:                                    \
    return Tier::dst_tier;
#include "offload/copy_kinds.def"
  }
  return Tier::kHost;
}

absl::StatusOr<std::unique_ptr<CopyEngine>> CopyEngine::Create(const CopyEngineOptions& options) {
  if (options.host == nullptr) return absl::InvalidArgumentError("CopyEngine needs a host pool");
  if (options.num_workers < 1) return absl::InvalidArgumentError("num_workers must be >= 1");
  if (options.max_coalesce_pages < 1) {
    return absl::InvalidArgumentError("max_coalesce_pages must be >= 1");
  }
  if (options.device != nullptr) {
    if (options.device->slot_bytes() != options.host->slot_bytes()) {
      return absl::InvalidArgumentError(
          absl::StrCat("device slot_bytes ", options.device->slot_bytes(), " != host slot_bytes ",
                       options.host->slot_bytes()));
    }
    if (!options.device->host_accessible()) {
      return absl::UnimplementedError("copies to real device memory (CUDA) are not built yet");
    }
  }
  return std::unique_ptr<CopyEngine>(new CopyEngine(options));
}

CopyEngine::CopyEngine(const CopyEngineOptions& options)
    : options_(options),
      page_bytes_(static_cast<uint64_t>(options.host->slot_bytes())),
      paused_(options.start_paused) {
  workers_.reserve(options_.num_workers);
  for (int i = 0; i < options_.num_workers; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

CopyEngine::~CopyEngine() { Shutdown(); }

PagePool* CopyEngine::MemoryPool(Tier tier) const {
  switch (tier) {
    case Tier::kDevice:
      return options_.device;
    case Tier::kHost:
      return options_.host;
    case Tier::kDisk:
      return nullptr;
  }
  return nullptr;
}

std::string CopyEngine::SourcePosition(const MoveRequest& request, uint32_t offset) const {
  std::string position(1, static_cast<char>(request.direction));
  if (SourceTier(request.direction) == Tier::kDisk) {
    // Validated at Submit, so encoding cannot fail here.
    position += EncodePageKey(KeyAt(request.disk_key, offset)).value_or("");
  } else {
    absl::StrAppend(&position, request.src_slot + offset);
  }
  return position;
}

std::string CopyEngine::DestinationPosition(const MoveRequest& request, uint32_t offset) const {
  if (DestinationTier(request.direction) == Tier::kDisk) {
    return EncodePageKey(KeyAt(request.disk_key, offset)).value_or("");
  }
  return absl::StrCat(request.dst_slot + offset);
}

absl::StatusOr<CopyTicket> CopyEngine::Submit(MoveRequest request) {
  const int direction = static_cast<int>(request.direction);
  const int priority = static_cast<int>(request.priority);
  if (direction < 0 || direction >= kNumCopyDirections || priority < 0 ||
      priority >= kNumCopyPriorities) {
    return absl::InvalidArgumentError("unknown copy direction or priority");
  }
  if (request.num_pages == 0) return absl::InvalidArgumentError("a move needs num_pages >= 1");
  const Tier src = SourceTier(request.direction);
  const Tier dst = DestinationTier(request.direction);
  for (const auto& [tier, slot] : {std::pair{src, request.src_slot}, {dst, request.dst_slot}}) {
    if (tier == Tier::kDisk) {
      if (options_.disk == nullptr) {
        return absl::FailedPreconditionError(
            absl::StrCat(std::string(CopyDirectionName(request.direction)),
                         " needs a DiskStore; this engine has none"));
      }
      RETURN_IF_ERROR(EncodePageKey(request.disk_key).status());
      if (uint64_t{request.disk_key.ordinal} + request.num_pages > uint64_t{1} << 32) {
        return absl::InvalidArgumentError("disk page ordinals overflow 32 bits");
      }
      continue;
    }
    const PagePool* pool = MemoryPool(tier);
    if (pool == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat(std::string(CopyDirectionName(request.direction)),
                       " needs a device pool; this engine has none"));
    }
    if (slot >= pool->num_slots() || request.num_pages > pool->num_slots() - slot) {
      return absl::InvalidArgumentError(absl::StrCat(
          "slots [", slot, ", ", slot + request.num_pages, ") are outside the ",
          tier == Tier::kDevice ? "device" : "host", " pool of ", pool->num_slots(), " slots"));
    }
  }

  MutexLock lock(&mu_);
  if (stopping_) return absl::FailedPreconditionError("copy engine is shut down");
  const CopyTicket ticket(next_ticket_++);
  Queue& queue = queues_[priority];
  queue.push_back(Queued{ticket, std::move(request)});
  IndexLocked(priority, std::prev(queue.end()));
  pending_.emplace(ticket.value(), TicketState{});
  ++stats_.queued;
  work_cv_.Signal();
  return ticket;
}

void CopyEngine::IndexLocked(int priority, Queue::iterator it) {
  by_source_[priority].try_emplace(SourcePosition(it->request, 0), it);
}

void CopyEngine::UnindexLocked(int priority, Queue::iterator it) {
  auto& index = by_source_[priority];
  auto found = index.find(SourcePosition(it->request, 0));
  if (found != index.end() && found->second == it) index.erase(found);
}

bool CopyEngine::AnyQueuedLocked() const {
  for (const Queue& queue : queues_) {
    if (!queue.empty()) return true;
  }
  return false;
}

std::vector<CopyEngine::Queued> CopyEngine::TakeRunLocked() {
  int priority = 0;
  while (queues_[priority].empty()) ++priority;
  Queue& queue = queues_[priority];
  std::vector<Queued> run;
  UnindexLocked(priority, queue.begin());
  run.push_back(std::move(queue.front()));
  queue.pop_front();
  uint32_t pages = run.back().request.num_pages;
  auto& index = by_source_[priority];
  while (pages < options_.max_coalesce_pages) {
    const MoveRequest& last = run.back().request;
    auto found = index.find(SourcePosition(last, last.num_pages));
    if (found == index.end()) break;
    const MoveRequest& next = found->second->request;
    if (DestinationPosition(next, 0) != DestinationPosition(last, last.num_pages) ||
        pages + next.num_pages > options_.max_coalesce_pages) {
      break;
    }
    Queue::iterator it = found->second;
    index.erase(found);
    pages += it->request.num_pages;
    run.push_back(std::move(*it));
    queue.erase(it);
  }
  return run;
}

void CopyEngine::WorkerLoop() {
  while (true) {
    std::vector<Queued> run;
    SteadyTime start;
    {
      MutexLock lock(&mu_);
      while (!stopping_ && (paused_ || !AnyQueuedLocked())) work_cv_.Wait(&mu_);
      if (stopping_) return;  // Shutdown cancels whatever is still queued.
      run = TakeRunLocked();
      stats_.queued -= run.size();
      ++stats_.running;
      start = std::chrono::steady_clock::now();
    }

    std::vector<absl::Status> statuses = Execute(run);
    const SteadyTime end = std::chrono::steady_clock::now();

    {
      MutexLock lock(&mu_);
      SteadyTime overlap_end = end;
      for (const Queued& q : run) {
        const TicketState& state = pending_[q.ticket.value()];
        if (state.first_wait.has_value() && *state.first_wait < overlap_end) {
          overlap_end = *state.first_wait;
        }
      }
      stats_.busy_ns += Nanos(end - start);
      stats_.overlapped_ns += Nanos(overlap_end - start);
      ++stats_.transfers;
      if (run.size() > 1) {
        ++stats_.coalesced_transfers;
        stats_.coalesced_moves += run.size() - 1;
      }
      for (size_t i = 0; i < run.size(); ++i) {
        const MoveRequest& request = run[i].request;
        if (statuses[i].ok()) {
          ++stats_.moves;
          stats_.pages_moved += request.num_pages;
          stats_.bytes_moved[static_cast<int>(request.direction)] +=
              uint64_t{request.num_pages} * page_bytes_;
          stats_.bytes_by_priority[static_cast<int>(request.priority)] +=
              uint64_t{request.num_pages} * page_bytes_;
        } else {
          ++stats_.failed_moves;
        }
      }
    }

    for (size_t i = 0; i < run.size(); ++i) {
      if (run[i].request.done) run[i].request.done(statuses[i]);
    }

    MutexLock lock(&mu_);
    for (const Queued& q : run) pending_.erase(q.ticket.value());
    --stats_.running;
    done_cv_.SignalAll();
  }
}

std::vector<absl::Status> CopyEngine::Execute(const std::vector<Queued>& run) {
  const MoveRequest& first = run.front().request;
  uint64_t total_pages = 0;
  for (const Queued& q : run) total_pages += q.request.num_pages;
  std::vector<absl::Status> statuses(run.size());

  switch (first.direction) {
    case CopyDirection::kDeviceToHost:
    case CopyDirection::kHostToDevice: {
      // Both pools are host-accessible (checked at Create): the run is one contiguous memcpy.
      const PagePool* src = MemoryPool(SourceTier(first.direction));
      const PagePool* dst = MemoryPool(DestinationTier(first.direction));
      std::memcpy(dst->SlotAddress(first.dst_slot), src->SlotAddress(first.src_slot),
                  total_pages * page_bytes_);
      break;
    }
    case CopyDirection::kHostToDisk: {
      DiskStore::Batch batch(options_.disk);
      absl::Status status;
      for (const Queued& q : run) {
        for (uint32_t i = 0; i < q.request.num_pages && status.ok(); ++i) {
          const std::byte* page = options_.host->SlotAddress(q.request.src_slot + i);
          status = batch.PutPage(KeyAt(q.request.disk_key, i),
                                 absl::Span<const std::byte>(page, page_bytes_));
        }
      }
      if (status.ok()) status = options_.disk->Write(batch, options_.sync_disk_writes);
      for (absl::Status& s : statuses) s = status;  // The batch is all-or-nothing.
      break;
    }
    case CopyDirection::kDiskToHost: {
      std::vector<PageKey> keys;
      std::vector<absl::Span<std::byte>> outs;
      keys.reserve(total_pages);
      outs.reserve(total_pages);
      for (const Queued& q : run) {
        for (uint32_t i = 0; i < q.request.num_pages; ++i) {
          keys.push_back(KeyAt(q.request.disk_key, i));
          outs.emplace_back(options_.host->SlotAddress(q.request.dst_slot + i), page_bytes_);
        }
      }
      const std::vector<absl::Status> page_statuses = options_.disk->GetPages(keys, outs);
      size_t page = 0;
      for (size_t m = 0; m < run.size(); ++m) {
        for (uint32_t i = 0; i < run[m].request.num_pages; ++i, ++page) {
          if (statuses[m].ok() && !page_statuses[page].ok()) statuses[m] = page_statuses[page];
        }
      }
      break;
    }
  }
  return statuses;
}

absl::Status CopyEngine::Wait(CopyTicket ticket) {
  MutexLock lock(&mu_);
  if (ticket.value() == 0 || ticket.value() >= next_ticket_) {
    return absl::NotFoundError(absl::StrCat("copy ticket ", ticket.value(), " was never issued"));
  }
  auto it = pending_.find(ticket.value());
  if (it == pending_.end()) return absl::OkStatus();
  const SteadyTime start = std::chrono::steady_clock::now();
  if (!it->second.first_wait.has_value()) it->second.first_wait = start;
  ++stats_.waiters;
  while (pending_.contains(ticket.value())) done_cv_.Wait(&mu_);
  --stats_.waiters;
  stats_.stall_ns += Nanos(std::chrono::steady_clock::now() - start);
  return absl::OkStatus();
}

absl::Status CopyEngine::Drain() {
  MutexLock lock(&mu_);
  while (AnyQueuedLocked() || stats_.running > 0) {
    if (paused_ && AnyQueuedLocked()) {
      return absl::FailedPreconditionError("Drain() while paused with moves queued");
    }
    done_cv_.Wait(&mu_);
  }
  return absl::OkStatus();
}

void CopyEngine::Pause() {
  MutexLock lock(&mu_);
  paused_ = true;
}

void CopyEngine::Resume() {
  MutexLock lock(&mu_);
  paused_ = false;
  work_cv_.SignalAll();
}

void CopyEngine::Shutdown() {
  MutexLock shutdown_lock(&shutdown_mu_);
  std::vector<Queued> cancelled;
  {
    MutexLock lock(&mu_);
    stopping_ = true;
    for (int p = 0; p < kNumCopyPriorities; ++p) {
      for (Queued& q : queues_[p]) cancelled.push_back(std::move(q));
      queues_[p].clear();
      by_source_[p].clear();
    }
    stats_.queued = 0;
    stats_.cancelled_moves += cancelled.size();
    work_cv_.SignalAll();
    done_cv_.SignalAll();  // Wake a Drain() waiting on a paused engine.
  }
  for (std::thread& worker : workers_) worker.join();
  workers_.clear();
  for (Queued& q : cancelled) {
    if (q.request.done) q.request.done(absl::CancelledError("copy engine shut down"));
  }
  MutexLock lock(&mu_);
  for (const Queued& q : cancelled) pending_.erase(q.ticket.value());
  done_cv_.SignalAll();
}

CopyEngineStats CopyEngine::Stats() const {
  MutexLock lock(&mu_);
  return stats_;
}

}  // namespace headwise
