#include "cachesvc/remote/redis_cluster.h"

#include <hiredis/hiredis.h>
#include <sys/time.h>

#include <algorithm>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace headwise {
namespace {

RedisReply Copy(const redisReply* r) {
  RedisReply out;
  switch (r->type) {
    case REDIS_REPLY_STRING:
      out.type = RedisReply::Type::kString;
      out.str.assign(r->str, r->len);
      break;
    case REDIS_REPLY_STATUS:
      out.type = RedisReply::Type::kStatus;
      out.str.assign(r->str, r->len);
      break;
    case REDIS_REPLY_ERROR:
      out.type = RedisReply::Type::kError;
      out.str.assign(r->str, r->len);
      break;
    case REDIS_REPLY_INTEGER:
      out.type = RedisReply::Type::kInteger;
      out.integer = r->integer;
      break;
    case REDIS_REPLY_ARRAY:
      out.type = RedisReply::Type::kArray;
      for (size_t i = 0; i < r->elements; ++i) out.elements.push_back(Copy(r->element[i]));
      break;
    default:
      out.type = RedisReply::Type::kNil;
  }
  return out;
}

void AppendArgv(redisContext* c, const std::vector<std::string>& argv) {
  std::vector<const char*> args;
  std::vector<size_t> lens;
  for (const std::string& a : argv) {
    args.push_back(a.data());
    lens.push_back(a.size());
  }
  redisAppendCommandArgv(c, static_cast<int>(args.size()), args.data(), lens.data());
}

// "MOVED 3999 127.0.0.1:6381" / "ASK 3999 127.0.0.1:6381": the kind and the address.
bool ParseRedirect(const RedisReply& r, bool* ask, std::string* address) {
  if (!r.is_error()) return false;
  const bool moved = absl::StartsWith(r.str, "MOVED ");
  *ask = absl::StartsWith(r.str, "ASK ");
  if (!moved && !*ask) return false;
  const std::vector<std::string> parts = absl::StrSplit(r.str, ' ');
  if (parts.size() < 3) return false;
  *address = parts[2];
  return true;
}

}  // namespace

absl::Status SplitRedisAddress(std::string_view address_view, std::string* host, int* port) {
  const std::string address(address_view);
  const size_t colon = address.rfind(':');
  if (colon == std::string_view::npos || colon == 0 ||
      !absl::SimpleAtoi(address.substr(colon + 1), port) || *port < 1 || *port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("'", address, "' is not host:port"));
  }
  *host = address.substr(0, colon);
  return absl::OkStatus();
}

uint16_t RedisCluster::Crc16(std::string_view bytes) {
  uint16_t crc = 0;  // CRC16-CCITT (XMODEM): poly 0x1021, init 0, no reflection.
  for (const char ch : bytes) {
    crc ^= static_cast<uint16_t>(static_cast<uint8_t>(ch)) << 8;
    for (int i = 0; i < 8; ++i) {
      crc = (crc & 0x8000) != 0 ? static_cast<uint16_t>((crc << 1) ^ 0x1021)
                                : static_cast<uint16_t>(crc << 1);
    }
  }
  return crc;
}

uint16_t RedisCluster::KeySlot(std::string_view key) {
  const size_t open = key.find('{');
  if (open != std::string_view::npos) {
    const size_t close = key.find('}', open + 1);
    if (close != std::string_view::npos && close > open + 1) {
      key = key.substr(open + 1, close - open - 1);
    }
  }
  return Crc16(key) % 16384;
}

absl::StatusOr<std::unique_ptr<RedisCluster>> RedisCluster::Create(
    const RedisClusterOptions& options) {
  if (options.seeds.empty()) return absl::InvalidArgumentError("no Redis Cluster seed node");
  for (const std::string& seed : options.seeds) {
    std::string host;
    int port = 0;
    if (absl::Status st = SplitRedisAddress(seed, &host, &port); !st.ok()) return st;
  }
  if (options.tls) {
    return absl::UnimplementedError("TLS to Redis needs hiredis >= 1.0 (Debian ships 0.14)");
  }
  if (options.max_attempts < 1) return absl::InvalidArgumentError("max_attempts must be >= 1");
  std::unique_ptr<RedisCluster> cluster(new RedisCluster(options));
  absl::MutexLock lock(&cluster->mu_);
  cluster->slot_node_.fill(-1);
  cluster->RefreshSlotsLocked().IgnoreError();  // Unreachable now: calls retry later.
  return cluster;
}

RedisCluster::~RedisCluster() {
  absl::MutexLock lock(&mu_);
  for (auto& [address, c] : connections_) redisFree(c);
}

absl::StatusOr<redisContext*> RedisCluster::Connection(const std::string& address) {
  if (auto it = connections_.find(address); it != connections_.end()) return it->second;
  std::string host;
  int port = 0;
  if (absl::Status st = SplitRedisAddress(address, &host, &port); !st.ok()) return st;
  redisContext* c =
      redisConnectWithTimeout(host.c_str(), port, absl::ToTimeval(options_.connect_timeout));
  if (c == nullptr || c->err != 0) {
    const std::string why = c == nullptr ? "out of memory" : c->errstr;
    if (c != nullptr) redisFree(c);
    return absl::UnavailableError(absl::StrCat("redis ", address, ": ", why));
  }
  redisSetTimeout(c, absl::ToTimeval(options_.command_timeout));
  if (!options_.password.empty()) {
    std::vector<std::string> auth = {"AUTH"};
    if (!options_.user.empty()) auth.push_back(options_.user);
    auth.push_back(options_.password);
    AppendArgv(c, auth);
    void* raw = nullptr;
    const bool sent = redisGetReply(c, &raw) == REDIS_OK && raw != nullptr;
    const bool ok = sent && static_cast<redisReply*>(raw)->type != REDIS_REPLY_ERROR;
    if (raw != nullptr) freeReplyObject(raw);
    if (!ok) {
      redisFree(c);
      // Never the password; the server's message is enough ("WRONGPASS ...").
      return sent ? absl::PermissionDeniedError(absl::StrCat("redis ", address, ": AUTH refused"))
                  : absl::UnavailableError(absl::StrCat("redis ", address, ": AUTH not answered"));
    }
  }
  connections_[address] = c;
  return c;
}

void RedisCluster::Drop(const std::string& address) {
  if (auto it = connections_.find(address); it != connections_.end()) {
    redisFree(it->second);
    connections_.erase(it);
  }
}

absl::StatusOr<std::vector<RedisReply>> RedisCluster::Send(
    const std::string& address, bool asking, const std::vector<std::vector<std::string>>& cmds) {
  absl::StatusOr<redisContext*> c = Connection(address);
  if (!c.ok()) return c.status();
  if (asking) AppendArgv(*c, {"ASKING"});
  for (const auto& argv : cmds) AppendArgv(*c, argv);
  std::vector<RedisReply> replies;
  const size_t expect = cmds.size() + (asking ? 1 : 0);
  for (size_t i = 0; i < expect; ++i) {
    void* raw = nullptr;
    if (redisGetReply(*c, &raw) != REDIS_OK || raw == nullptr) {
      const std::string why = (*c)->errstr;
      Drop(address);  // The stream is out of step now.
      return absl::UnavailableError(absl::StrCat("redis ", address, ": ", why));
    }
    RedisReply r = Copy(static_cast<redisReply*>(raw));
    freeReplyObject(raw);
    if (!(asking && i == 0)) replies.push_back(std::move(r));
  }
  return replies;
}

absl::Status RedisCluster::LoadSlotsFrom(const std::string& address) {
  absl::StatusOr<std::vector<RedisReply>> r = Send(address, false, {{"CLUSTER", "SLOTS"}});
  if (!r.ok()) return r.status();
  const RedisReply& slots = r->front();
  if (slots.type != RedisReply::Type::kArray || slots.elements.empty()) {
    return absl::UnavailableError(
        absl::StrCat("redis ", address, ": CLUSTER SLOTS gave no slots ", slots.str));
  }
  std::vector<std::string> nodes;
  std::array<int16_t, 16384> map;
  map.fill(-1);
  for (const RedisReply& range : slots.elements) {
    if (range.elements.size() < 3 || range.elements[2].elements.size() < 2) continue;
    const RedisReply& master = range.elements[2];
    std::string node = absl::StrCat(master.elements[0].str, ":", master.elements[1].integer);
    if (master.elements[0].str.empty()) node = address;  // "": the node we asked.
    auto it = std::find(nodes.begin(), nodes.end(), node);
    const auto index = static_cast<int16_t>(it - nodes.begin());
    if (it == nodes.end()) nodes.push_back(node);
    const int64_t lo = std::clamp<int64_t>(range.elements[0].integer, 0, 16383);
    const int64_t hi = std::clamp<int64_t>(range.elements[1].integer, 0, 16383);
    for (int64_t s = lo; s <= hi; ++s) map[static_cast<size_t>(s)] = index;
  }
  nodes_ = std::move(nodes);
  slot_node_ = map;
  return absl::OkStatus();
}

absl::Status RedisCluster::RefreshSlotsLocked() {
  std::vector<std::string> candidates = options_.seeds;
  for (const std::string& n : nodes_) {
    if (std::find(candidates.begin(), candidates.end(), n) == candidates.end()) {
      candidates.push_back(n);
    }
  }
  absl::Status last = absl::UnavailableError("no Redis node to ask");
  for (const std::string& address : candidates) {
    last = LoadSlotsFrom(address);
    if (last.ok()) return last;
    if (last.code() == absl::StatusCode::kPermissionDenied) return last;
  }
  return absl::UnavailableError(absl::StrCat("no Redis Cluster node answered: ", last.message()));
}

absl::Status RedisCluster::RefreshSlots() {
  absl::MutexLock lock(&mu_);
  return RefreshSlotsLocked();
}

absl::StatusOr<std::vector<RedisReply>> RedisCluster::Pipeline(
    std::string_view key, const std::vector<std::vector<std::string>>& commands) {
  absl::MutexLock lock(&mu_);
  const uint16_t slot = KeySlot(key);
  std::string redirect;
  bool asking = false;
  absl::Status last = absl::UnavailableError("no try");
  for (int attempt = 0; attempt < options_.max_attempts; ++attempt) {
    std::string address = redirect;
    if (address.empty()) {
      if (slot_node_[slot] < 0) {
        last = RefreshSlotsLocked();
        if (!last.ok() || slot_node_[slot] < 0) continue;
      }
      address = nodes_[static_cast<size_t>(slot_node_[slot])];
    }
    absl::StatusOr<std::vector<RedisReply>> replies = Send(address, asking, commands);
    redirect.clear();
    asking = false;
    if (!replies.ok()) {
      last = replies.status();
      if (last.code() == absl::StatusCode::kPermissionDenied) return last;
      slot_node_[slot] = -1;  // Ask the cluster again (a failover may have moved the slot).
      continue;
    }
    bool ask = false;
    std::string to;
    const auto redirected = std::find_if(replies->begin(), replies->end(), [&](const auto& r) {
      return ParseRedirect(r, &ask, &to);
    });
    if (redirected == replies->end()) return replies;
    last = absl::UnavailableError(absl::StrCat("redis: ", redirected->str));
    redirect = to;
    asking = ask;
    if (!ask) RefreshSlotsLocked().IgnoreError();  // MOVED: the map is stale.
  }
  return absl::UnavailableError(absl::StrCat("Redis Cluster: ", last.message()));
}

absl::StatusOr<RedisReply> RedisCluster::Command(std::string_view key,
                                                 const std::vector<std::string>& argv) {
  absl::StatusOr<std::vector<RedisReply>> r = Pipeline(key, {argv});
  if (!r.ok()) return r.status();
  return std::move(r->front());
}

}  // namespace headwise
