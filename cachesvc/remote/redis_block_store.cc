#include "cachesvc/remote/redis_block_store.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace headwise {
namespace {

constexpr char kMagic[4] = {'H', 'W', 'P', 'B'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 48;

void PutLe(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>(v >> (8 * i)));
}
uint64_t GetLe(std::string_view in, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(in[at + i]);
  return v;
}
void PutHash(std::string& out, const BlockHash& h) {
  PutLe(out, h.hi, 8);
  PutLe(out, h.lo, 8);
}
BlockHash GetHash(std::string_view in, size_t at) {
  return BlockHash{GetLe(in, at, 8), GetLe(in, at + 8, 8)};
}
BlockHash Checksum(const BlockHash& hash, std::string_view payload) {
  std::string buf;
  buf.reserve(16 + payload.size());
  PutHash(buf, hash);
  buf.append(payload);
  return Sha256Prefix(buf);
}

}  // namespace

std::string RedisBlockStore::EncodeValue(const BlockHash& hash, std::string_view payload) {
  std::string out(kMagic, sizeof(kMagic));
  out.reserve(kHeaderBytes + payload.size());
  PutLe(out, kVersion, 4);
  PutHash(out, hash);
  PutLe(out, payload.size(), 8);
  PutHash(out, Checksum(hash, payload));
  out.append(payload);
  return out;
}

absl::StatusOr<std::string> RedisBlockStore::DecodeValue(const BlockHash& hash,
                                                         std::string_view value) {
  if (value.size() < kHeaderBytes || std::memcmp(value.data(), kMagic, 4) != 0 ||
      GetLe(value, 4, 4) != kVersion) {
    return absl::DataLossError("not a block value (magic, version or size)");
  }
  if (GetHash(value, 8) != hash) return absl::DataLossError("value names another block");
  const std::string_view payload = value.substr(kHeaderBytes);
  if (GetLe(value, 24, 8) != payload.size()) return absl::DataLossError("truncated value");
  if (GetHash(value, 32) != Checksum(hash, payload)) return absl::DataLossError("bad checksum");
  return std::string(payload);
}

absl::StatusOr<std::unique_ptr<RedisBlockStore>> RedisBlockStore::Create(
    const RedisBlockStoreOptions& options) {
  if (options.wait_replicas < 0) return absl::InvalidArgumentError("wait_replicas must be >= 0");
  if (options.max_queued_writes < 1) {
    return absl::InvalidArgumentError("max_queued_writes must be >= 1");
  }
  absl::StatusOr<std::unique_ptr<RedisCluster>> cluster = RedisCluster::Create(options.cluster);
  if (!cluster.ok()) return cluster.status();
  return std::unique_ptr<RedisBlockStore>(new RedisBlockStore(options, std::move(*cluster)));
}

RedisBlockStore::RedisBlockStore(const RedisBlockStoreOptions& options,
                                 std::unique_ptr<RedisCluster> cluster)
    : options_(options), cluster_(std::move(cluster)) {
  writer_ = std::thread([this] { WriterLoop(); });
}

RedisBlockStore::~RedisBlockStore() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
    stats_.writes_dropped += static_cast<int64_t>(queue_.size());
    queue_.clear();
  }
  writer_.join();
}

void RedisBlockStore::PutAsync(const BlockHash& hash,
                               std::function<absl::StatusOr<std::string>()> payload) {
  absl::MutexLock lock(&mu_);
  if (stop_ || static_cast<int>(queue_.size()) >= options_.max_queued_writes) {
    ++stats_.writes_dropped;
    return;
  }
  queue_.emplace_back(hash, std::move(payload));
  ++stats_.writes_queued;
}

void RedisBlockStore::WriterLoop() {
  while (true) {
    Write write;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](RedisBlockStore* s)
               ABSL_NO_THREAD_SAFETY_ANALYSIS { return s->stop_ || !s->queue_.empty(); },
          this));
      if (stop_) return;
      write = std::move(queue_.front());
      queue_.pop_front();
      writing_ = true;
    }
    Store(write);
    absl::MutexLock lock(&mu_);
    writing_ = false;
  }
}

void RedisBlockStore::Store(const Write& write) {
  absl::StatusOr<std::string> payload = write.second();
  if (!payload.ok() || !MayTry()) {
    absl::MutexLock lock(&mu_);
    ++stats_.writes_dropped;
    return;
  }
  const std::string key = Key(write.first);
  std::vector<std::vector<std::string>> commands = {
      {"SET", key, EncodeValue(write.first, *payload)}};
  if (options_.wait_replicas > 0) {
    commands.push_back({"WAIT", absl::StrCat(options_.wait_replicas),
                        absl::StrCat(absl::ToInt64Milliseconds(options_.wait_timeout))});
  }
  absl::StatusOr<std::vector<RedisReply>> replies = cluster_->Pipeline(key, commands);
  Outcome(replies.status());
  absl::MutexLock lock(&mu_);
  if (!replies.ok() || replies->front().is_error()) {
    ++stats_.writes_failed;
    return;
  }
  ++stats_.writes_stored;
  stats_.bytes_written += payload->size();
  if (options_.wait_replicas == 0 || (replies->size() > 1 && !(*replies)[1].is_error() &&
                                      (*replies)[1].integer >= options_.wait_replicas)) {
    ++stats_.writes_acknowledged;
  }
}

absl::StatusOr<std::string> RedisBlockStore::Get(const BlockHash& hash) {
  {
    absl::MutexLock lock(&mu_);
    ++stats_.gets;
  }
  if (!MayTry()) return absl::UnavailableError("remote tier unavailable");
  absl::StatusOr<RedisReply> reply = cluster_->Command(Key(hash), {"GET", Key(hash)});
  Outcome(reply.status());
  absl::MutexLock lock(&mu_);
  if (!reply.ok()) return reply.status();
  if (reply->type != RedisReply::Type::kString) {
    ++stats_.get_misses;
    return absl::NotFoundError("no such block");
  }
  absl::StatusOr<std::string> payload = DecodeValue(hash, reply->str);
  if (!payload.ok()) {
    ++stats_.get_misses;
    ++stats_.checksum_failures;
    spdlog::warn("remote tier: block {} refused: {}", hash.ToHex(),
                 std::string(payload.status().message()));
    return absl::NotFoundError(payload.status().message());
  }
  ++stats_.get_hits;
  stats_.bytes_read += payload->size();
  return payload;
}

bool RedisBlockStore::MayTry() {
  absl::MutexLock lock(&mu_);
  return available_ || absl::Now() - last_failure_ >= options_.retry_interval;
}

void RedisBlockStore::Outcome(const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  if (status.ok()) {
    if (!available_) spdlog::info("remote tier: Redis Cluster reachable again");
    available_ = true;
    return;
  }
  ++stats_.unavailable_errors;
  last_failure_ = absl::Now();
  if (available_) {
    spdlog::warn("remote tier unavailable (serving from local tiers): {}",
                 std::string(status.message()));
  }
  available_ = false;
}

void RedisBlockStore::Flush() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](RedisBlockStore* s)
           ABSL_NO_THREAD_SAFETY_ANALYSIS { return s->queue_.empty() && !s->writing_; },
      this));
}

RedisBlockStoreStats RedisBlockStore::Stats() const {
  absl::MutexLock lock(&mu_);
  RedisBlockStoreStats out = stats_;
  out.available = available_;
  return out;
}

void RenderRemoteTierMetrics(const RedisBlockStoreStats& s, std::string* out) {
  absl::StrAppend(
      out, "# HELP headwise_remote_available 1 while the Redis Cluster tier answers.\n",
      "# TYPE headwise_remote_available gauge\nheadwise_remote_available ", s.available ? 1 : 0,
      "\n# HELP headwise_remote_writes_total Block write-backs by result.\n",
      "# TYPE headwise_remote_writes_total counter\n",
      "headwise_remote_writes_total{result=\"queued\"} ", s.writes_queued, "\n",
      "headwise_remote_writes_total{result=\"stored\"} ", s.writes_stored, "\n",
      "headwise_remote_writes_total{result=\"acknowledged\"} ", s.writes_acknowledged, "\n",
      "headwise_remote_writes_total{result=\"dropped\"} ", s.writes_dropped, "\n",
      "headwise_remote_writes_total{result=\"failed\"} ", s.writes_failed, "\n",
      "# HELP headwise_remote_gets_total Block reads by result.\n",
      "# TYPE headwise_remote_gets_total counter\n", "headwise_remote_gets_total{result=\"hit\"} ",
      s.get_hits, "\n", "headwise_remote_gets_total{result=\"miss\"} ", s.get_misses, "\n",
      "# HELP headwise_remote_checksum_failures_total Values refused by their check.\n",
      "# TYPE headwise_remote_checksum_failures_total counter\n",
      "headwise_remote_checksum_failures_total ", s.checksum_failures, "\n",
      "# HELP headwise_remote_unavailable_errors_total Calls no node answered.\n",
      "# TYPE headwise_remote_unavailable_errors_total counter\n",
      "headwise_remote_unavailable_errors_total ", s.unavailable_errors, "\n",
      "headwise_bytes_moved_total{direction=\"host_to_remote\"} ", s.bytes_written, "\n",
      "headwise_bytes_moved_total{direction=\"remote_to_host\"} ", s.bytes_read, "\n");
}

RedisBlockStoreOptions RemoteOptionsFromConfig(const headwise::v1::RedisRemoteConfig& config) {
  RedisBlockStoreOptions o;
  o.cluster.seeds.assign(config.seeds().begin(), config.seeds().end());
  o.cluster.user = config.user();
  o.cluster.password = config.password();
  o.cluster.tls = config.tls();
  o.cluster.command_timeout = absl::Milliseconds(config.command_timeout_ms());
  o.key_prefix = config.key_prefix();
  o.wait_replicas = static_cast<int>(config.wait_replicas());
  o.wait_timeout = absl::Milliseconds(config.wait_timeout_ms());
  o.max_queued_writes = static_cast<int>(config.max_queued_writes());
  return o;
}

}  // namespace headwise
