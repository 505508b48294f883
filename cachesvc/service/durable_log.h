// DurableLog: what makes durable sequences survive a daemon crash. Each durable sequence is a
// record (handle, tenant, layout, policy) plus an ordered log of its acknowledged mutations
// (appends with their K/V bytes, truncations). Every write is one RocksDB write batch with
// sync = true (the WAL is fsynced before the call returns), so a mutation acknowledged to a client
// survives kill -9 and power loss. On start the daemon replays each log into a fresh engine,
// which rebuilds the same cache state (eviction policies are deterministic functions of the
// appends), so attention outputs are the same as before the crash.
//
// Storage (a DiskStore of its own, not the engine's spill store):
//   sequences family  "l/<tenant>\0<name>"       DurableLayoutRecord
//                     "s/<handle>"               DurableSequenceRecord
//   page_meta family  "o/<handle>/<16 hex op>"   DurableOpRecord (key order = op order)
//   pages family      PageKey{handle, 0, 0, op}  K bytes of an APPEND op
//                     PageKey{handle, 0, 1, op}  V bytes of an APPEND op
//
// Thread-safety: every method may be called concurrently. Ordering of one sequence's ops is the
// caller's business (the service holds the sequence's lock around log write + engine call).
#ifndef HEADWISE_CACHESVC_SERVICE_DURABLE_LOG_H_
#define HEADWISE_CACHESVC_SERVICE_DURABLE_LOG_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cachesvc/base/ids.h"
#include "headwise/v1/durable.pb.h"
#include "offload/disk_store.h"

namespace headwise {

class DurableLog {
 public:
  // Opens (creating when missing) the log database in directory `path`.
  static absl::StatusOr<std::unique_ptr<DurableLog>> Open(const std::string& path);

  absl::Status PutLayout(const headwise::v1::DurableLayoutRecord& record);
  absl::Status PutSequence(const headwise::v1::DurableSequenceRecord& record);

  // One APPEND op: op number `op_index` of sequence `handle`, with its K and V bytes and the
  // client's step id (0: none).
  struct AppendOp {
    std::string handle;
    uint32_t op_index = 0;
    int layer = 0;
    int num_tokens = 0;
    uint64_t step_id = 0;
    absl::Span<const std::byte> k;
    absl::Span<const std::byte> v;
    // Decisions of a query-dependent policy, per kv head (positions dropped); null: none logged.
    const std::vector<std::vector<int64_t>>* drops = nullptr;
  };
  // Logs `op`. INVALID_ARGUMENT for a handle that is not 32 lowercase hex digits.
  absl::Status PutAppend(const AppendOp& op);
  // Logs every op of `ops` in one write batch (one fsync): all or none.
  absl::Status PutAppends(absl::Span<const AppendOp> ops);
  // Rewrites the record of APPEND `op` (already logged with PutAppend; its K/V stay) with its
  // decisions (op.drops, required), synced: the step's decisions are durable before it is
  // acknowledged.
  absl::Status PutAppendDecisions(const AppendOp& op);
  absl::Status PutTruncate(const std::string& handle, uint32_t op_index, int64_t length);
  // Removes op `op_index` (undoes a Put* whose engine call then failed). A later op written with
  // the same index also replaces it.
  absl::Status DeleteOp(const std::string& handle, uint32_t op_index);
  // Removes several ops of possibly different sequences in one write batch.
  absl::Status DeleteOps(absl::Span<const std::pair<std::string, uint32_t>> ops);
  // Removes the sequence record, its ops and their payloads.
  absl::Status DeleteSequence(const std::string& handle);
  // Flushes memtables to files (orderly shutdown: a shorter WAL to replay at the next start).
  absl::Status Flush();

  struct Op {
    uint32_t index = 0;
    headwise::v1::DurableOpRecord record;
  };
  absl::StatusOr<std::vector<headwise::v1::DurableLayoutRecord>> LoadLayouts();
  absl::StatusOr<std::vector<headwise::v1::DurableSequenceRecord>> LoadSequences();
  // The ops of `handle` in order (records only; payloads via ReadAppend).
  absl::StatusOr<std::vector<Op>> LoadOps(const std::string& handle);
  // The K and V bytes of an APPEND op, sized from its record. DATA_LOSS when missing.
  absl::Status ReadAppend(const std::string& handle, const Op& op, std::vector<std::byte>* k,
                          std::vector<std::byte>* v);

  // Fault injection for tests: while set, every write (Put*, Delete*) first calls `fault` with
  // the method's name ("PutAppend", "PutAppends", "PutTruncate", "DeleteOp", "DeleteOps",
  // "PutLayout", "PutSequence", "DeleteSequence"); a non-OK result is returned instead of
  // writing. Process-wide; nullptr (the default) clears it. Not for production use.
  static void SetWriteFaultForTesting(std::function<absl::Status(std::string_view)> fault);

 private:
  explicit DurableLog(std::unique_ptr<DiskStore> store) : store_(std::move(store)) {}
  absl::Status WriteAppends(absl::Span<const AppendOp> ops);
  absl::Status WriteDeletes(absl::Span<const std::pair<std::string, uint32_t>> ops);
  std::unique_ptr<DiskStore> store_;
};

// Parses 32 lowercase hex digits. INVALID_ARGUMENT otherwise.
absl::StatusOr<SequenceId> ParseHandle(const std::string& handle);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_SERVICE_DURABLE_LOG_H_
