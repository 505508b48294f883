// KvBackend: where the llama2 engine keeps its KV cache and computes attention. The engine
// itself keeps no KV cache: each layer's K/V of each token goes to a backend, and the attention
// output comes back from it. Two kinds are meant to exist: EmbeddedBackend (an in-process
// headwise::Engine, embedded_backend.h) and a daemon backend over the gRPC client (see
// docs/llama2.md).
//
// The interface is deliberately narrow (register a layout, create/release a sequence, one fused
// decode step per layer, a stats line) so that every method maps onto one daemon RPC:
// RegisterLayout, CreateSequence, DecodeStep, Release, Stats.
#ifndef HEADWISE_CLIENTS_LLAMA2_KV_BACKEND_H_
#define HEADWISE_CLIENTS_LLAMA2_KV_BACKEND_H_

#include <cstddef>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cachesvc/base/ids.h"
#include "cachesvc/base/layout.h"
#include "headwise/v1/policy.pb.h"

namespace headwise::llama2 {

class KvBackend {
 public:
  virtual ~KvBackend() = default;

  // Registers `layout` under `name` (registering the same layout again is OK).
  virtual absl::Status RegisterLayout(const std::string& name, const ModelLayout& layout) = 0;

  // A new empty sequence of a registered layout, managed by `spec` (placement, eviction).
  virtual absl::StatusOr<SequenceId> CreateSequence(const std::string& layout_name,
                                                    const headwise::v1::PolicySpec& spec) = 0;

  // One decode step of `layer` for one token: appends k and v ([num_kv_heads][head_dim] f32)
  // to the layer's cache, then computes attention of q ([num_q_heads][head_dim] f32) over the
  // cached tokens the sequence's policy keeps, the new one included, into o
  // ([num_q_heads][head_dim]) and lse ([num_q_heads], natural-log sum of exp of the logits,
  // which lets a caller merge with attention computed elsewhere). Query head h reads KV head h /
  // group_size; the logit scale is 1/sqrt(head_dim). Layers must be stepped in the order the
  // engine's append rule allows (every layer once per token).
  virtual absl::Status AppendAndAttend(const SequenceId& seq, LayerId layer,
                                       absl::Span<const float> q, absl::Span<const float> k,
                                       absl::Span<const float> v, absl::Span<float> o,
                                       absl::Span<float> lse) = 0;

  // Frees the sequence.
  virtual absl::Status ReleaseSequence(const SequenceId& seq) = 0;

  // Human-readable statistics of the backend and of `seq` (pages, bytes, evictions), for logs.
  virtual absl::StatusOr<std::string> DescribeStats(const SequenceId& seq) = 0;
};

// The bytes of f32 values, as the backends hand K/V (the model's dtype is f32) to Headwise.
inline absl::Span<const std::byte> AsBytes(absl::Span<const float> values) {
  return absl::MakeConstSpan(reinterpret_cast<const std::byte*>(values.data()),
                             values.size() * sizeof(float));
}

}  // namespace headwise::llama2

#endif  // HEADWISE_CLIENTS_LLAMA2_KV_BACKEND_H_
