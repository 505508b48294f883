#include "clients/llama2/remote_backend.h"

#include <cstddef>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"

namespace headwise::llama2 {
absl::StatusOr<std::unique_ptr<RemoteBackend>> RemoteBackend::Connect(
    const client::ClientOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<client::Client> c, client::Client::Connect(options));
  return std::unique_ptr<RemoteBackend>(new RemoteBackend(std::move(c)));
}

absl::Status RemoteBackend::RegisterLayout(const std::string& name, const ModelLayout& layout) {
  return client_->RegisterLayout(name, layout);
}

absl::StatusOr<SequenceId> RemoteBackend::CreateSequence(const std::string& layout_name,
                                                         const headwise::v1::PolicySpec& spec) {
  ASSIGN_OR_RETURN(client::Sequence remote,
                   client_->CreateSequence(layout_name, spec, /*durable=*/false));
  absl::MutexLock lock(&mu_);
  const SequenceId id(0, ++next_id_);
  sequences_.emplace(id, std::move(remote));
  return id;
}

absl::StatusOr<client::Sequence> RemoteBackend::Find(const SequenceId& seq) const {
  absl::MutexLock lock(&mu_);
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("no remote sequence for ", seq.ToHex()));
  }
  return it->second;
}

absl::Status RemoteBackend::AppendAndAttend(const SequenceId& seq, LayerId layer,
                                            absl::Span<const float> q, absl::Span<const float> k,
                                            absl::Span<const float> v, absl::Span<float> o,
                                            absl::Span<float> lse) {
  ASSIGN_OR_RETURN(client::Sequence remote, Find(seq));
  ASSIGN_OR_RETURN(client::AttendOutput out,
                   client_->DecodeStep(remote, layer.value(), q, AsBytes(k), AsBytes(v)));
  if (out.o.size() != o.size() || out.lse.size() != lse.size()) {
    return absl::InternalError(absl::StrCat("DecodeStep returned o of ", out.o.size(),
                                            " and lse of ", out.lse.size(), " floats; expected ",
                                            o.size(), " and ", lse.size()));
  }
  std::memcpy(o.data(), out.o.data(), o.size() * sizeof(float));
  std::memcpy(lse.data(), out.lse.data(), lse.size() * sizeof(float));
  return absl::OkStatus();
}

absl::Status RemoteBackend::ReleaseSequence(const SequenceId& seq) {
  ASSIGN_OR_RETURN(client::Sequence remote, Find(seq));
  RETURN_IF_ERROR(client_->Release(remote));
  absl::MutexLock lock(&mu_);
  sequences_.erase(seq);
  return absl::OkStatus();
}

absl::StatusOr<std::string> RemoteBackend::DescribeStats(const SequenceId& seq) {
  ASSIGN_OR_RETURN(client::Sequence remote, Find(seq));
  ASSIGN_OR_RETURN(headwise::v1::SequenceInfo info, client_->GetSequence(remote));
  ASSIGN_OR_RETURN(headwise::v1::StatsResponse stats, client_->Stats());
  const int64_t length = info.layer_lengths().empty() ? 0 : info.layer_lengths(0);
  return absl::StrCat("sequence: length ", length, ", pages ", info.pages(), " (",
                      info.shared_pages(), " shared), device/host/disk bytes ", info.device_bytes(),
                      "/", info.host_bytes(), "/", info.disk_bytes(), ", evicted pages ",
                      info.evicted_pages(), "\ndaemon: ", stats.ShortDebugString());
}

}  // namespace headwise::llama2
