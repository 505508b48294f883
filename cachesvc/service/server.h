// HeadwiseServer: everything `headwised` runs, assembled from a DaemonConfig: the engine, the
// durable log, the staging regions, the gRPC service on a Unix socket (and optionally TCP, with
// TLS), and the metrics HTTP endpoint. The daemon's main() and the service tests both use it.
#ifndef HEADWISE_CACHESVC_SERVICE_SERVER_H_
#define HEADWISE_CACHESVC_SERVICE_SERVER_H_

#include <atomic>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "cachesvc/base/bounded_file.h"
#include "cachesvc/engine.h"
#include "cachesvc/prefix/prefix_cache.h"
#include "cachesvc/remote/redis_block_store.h"
#include "cachesvc/service/durable_log.h"
#include "cachesvc/service/headwise_service.h"
#include "cachesvc/service/metrics.h"
#include "cachesvc/service/staging.h"
#include "cachesvc/service/tenants.h"
#include "headwise/v1/config.pb.h"
#include "policies/pattern_directory.h"

namespace grpc {
class Server;
}  // namespace grpc

namespace headwise {

// The lock file inside a data directory (see HeadwiseServer::Start). It holds the pid of the
// daemon that holds the lock.
inline constexpr char kDataDirLockFile[] = "headwised.lock";

class HeadwiseServer {
 public:
  // Starts serving `config`, which must have gone through ResolveConfig. In order: creates the
  // data directory (0700) and takes its lock (an exclusive flock on <data_dir>/headwised.lock,
  // held until Shutdown: one daemon per data directory; FAILED_PRECONDITION at once, naming the
  // holder's pid, when another process holds it, before anything in the directory is touched),
  // wipes the engine's spill store (a cache), opens the engine and the
  // durable log, restores durable sequences, prepares the socket path (parent directory created
  // 0700; a stale socket from a dead daemon removed; FAILED_PRECONDITION when a live daemon
  // answers on it), listens (socket mode 0600) and starts the metrics endpoint.
  static absl::StatusOr<std::unique_ptr<HeadwiseServer>> Start(
      const headwise::v1::DaemonConfig& config);

  // Graceful stop: in-flight calls get `grace` to finish, then are cancelled; then the metrics
  // endpoint stops, every staging region is unlinked, the durable log is flushed and closed, the
  // socket file is removed and the data directory's lock is released. Idempotent; thread-safe.
  void Shutdown(absl::Duration grace);

  // Shutdown(0) if not done yet. Durable state needs no flush to survive (every acknowledged
  // write is already fsynced), so destroying without Shutdown is a crash, not a loss.
  ~HeadwiseServer();

  const std::string& unix_socket() const { return unix_socket_; }
  // The TCP port actually bound (0 without a TCP listener).
  int tcp_port() const { return tcp_port_; }
  // The metrics port actually bound (0 without a metrics endpoint).
  int metrics_port() const;
  // "http://host:port/metrics", or empty.
  std::string metrics_url() const;

  // The body of GET /metrics.
  std::string RenderMetrics() const;
  const ServiceMetrics& metrics() const { return metrics_; }
  int restored_sequences() const { return restored_; }
  // The service (tests read its scheduler counters).
  const HeadwiseService* service() const { return service_.get(); }

 private:
  HeadwiseServer() = default;
  absl::Status StartImpl(const headwise::v1::DaemonConfig& config);
  // Creates the remote tier and the prefix cache from config.prefix_cache (when enabled) and
  // points `service_options` at them.
  absl::Status StartPrefixCache(const headwise::v1::DaemonConfig& config,
                                HeadwiseServiceOptions& service_options);

  headwise::v1::DaemonConfig config_;
  // The data directory's lock (kDataDirLockFile); -1 without a data_dir. Released last.
  ScopedFd data_dir_lock_;
  ServiceMetrics metrics_;
  std::unique_ptr<TenantRegistry> tenants_;
  // Declared before engine_, which points to it (EngineOptions::patterns). Null: none configured.
  std::unique_ptr<PatternDirectory> patterns_;
  std::unique_ptr<Engine> engine_;
  // Prefix reuse (docs/scale-out.md): the remote tier (null without seeds) and the cache (null
  // when disabled). Both are released before the engine, the cache first.
  std::unique_ptr<RedisBlockStore> remote_;
  std::unique_ptr<PrefixCache> prefix_;
  std::unique_ptr<DurableLog> durable_log_;
  std::unique_ptr<StagingRegistry> staging_;
  std::unique_ptr<HeadwiseService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<MetricsHttpServer> http_;
  std::string unix_socket_;
  std::string metrics_host_;
  int tcp_port_ = 0;
  int restored_ = 0;
  std::atomic<bool> stopped_{false};
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_SERVICE_SERVER_H_
