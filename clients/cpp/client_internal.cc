#include "clients/cpp/client_internal.h"

#include <cstring>
#include <filesystem>

#include "absl/strings/match.h"
#include "cachesvc/base/status_macros.h"

namespace headwise::client::internal {

std::string NormalizeTarget(const std::string& target) {
  absl::string_view rest = target;
  if (absl::StartsWith(rest, "unix://")) {
    rest.remove_prefix(7);
  } else if (absl::StartsWith(rest, "unix:")) {
    rest.remove_prefix(5);
  } else {
    return target;
  }
  std::filesystem::path path{std::string(rest)};
  if (path.is_relative()) path = std::filesystem::absolute(path).lexically_normal();
  return absl::StrCat("unix://", path.string());
}

void SetInline(v1::Tensor* tensor, v1::DTypeProto dtype, std::initializer_list<int64_t> shape,
               const void* data, size_t bytes) {
  tensor->set_dtype(dtype);
  for (int64_t d : shape) tensor->add_shape(d);
  tensor->set_data(data, bytes);
}

void SetStaged(v1::Tensor* tensor, v1::DTypeProto dtype, std::initializer_list<int64_t> shape,
               const StagingRegion& region, uint64_t offset, uint64_t length) {
  tensor->set_dtype(dtype);
  for (int64_t d : shape) tensor->add_shape(d);
  v1::StagedBytes* staged = tensor->mutable_staged();
  staged->set_region_id(region.id());
  staged->set_offset(offset);
  staged->set_length(length);
}

uint64_t KvBytes(const ModelLayout& layout, int num_tokens) {
  return uint64_t(num_tokens) * layout.num_kv_heads * layout.head_dim * DTypeSize(layout.dtype);
}
uint64_t QBytes(const ModelLayout& layout) {
  return uint64_t(layout.num_q_heads) * layout.head_dim * sizeof(float);
}

void SetQInline(v1::Tensor* tensor, const ModelLayout& layout, absl::Span<const float> q) {
  SetInline(tensor, v1::DTYPE_F32, {layout.num_q_heads, layout.head_dim}, q.data(),
            q.size() * sizeof(float));
}
void SetKvInline(v1::Tensor* tensor, const ModelLayout& layout, absl::Span<const std::byte> data,
                 int num_tokens) {
  SetInline(tensor, ToProto(layout.dtype), {num_tokens, layout.num_kv_heads, layout.head_dim},
            data.data(), data.size());
}
void SetKvStaged(v1::Tensor* tensor, const ModelLayout& layout, const StagingRegion& region,
                 uint64_t offset, int num_tokens) {
  SetStaged(tensor, ToProto(layout.dtype), {num_tokens, layout.num_kv_heads, layout.head_dim},
            region, offset, KvBytes(layout, num_tokens));
}

absl::StatusOr<std::vector<float>> InlineFloats(const v1::Tensor& tensor, const char* what) {
  if (!tensor.has_data() && tensor.has_staged()) {
    return absl::InternalError(absl::StrCat("reply's ", what, " is staged, expected inline"));
  }
  const std::string& data = tensor.data();
  if (data.size() % sizeof(float) != 0) {
    return absl::InternalError(absl::StrCat("reply's ", what, " has ", data.size(), " bytes"));
  }
  std::vector<float> out(data.size() / sizeof(float));
  std::memcpy(out.data(), data.data(), data.size());
  return out;
}

absl::StatusOr<AttendOutput> InlineOutput(const v1::Tensor& o, const v1::Tensor& lse,
                                          int64_t layer_length) {
  AttendOutput out;
  ASSIGN_OR_RETURN(out.o, InlineFloats(o, "o"));
  ASSIGN_OR_RETURN(out.lse, InlineFloats(lse, "lse"));
  out.layer_length = layer_length;
  return out;
}

absl::StatusOr<StagedOutput> StagedOutputOf(const v1::Tensor& o, const v1::Tensor& lse,
                                            int64_t layer_length) {
  if (!o.has_staged() || !lse.has_staged()) {
    return absl::InternalError("reply's o/lse are inline, expected staged");
  }
  return StagedOutput{o.staged().offset(), lse.staged().offset(), layer_length};
}

void SetOutput(v1::OutputPlacement* output, const StagingRegion& region, uint64_t offset) {
  output->set_region_id(region.id());
  output->set_offset(offset);
}

}  // namespace headwise::client::internal
