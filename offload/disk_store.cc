#include "offload/disk_store.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"
#include "rocksdb/db.h"
#include "rocksdb/options.h"
#include "rocksdb/slice.h"
#include "rocksdb/write_batch.h"

namespace headwise {
namespace {

// RocksDB's write group lets one writer thread write other threads' batches, handing them over
// with atomics inside the (uninstrumented) library. ThreadSanitizer cannot see that hand-off, so
// TSan builds serialize writes here instead; normal builds keep RocksDB's group commit.
#ifdef HEADWISE_STD_MUTEX
#define HEADWISE_SERIALIZE_WRITES_FOR_TSAN() MutexLock tsan_write_lock(&tsan_write_mu_)
#else
#define HEADWISE_SERIALIZE_WRITES_FOR_TSAN() \
  do {                                       \
  } while (false)
#endif

constexpr char kPagesFamily[] = "pages";
constexpr char kPageMetaFamily[] = "page_meta";
constexpr char kSequencesFamily[] = "sequences";
// Positions in handles_.
constexpr size_t kPagesIndex = 1;
constexpr size_t kPageMetaIndex = 2;
constexpr size_t kSequencesIndex = 3;

void PutBigEndian(uint64_t value, int bytes, char* out) {
  for (int i = bytes - 1; i >= 0; --i) {
    out[i] = static_cast<char>(value & 0xff);
    value >>= 8;
  }
}

uint64_t GetBigEndian(const char* in, int bytes) {
  uint64_t value = 0;
  for (int i = 0; i < bytes; ++i) value = (value << 8) | static_cast<uint8_t>(in[i]);
  return value;
}

std::string SequencePrefix(const SequenceId& sequence) {
  std::string prefix(16, '\0');
  PutBigEndian(sequence.hi(), 8, prefix.data());
  PutBigEndian(sequence.lo(), 8, prefix.data() + 8);
  return prefix;
}

absl::Status FromRocks(const rocksdb::Status& s, absl::string_view what) {
  if (s.ok()) return absl::OkStatus();
  const std::string message = absl::StrCat(what, ": ", s.ToString());
  if (s.IsNotFound()) return absl::NotFoundError(message);
  if (s.IsCorruption()) return absl::DataLossError(message);
  if (s.IsInvalidArgument()) return absl::InvalidArgumentError(message);
  if (s.IsNoSpace()) return absl::ResourceExhaustedError(message);
  if (s.IsBusy() || s.IsTryAgain() || s.IsTimedOut()) return absl::UnavailableError(message);
  if (s.IsNotSupported()) return absl::UnimplementedError(message);
  return absl::InternalError(message);
}

rocksdb::Slice AsSlice(absl::Span<const std::byte> bytes) {
  return rocksdb::Slice(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

rocksdb::Slice AsSlice(std::string_view s) { return rocksdb::Slice(s.data(), s.size()); }

rocksdb::WriteOptions WriteOptionsFor(bool sync) {
  rocksdb::WriteOptions options;
  options.sync = sync;
  return options;
}

absl::Status CopyPage(const PageKey& key, const rocksdb::Status& s,
                      const rocksdb::PinnableSlice& value, absl::Span<std::byte> out) {
  if (s.IsNotFound()) {
    return absl::NotFoundError(absl::StrCat("page (", key.sequence.ToHex(), ", layer ",
                                            key.layer.value(), ", head ", key.head.value(),
                                            ", page ", key.ordinal, ") is not on disk"));
  }
  RETURN_IF_ERROR(FromRocks(s, "get page"));
  if (value.size() != out.size()) {
    return absl::DataLossError(absl::StrCat(
        "page (", key.sequence.ToHex(), ", layer ", key.layer.value(), ", head ", key.head.value(),
        ", page ", key.ordinal, ") has ", value.size(), " bytes on disk, expected ", out.size()));
  }
  std::memcpy(out.data(), value.data(), out.size());
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> EncodePageKey(const PageKey& key) {
  if (key.layer.value() < 0 || key.layer.value() > 0xffff || key.head.value() < 0 ||
      key.head.value() > 0xffff) {
    return absl::InvalidArgumentError(absl::StrCat("page key layer ", key.layer.value(),
                                                   " or head ", key.head.value(),
                                                   " outside [0, 65535]"));
  }
  std::string out(kPageKeyBytes, '\0');
  PutBigEndian(key.sequence.hi(), 8, out.data());
  PutBigEndian(key.sequence.lo(), 8, out.data() + 8);
  PutBigEndian(static_cast<uint64_t>(key.layer.value()), 2, out.data() + 16);
  PutBigEndian(static_cast<uint64_t>(key.head.value()), 2, out.data() + 18);
  PutBigEndian(key.ordinal, 4, out.data() + 20);
  return out;
}

absl::StatusOr<PageKey> DecodePageKey(std::string_view bytes) {
  if (bytes.size() != kPageKeyBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("a page key has ", kPageKeyBytes, " bytes, got ", bytes.size()));
  }
  PageKey key;
  key.sequence = SequenceId(GetBigEndian(bytes.data(), 8), GetBigEndian(bytes.data() + 8, 8));
  key.layer = LayerId(static_cast<int32_t>(GetBigEndian(bytes.data() + 16, 2)));
  key.head = HeadId(static_cast<int32_t>(GetBigEndian(bytes.data() + 18, 2)));
  key.ordinal = static_cast<uint32_t>(GetBigEndian(bytes.data() + 20, 4));
  return key;
}

// ---- Batch ----

DiskStore::Batch::Batch(DiskStore* store)
    : store_(store), batch_(std::make_unique<rocksdb::WriteBatch>()) {}

DiskStore::Batch::~Batch() = default;

int DiskStore::Batch::count() const { return static_cast<int>(batch_->Count()); }

absl::Status DiskStore::Batch::PutPage(const PageKey& key, absl::Span<const std::byte> bytes) {
  ASSIGN_OR_RETURN(const std::string encoded, EncodePageKey(key));
  RETURN_IF_ERROR(FromRocks(batch_->Put(store_->pages(), encoded, AsSlice(bytes)), "batch put"));
  value_bytes_ += bytes.size();
  ++pages_put_;
  return absl::OkStatus();
}

absl::Status DiskStore::Batch::DeletePage(const PageKey& key) {
  ASSIGN_OR_RETURN(const std::string encoded, EncodePageKey(key));
  RETURN_IF_ERROR(FromRocks(batch_->Delete(store_->pages(), encoded), "batch delete"));
  ++pages_deleted_;
  return absl::OkStatus();
}

absl::Status DiskStore::Batch::Put(RecordFamily family, std::string_view key,
                                   std::string_view value) {
  RETURN_IF_ERROR(
      FromRocks(batch_->Put(store_->family(family), AsSlice(key), AsSlice(value)), "batch put"));
  value_bytes_ += value.size();
  return absl::OkStatus();
}

absl::Status DiskStore::Batch::Delete(RecordFamily family, std::string_view key) {
  return FromRocks(batch_->Delete(store_->family(family), AsSlice(key)), "batch delete");
}

// ---- DiskStore ----

absl::StatusOr<std::unique_ptr<DiskStore>> DiskStore::Open(const DiskStoreOptions& options) {
  if (options.path.empty()) return absl::InvalidArgumentError("DiskStoreOptions.path is empty");
  rocksdb::DBOptions db_options;
  db_options.create_if_missing = options.create_if_missing;
  db_options.create_missing_column_families = options.create_if_missing;
  db_options.max_background_jobs = options.max_background_jobs;

  rocksdb::ColumnFamilyOptions small;
  small.write_buffer_size = options.write_buffer_size;
  rocksdb::ColumnFamilyOptions pages = small;
  pages.enable_blob_files = true;
  pages.min_blob_size = options.min_blob_size;
  pages.enable_blob_garbage_collection = options.enable_blob_garbage_collection;

  std::vector<rocksdb::ColumnFamilyDescriptor> families = {
      {rocksdb::kDefaultColumnFamilyName, small},
      {kPagesFamily, pages},
      {kPageMetaFamily, small},
      {kSequencesFamily, small},
  };
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* db = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(db_options, options.path, families, &handles, &db);
  if (!s.ok()) {
    // RocksDB reports a missing database without create_if_missing as InvalidArgument.
    if (!options.create_if_missing && s.IsInvalidArgument() &&
        s.ToString().find("does not exist") != std::string::npos) {
      return absl::NotFoundError(absl::StrCat("no database at ", options.path, ": ", s.ToString()));
    }
    return FromRocks(s, absl::StrCat("open ", options.path));
  }
  return std::unique_ptr<DiskStore>(new DiskStore(options.path, db, std::move(handles)));
}

DiskStore::DiskStore(std::string path, rocksdb::DB* db,
                     std::vector<rocksdb::ColumnFamilyHandle*> handles)
    : path_(std::move(path)), db_(db), handles_(std::move(handles)) {}

DiskStore::~DiskStore() {
  for (rocksdb::ColumnFamilyHandle* handle : handles_) db_->DestroyColumnFamilyHandle(handle);
  db_->Close().PermitUncheckedError();
  delete db_;
}

rocksdb::ColumnFamilyHandle* DiskStore::pages() const { return handles_[kPagesIndex]; }

rocksdb::ColumnFamilyHandle* DiskStore::family(RecordFamily family) const {
  return handles_[family == RecordFamily::kPageMeta ? kPageMetaIndex : kSequencesIndex];
}

absl::Status DiskStore::PutPage(const PageKey& key, absl::Span<const std::byte> bytes, bool sync) {
  ASSIGN_OR_RETURN(const std::string encoded, EncodePageKey(key));
  HEADWISE_SERIALIZE_WRITES_FOR_TSAN();
  RETURN_IF_ERROR(
      FromRocks(db_->Put(WriteOptionsFor(sync), pages(), encoded, AsSlice(bytes)), "put page"));
  bytes_written_.fetch_add(bytes.size(), std::memory_order_relaxed);
  pages_written_.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status DiskStore::GetPage(const PageKey& key, absl::Span<std::byte> out) {
  ASSIGN_OR_RETURN(const std::string encoded, EncodePageKey(key));
  rocksdb::PinnableSlice value;
  const rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), pages(), encoded, &value);
  RETURN_IF_ERROR(CopyPage(key, s, value, out));
  bytes_read_.fetch_add(out.size(), std::memory_order_relaxed);
  pages_read_.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

std::vector<absl::Status> DiskStore::GetPages(absl::Span<const PageKey> keys,
                                              absl::Span<const absl::Span<std::byte>> outs) {
  std::vector<absl::Status> result(keys.size());
  std::vector<std::string> encoded(keys.size());
  std::vector<rocksdb::Slice> slices;
  std::vector<size_t> index;  // position in `keys` of each slice
  slices.reserve(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    absl::StatusOr<std::string> e = EncodePageKey(keys[i]);
    if (!e.ok()) {
      result[i] = e.status();
      continue;
    }
    encoded[i] = *std::move(e);
    slices.emplace_back(encoded[i]);
    index.push_back(i);
  }
  std::vector<rocksdb::PinnableSlice> values(slices.size());
  std::vector<rocksdb::Status> statuses(slices.size());
  if (!slices.empty()) {
    db_->MultiGet(rocksdb::ReadOptions(), pages(), slices.size(), slices.data(), values.data(),
                  statuses.data());
  }
  for (size_t j = 0; j < slices.size(); ++j) {
    const size_t i = index[j];
    result[i] = CopyPage(keys[i], statuses[j], values[j], outs[i]);
    if (result[i].ok()) {
      bytes_read_.fetch_add(outs[i].size(), std::memory_order_relaxed);
      pages_read_.fetch_add(1, std::memory_order_relaxed);
    }
  }
  return result;
}

absl::Status DiskStore::DeletePage(const PageKey& key, bool sync) {
  ASSIGN_OR_RETURN(const std::string encoded, EncodePageKey(key));
  HEADWISE_SERIALIZE_WRITES_FOR_TSAN();
  RETURN_IF_ERROR(FromRocks(db_->Delete(WriteOptionsFor(sync), pages(), encoded), "delete page"));
  pages_deleted_.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status DiskStore::DeleteSequencePages(const SequenceId& sequence, bool sync) {
  const std::string begin = SequencePrefix(sequence);
  // The largest 24-byte key with this prefix is prefix + 8 x 0xff; one more byte sorts after it.
  const std::string end = begin + std::string(8, '\xff') + std::string(1, '\0');
  HEADWISE_SERIALIZE_WRITES_FOR_TSAN();
  return FromRocks(db_->DeleteRange(WriteOptionsFor(sync), pages(), begin, end),
                   "delete sequence pages");
}

absl::Status DiskStore::Put(RecordFamily family, std::string_view key, std::string_view value,
                            bool sync) {
  HEADWISE_SERIALIZE_WRITES_FOR_TSAN();
  RETURN_IF_ERROR(
      FromRocks(db_->Put(WriteOptionsFor(sync), this->family(family), AsSlice(key), AsSlice(value)),
                "put record"));
  bytes_written_.fetch_add(value.size(), std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::StatusOr<std::string> DiskStore::Get(RecordFamily family, std::string_view key) {
  std::string value;
  const rocksdb::Status s =
      db_->Get(rocksdb::ReadOptions(), this->family(family), AsSlice(key), &value);
  if (s.IsNotFound())
    return absl::NotFoundError(absl::StrCat("no record '", std::string(key), "'"));
  RETURN_IF_ERROR(FromRocks(s, "get record"));
  bytes_read_.fetch_add(value.size(), std::memory_order_relaxed);
  return value;
}

absl::Status DiskStore::Delete(RecordFamily family, std::string_view key, bool sync) {
  HEADWISE_SERIALIZE_WRITES_FOR_TSAN();
  return FromRocks(db_->Delete(WriteOptionsFor(sync), this->family(family), AsSlice(key)),
                   "delete record");
}

absl::Status DiskStore::Iterate(
    RecordFamily family, std::string_view prefix,
    const std::function<bool(std::string_view key, std::string_view value)>& fn) {
  std::unique_ptr<rocksdb::Iterator> it(
      db_->NewIterator(rocksdb::ReadOptions(), this->family(family)));
  uint64_t read = 0;
  for (it->Seek(AsSlice(prefix)); it->Valid(); it->Next()) {
    const rocksdb::Slice key = it->key();
    if (!key.starts_with(AsSlice(prefix))) break;
    const rocksdb::Slice value = it->value();
    read += value.size();
    if (!fn(std::string_view(key.data(), key.size()), std::string_view(value.data(), value.size())))
      break;
  }
  bytes_read_.fetch_add(read, std::memory_order_relaxed);
  return FromRocks(it->status(), "iterate");
}

absl::Status DiskStore::Write(Batch& batch, bool sync) {
  if (batch.store_ != this) return absl::InvalidArgumentError("batch belongs to another store");
  HEADWISE_SERIALIZE_WRITES_FOR_TSAN();
  RETURN_IF_ERROR(FromRocks(db_->Write(WriteOptionsFor(sync), batch.batch_.get()), "write batch"));
  bytes_written_.fetch_add(batch.value_bytes_, std::memory_order_relaxed);
  pages_written_.fetch_add(batch.pages_put_, std::memory_order_relaxed);
  pages_deleted_.fetch_add(batch.pages_deleted_, std::memory_order_relaxed);
  batch.batch_->Clear();
  batch.value_bytes_ = batch.pages_put_ = batch.pages_deleted_ = 0;
  return absl::OkStatus();
}

absl::Status DiskStore::Flush() {
  return FromRocks(db_->Flush(rocksdb::FlushOptions(), handles_), "flush");
}

DiskStoreStats DiskStore::Stats() const {
  DiskStoreStats stats;
  stats.bytes_written = bytes_written_.load(std::memory_order_relaxed);
  stats.bytes_read = bytes_read_.load(std::memory_order_relaxed);
  stats.pages_written = pages_written_.load(std::memory_order_relaxed);
  stats.pages_read = pages_read_.load(std::memory_order_relaxed);
  stats.pages_deleted = pages_deleted_.load(std::memory_order_relaxed);
  uint64_t value = 0;
  if (db_->GetIntProperty(pages(), "rocksdb.estimate-num-keys", &value)) {
    stats.pages_stored = value;
  }
  if (db_->GetIntProperty(pages(), "rocksdb.num-blob-files", &value)) stats.blob_files = value;
  return stats;
}

}  // namespace headwise
