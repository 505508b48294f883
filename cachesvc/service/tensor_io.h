// Request validation and tensor I/O of the service: proto <-> engine types, the checks every data
// RPC runs before it changes anything, input bytes (inline or staged) and output destinations
// (inline or a staging region, pinned before the engine call).
//
// The rule these helpers serve: a data RPC validates everything, resolves every staging region it
// reads or writes and holds a reference to each (so a concurrent CloseStaging cannot unmap it),
// and only then changes the sequence. Writing the outputs afterwards cannot fail.
#ifndef HEADWISE_CACHESVC_SERVICE_TENSOR_IO_H_
#define HEADWISE_CACHESVC_SERVICE_TENSOR_IO_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cachesvc/base/ids.h"
#include "cachesvc/base/layout.h"
#include "cachesvc/service/staging.h"
#include "headwise/v1/policy.pb.h"
#include "headwise/v1/service.pb.h"

namespace headwise {

// Largest T of one Append or Prefill call.
inline constexpr int64_t kMaxTokensPerCall = int64_t{1} << 20;

// DTYPE_UNSPECIFIED is F16 (the proto default). INVALID_ARGUMENT for an unknown value.
absl::StatusOr<DType> DTypeFromProto(int dtype);
headwise::v1::DTypeProto DTypeToProto(DType dtype);
// A validated layout (ValidateLayout), or INVALID_ARGUMENT.
absl::StatusOr<ModelLayout> LayoutFromProto(const headwise::v1::ModelLayoutProto& proto);
headwise::v1::ModelLayoutProto LayoutToProto(const ModelLayout& layout);
bool SameLayout(const ModelLayout& a, const ModelLayout& b);
// The tier new pages of a sequence with this policy land in: host for the offload placements,
// else device (what tier quotas are checked against before an append).
Tier AppendTier(const headwise::v1::PolicySpec& policy);
// The most bytes an append of `tokens` tokens to one layer can add to its sequence: a head's page
// count grows by at most ceil(tokens / page_tokens) whatever its tail holds, times num_kv_heads
// heads, times layout.page_bytes(). What tier quotas reserve before an append. REQUIRES:
// tokens >= 0 and a valid layout.
uint64_t MaxAppendBytes(const ModelLayout& layout, int64_t tokens);
// "[1,2,3]".
std::string ShapeString(const std::vector<int64_t>& shape);
// INVALID_ARGUMENT unless 0 <= layer < layout.num_layers.
absl::Status CheckLayer(const ModelLayout& layout, int layer);
// The token count T of a [T][heads][head_dim] tensor; INVALID_ARGUMENT for another rank or T
// outside [1, kMaxTokensPerCall].
absl::StatusOr<int> TokenCount(const headwise::v1::Tensor& tensor, const char* what);

// RESOURCE_EXHAUSTED (naming the config field) when one `rpc` call carries more than `limit`
// tokens: a single call's cost is bounded by the daemon's per-call limits.
absl::Status CheckCallTokens(const char* rpc, int64_t tokens, int64_t limit);
std::vector<float> CopyFloats(absl::Span<const std::byte> bytes);

// A request's input bytes: a view of inline or staged bytes, and the region that keeps a staged
// view mapped (null for inline bytes, whose storage is the request).
struct InputBytes {
  absl::Span<const std::byte> span;
  std::shared_ptr<StagingRegion> region;
};

// Validates `tensor` against `dtype` and `shape` (exactly) and returns its bytes. Staged bytes
// must lie in one of `tenant`'s regions of `staging`. Every element must be finite: a NaN or an
// infinity (the f32, f16 and bf16 bit patterns alike) is INVALID_ARGUMENT naming the tensor, the
// element and what it is (CheckFinite). INVALID_ARGUMENT for any other mismatch.
//
// A staged tensor is checked when the call reads it; a client that rewrites its region while its
// own call runs can still slip values past the check into its own sequence (never another
// tenant's).
absl::StatusOr<InputBytes> TensorBytes(const StagingRegistry& staging, const std::string& tenant,
                                       const headwise::v1::Tensor& tensor, const char* what,
                                       DType dtype, const std::vector<int64_t>& shape);

// OK when every element of `bytes` (elements of `dtype`) is finite; otherwise INVALID_ARGUMENT
// "<what>: element <i> is NaN" (or "+Inf", "-Inf") for the first one, plus a note that K, V and
// Q must be finite. One pass over the bytes, no allocation.
absl::Status CheckFinite(absl::Span<const std::byte> bytes, DType dtype, const char* what);

// Where an RPC's f32 outputs o ([rows][num_q_heads][head_dim]) and lse ([rows][num_q_heads]) go:
// inline in the reply, or into a staging region resolved and pinned when the target is made.
class OutputTarget {
 public:
  // Resolves `placement` for outputs of these shapes. INVALID_ARGUMENT when it names a region
  // that is not the tenant's or cannot hold o and lse at its offset. Nothing is written.
  static absl::StatusOr<OutputTarget> Resolve(const StagingRegistry& staging,
                                              const std::string& tenant,
                                              const headwise::v1::OutputPlacement& placement,
                                              std::vector<int64_t> o_shape,
                                              std::vector<int64_t> lse_shape);

  size_t o_floats() const { return o_floats_; }
  size_t lse_floats() const { return lse_floats_; }

  // Writes o and lse (inline into the tensors, or into the pinned region, which the tensors then
  // name). Cannot fail. REQUIRES: o.size() == o_floats(), lse.size() == lse_floats().
  void Write(absl::Span<const float> o, absl::Span<const float> lse, headwise::v1::Tensor* o_out,
             headwise::v1::Tensor* lse_out) const;

 private:
  OutputTarget() = default;
  std::vector<int64_t> o_shape_, lse_shape_;
  size_t o_floats_ = 0, lse_floats_ = 0;
  std::string region_id_;  // Empty: inline.
  uint64_t offset_ = 0;
  std::shared_ptr<StagingRegion> region_;
  absl::Span<std::byte> range_;  // Inside region_: o then lse.
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_SERVICE_TENSOR_IO_H_
