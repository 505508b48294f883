#include "cachesvc/service/metrics.h"

#include <httplib.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cachesvc/service/tenants.h"

namespace headwise {

void ServiceMetrics::RecordRequest(const std::string& rpc, const std::string& code,
                                   double seconds) {
  absl::MutexLock lock(&mu_);
  ++requests_[{rpc, code}];
  Histogram& h = latency_[rpc];
  ++h.count;
  h.sum += seconds;
  for (size_t i = 0; i < kLatencyBuckets.size(); ++i) {
    if (seconds <= kLatencyBuckets[i]) {
      ++h.buckets[i];
      break;
    }
  }
}

uint64_t ServiceMetrics::RequestCount(const std::string& rpc, const std::string& code) const {
  absl::MutexLock lock(&mu_);
  auto it = requests_.find({rpc, code});
  return it == requests_.end() ? 0 : it->second;
}

void ServiceMetrics::Render(std::string* out) const {
  absl::MutexLock lock(&mu_);
  absl::StrAppend(out,
                  "# HELP headwise_requests_total gRPC requests finished, by method and status.\n"
                  "# TYPE headwise_requests_total counter\n");
  for (const auto& [key, count] : requests_) {
    absl::StrAppend(out, "headwise_requests_total{rpc=\"", key.first, "\",code=\"", key.second,
                    "\"} ", count, "\n");
  }
  absl::StrAppend(out,
                  "# HELP headwise_request_seconds gRPC request latency, by method.\n"
                  "# TYPE headwise_request_seconds histogram\n");
  for (const auto& [rpc, h] : latency_) {
    uint64_t cumulative = 0;
    for (size_t i = 0; i < kLatencyBuckets.size(); ++i) {
      cumulative += h.buckets[i];
      absl::StrAppend(out, "headwise_request_seconds_bucket{rpc=\"", rpc, "\",le=\"",
                      absl::StrFormat("%g", kLatencyBuckets[i]), "\"} ", cumulative, "\n");
    }
    absl::StrAppend(out, "headwise_request_seconds_bucket{rpc=\"", rpc, "\",le=\"+Inf\"} ", h.count,
                    "\n");
    absl::StrAppend(out, "headwise_request_seconds_sum{rpc=\"", rpc, "\"} ",
                    absl::StrFormat("%.9g", h.sum), "\n");
    absl::StrAppend(out, "headwise_request_seconds_count{rpc=\"", rpc, "\"} ", h.count, "\n");
  }
}

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& host, int port, std::function<std::string()> render,
    const std::string& token) {
  std::unique_ptr<MetricsHttpServer> server(new MetricsHttpServer());
  server->server_ = std::make_unique<httplib::Server>();
  const std::string expected = token.empty() ? "" : "Bearer " + token;
  server->server_->Get("/metrics", [render, expected](const httplib::Request& req,
                                                      httplib::Response& res) {
    if (!expected.empty() && !ConstantTimeEquals(req.get_header_value("Authorization"), expected)) {
      res.status = 401;
      res.set_header("WWW-Authenticate", "Bearer");
      res.set_content("unauthorized\n", "text/plain");
      return;
    }
    res.set_content(render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  server->server_->Get("/healthz", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("ok\n", "text/plain");
  });
  // httplib wants a bare IPv6 literal, without brackets.
  std::string bind_host = host;
  if (bind_host.size() > 2 && bind_host.front() == '[' && bind_host.back() == ']') {
    bind_host = bind_host.substr(1, bind_host.size() - 2);
  }
  if (port == 0) {
    server->port_ = server->server_->bind_to_any_port(bind_host);
    if (server->port_ < 0) {
      return absl::InternalError(absl::StrCat("metrics: cannot bind ", host, ":0"));
    }
  } else {
    if (!server->server_->bind_to_port(bind_host, port)) {
      return absl::InternalError(absl::StrCat("metrics: cannot bind ", host, ":", port));
    }
    server->port_ = port;
  }
  httplib::Server* raw = server->server_.get();
  server->thread_ = std::thread([raw] { raw->listen_after_bind(); });
  return server;
}

MetricsHttpServer::~MetricsHttpServer() {
  if (server_ != nullptr) server_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace headwise
