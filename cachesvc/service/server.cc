#include "cachesvc/service/server.h"

#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/server_credentials.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cachesvc/base/bounded_file.h"
#include "cachesvc/base/status_macros.h"
#include "cachesvc/prefix/prefix_config.h"
#include "cachesvc/prefix/prefix_metrics.h"
#include "cachesvc/service/config.h"
#include "spdlog/spdlog.h"

#ifndef HEADWISE_VERSION
#define HEADWISE_VERSION "0.0.0"
#endif

namespace headwise {
namespace {

namespace fs = std::filesystem;

// Creates `path` and any missing parents, each new one with mode 0700 (existing ones are left
// as they are).
absl::Status MakePrivateDirectory(const std::string& path) {
  fs::path partial;
  for (const fs::path& part : fs::path(path)) {
    partial /= part;
    if (mkdir(partial.c_str(), 0700) != 0 && errno != EEXIST) {
      return absl::InternalError(
          absl::StrCat("cannot create directory ", partial.string(), ": ", std::strerror(errno)));
    }
  }
  return absl::OkStatus();
}

// Leaves `path` free for a new socket: a stale socket of a dead daemon is removed; a live one
// (something accepts connections) is an error, as is any other kind of file.
absl::Status PrepareSocketPath(const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("unix socket path '", path, "' is longer than ",
                                                   sizeof(addr.sun_path) - 1, " bytes"));
  }
  const fs::path parent = fs::path(path).parent_path();
  if (!parent.empty()) RETURN_IF_ERROR(MakePrivateDirectory(parent.string()));
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) return absl::OkStatus();  // Nothing there.
  if (!S_ISSOCK(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("'", path, "' exists and is not a socket; refusing to remove it"));
  }
  const int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const bool live = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  if (live) {
    return absl::FailedPreconditionError(
        absl::StrCat("another process is listening on '", path, "'"));
  }
  spdlog::info("removing stale socket {}", path);
  unlink(path.c_str());
  return absl::OkStatus();
}

// Takes the exclusive lock of data directory `dir` (created already): flock(LOCK_EX | LOCK_NB) on
// <dir>/kDataDirLockFile, opened without following a link and created 0600, then writes this
// process's pid into it. flock locks belong to the open file, so a second server in the same
// process is refused as well, and the kernel drops the lock when the daemon dies (even by
// kill -9): a stale lock file never blocks a restart.
absl::StatusOr<ScopedFd> LockDataDir(const std::string& dir) {
  const std::string path = (fs::path(dir) / kDataDirLockFile).string();
  ScopedFd fd(open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (fd.get() < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot open the data_dir lock '", path, "': ", std::strerror(errno)));
  }
  if (flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno != EWOULDBLOCK) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot lock the data_dir lock '", path, "': ", std::strerror(errno)));
    }
    char buffer[24] = {};
    const ssize_t n = pread(fd.get(), buffer, sizeof(buffer) - 1, 0);
    int pid = 0;  // Named only when the file holds a pid (nothing else of it is quoted).
    const bool has_pid =
        n > 0 && absl::SimpleAtoi(absl::StripAsciiWhitespace(buffer), &pid) && pid > 0;
    return absl::FailedPreconditionError(absl::StrCat(
        "data_dir '", dir, "' is in use by another headwised",
        has_pid ? absl::StrCat(" (pid ", pid, ")") : std::string(), ", which holds the lock '",
        path, "': one daemon per data directory; stop that one or give this one another data_dir"));
  }
  const std::string pid = absl::StrCat(getpid(), "\n");
  if (ftruncate(fd.get(), 0) != 0 || pwrite(fd.get(), pid.data(), pid.size(), 0) < 0) {
    spdlog::warn("cannot write the pid into {}: {}", path, std::strerror(errno));
  }
  return fd;
}

// A PEM file the operator names (certificate chain, key or CA bundle): at most
// kMaxTlsFileBytes, regular, symbolic links followed (certificate managers link them).
absl::StatusOr<std::string> ReadTlsFile(const std::string& what, const std::string& path) {
  BoundedReadOptions options;
  options.max_bytes = kMaxTlsFileBytes;
  options.follow_final_symlink = true;
  options.description = absl::StrCat("tls.", what, " '", path, "'");
  return ReadBoundedFile(path, options);
}

}  // namespace

absl::StatusOr<std::unique_ptr<HeadwiseServer>> HeadwiseServer::Start(
    const headwise::v1::DaemonConfig& config) {
  std::unique_ptr<HeadwiseServer> server(new HeadwiseServer());
  absl::Status status = server->StartImpl(config);
  if (!status.ok()) {
    server->Shutdown(absl::ZeroDuration());
    return status;
  }
  return server;
}

absl::Status HeadwiseServer::StartImpl(const headwise::v1::DaemonConfig& config) {
  config_ = config;
  tenants_ = std::make_unique<TenantRegistry>(config.tenants());

  EngineOptions engine_options;
  engine_options.device_budget_bytes = config.device_budget_bytes();
  engine_options.host_budget_bytes = config.host_budget_bytes();
  engine_options.copy_threads = config.copy_threads();
  if (!config.pattern_dir().empty()) {
    ASSIGN_OR_RETURN(patterns_, PatternDirectory::Open(config.pattern_dir()));
    engine_options.patterns = patterns_.get();
  }
  if (!config.data_dir().empty()) {
    RETURN_IF_ERROR(MakePrivateDirectory(config.data_dir()));
    // Before anything in the directory is touched: a second daemon on it stops here.
    ASSIGN_OR_RETURN(data_dir_lock_, LockDataDir(config.data_dir()));
    // The spill store only ever holds pages of live sequences: after a restart it is garbage.
    const std::string spill = (fs::path(config.data_dir()) / "spill").string();
    std::error_code error;
    fs::remove_all(spill, error);
    if (error) {
      return absl::InternalError(absl::StrCat("cannot wipe ", spill, ": ", error.message()));
    }
    engine_options.disk_path = spill;
    ASSIGN_OR_RETURN(durable_log_,
                     DurableLog::Open((fs::path(config.data_dir()) / "durable").string()));
  }
  ASSIGN_OR_RETURN(engine_, Engine::Create(engine_options));
  if (const int orphans = StagingRegistry::RemoveOrphans(); orphans > 0) {
    spdlog::info("removed {} staging region(s) left by daemons that did not shut down", orphans);
  }
  staging_ = std::make_unique<StagingRegistry>(config.max_staging_region_bytes());

  HeadwiseServiceOptions service_options;
  service_options.engine = engine_.get();
  service_options.tenants = tenants_.get();
  service_options.staging = staging_.get();
  service_options.metrics = &metrics_;
  service_options.durable_log = durable_log_.get();
  service_options.worker_threads = config.worker_threads();
  const auto& admission = config.admission();
  service_options.admission.max_calls_per_tenant =
      static_cast<int>(admission.max_calls_per_tenant());
  service_options.admission.max_bytes_per_tenant =
      static_cast<int64_t>(admission.max_queued_bytes_per_tenant());
  service_options.admission.max_queued = static_cast<int>(admission.max_queued_calls());
  service_options.max_prefill_tokens_per_call = admission.max_prefill_tokens_per_call();
  service_options.max_append_tokens_per_call = admission.max_append_tokens_per_call();
  service_options.version = HEADWISE_VERSION;
  RETURN_IF_ERROR(StartPrefixCache(config, service_options));
  service_ = std::make_unique<HeadwiseService>(service_options);
  ASSIGN_OR_RETURN(restored_, service_->Restore());

  grpc::ServerBuilder builder;
  builder.RegisterService(service_.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(config.max_message_bytes()));
  builder.SetMaxSendMessageSize(static_cast<int>(config.max_message_bytes()));
  if (!config.unix_socket().empty()) {
    RETURN_IF_ERROR(PrepareSocketPath(config.unix_socket()));
    builder.AddListeningPort(absl::StrCat("unix:", config.unix_socket()),
                             grpc::InsecureServerCredentials());
  }
  if (!config.tcp_address().empty()) {
    std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
    if (!config.tls().cert_path().empty()) {
      grpc::SslServerCredentialsOptions ssl(
          config.tls().client_ca_path().empty()
              ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
              : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
      ASSIGN_OR_RETURN(std::string cert, ReadTlsFile("cert_path", config.tls().cert_path()));
      ASSIGN_OR_RETURN(std::string key, ReadTlsFile("key_path", config.tls().key_path()));
      if (!config.tls().client_ca_path().empty()) {
        ASSIGN_OR_RETURN(ssl.pem_root_certs,
                         ReadTlsFile("client_ca_path", config.tls().client_ca_path()));
      }
      ssl.pem_key_cert_pairs.push_back({key, cert});
      credentials = grpc::SslServerCredentials(ssl);
    }
    builder.AddListeningPort(config.tcp_address(), credentials, &tcp_port_);
  }
  // The socket is created by gRPC; a umask makes it 0600 from the first moment (the chmod below
  // only makes sure of it).
  const mode_t old_umask = umask(0177);
  server_ = builder.BuildAndStart();
  umask(old_umask);
  if (server_ == nullptr) {
    return absl::InternalError(absl::StrCat("cannot listen on unix:'", config.unix_socket(),
                                            "' tcp:'", config.tcp_address(), "'"));
  }
  if (!config.unix_socket().empty()) {
    unix_socket_ = config.unix_socket();
    if (chmod(unix_socket_.c_str(), 0600) != 0) {
      return absl::InternalError(absl::StrCat("chmod ", unix_socket_, ": ", std::strerror(errno)));
    }
  }

  if (!config.metrics_address().empty()) {
    int port = 0;
    RETURN_IF_ERROR(SplitHostPort(config.metrics_address(), &metrics_host_, &port));
    ASSIGN_OR_RETURN(http_, MetricsHttpServer::Start(
                                metrics_host_, port, [this] { return RenderMetrics(); },
                                config.metrics_token()));
  }
  spdlog::info(
      "headwised started: version={} unix={} tcp={} tls={} metrics={} data_dir={} "
      "pattern_dir={} tenants={} restored_sequences={}",
      HEADWISE_VERSION, unix_socket_.empty() ? "-" : unix_socket_,
      config.tcp_address().empty() ? "-"
                                   : absl::StrCat(config.tcp_address(), " (port ", tcp_port_, ")"),
      config.tls().cert_path().empty() ? "off" : "on", metrics_url().empty() ? "-" : metrics_url(),
      config.data_dir().empty() ? "-" : config.data_dir(),
      config.pattern_dir().empty() ? "-" : config.pattern_dir(), config.tenants_size(), restored_);
  return absl::OkStatus();
}

int HeadwiseServer::metrics_port() const { return http_ == nullptr ? 0 : http_->port(); }

std::string HeadwiseServer::metrics_url() const {
  if (http_ == nullptr) return "";
  const bool v6 = metrics_host_.find(':') != std::string::npos && metrics_host_.front() != '[';
  return absl::StrCat("http://", v6 ? "[" : "", metrics_host_, v6 ? "]" : "", ":", http_->port(),
                      "/metrics");
}

absl::Status HeadwiseServer::StartPrefixCache(const headwise::v1::DaemonConfig& config,
                                              HeadwiseServiceOptions& service_options) {
  const headwise::v1::PrefixCacheConfig& p = config.prefix_cache();
  if (!p.enabled()) return absl::OkStatus();
  if (!p.remote().seeds().empty()) {
    // A cluster that is down now is not an error: the tier is unavailable until it answers.
    ASSIGN_OR_RETURN(remote_, RedisBlockStore::Create(RemoteOptionsFromConfig(p.remote())));
  }
  PrefixCacheOptions options;
  options.engine = engine_.get();
  options.policy = p.policy();
  options.device_budget_bytes = p.device_budget_bytes();
  options.host_budget_bytes = p.host_budget_bytes();
  options.remote = remote_.get();
  ASSIGN_OR_RETURN(prefix_, PrefixCache::Create(options));
  service_options.prefix_cache = prefix_.get();
  service_options.prefix_block_pages = static_cast<int>(p.block_pages());
  service_options.prefix_scopes = PrefixScopes(config);
  spdlog::info("prefix cache: policy={} block_pages={} device_budget={} host_budget={} remote={}",
               p.policy(), p.block_pages(), p.device_budget_bytes(), p.host_budget_bytes(),
               remote_ == nullptr ? "off" : absl::StrCat(p.remote().seeds_size(), " seed(s)"));
  return absl::OkStatus();
}

std::string HeadwiseServer::RenderMetrics() const {
  std::string out;
  metrics_.Render(&out);
  if (engine_ == nullptr) return out;
  const EngineStats stats = engine_->GetStats();
  const uint64_t disk_bytes = stats.disk_bytes;
  absl::StrAppend(&out,
                  "# HELP headwise_tier_bytes Bytes in use per tier.\n"
                  "# TYPE headwise_tier_bytes gauge\n",
                  "headwise_tier_bytes{tier=\"device\"} ", stats.device.used_bytes, "\n",
                  "headwise_tier_bytes{tier=\"host\"} ", stats.host.used_bytes, "\n",
                  "headwise_tier_bytes{tier=\"disk\"} ", disk_bytes, "\n");
  absl::StrAppend(&out,
                  "# HELP headwise_tier_budget_bytes Capacity per tier.\n"
                  "# TYPE headwise_tier_budget_bytes gauge\n",
                  "headwise_tier_budget_bytes{tier=\"device\"} ", stats.device.budget_bytes, "\n",
                  "headwise_tier_budget_bytes{tier=\"host\"} ", stats.host.budget_bytes, "\n");
  absl::StrAppend(
      &out,
      "# HELP headwise_bytes_moved_total Bytes moved between tiers, by direction.\n"
      "# TYPE headwise_bytes_moved_total counter\n",
      "headwise_bytes_moved_total{direction=\"host_to_device\"} ", stats.bytes_host_to_device, "\n",
      "headwise_bytes_moved_total{direction=\"device_to_host\"} ", stats.bytes_device_to_host, "\n",
      "headwise_bytes_moved_total{direction=\"host_to_disk\"} ", stats.bytes_host_to_disk, "\n",
      "headwise_bytes_moved_total{direction=\"disk_to_host\"} ", stats.bytes_disk_to_host, "\n");
  absl::StrAppend(&out,
                  "# HELP headwise_evicted_pages_total Pages dropped by eviction policies.\n"
                  "# TYPE headwise_evicted_pages_total counter\n",
                  "headwise_evicted_pages_total ", stats.evicted_pages, "\n");
  absl::StrAppend(&out,
                  "# HELP headwise_merged_tokens_total Dropped tokens merge policies folded into"
                  " kept ones.\n"
                  "# TYPE headwise_merged_tokens_total counter\n",
                  "headwise_merged_tokens_total ", stats.merged_tokens, "\n");
  absl::StrAppend(
      &out,
      "# HELP headwise_prefetch_pages_total Pages copied to the device ahead of need (prefetched),"
      " of those read by attention (used), read by attention (needed), needed but copied on"
      " demand (late).\n"
      "# TYPE headwise_prefetch_pages_total counter\n",
      "headwise_prefetch_pages_total{kind=\"prefetched\"} ", stats.prefetch.prefetched_pages, "\n",
      "headwise_prefetch_pages_total{kind=\"used\"} ", stats.prefetch.used_pages, "\n",
      "headwise_prefetch_pages_total{kind=\"needed\"} ", stats.prefetch.needed_pages, "\n",
      "headwise_prefetch_pages_total{kind=\"late\"} ", stats.prefetch.late_pages, "\n",
      "# HELP headwise_prefetch_late_bytes_total Bytes of needed pages copied on demand.\n"
      "# TYPE headwise_prefetch_late_bytes_total counter\n",
      "headwise_prefetch_late_bytes_total ", stats.prefetch.late_bytes, "\n");
  absl::StrAppend(&out,
                  "# HELP headwise_stall_seconds_total Copy time waited for.\n"
                  "# TYPE headwise_stall_seconds_total counter\n",
                  "headwise_stall_seconds_total ",
                  absl::StrFormat("%.9g", static_cast<double>(stats.stall_ns) * 1e-9), "\n");
  absl::StrAppend(&out,
                  "# HELP headwise_sequences Live sequences.\n"
                  "# TYPE headwise_sequences gauge\n",
                  "headwise_sequences ", stats.sequences, "\n");
  absl::StrAppend(&out,
                  "# HELP headwise_device_emulated 1 when host memory stands in for the GPU.\n"
                  "# TYPE headwise_device_emulated gauge\n",
                  "headwise_device_emulated ", stats.device_emulated ? 1 : 0, "\n");
  if (service_ != nullptr) {
    const FairScheduler::Counters q = service_->scheduler_counters();
    absl::StrAppend(&out,
                    "# HELP headwise_calls_queued Calls waiting for a worker, by lane.\n"
                    "# TYPE headwise_calls_queued gauge\n",
                    "headwise_calls_queued{lane=\"interactive\"} ", q.queued[0], "\n",
                    "headwise_calls_queued{lane=\"bulk\"} ", q.queued[1], "\n",
                    "# HELP headwise_calls_running Calls running on a worker, by lane.\n"
                    "# TYPE headwise_calls_running gauge\n",
                    "headwise_calls_running{lane=\"interactive\"} ", q.running[0], "\n",
                    "headwise_calls_running{lane=\"bulk\"} ", q.running[1], "\n",
                    "# HELP headwise_calls_rejected_total Calls refused by admission control.\n"
                    "# TYPE headwise_calls_rejected_total counter\n",
                    "headwise_calls_rejected_total ", q.rejected, "\n",
                    "# HELP headwise_calls_cancelled_total Queued calls removed because their "
                    "client cancelled.\n"
                    "# TYPE headwise_calls_cancelled_total counter\n",
                    "headwise_calls_cancelled_total ", q.cancelled, "\n");
  }
  if (prefix_ != nullptr) RenderPrefixMetrics(prefix_->Stats(), &out);
  if (remote_ != nullptr) RenderRemoteTierMetrics(remote_->Stats(), &out);
  if (staging_ != nullptr) {
    absl::StrAppend(&out,
                    "# HELP headwise_staging_regions Open staging regions.\n"
                    "# TYPE headwise_staging_regions gauge\n",
                    "headwise_staging_regions ", staging_->open_regions(), "\n");
  }
  return out;
}

void HeadwiseServer::Shutdown(absl::Duration grace) {
  if (stopped_.exchange(true)) return;
  const absl::Time start = absl::Now();
  if (server_ != nullptr) {
    // Returns once every call has finished: those still running after `grace` are cancelled.
    server_->Shutdown(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(grace));
    server_.reset();
  }
  http_.reset();
  service_.reset();  // Joins the workers (nothing is queued once gRPC is down).
  if (staging_ != nullptr) staging_->CloseAll();
  prefix_.reset();  // Unpins its blocks; then the remote writer, which reads pins, stops.
  remote_.reset();
  engine_.reset();
  if (durable_log_ != nullptr) {
    absl::Status status = durable_log_->Flush();
    if (!status.ok()) spdlog::error("flushing the durable log: {}", std::string(status.message()));
    durable_log_.reset();
  }
  if (!unix_socket_.empty()) unlink(unix_socket_.c_str());
  data_dir_lock_ = ScopedFd();  // Last: everything in the data directory is closed.
  spdlog::info("headwised stopped in {}", absl::FormatDuration(absl::Now() - start));
}

HeadwiseServer::~HeadwiseServer() { Shutdown(absl::ZeroDuration()); }

}  // namespace headwise
