// DiskStore: the disk tier on RocksDB. Three column families:
//   "pages"      page payloads, one value per head-page, stored as blobs (integrated BlobDB:
//                enable_blob_files, min_blob_size, blob GC), so compaction moves 24-byte keys
//                and blob references, not payloads;
//   "page_meta"  small page metadata records (opaque bytes to this class);
//   "sequences"  small sequence records (opaque bytes to this class).
// Every write goes through the WAL; `sync` additionally fsyncs the WAL before returning, which
// is what makes an acknowledged write survive a crash or power loss (not only a process kill).
//
// Page keys: PageKey = (128-bit sequence id, layer, kv head, page ordinal), encoded as a fixed
// 24-byte big-endian string (EncodePageKey), so the byte order of keys is the order of the
// tuple: all pages of a sequence, and of one (sequence, layer, head), are adjacent, and a whole
// sequence can be dropped with one range delete. A forked sequence that shares a page refers to
// the owner's key; sharing and refcounts are the engine's business, not this store's.
//
// Thread-safety: every method may be called from any thread concurrently (RocksDB's DB is
// thread-safe). A Batch is not thread-safe; use one per thread.
#ifndef HEADWISE_OFFLOAD_DISK_STORE_H_
#define HEADWISE_OFFLOAD_DISK_STORE_H_

#include <atomic>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cachesvc/base/ids.h"
#include "cachesvc/base/mutex.h"

namespace rocksdb {
class ColumnFamilyHandle;
class DB;
class WriteBatch;
}  // namespace rocksdb

namespace headwise {

// The disk address of one head-page. layer and head must be in [0, 65535].
struct PageKey {
  SequenceId sequence;
  LayerId layer;
  HeadId head;
  // Index of the page in its (sequence, layer, head) page table.
  uint32_t ordinal = 0;

  // The key of the next page of the same (sequence, layer, head).
  PageKey Next() const { return PageKey{sequence, layer, head, ordinal + 1}; }
  auto operator<=>(const PageKey&) const = default;
};

inline constexpr size_t kPageKeyBytes = 24;

// sequence.hi (8 bytes BE) | sequence.lo (8 BE) | layer (2 BE) | head (2 BE) | ordinal (4 BE).
// INVALID_ARGUMENT when layer or head does not fit in 16 bits.
absl::StatusOr<std::string> EncodePageKey(const PageKey& key);
// Inverse of EncodePageKey; INVALID_ARGUMENT unless `bytes` has exactly 24 bytes.
absl::StatusOr<PageKey> DecodePageKey(std::string_view bytes);

// The families of small records.
enum class RecordFamily : uint8_t { kPageMeta, kSequences };

struct DiskStoreOptions {
  // Directory of the RocksDB database. Required.
  std::string path;
  // Create the database (and its column families) when it does not exist. Default: true.
  bool create_if_missing = true;
  // Values of at least this many bytes in "pages" go to blob files. Default: 4 KiB.
  uint64_t min_blob_size = 4096;
  // Reclaim space of deleted/overwritten pages during compaction. Default: true.
  bool enable_blob_garbage_collection = true;
  // Memtable size per column family. Default: 64 MiB.
  uint64_t write_buffer_size = uint64_t{64} << 20;
  // RocksDB background flush + compaction threads. Default: 2.
  int max_background_jobs = 2;
};

struct DiskStoreStats {
  // Value bytes written (pages and records) and read since Open.
  uint64_t bytes_written = 0;
  uint64_t bytes_read = 0;
  // Page puts, successful page gets and page delete operations (present or not) since Open.
  uint64_t pages_written = 0;
  uint64_t pages_read = 0;
  uint64_t pages_deleted = 0;
  // Pages currently stored, as RocksDB estimates it ("rocksdb.estimate-num-keys" of "pages"):
  // exact after puts of fresh keys and a flush, approximate with overwrites and deletes.
  uint64_t pages_stored = 0;
  // Live blob files ("rocksdb.num-blob-files" of "pages").
  uint64_t blob_files = 0;
};

class DiskStore {
 public:
  // An atomic group of writes; applied all-or-nothing by DiskStore::Write. Not thread-safe.
  class Batch {
   public:
    // REQUIRES: `store` outlives the batch.
    explicit Batch(DiskStore* store);
    ~Batch();
    absl::Status PutPage(const PageKey& key, absl::Span<const std::byte> bytes);
    absl::Status DeletePage(const PageKey& key);
    absl::Status Put(RecordFamily family, std::string_view key, std::string_view value);
    absl::Status Delete(RecordFamily family, std::string_view key);
    // Operations added so far.
    int count() const;

   private:
    friend class DiskStore;
    DiskStore* store_;
    std::unique_ptr<rocksdb::WriteBatch> batch_;
    uint64_t value_bytes_ = 0;
    uint64_t pages_put_ = 0;
    uint64_t pages_deleted_ = 0;
  };

  // Opens (or creates, per options) the database at options.path with the three column
  // families. INVALID_ARGUMENT for an empty path; NOT_FOUND when it does not exist and
  // !create_if_missing; other RocksDB errors mapped to Status (Corruption -> DATA_LOSS).
  static absl::StatusOr<std::unique_ptr<DiskStore>> Open(const DiskStoreOptions& options);
  // Closes the database (memtables stay in the WAL; nothing acknowledged is lost).
  ~DiskStore();
  DiskStore(const DiskStore&) = delete;
  DiskStore& operator=(const DiskStore&) = delete;

  // Stores one page payload under `key`, replacing any previous value.
  absl::Status PutPage(const PageKey& key, absl::Span<const std::byte> bytes, bool sync = false);
  // Reads the page into `out`, whose size must be the stored size. NOT_FOUND when absent,
  // DATA_LOSS when the stored value has another size (`out` is untouched then).
  absl::Status GetPage(const PageKey& key, absl::Span<std::byte> out);
  // Reads many pages with one RocksDB MultiGet. REQUIRES: keys.size() == outs.size().
  // Returns one Status per key, with GetPage's meanings.
  std::vector<absl::Status> GetPages(absl::Span<const PageKey> keys,
                                     absl::Span<const absl::Span<std::byte>> outs);
  // OK whether or not the page existed.
  absl::Status DeletePage(const PageKey& key, bool sync = false);
  // Deletes every page of `sequence` (one range delete).
  absl::Status DeleteSequencePages(const SequenceId& sequence, bool sync = false);

  // Small records. Get returns NOT_FOUND when absent; Delete is OK when absent.
  absl::Status Put(RecordFamily family, std::string_view key, std::string_view value,
                   bool sync = false);
  absl::StatusOr<std::string> Get(RecordFamily family, std::string_view key);
  absl::Status Delete(RecordFamily family, std::string_view key, bool sync = false);
  // Calls fn(key, value) for every record whose key starts with `prefix`, in key order, until
  // fn returns false. Sees a consistent snapshot. REQUIRES: fn does not write to this store's
  // same family in a way it expects to observe.
  absl::Status Iterate(RecordFamily family, std::string_view prefix,
                       const std::function<bool(std::string_view key, std::string_view value)>& fn);

  // Applies `batch` atomically; `sync` fsyncs the WAL first. The batch may be reused after.
  absl::Status Write(Batch& batch, bool sync = false);

  // Flushes memtables to SST and blob files (tests, orderly shutdown).
  absl::Status Flush();

  DiskStoreStats Stats() const;
  const std::string& path() const { return path_; }

 private:
  DiskStore(std::string path, rocksdb::DB* db, std::vector<rocksdb::ColumnFamilyHandle*> handles);
  rocksdb::ColumnFamilyHandle* pages() const;
  rocksdb::ColumnFamilyHandle* family(RecordFamily family) const;

  const std::string path_;
  rocksdb::DB* db_;  // Owned.
  // default, pages, page_meta, sequences. Owned.
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
  std::atomic<uint64_t> bytes_written_{0};
  std::atomic<uint64_t> bytes_read_{0};
  std::atomic<uint64_t> pages_written_{0};
  std::atomic<uint64_t> pages_read_{0};
  std::atomic<uint64_t> pages_deleted_{0};
  // Held around every write in ThreadSanitizer builds only (see disk_store.cc).
  Mutex tsan_write_mu_;
};

}  // namespace headwise

#endif  // HEADWISE_OFFLOAD_DISK_STORE_H_
