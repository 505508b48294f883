// Test helpers for mixed-precision heads: a random paged KV cache whose every page has its own
// format (f32/f16/bf16 or KIVI int8/int4/int2), each format in its own pool with scattered
// slots, plus what a float64 reference needs: the values the kernel must see (dtype-rounded or
// dequantized) and the original values before quantization.
#ifndef HEADWISE_TESTS_KERNELS_MIXED_KV_FIXTURE_H_
#define HEADWISE_TESTS_KERNELS_MIXED_KV_FIXTURE_H_

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "cachesvc/base/dtype.h"
#include "gtest/gtest.h"
#include "kernels/attention.h"

namespace headwise::kernels::testing {

// One page of the cache: its format, valid rows, and K/V (P x D each) before and after storage.
struct MixedPage {
  PageFormat format = PageFormat::kF16;
  int len = 0;
  std::vector<float> k_orig, v_orig;  // What was written (f32).
  std::vector<float> k, v;            // What the page holds, decoded to f32.
};

class MixedPagedKv {
 public:
  // pages_of_head[h][i] = {format, len} of head h's i-th page. Keys get a per-channel offset
  // and spread (KIVI's outlier channels) so that per-channel groups matter.
  struct PageSpec {
    PageFormat format;
    int len;
  };
  MixedPagedKv(int head_dim, int page_tokens, int group_size,
               const std::vector<std::vector<PageSpec>>& pages_of_head, uint32_t seed)
      : d_(head_dim), p_(page_tokens), g_(group_size) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> channel_mean(d_), channel_spread(d_);
    for (int c = 0; c < d_; ++c) {
      channel_mean[c] = normal(rng);
      channel_spread[c] = std::exp(0.5f * normal(rng));
    }
    indptr_.push_back(0);
    int64_t count[kNumPageFormats] = {};
    for (const auto& head : pages_of_head) {
      for (const PageSpec& spec : head) {
        MixedPage page;
        page.format = spec.format;
        page.len = spec.len;
        for (int i = 0; i < p_ * d_; ++i) {
          const int c = i % d_;
          page.k_orig.push_back(channel_mean[c] + channel_spread[c] * normal(rng));
          page.v_orig.push_back(normal(rng));
        }
        pages_.push_back(std::move(page));
        ++count[static_cast<int>(spec.format)];
      }
      indptr_.push_back(static_cast<int32_t>(pages_.size()));
    }
    // Each format's pool: its pages in shuffled slots, with two spare slots of random bytes.
    std::vector<std::vector<int32_t>> free_slots(kNumPageFormats);
    for (int f = 0; f < kNumPageFormats; ++f) {
      slots_[f] = count[f] > 0 ? count[f] + 2 : 0;
      pools_[f].resize(slots_[f] * SlotBytes(static_cast<PageFormat>(f)));
      for (std::byte& b : pools_[f]) b = static_cast<std::byte>(rng() & 0x3f);
      free_slots[f].resize(slots_[f]);
      std::iota(free_slots[f].begin(), free_slots[f].end(), 0);
      std::shuffle(free_slots[f].begin(), free_slots[f].end(), rng);
    }
    for (MixedPage& page : pages_) {
      const int f = static_cast<int>(page.format);
      indices_.push_back(free_slots[f].back());
      free_slots[f].pop_back();
      formats_.push_back(static_cast<uint8_t>(f));
      lens_.push_back(page.len);
      Store(page, indices_.back());
    }
  }

  // Replaces token t of page j by (k, v) (in f32, before storage) and gives it logit bias `bias`
  // (page_bias); re-stores the page. The page's other tokens keep their values.
  void SetToken(int32_t j, int t, const float* k, const float* v, float bias) {
    MixedPage& page = pages_[j];
    std::copy_n(k, d_, page.k_orig.begin() + int64_t{t} * d_);
    std::copy_n(v, d_, page.v_orig.begin() + int64_t{t} * d_);
    if (bias_.empty()) bias_.assign(pages_.size() * p_, 0.0f);
    bias_[int64_t{j} * p_ + t] = bias;
    Store(page, indices_[j]);
  }

  PagedKvView view() const {
    PagedKvView kv;
    kv.indptr = indptr_.data();
    kv.indices = indices_.data();
    kv.page_len = lens_.data();
    kv.page_format = formats_.data();
    for (int f = 0; f < kNumPageFormats; ++f) {
      kv.format_pool[f] = pools_[f].empty() ? nullptr : pools_[f].data();
      kv.format_slots[f] = slots_[f];
    }
    kv.page_bias = bias_.empty() ? nullptr : bias_.data();
    kv.quant_group_size = g_;
    kv.num_kv_heads = static_cast<int>(indptr_.size()) - 1;
    kv.page_tokens = p_;
    kv.head_dim = d_;
    kv.dtype = DType::kF32;
    return kv;
  }

  int num_kv_heads() const { return static_cast<int>(indptr_.size()) - 1; }
  const MixedPage& page(int32_t j) const { return pages_[j]; }
  int32_t first_page(int h) const { return indptr_[h]; }
  int32_t end_page(int h) const { return indptr_[h + 1]; }
  float bias(int32_t j, int t) const { return bias_.empty() ? 0.0f : bias_[int64_t{j} * p_ + t]; }
  int64_t SlotBytes(PageFormat f) const { return FormatPageBytes(f, p_, d_, g_); }

 private:
  // Writes the page into its slot and records what the kernel will read back.
  void Store(MixedPage& page, int32_t slot) {
    const int f = static_cast<int>(page.format);
    std::byte* at = pools_[f].data() + slot * SlotBytes(page.format);
    const int bits = PageFormatBits(page.format);
    const DType dtype = bits > 0 ? DType::kF32 : PageFormatDType(page.format);
    std::vector<std::byte> full(PageBytes(p_, d_, dtype));
    const int64_t elems = int64_t{p_} * d_;
    for (int64_t i = 0; i < elems; ++i) {
      StoreFromFloat(full.data(), dtype, i, page.k_orig[i]);
      StoreFromFloat(full.data(), dtype, elems + i, page.v_orig[i]);
    }
    if (bits > 0) {
      ASSERT_TRUE(QuantizePage(full.data(), dtype, p_, d_, QuantParams{bits, g_}, at).ok());
      ASSERT_TRUE(DequantizePage(at, p_, d_, QuantParams{bits, g_}, dtype, full.data()).ok());
    } else {
      std::copy(full.begin(), full.end(), at);
    }
    page.k.resize(elems);
    page.v.resize(elems);
    for (int64_t i = 0; i < elems; ++i) {
      page.k[i] = LoadAsFloat(full.data(), dtype, i);
      page.v[i] = LoadAsFloat(full.data(), dtype, elems + i);
    }
  }

  int d_, p_, g_;
  std::vector<MixedPage> pages_;
  std::vector<int32_t> indptr_, indices_, lens_;
  std::vector<uint8_t> formats_;
  std::vector<std::byte> pools_[kNumPageFormats];
  int64_t slots_[kNumPageFormats] = {};
  std::vector<float> bias_;
};

// A random page spec list: `pages` pages per head with formats drawn from `formats` and lengths
// in 1..P (or all P when `full`).
inline std::vector<std::vector<MixedPagedKv::PageSpec>> RandomSpecs(
    int heads, int pages, int page_tokens, const std::vector<PageFormat>& formats, bool full,
    uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<MixedPagedKv::PageSpec>> specs(heads);
  for (auto& head : specs) {
    for (int i = 0; i < pages; ++i) {
      const PageFormat f = formats[rng() % formats.size()];
      const int len = full ? page_tokens : 1 + static_cast<int>(rng() % page_tokens);
      head.push_back({f, len});
    }
  }
  return specs;
}

}  // namespace headwise::kernels::testing

#endif  // HEADWISE_TESTS_KERNELS_MIXED_KV_FIXTURE_H_
