#include "cachesvc/service/tensor_io.h"

#include <cstring>
#include <string_view>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cachesvc/base/status_macros.h"

namespace headwise {
namespace {

using headwise::v1::Tensor;

int64_t Product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// The bit layout of one floating-point dtype: an element is NaN or infinite when every exponent
// bit is set (then NaN when any mantissa bit is set).
template <typename Bits>
struct FloatBits {
  Bits exponent;
  Bits mantissa;
  Bits sign;
};
constexpr FloatBits<uint32_t> kF32Bits = {0x7f800000u, 0x007fffffu, 0x80000000u};
constexpr FloatBits<uint16_t> kF16Bits = {0x7c00u, 0x03ffu, 0x8000u};
constexpr FloatBits<uint16_t> kBF16Bits = {0x7f80u, 0x007fu, 0x8000u};

// Whether any lane of `w` (lanes of sizeof(Bits) bytes) has every bit of `exponent` set, i.e.
// is NaN or infinite. SWAR: y's lane is 0 exactly for such a lane, and its top bit is always 0
// (the exponent mask has no sign bit), so the classic "has a zero lane" test is exact.
template <typename Bits>
bool AnyNonFiniteLane(uint64_t w, Bits exponent) {
  constexpr int kLaneBits = 8 * sizeof(Bits);
  uint64_t ones = 0, high = 0, mask = 0;
  for (int lane = 0; lane < 64 / kLaneBits; ++lane) {
    ones |= uint64_t{1} << (lane * kLaneBits);
    high |= uint64_t{1} << (lane * kLaneBits + kLaneBits - 1);
    mask |= uint64_t{exponent} << (lane * kLaneBits);
  }
  const uint64_t y = (w & mask) ^ mask;
  return ((y - ones) & ~y & high) != 0;
}

// The index of the first non-finite element of `bytes`, or -1. The scan reads 8 bytes at a time
// with no early exit (about one instruction per element); the index is searched for only when
// there is one.
template <typename Bits>
int64_t FirstNonFinite(absl::Span<const std::byte> bytes, const FloatBits<Bits>& f, Bits* found) {
  const size_t n = bytes.size() / sizeof(Bits);
  const size_t words = bytes.size() / 8;
  bool any = false;
  for (size_t i = 0; i < words; ++i) {
    uint64_t w;
    std::memcpy(&w, bytes.data() + i * 8, 8);
    any |= AnyNonFiniteLane<Bits>(w, f.exponent);
  }
  for (size_t i = words * 8 / sizeof(Bits); i < n; ++i) {
    Bits x;
    std::memcpy(&x, bytes.data() + i * sizeof(Bits), sizeof(Bits));
    any |= (x & f.exponent) == f.exponent;
  }
  if (!any) return -1;
  for (size_t i = 0; i < n; ++i) {
    std::memcpy(found, bytes.data() + i * sizeof(Bits), sizeof(Bits));
    if ((*found & f.exponent) == f.exponent) return static_cast<int64_t>(i);
  }
  return -1;
}

template <typename Bits>
absl::Status CheckFiniteBits(absl::Span<const std::byte> bytes, const FloatBits<Bits>& f,
                             const char* what) {
  Bits x = 0;
  const int64_t i = FirstNonFinite(bytes, f, &x);
  if (i < 0) return absl::OkStatus();
  const char* kind = (x & f.mantissa) != 0 ? "NaN" : (x & f.sign) != 0 ? "-Inf" : "+Inf";
  return absl::InvalidArgumentError(absl::StrCat(
      what, ": element ", i, " is ", kind, " (K, V and Q must be finite; nothing was changed)"));
}

void SetShape(const std::vector<int64_t>& shape, Tensor* tensor) {
  tensor->set_dtype(headwise::v1::DTYPE_F32);
  for (int64_t d : shape) tensor->add_shape(d);
}

}  // namespace

absl::StatusOr<DType> DTypeFromProto(int dtype) {
  switch (dtype) {
    case headwise::v1::DTYPE_UNSPECIFIED:
    case headwise::v1::DTYPE_F16:
      return DType::kF16;
    case headwise::v1::DTYPE_F32:
      return DType::kF32;
    case headwise::v1::DTYPE_BF16:
      return DType::kBF16;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", dtype));
  }
}

headwise::v1::DTypeProto DTypeToProto(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return headwise::v1::DTYPE_F32;
    case DType::kBF16:
      return headwise::v1::DTYPE_BF16;
    default:
      return headwise::v1::DTYPE_F16;
  }
}

absl::StatusOr<ModelLayout> LayoutFromProto(const headwise::v1::ModelLayoutProto& proto) {
  ModelLayout layout;
  layout.num_layers = proto.num_layers();
  layout.num_q_heads = proto.num_q_heads();
  layout.num_kv_heads = proto.num_kv_heads();
  layout.head_dim = proto.head_dim();
  ASSIGN_OR_RETURN(layout.dtype, DTypeFromProto(proto.dtype()));
  if (proto.has_page_tokens()) layout.page_tokens = proto.page_tokens();
  RETURN_IF_ERROR(ValidateLayout(layout));
  return layout;
}

headwise::v1::ModelLayoutProto LayoutToProto(const ModelLayout& layout) {
  headwise::v1::ModelLayoutProto proto;
  proto.set_num_layers(layout.num_layers);
  proto.set_num_q_heads(layout.num_q_heads);
  proto.set_num_kv_heads(layout.num_kv_heads);
  proto.set_head_dim(layout.head_dim);
  proto.set_dtype(DTypeToProto(layout.dtype));
  proto.set_page_tokens(layout.page_tokens);
  return proto;
}

bool SameLayout(const ModelLayout& a, const ModelLayout& b) {
  return a.num_layers == b.num_layers && a.num_q_heads == b.num_q_heads &&
         a.num_kv_heads == b.num_kv_heads && a.head_dim == b.head_dim && a.dtype == b.dtype &&
         a.page_tokens == b.page_tokens;
}

Tier AppendTier(const headwise::v1::PolicySpec& policy) {
  const auto mode = policy.placement().mode();
  return mode == headwise::v1::Placement::LAYER_OFFLOAD ||
                 mode == headwise::v1::Placement::HEAD_OFFLOAD
             ? Tier::kHost
             : Tier::kDevice;
}

uint64_t MaxAppendBytes(const ModelLayout& layout, int64_t tokens) {
  const uint64_t pages_per_head =
      (static_cast<uint64_t>(tokens) + static_cast<uint64_t>(layout.page_tokens) - 1) /
      static_cast<uint64_t>(layout.page_tokens);
  return pages_per_head * static_cast<uint64_t>(layout.num_kv_heads) *
         static_cast<uint64_t>(layout.page_bytes());
}

absl::Status CheckFinite(absl::Span<const std::byte> bytes, DType dtype, const char* what) {
  switch (dtype) {
    case DType::kF32:
      return CheckFiniteBits(bytes, kF32Bits, what);
    case DType::kF16:
      return CheckFiniteBits(bytes, kF16Bits, what);
    case DType::kBF16:
      return CheckFiniteBits(bytes, kBF16Bits, what);
  }
  return absl::InvalidArgumentError(absl::StrCat(what, ": unknown dtype"));
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

absl::Status CheckLayer(const ModelLayout& layout, int layer) {
  if (layer < 0 || layer >= layout.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " is not in [0, ", layout.num_layers, ")"));
  }
  return absl::OkStatus();
}

absl::Status CheckCallTokens(const char* rpc, int64_t tokens, int64_t limit) {
  if (tokens <= limit) return absl::OkStatus();
  return absl::ResourceExhaustedError(
      absl::StrCat(rpc, " carries ", tokens, " tokens; one call may carry at most ", limit,
                   " (admission.max_", std::string_view(rpc) == "Prefill" ? "prefill" : "append",
                   "_tokens_per_call): split it into chunks"));
}

absl::StatusOr<int> TokenCount(const Tensor& tensor, const char* what) {
  if (tensor.shape_size() != 3 || tensor.shape(0) < 1 || tensor.shape(0) > kMaxTokensPerCall) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": shape must be [T][heads][head_dim] with 1 <= T <= ", kMaxTokensPerCall, ", got ",
        ShapeString({tensor.shape().begin(), tensor.shape().end()})));
  }
  return static_cast<int>(tensor.shape(0));
}

std::vector<float> CopyFloats(absl::Span<const std::byte> bytes) {
  std::vector<float> out(bytes.size() / sizeof(float));
  if (!bytes.empty()) std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

absl::StatusOr<InputBytes> TensorBytes(const StagingRegistry& staging, const std::string& tenant,
                                       const Tensor& tensor, const char* what, DType dtype,
                                       const std::vector<int64_t>& shape) {
  ASSIGN_OR_RETURN(DType got, DTypeFromProto(tensor.dtype()));
  if (got != dtype) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": dtype ", std::string(DTypeName(got)),
                                                   " does not match the expected ",
                                                   std::string(DTypeName(dtype))));
  }
  const std::vector<int64_t> got_shape(tensor.shape().begin(), tensor.shape().end());
  if (got_shape != shape) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": shape ", ShapeString(got_shape), " is not ", ShapeString(shape)));
  }
  const uint64_t expected = static_cast<uint64_t>(Product(shape)) * DTypeSize(dtype);
  InputBytes bytes;
  switch (tensor.payload_case()) {
    case Tensor::kData:
      if (tensor.data().size() != expected) {
        return absl::InvalidArgumentError(absl::StrCat(what, ": payload has ", tensor.data().size(),
                                                       " bytes, shape ", ShapeString(shape),
                                                       " needs ", expected));
      }
      bytes.span = absl::Span<const std::byte>(
          reinterpret_cast<const std::byte*>(tensor.data().data()), tensor.data().size());
      RETURN_IF_ERROR(CheckFinite(bytes.span, dtype, what));
      return bytes;
    case Tensor::kStaged: {
      const auto& staged = tensor.staged();
      if (staged.length() != expected) {
        return absl::InvalidArgumentError(absl::StrCat(what, ": staged length ", staged.length(),
                                                       ", shape ", ShapeString(shape), " needs ",
                                                       expected));
      }
      ASSIGN_OR_RETURN(bytes.region, staging.Find(tenant, staged.region_id()));
      ASSIGN_OR_RETURN(absl::Span<std::byte> range,
                       bytes.region->Range(staged.offset(), staged.length()));
      bytes.span = range;
      RETURN_IF_ERROR(CheckFinite(bytes.span, dtype, what));
      return bytes;
    }
    case Tensor::PAYLOAD_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError(absl::StrCat(what, ": no payload (data or staged)"));
}

absl::StatusOr<OutputTarget> OutputTarget::Resolve(const StagingRegistry& staging,
                                                   const std::string& tenant,
                                                   const headwise::v1::OutputPlacement& placement,
                                                   std::vector<int64_t> o_shape,
                                                   std::vector<int64_t> lse_shape) {
  OutputTarget target;
  target.o_floats_ = static_cast<size_t>(Product(o_shape));
  target.lse_floats_ = static_cast<size_t>(Product(lse_shape));
  target.o_shape_ = std::move(o_shape);
  target.lse_shape_ = std::move(lse_shape);
  if (!placement.region_id().empty()) {
    ASSIGN_OR_RETURN(target.region_, staging.Find(tenant, placement.region_id()));
    ASSIGN_OR_RETURN(target.range_, target.region_->Range(
                                        placement.offset(),
                                        (target.o_floats_ + target.lse_floats_) * sizeof(float)));
    target.region_id_ = placement.region_id();
    target.offset_ = placement.offset();
  }
  return target;
}

void OutputTarget::Write(absl::Span<const float> o, absl::Span<const float> lse, Tensor* o_out,
                         Tensor* lse_out) const {
  const uint64_t o_bytes = o.size() * sizeof(float);
  const uint64_t lse_bytes = lse.size() * sizeof(float);
  SetShape(o_shape_, o_out);
  SetShape(lse_shape_, lse_out);
  if (region_ == nullptr) {
    o_out->set_data(reinterpret_cast<const char*>(o.data()), o_bytes);
    lse_out->set_data(reinterpret_cast<const char*>(lse.data()), lse_bytes);
    return;
  }
  if (o_bytes > 0) std::memcpy(range_.data(), o.data(), o_bytes);
  if (lse_bytes > 0) std::memcpy(range_.data() + o_bytes, lse.data(), lse_bytes);
  auto* o_staged = o_out->mutable_staged();
  o_staged->set_region_id(region_id_);
  o_staged->set_offset(offset_);
  o_staged->set_length(o_bytes);
  auto* lse_staged = lse_out->mutable_staged();
  lse_staged->set_region_id(region_id_);
  lse_staged->set_offset(offset_ + o_bytes);
  lse_staged->set_length(lse_bytes);
}

}  // namespace headwise
