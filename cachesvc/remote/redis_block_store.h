// RedisBlockStore: the prefix cache's remote tier (RemoteBlockStore) on Redis Cluster
// (docs/scale-out.md). Several daemons pointed at one cluster share prefix blocks.
//
// Keys: key_prefix + the block hash in hex ("hw:pb:<32 hex>"); the hash already names the scope,
// model, layout and every token before the block (block_hash.h).
// Values: a 48-byte header, then the payload (Engine::ReadBlock's bytes):
//   "HWPB" | u32 version 1 | 16-byte block hash | u64 payload bytes | 16-byte checksum
// with checksum = SHA-256(hash || payload) truncated to 128 bits, integers little-endian. Get
// verifies all of it: a value that fails (bit rot, a foreign writer, a truncated value) is a
// counted miss (checksum_failures), never returned.
//
// Writes are asynchronous: PutAsync queues (bounded by max_queued_writes; a full queue drops and
// counts), one writer thread reads each block's payload and SETs it (a block is immutable, so a
// rewrite stores the same bytes, and repairs a value that went bad); with wait_replicas = N > 0 the
// SET is pipelined with WAIT N wait_timeout_ms on the same connection and the block counts as
// acknowledged only when N replicas confirmed it (acknowledged_writes), otherwise as stored but
// unacknowledged.
//
// Availability: a call that finds no node (UNAVAILABLE) marks the tier unavailable (logged once
// per transition, a gauge in Stats); while unavailable, Get answers UNAVAILABLE at once and
// writes are dropped (counted) until retry_interval has passed since the last failure, when
// one call tries again. The daemon keeps serving from its local tiers meanwhile.
//
// Thread-safety: every method may be called from any thread.
#ifndef HEADWISE_CACHESVC_REMOTE_REDIS_BLOCK_STORE_H_
#define HEADWISE_CACHESVC_REMOTE_REDIS_BLOCK_STORE_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cachesvc/prefix/remote_block_store.h"
#include "cachesvc/remote/redis_cluster.h"
#include "headwise/v1/config.pb.h"

namespace headwise {

struct RedisBlockStoreOptions {
  RedisClusterOptions cluster;
  // Prepended to every key. Default: "hw:pb:".
  std::string key_prefix = "hw:pb:";
  // Replicas that must confirm a write (WAIT N); 0: fire-and-forget. Default: 0.
  int wait_replicas = 0;
  // WAIT's timeout. Default: 1000 ms.
  absl::Duration wait_timeout = absl::Milliseconds(1000);
  // Writes queued at once; more are dropped. Default: 256.
  int max_queued_writes = 256;
  // How long the tier stays unavailable after a failure before a call tries again.
  // Default: 1 s.
  absl::Duration retry_interval = absl::Seconds(1);
};

struct RedisBlockStoreStats {
  bool available = true;
  int64_t writes_queued = 0;
  int64_t writes_dropped = 0;       // Queue full, tier unavailable, or payload gone.
  int64_t writes_stored = 0;        // SET answered OK (or the key existed).
  int64_t writes_acknowledged = 0;  // Of those, confirmed by wait_replicas replicas.
  int64_t writes_failed = 0;
  int64_t gets = 0;
  int64_t get_hits = 0;
  int64_t get_misses = 0;  // Includes checksum failures.
  int64_t checksum_failures = 0;
  int64_t unavailable_errors = 0;
  uint64_t bytes_written = 0;  // Payload bytes, host -> remote.
  uint64_t bytes_read = 0;     // Payload bytes of verified hits, remote -> host.
};

class RedisBlockStore final : public RemoteBlockStore {
 public:
  static absl::StatusOr<std::unique_ptr<RedisBlockStore>> Create(
      const RedisBlockStoreOptions& options);
  // Finishes the write in progress, drops the queued ones, joins the writer.
  ~RedisBlockStore() override;

  void PutAsync(const BlockHash& hash,
                std::function<absl::StatusOr<std::string>()> payload) override;
  absl::StatusOr<std::string> Get(const BlockHash& hash) override;

  // Blocks until every write queued so far has been tried (tests, shutdown).
  void Flush();
  RedisBlockStoreStats Stats() const;

  // The stored value of `payload` under `hash` (the format above), and its check.
  static std::string EncodeValue(const BlockHash& hash, std::string_view payload);
  // The payload, or DATA_LOSS naming what failed.
  static absl::StatusOr<std::string> DecodeValue(const BlockHash& hash, std::string_view value);
  std::string Key(const BlockHash& hash) const { return options_.key_prefix + hash.ToHex(); }

 private:
  using Write = std::pair<BlockHash, std::function<absl::StatusOr<std::string>()>>;
  RedisBlockStore(const RedisBlockStoreOptions& options, std::unique_ptr<RedisCluster> cluster);
  void WriterLoop();
  void Store(const Write& write);
  // False while the tier is unavailable and the retry interval has not passed.
  bool MayTry();
  // Records the outcome of a cluster call (availability and its log line).
  void Outcome(const absl::Status& status);

  const RedisBlockStoreOptions options_;
  std::unique_ptr<RedisCluster> cluster_;
  mutable absl::Mutex mu_;
  std::deque<Write> queue_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool available_ ABSL_GUARDED_BY(mu_) = true;
  absl::Time last_failure_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  RedisBlockStoreStats stats_ ABSL_GUARDED_BY(mu_);
  std::thread writer_;
};

// Appends the remote tier's figures to a Prometheus text body: headwise_remote_available,
// headwise_remote_writes_total{result=...}, headwise_remote_gets_total{result=...},
// headwise_remote_checksum_failures_total, headwise_remote_unavailable_errors_total and
// headwise_bytes_moved_total{direction="host_to_remote"|"remote_to_host"}.
void RenderRemoteTierMetrics(const RedisBlockStoreStats& stats, std::string* out);

// The store's options from the daemon's config (docs/scale-out.md).
RedisBlockStoreOptions RemoteOptionsFromConfig(const headwise::v1::RedisRemoteConfig& config);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_REMOTE_REDIS_BLOCK_STORE_H_
