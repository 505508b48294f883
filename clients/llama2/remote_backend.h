// RemoteBackend: a KvBackend over the Headwise daemon (`headwised`), through the typed gRPC
// client in clients/cpp. Each AppendAndAttend is one DecodeStep RPC (append, then attend, in the
// daemon); tensors travel inline.
//
// Sequences are named by the daemon's 32-hex-digit handles; this backend hands out local
// SequenceIds and keeps the mapping.
//
// Thread-safety: every method may be called from any thread.
#ifndef HEADWISE_CLIENTS_LLAMA2_REMOTE_BACKEND_H_
#define HEADWISE_CLIENTS_LLAMA2_REMOTE_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "clients/cpp/client.h"
#include "clients/llama2/kv_backend.h"

namespace headwise::llama2 {

class RemoteBackend : public KvBackend {
 public:
  // Connects (Client::Connect's errors, e.g. UNAVAILABLE when no daemon listens at the target).
  static absl::StatusOr<std::unique_ptr<RemoteBackend>> Connect(
      const client::ClientOptions& options);

  absl::Status RegisterLayout(const std::string& name, const ModelLayout& layout) override;
  // Creates a non-durable sequence.
  absl::StatusOr<SequenceId> CreateSequence(const std::string& layout_name,
                                            const headwise::v1::PolicySpec& spec) override;
  absl::Status AppendAndAttend(const SequenceId& seq, LayerId layer, absl::Span<const float> q,
                               absl::Span<const float> k, absl::Span<const float> v,
                               absl::Span<float> o, absl::Span<float> lse) override;
  absl::Status ReleaseSequence(const SequenceId& seq) override;
  // The daemon's SequenceInfo and StatsResponse, as text.
  absl::StatusOr<std::string> DescribeStats(const SequenceId& seq) override;

 private:
  explicit RemoteBackend(std::unique_ptr<client::Client> client) : client_(std::move(client)) {}
  // The daemon sequence of `seq`, or NOT_FOUND.
  absl::StatusOr<client::Sequence> Find(const SequenceId& seq) const;

  std::unique_ptr<client::Client> client_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<SequenceId, client::Sequence> sequences_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace headwise::llama2

#endif  // HEADWISE_CLIENTS_LLAMA2_REMOTE_BACKEND_H_
