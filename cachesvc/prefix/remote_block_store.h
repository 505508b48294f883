// RemoteBlockStore: where the prefix cache writes full prefix blocks back and reads them on a
// local miss, shared by every daemon that uses the same store (cachesvc/remote/: Redis Cluster).
// Keys are block hashes (block_hash.h); values are a block's pages (Engine::ReadBlock's format).
//
// Thread-safety: every method may be called from any thread.
#ifndef HEADWISE_CACHESVC_PREFIX_REMOTE_BLOCK_STORE_H_
#define HEADWISE_CACHESVC_PREFIX_REMOTE_BLOCK_STORE_H_

#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "cachesvc/prefix/block_hash.h"

namespace headwise {

class RemoteBlockStore {
 public:
  virtual ~RemoteBlockStore() = default;
  // Queues `hash` for write-back and returns at once. `payload` is called later, on the store's
  // own thread, to read the block's bytes (it may fail, e.g. when the block left the local cache
  // meanwhile: then nothing is written). A full queue drops the write (counted).
  virtual void PutAsync(const BlockHash& hash,
                        std::function<absl::StatusOr<std::string>()> payload) = 0;
  // The payload stored under `hash`, verified. NOT_FOUND for a miss and for a value that fails
  // its checksum (counted; never returned); UNAVAILABLE when the store cannot be reached.
  virtual absl::StatusOr<std::string> Get(const BlockHash& hash) = 0;
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_PREFIX_REMOTE_BLOCK_STORE_H_
