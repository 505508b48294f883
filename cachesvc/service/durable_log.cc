#include "cachesvc/service/durable_log.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cachesvc/base/status_macros.h"
#include "cachesvc/service/test_hook.h"

namespace headwise {
namespace {

using headwise::v1::DurableLayoutRecord;
using headwise::v1::DurableOpRecord;
using headwise::v1::DurableSequenceRecord;

constexpr char kLayoutPrefix[] = "l/";
constexpr char kSequencePrefix[] = "s/";

std::string OpPrefix(const std::string& handle) { return absl::StrCat("o/", handle, "/"); }
std::string OpKey(const std::string& handle, uint32_t op_index) {
  return absl::StrCat(OpPrefix(handle), absl::StrFormat("%016x", op_index));
}

TestHook<absl::Status, std::string_view>& WriteFault() {
  static auto* hook = new TestHook<absl::Status, std::string_view>();
  return *hook;
}

// The injected fault of `what`, if any (SetWriteFaultForTesting).
absl::Status InjectedFault(std::string_view what) {
  return WriteFault().Call(absl::OkStatus(), what);
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

}  // namespace

absl::StatusOr<SequenceId> ParseHandle(const std::string& handle) {
  if (handle.size() != 32) return absl::InvalidArgumentError("handle is not 32 hex digits");
  uint64_t parts[2] = {0, 0};
  for (int i = 0; i < 32; ++i) {
    const int v = HexValue(handle[i]);
    if (v < 0) return absl::InvalidArgumentError("handle is not 32 lowercase hex digits");
    parts[i / 16] = (parts[i / 16] << 4) | static_cast<uint64_t>(v);
  }
  return SequenceId(parts[0], parts[1]);
}

absl::StatusOr<std::unique_ptr<DurableLog>> DurableLog::Open(const std::string& path) {
  DiskStoreOptions options;
  options.path = path;
  // Small memtables: the log is written once and read at restart only.
  options.write_buffer_size = uint64_t{16} << 20;
  ASSIGN_OR_RETURN(auto store, DiskStore::Open(options));
  return std::unique_ptr<DurableLog>(new DurableLog(std::move(store)));
}

void DurableLog::SetWriteFaultForTesting(std::function<absl::Status(std::string_view)> fault) {
  WriteFault().Set(std::move(fault));
}

absl::Status DurableLog::PutLayout(const DurableLayoutRecord& record) {
  RETURN_IF_ERROR(InjectedFault("PutLayout"));
  return store_->Put(
      RecordFamily::kSequences,
      absl::StrCat(kLayoutPrefix, record.tenant(), std::string(1, '\0'), record.name()),
      record.SerializeAsString(), /*sync=*/true);
}

absl::Status DurableLog::PutSequence(const DurableSequenceRecord& record) {
  RETURN_IF_ERROR(ParseHandle(record.handle()).status());
  RETURN_IF_ERROR(InjectedFault("PutSequence"));
  return store_->Put(RecordFamily::kSequences, absl::StrCat(kSequencePrefix, record.handle()),
                     record.SerializeAsString(), /*sync=*/true);
}

absl::Status DurableLog::PutAppend(const AppendOp& op) {
  RETURN_IF_ERROR(ParseHandle(op.handle).status());
  RETURN_IF_ERROR(InjectedFault("PutAppend"));
  return WriteAppends(absl::MakeConstSpan(&op, 1));
}

absl::Status DurableLog::PutAppends(absl::Span<const AppendOp> ops) {
  for (const AppendOp& op : ops) RETURN_IF_ERROR(ParseHandle(op.handle).status());
  RETURN_IF_ERROR(InjectedFault("PutAppends"));
  return WriteAppends(ops);
}

namespace {

DurableOpRecord AppendRecord(const DurableLog::AppendOp& op) {
  DurableOpRecord record;
  record.set_kind(DurableOpRecord::APPEND);
  record.set_layer(op.layer);
  record.set_num_tokens(op.num_tokens);
  record.set_k_bytes(op.k.size());
  record.set_v_bytes(op.v.size());
  record.set_step_id(op.step_id);
  if (op.drops != nullptr) {
    record.set_decisions_logged(true);
    for (size_t h = 0; h < op.drops->size(); ++h) {
      if ((*op.drops)[h].empty()) continue;
      headwise::v1::HeadDrops* d = record.add_dropped();
      d->set_kv_head(static_cast<int32_t>(h));
      for (int64_t p : (*op.drops)[h]) d->add_positions(p);
    }
  }
  return record;
}

}  // namespace

absl::Status DurableLog::PutAppendDecisions(const AppendOp& op) {
  RETURN_IF_ERROR(ParseHandle(op.handle).status());
  if (op.drops == nullptr) return absl::InvalidArgumentError("PutAppendDecisions needs drops");
  RETURN_IF_ERROR(InjectedFault("PutAppendDecisions"));
  return store_->Put(RecordFamily::kPageMeta, OpKey(op.handle, op.op_index),
                     AppendRecord(op).SerializeAsString(), /*sync=*/true);
}

absl::Status DurableLog::WriteAppends(absl::Span<const AppendOp> ops) {
  DiskStore::Batch batch(store_.get());
  for (const AppendOp& op : ops) {
    ASSIGN_OR_RETURN(SequenceId id, ParseHandle(op.handle));
    const DurableOpRecord record = AppendRecord(op);
    RETURN_IF_ERROR(batch.PutPage(PageKey{id, LayerId(0), HeadId(0), op.op_index}, op.k));
    RETURN_IF_ERROR(batch.PutPage(PageKey{id, LayerId(0), HeadId(1), op.op_index}, op.v));
    RETURN_IF_ERROR(batch.Put(RecordFamily::kPageMeta, OpKey(op.handle, op.op_index),
                              record.SerializeAsString()));
  }
  return store_->Write(batch, /*sync=*/true);
}

absl::Status DurableLog::PutTruncate(const std::string& handle, uint32_t op_index, int64_t length) {
  RETURN_IF_ERROR(ParseHandle(handle).status());
  RETURN_IF_ERROR(InjectedFault("PutTruncate"));
  DurableOpRecord record;
  record.set_kind(DurableOpRecord::TRUNCATE);
  record.set_truncate_length(length);
  return store_->Put(RecordFamily::kPageMeta, OpKey(handle, op_index), record.SerializeAsString(),
                     /*sync=*/true);
}

absl::Status DurableLog::DeleteOp(const std::string& handle, uint32_t op_index) {
  RETURN_IF_ERROR(ParseHandle(handle).status());
  RETURN_IF_ERROR(InjectedFault("DeleteOp"));
  const std::pair<std::string, uint32_t> op(handle, op_index);
  return WriteDeletes(absl::MakeConstSpan(&op, 1));
}

absl::Status DurableLog::DeleteOps(absl::Span<const std::pair<std::string, uint32_t>> ops) {
  for (const auto& op : ops) RETURN_IF_ERROR(ParseHandle(op.first).status());
  RETURN_IF_ERROR(InjectedFault("DeleteOps"));
  return WriteDeletes(ops);
}

absl::Status DurableLog::WriteDeletes(absl::Span<const std::pair<std::string, uint32_t>> ops) {
  DiskStore::Batch batch(store_.get());
  for (const auto& [handle, op_index] : ops) {
    ASSIGN_OR_RETURN(SequenceId id, ParseHandle(handle));
    RETURN_IF_ERROR(batch.Delete(RecordFamily::kPageMeta, OpKey(handle, op_index)));
    RETURN_IF_ERROR(batch.DeletePage(PageKey{id, LayerId(0), HeadId(0), op_index}));
    RETURN_IF_ERROR(batch.DeletePage(PageKey{id, LayerId(0), HeadId(1), op_index}));
  }
  return store_->Write(batch, /*sync=*/true);
}

absl::Status DurableLog::DeleteSequence(const std::string& handle) {
  ASSIGN_OR_RETURN(SequenceId id, ParseHandle(handle));
  RETURN_IF_ERROR(InjectedFault("DeleteSequence"));
  std::vector<std::string> op_keys;
  RETURN_IF_ERROR(store_->Iterate(RecordFamily::kPageMeta, OpPrefix(handle),
                                  [&](std::string_view key, std::string_view) {
                                    op_keys.emplace_back(key);
                                    return true;
                                  }));
  DiskStore::Batch batch(store_.get());
  // The sequence record goes first in the batch; the batch is atomic anyway.
  RETURN_IF_ERROR(batch.Delete(RecordFamily::kSequences, absl::StrCat(kSequencePrefix, handle)));
  for (const auto& key : op_keys) RETURN_IF_ERROR(batch.Delete(RecordFamily::kPageMeta, key));
  RETURN_IF_ERROR(store_->Write(batch, /*sync=*/true));
  return store_->DeleteSequencePages(id, /*sync=*/true);
}

absl::Status DurableLog::Flush() { return store_->Flush(); }

absl::StatusOr<std::vector<DurableLayoutRecord>> DurableLog::LoadLayouts() {
  std::vector<DurableLayoutRecord> records;
  absl::Status parse_status;
  RETURN_IF_ERROR(store_->Iterate(
      RecordFamily::kSequences, kLayoutPrefix, [&](std::string_view key, std::string_view value) {
        DurableLayoutRecord record;
        if (!record.ParseFromArray(value.data(), value.size())) {
          parse_status = absl::DataLossError(absl::StrCat("bad layout record ", std::string(key)));
          return false;
        }
        records.push_back(std::move(record));
        return true;
      }));
  RETURN_IF_ERROR(parse_status);
  return records;
}

absl::StatusOr<std::vector<DurableSequenceRecord>> DurableLog::LoadSequences() {
  std::vector<DurableSequenceRecord> records;
  absl::Status parse_status;
  RETURN_IF_ERROR(store_->Iterate(
      RecordFamily::kSequences, kSequencePrefix, [&](std::string_view key, std::string_view value) {
        DurableSequenceRecord record;
        if (!record.ParseFromArray(value.data(), value.size())) {
          parse_status =
              absl::DataLossError(absl::StrCat("bad sequence record ", std::string(key)));
          return false;
        }
        records.push_back(std::move(record));
        return true;
      }));
  RETURN_IF_ERROR(parse_status);
  return records;
}

absl::StatusOr<std::vector<DurableLog::Op>> DurableLog::LoadOps(const std::string& handle) {
  const std::string prefix = OpPrefix(handle);
  std::vector<Op> ops;
  absl::Status parse_status;
  RETURN_IF_ERROR(store_->Iterate(
      RecordFamily::kPageMeta, prefix, [&](std::string_view key, std::string_view value) {
        Op op;
        uint64_t index = 0;
        bool ok = key.size() == prefix.size() + 16;
        for (size_t i = prefix.size(); ok && i < key.size(); ++i) {
          const int v = HexValue(key[i]);
          ok = v >= 0;
          index = (index << 4) | static_cast<uint64_t>(v < 0 ? 0 : v);
        }
        if (!ok || !op.record.ParseFromArray(value.data(), value.size())) {
          parse_status = absl::DataLossError(absl::StrCat("bad op record ", std::string(key)));
          return false;
        }
        op.index = static_cast<uint32_t>(index);
        ops.push_back(std::move(op));
        return true;
      }));
  RETURN_IF_ERROR(parse_status);
  return ops;
}

absl::Status DurableLog::ReadAppend(const std::string& handle, const Op& op,
                                    std::vector<std::byte>* k, std::vector<std::byte>* v) {
  ASSIGN_OR_RETURN(SequenceId id, ParseHandle(handle));
  k->resize(op.record.k_bytes());
  v->resize(op.record.v_bytes());
  absl::Status status =
      store_->GetPage(PageKey{id, LayerId(0), HeadId(0), op.index}, absl::MakeSpan(*k));
  if (status.ok()) {
    status = store_->GetPage(PageKey{id, LayerId(0), HeadId(1), op.index}, absl::MakeSpan(*v));
  }
  if (!status.ok()) {
    return absl::DataLossError(absl::StrCat("sequence ", handle, " op ", op.index,
                                            ": payload unreadable: ", status.message()));
  }
  return absl::OkStatus();
}

}  // namespace headwise
