// EmbeddedBackend: a KvBackend over an in-process headwise::Engine; attention runs in Headwise's
// CPU (or, when the engine was built with CUDA, GPU) kernels.
//
// Thread-safety: as the Engine's: calls on different sequences may run concurrently.
#ifndef HEADWISE_CLIENTS_LLAMA2_EMBEDDED_BACKEND_H_
#define HEADWISE_CLIENTS_LLAMA2_EMBEDDED_BACKEND_H_

#include <memory>
#include <string>

#include "cachesvc/engine.h"
#include "clients/llama2/kv_backend.h"

namespace headwise::llama2 {

class EmbeddedBackend : public KvBackend {
 public:
  // Creates the engine from `options`; Engine::Create's errors.
  static absl::StatusOr<std::unique_ptr<EmbeddedBackend>> Create(const EngineOptions& options);

  absl::Status RegisterLayout(const std::string& name, const ModelLayout& layout) override;
  absl::StatusOr<SequenceId> CreateSequence(const std::string& layout_name,
                                            const headwise::v1::PolicySpec& spec) override;
  // Engine::Append then Engine::Attend (eviction runs between them, so the new token attends
  // over exactly what the policy keeps after it was stored).
  absl::Status AppendAndAttend(const SequenceId& seq, LayerId layer, absl::Span<const float> q,
                               absl::Span<const float> k, absl::Span<const float> v,
                               absl::Span<float> o, absl::Span<float> lse) override;
  absl::Status ReleaseSequence(const SequenceId& seq) override;
  absl::StatusOr<std::string> DescribeStats(const SequenceId& seq) override;

  // The engine, for callers that want its full statistics. Owned by this backend.
  Engine& engine() { return *engine_; }

 private:
  explicit EmbeddedBackend(std::unique_ptr<Engine> engine) : engine_(std::move(engine)) {}

  std::unique_ptr<Engine> engine_;
};

}  // namespace headwise::llama2

#endif  // HEADWISE_CLIENTS_LLAMA2_EMBEDDED_BACKEND_H_
