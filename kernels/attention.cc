// Argument validation for kernels/attention.h, then the CPU backend.

#include "kernels/attention.h"

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "cachesvc/base/layout.h"
#include "cachesvc/base/status_macros.h"
#include "kernels/cpu/cpu_attention.h"

namespace headwise::kernels {
namespace {

absl::Status Invalid(const absl::FormatSpec<>& message) {
  return absl::InvalidArgumentError(absl::StrFormat(message));
}

bool IsKnownDType(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16;
}

absl::Status ValidateQueryHeads(const PagedKvView& kv, int num_q_heads) {
  if (num_q_heads <= 0 || num_q_heads % kv.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("num_q_heads (%d) must be a positive multiple of num_kv_heads (%d)",
                        num_q_heads, kv.num_kv_heads));
  }
  return absl::OkStatus();
}

// The mixed-precision part of a view: formats, pools, slots and the KIVI group size.
absl::Status ValidatePageFormats(const PagedKvView& kv) {
  if (kv.token_bias != nullptr) {
    return Invalid("a mixed-precision view takes page_bias, not token_bias (slots are per pool)");
  }
  bool any_kivi = false;
  const int32_t total_pages = kv.indptr[kv.num_kv_heads];
  for (int32_t j = 0; j < total_pages; ++j) {
    const int f = kv.page_format[j];
    if (f >= kNumPageFormats) {
      return absl::InvalidArgumentError(
          absl::StrFormat("page_format[%d] = %d is not a page format", j, f));
    }
    if (kv.format_pool[f] == nullptr || kv.indices[j] >= kv.format_slots[f]) {
      return absl::InvalidArgumentError(
          absl::StrFormat("indices[%d] = %d is outside the %s pool (%d slots)", j, kv.indices[j],
                          PageFormatName(static_cast<PageFormat>(f)), kv.format_slots[f]));
    }
    any_kivi |= PageFormatBits(static_cast<PageFormat>(f)) > 0;
  }
  const int g = kv.quant_group_size;
  if (any_kivi && (g < 8 || g % 8 != 0 || kv.page_tokens % g != 0 || kv.head_dim % g != 0)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "quant_group_size %d must be a multiple of 8 dividing page_tokens %d and head_dim %d", g,
        kv.page_tokens, kv.head_dim));
  }
  return absl::OkStatus();
}

}  // namespace

const char* PageFormatName(PageFormat f) {
  switch (f) {
    case PageFormat::kF32:
      return "f32";
    case PageFormat::kF16:
      return "f16";
    case PageFormat::kBF16:
      return "bf16";
    case PageFormat::kInt8:
      return "int8";
    case PageFormat::kInt4:
      return "int4";
    case PageFormat::kInt2:
      return "int2";
  }
  return "unknown";
}

int64_t FormatPageBytes(PageFormat f, int page_tokens, int head_dim, int group_size) {
  const int bits = PageFormatBits(f);
  if (bits == 0) return PageBytes(page_tokens, head_dim, PageFormatDType(f));
  return QuantizedPageBytes(page_tokens, head_dim, QuantParams{bits, group_size});
}

absl::Status ValidatePagedKvView(const PagedKvView& kv) {
  if (kv.num_kv_heads <= 0) return Invalid("num_kv_heads must be positive");
  if (kv.page_tokens <= 0) return Invalid("page_tokens must be positive");
  if (!IsSupportedHeadDim(kv.head_dim)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("unsupported head_dim %d (8, 16, 32, 64, 96, 128, 256)", kv.head_dim));
  }
  if (!IsKnownDType(kv.dtype)) return Invalid("unknown dtype");
  if (kv.indptr == nullptr) return Invalid("indptr is required");
  if (kv.last_page_len == nullptr && kv.page_len == nullptr) {
    return Invalid("last_page_len is required when page_len is not set");
  }
  if (kv.indptr[0] != 0) return Invalid("indptr[0] must be 0");
  for (int h = 0; h < kv.num_kv_heads; ++h) {
    const int32_t pages = kv.indptr[h + 1] - kv.indptr[h];
    if (pages < 0) return Invalid("indptr must be non-decreasing");
    if (kv.page_len == nullptr && pages > 0 &&
        (kv.last_page_len[h] < 1 || kv.last_page_len[h] > kv.page_tokens)) {
      return absl::InvalidArgumentError(absl::StrFormat("last_page_len[%d] = %d is outside 1..%d",
                                                        h, kv.last_page_len[h], kv.page_tokens));
    }
  }
  const int32_t total_pages = kv.indptr[kv.num_kv_heads];
  const bool mixed = kv.page_format != nullptr;
  if (total_pages > 0 &&
      (kv.indices == nullptr || (!mixed && (kv.pool == nullptr || kv.num_slots <= 0)))) {
    return Invalid("indices, pool and num_slots are required when pages exist");
  }
  if (kv.token_bias != nullptr && kv.page_bias != nullptr) {
    return Invalid("token_bias and page_bias are exclusive");
  }
  for (int32_t j = 0; j < total_pages; ++j) {
    if (kv.indices[j] < 0 || (!mixed && kv.indices[j] >= kv.num_slots)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("indices[%d] = %d is outside the pool", j, kv.indices[j]));
    }
    if (kv.page_len != nullptr && (kv.page_len[j] < 1 || kv.page_len[j] > kv.page_tokens)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("page_len[%d] = %d is outside 1..%d", j, kv.page_len[j], kv.page_tokens));
    }
  }
  return mixed ? ValidatePageFormats(kv) : absl::OkStatus();
}

absl::Status DecodeAttention(const PagedKvView& kv, const DecodeArgs& args) {
  RETURN_IF_ERROR(ValidatePagedKvView(kv));
  RETURN_IF_ERROR(ValidateQueryHeads(kv, args.num_q_heads));
  if (args.q == nullptr || args.o == nullptr) return Invalid("q and o are required");
  if (!(args.scale >= 0.0f)) return Invalid("scale must be >= 0 (0 means 1/sqrt(head_dim))");
  cpu::Decode(kv, args);
  return absl::OkStatus();
}

absl::Status PrefillAttention(const PagedKvView& kv, const PrefillArgs& args) {
  RETURN_IF_ERROR(ValidatePagedKvView(kv));
  RETURN_IF_ERROR(ValidateQueryHeads(kv, args.num_q_heads));
  if (args.num_tokens <= 0) return Invalid("num_tokens must be positive");
  if (args.q == nullptr || args.o == nullptr || args.k_new == nullptr || args.v_new == nullptr) {
    return Invalid("q, k_new, v_new and o are required");
  }
  if (!(args.scale >= 0.0f)) return Invalid("scale must be >= 0 (0 means 1/sqrt(head_dim))");
  // Mixed-precision and page-biased views take the row-wise kernel, which reads every page
  // through its own format; the blocked kernel packs float pages only.
  if (kv.page_format != nullptr || kv.page_bias != nullptr) {
    cpu::PrefillRowwise(kv, args);
  } else {
    cpu::Prefill(kv, args);
  }
  if (args.cancel != nullptr && args.cancel->load(std::memory_order_relaxed)) {
    return absl::CancelledError("prefill cancelled");
  }
  return absl::OkStatus();
}

absl::Status MergeAttentionStates(const float* const* o_parts, const float* const* lse_parts,
                                  int num_parts, int rows, int head_dim, float* o_out,
                                  float* lse_out) {
  if (num_parts < 1) return Invalid("num_parts must be positive");
  if (rows < 1 || head_dim < 1) return Invalid("rows and head_dim must be positive");
  if (o_parts == nullptr || lse_parts == nullptr || o_out == nullptr || lse_out == nullptr) {
    return Invalid("o_parts, lse_parts, o_out and lse_out are required");
  }
  for (int p = 0; p < num_parts; ++p) {
    if (o_parts[p] == nullptr || lse_parts[p] == nullptr) return Invalid("null part");
  }
  cpu::MergeStates(o_parts, lse_parts, num_parts, rows, head_dim, o_out, lse_out);
  return absl::OkStatus();
}

}  // namespace headwise::kernels
