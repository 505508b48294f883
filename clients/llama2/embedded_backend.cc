#include "clients/llama2/embedded_backend.h"

#include <cstddef>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"

namespace headwise::llama2 {
absl::StatusOr<std::unique_ptr<EmbeddedBackend>> EmbeddedBackend::Create(
    const EngineOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, Engine::Create(options));
  return std::unique_ptr<EmbeddedBackend>(new EmbeddedBackend(std::move(engine)));
}

absl::Status EmbeddedBackend::RegisterLayout(const std::string& name, const ModelLayout& layout) {
  return engine_->RegisterLayout(name, layout);
}

absl::StatusOr<SequenceId> EmbeddedBackend::CreateSequence(const std::string& layout_name,
                                                           const headwise::v1::PolicySpec& spec) {
  return engine_->CreateSequence(layout_name, spec);
}

absl::Status EmbeddedBackend::AppendAndAttend(const SequenceId& seq, LayerId layer,
                                              absl::Span<const float> q, absl::Span<const float> k,
                                              absl::Span<const float> v, absl::Span<float> o,
                                              absl::Span<float> lse) {
  RETURN_IF_ERROR(
      engine_->Append(seq, layer, AsBytes(k), AsBytes(v), /*num_tokens=*/1, DType::kF32));
  return engine_->Attend(seq, layer, q, o, lse);
}

absl::Status EmbeddedBackend::ReleaseSequence(const SequenceId& seq) {
  return engine_->Release(seq);
}

absl::StatusOr<std::string> EmbeddedBackend::DescribeStats(const SequenceId& seq) {
  ASSIGN_OR_RETURN(SequenceStats s, engine_->GetSequenceStats(seq));
  const EngineStats e = engine_->GetStats();
  return absl::StrCat(
      "sequence: length ", s.length, ", retained tokens (all layers x kv heads) ",
      s.retained_tokens, ", pages device/host/disk ", s.device_pages, "/", s.host_pages, "/",
      s.disk_pages, ", device bytes ", s.device_bytes, ", evicted pages ", s.evicted_pages,
      "\nengine: device ", e.device_emulated ? "(emulated) " : "", "used ", e.device.used_bytes,
      " B, peak ", e.device.peak_bytes, " B of ", e.device.budget_bytes, " B; host used ",
      e.host.used_bytes, " B; live pages device/host/disk ", e.device_pages, "/", e.host_pages, "/",
      e.disk_pages, "; sequences ", e.sequences, "; evicted pages ", e.evicted_pages);
}

}  // namespace headwise::llama2
