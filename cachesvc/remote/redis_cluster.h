// RedisCluster: a small synchronous Redis Cluster client over hiredis (libhiredis-dev 0.14).
//
// Routing: a key's slot is CRC16-XMODEM(key) mod 16384, where a key with a non-empty "{tag}"
// hashes only the tag (the cluster spec's hash tags). The slot map (slot -> master address)
// comes from CLUSTER SLOTS, asked of any reachable node (the seeds first, then every node
// known). A command goes to its slot's master; a MOVED reply updates the slot and retries
// there; an ASK reply retries once at the named node after ASKING; a connection error drops the
// connection, refreshes the map and retries. At most `max_attempts` tries per call, then
// UNAVAILABLE.
//
// Pipelining: Pipeline() writes every command of a call before reading any reply, on the one
// connection of the key's master (so a SET followed by WAIT waits for that SET's replicas).
//
// Auth: every new connection sends AUTH (with the ACL user when one is set) before anything
// else. The password is never logged or put into a Status message.
//
// TLS is not available: Debian's hiredis 0.14 has no TLS support (Create refuses tls = true).
//
// Thread-safety: every method may be called from any thread; one mutex serializes them (hiredis
// connections are not thread-safe), so calls do not overlap.
#ifndef HEADWISE_CACHESVC_REMOTE_REDIS_CLUSTER_H_
#define HEADWISE_CACHESVC_REMOTE_REDIS_CLUSTER_H_

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

struct redisContext;

namespace headwise {

struct RedisClusterOptions {
  // "host:port" of one or more cluster nodes. Required.
  std::vector<std::string> seeds;
  // ACL user and password for AUTH. Empty password: no AUTH. Empty user with a password: the
  // legacy `AUTH password` (the default user). Default: empty.
  std::string user;
  std::string password;
  // TLS to the nodes. Not supported by the installed hiredis. Default: false.
  bool tls = false;
  // Connect and per-command timeouts. Default: 500 ms and 2 s.
  absl::Duration connect_timeout = absl::Milliseconds(500);
  absl::Duration command_timeout = absl::Seconds(2);
  // Tries per call (redirects and reconnects included). Default: 5.
  int max_attempts = 5;
};

// One reply, copied out of hiredis.
struct RedisReply {
  enum class Type { kString, kStatus, kError, kInteger, kNil, kArray };
  Type type = Type::kNil;
  std::string str;  // kString, kStatus, kError.
  int64_t integer = 0;
  std::vector<RedisReply> elements;
  bool is_error() const { return type == Type::kError; }
};

class RedisCluster {
 public:
  // Validates the options (INVALID_ARGUMENT: no seed, a malformed "host:port", tls = true
  // UNIMPLEMENTED) and tries to load the slot map; a cluster that cannot be reached yet is not
  // an error (calls return UNAVAILABLE until it can).
  static absl::StatusOr<std::unique_ptr<RedisCluster>> Create(const RedisClusterOptions& options);
  ~RedisCluster();
  RedisCluster(const RedisCluster&) = delete;
  RedisCluster& operator=(const RedisCluster&) = delete;

  // The cluster slot of `key`.
  static uint16_t KeySlot(std::string_view key);
  static uint16_t Crc16(std::string_view bytes);

  // Sends every command of `commands` (each an argv) to the master of `key`'s slot, pipelined,
  // and returns their replies in order. A reply that is a Redis error other than MOVED/ASK is
  // returned as a reply (kError), not as a Status. UNAVAILABLE when no node answers within
  // max_attempts.
  absl::StatusOr<std::vector<RedisReply>> Pipeline(
      std::string_view key, const std::vector<std::vector<std::string>>& commands);
  absl::StatusOr<RedisReply> Command(std::string_view key, const std::vector<std::string>& argv);
  // Reloads the slot map. UNAVAILABLE when no node answers.
  absl::Status RefreshSlots();

 private:
  explicit RedisCluster(const RedisClusterOptions& options) : options_(options) {}
  // The live connection to `address`, connecting (and authenticating) when needed.
  absl::StatusOr<redisContext*> Connection(const std::string& address)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Drop(const std::string& address) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status RefreshSlotsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status LoadSlotsFrom(const std::string& address) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // One try of a pipeline at `address` (with ASKING first when `asking`).
  absl::StatusOr<std::vector<RedisReply>> Send(const std::string& address, bool asking,
                                               const std::vector<std::vector<std::string>>& cmds)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const RedisClusterOptions options_;
  absl::Mutex mu_;
  // Node addresses; slot_node_[slot] indexes them (-1: unknown).
  std::vector<std::string> nodes_ ABSL_GUARDED_BY(mu_);
  std::array<int16_t, 16384> slot_node_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, redisContext*> connections_ ABSL_GUARDED_BY(mu_);
};

// Splits "host:port". INVALID_ARGUMENT when malformed.
absl::Status SplitRedisAddress(std::string_view address, std::string* host, int* port);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_REMOTE_REDIS_CLUSTER_H_
