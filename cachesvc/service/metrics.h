// Service metrics in the Prometheus text exposition format (version 0.0.4), and the small HTTP
// server that serves them on GET /metrics.
//
// Request metrics are recorded by the service; engine and tier gauges are read from the engine
// at scrape time through a callback, so they are never stale and cost nothing between scrapes.
#ifndef HEADWISE_CACHESVC_SERVICE_METRICS_H_
#define HEADWISE_CACHESVC_SERVICE_METRICS_H_

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace httplib {
class Server;
}  // namespace httplib

namespace headwise {

class ServiceMetrics {
 public:
  // Upper bounds (seconds) of the request latency histogram buckets; +Inf is implied.
  static constexpr std::array<double, 14> kLatencyBuckets = {
      0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0};

  // Counts one finished request of `rpc` with gRPC status `code` (e.g. "OK", "NOT_FOUND") and
  // its latency. Thread-safe.
  void RecordRequest(const std::string& rpc, const std::string& code, double seconds);

  // Appends the request metrics to `out` in Prometheus text format. Thread-safe.
  void Render(std::string* out) const;

  // Requests of `rpc` finished with `code` so far (tests).
  uint64_t RequestCount(const std::string& rpc, const std::string& code) const;

 private:
  struct Histogram {
    std::array<uint64_t, kLatencyBuckets.size()> buckets{};  // Non-cumulative counts.
    uint64_t count = 0;
    double sum = 0;
  };
  mutable absl::Mutex mu_;
  std::map<std::pair<std::string, std::string>, uint64_t> requests_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Histogram> latency_ ABSL_GUARDED_BY(mu_);
};

// Serves GET /metrics (Prometheus text) and GET /healthz on its own thread.
class MetricsHttpServer {
 public:
  // Binds `host`:`port` (port 0: any free port) and starts serving. `render` produces the body
  // of /metrics; it is called on the server's threads. With a non-empty `token`, /metrics is 401
  // unless the request carries `Authorization: Bearer <token>`. INTERNAL when the address cannot
  // be bound.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& host, int port, std::function<std::string()> render,
      const std::string& token = "");
  // Stops the listener and joins its thread.
  ~MetricsHttpServer();

  // The bound port.
  int port() const { return port_; }

 private:
  MetricsHttpServer() = default;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_SERVICE_METRICS_H_
