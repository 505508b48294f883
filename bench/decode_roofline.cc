// Decode attention against its roofline, per page format (issue 9, item 5). One Llama-3-8B layer
// (8 KV heads, 32 query heads, head_dim 128, pages of 64 tokens scattered through the pool), all
// pages of one format: f16, bf16 (the float loop) or KIVI int8 / int4 / int2 (group 32, read
// directly by the kernel). For each (tokens, threads, format), measured in the same run on the
// same cores and the same pool:
//   * kernel: median of --reps calls of kernels::DecodeAttention;
//   * read bandwidth: median of --reps plain vectorized f32 reductions over the same pool
//     (SumBytesAsF32), with the same thread count;
//   * multiply-add peak: 16 independent FMA chains per thread on `threads` threads at once
//     (PeakMultiplyAddsOnThreads);
//   each a median of --reps, the three measured in turn rep by rep (the machine is shared);
//   * roofline = max(bytes read / read bandwidth, multiply-adds / peak), where bytes read are the
//     slots of every page (codes, scales and minimums) and multiply-adds are 2 * g * d per token
//     per KV head (QK and PV);
//   * ratio = roofline / kernel time (1.0 = at the roofline); tok/s = tokens * KV heads / time;
//     vs f16 = this format's tok/s over f16's at the same tokens and threads.
// Prints one table row per case, and a JSON line per case with --json.
//
// Usage: decode_roofline [--tokens 65536,1048576] [--threads 1,2]
//                        [--formats f16,bf16,int8,int4,int2] [--reps 7] [--json]

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/membw.h"
#include "cachesvc/base/dtype.h"
#include "kernels/attention.h"

namespace headwise::bench {
namespace {

constexpr int kKvHeads = 8;
constexpr int kQHeads = 32;
constexpr int kHeadDim = 128;
constexpr int kPageTokens = 64;
constexpr int kGroupSize = 32;
// Distinct random pages; the pool repeats them (enough to defeat the caches, cheap to make).
constexpr int kDistinctPages = 256;

using kernels::PageFormat;

// A layer's pages, all of one format, in an mmap'd pool backed by transparent huge pages.
class FormatCache {
 public:
  FormatCache(PageFormat format, int64_t tokens) : format_(format) {
    const int64_t pages_per_head = (tokens + kPageTokens - 1) / kPageTokens;
    pages_ = pages_per_head * kKvHeads;
    slot_bytes_ = kernels::FormatPageBytes(format, kPageTokens, kHeadDim, kGroupSize);
    pool_bytes_ = pages_ * slot_bytes_;
    void* mem =
        mmap(nullptr, pool_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
      std::fprintf(stderr, "mmap of %lld bytes failed\n", static_cast<long long>(pool_bytes_));
      std::exit(1);
    }
    madvise(mem, pool_bytes_, MADV_HUGEPAGE);
    pool_ = static_cast<std::byte*>(mem);
    Fill();
    std::mt19937 rng(17);
    for (int64_t i = 0; i < pages_; ++i) indices_.push_back(static_cast<int32_t>(i));
    // Shuffled within windows of 64 pages: scattered like an engine's allocation over time.
    for (int64_t i = 0; i < pages_; i += 64) {
      std::shuffle(indices_.begin() + i, indices_.begin() + std::min(pages_, i + 64), rng);
    }
    formats_.assign(pages_, static_cast<uint8_t>(format));
    for (int h = 0; h <= kKvHeads; ++h) indptr_.push_back(static_cast<int32_t>(h * pages_per_head));
    last_.assign(kKvHeads, static_cast<int32_t>(tokens - (pages_per_head - 1) * kPageTokens));
  }
  ~FormatCache() { munmap(pool_, pool_bytes_); }
  FormatCache(const FormatCache&) = delete;
  FormatCache& operator=(const FormatCache&) = delete;

  kernels::PagedKvView view() const {
    kernels::PagedKvView kv;
    kv.indptr = indptr_.data();
    kv.indices = indices_.data();
    kv.last_page_len = last_.data();
    kv.num_kv_heads = kKvHeads;
    kv.page_tokens = kPageTokens;
    kv.head_dim = kHeadDim;
    kv.dtype = DType::kF16;
    if (kernels::PageFormatBits(format_) == 0) {
      // The float loop's own path: a single-precision view.
      kv.pool = pool_;
      kv.num_slots = pages_;
      kv.dtype = kernels::PageFormatDType(format_);
    } else {
      kv.page_format = formats_.data();
      kv.format_pool[static_cast<int>(format_)] = pool_;
      kv.format_slots[static_cast<int>(format_)] = pages_;
      kv.quant_group_size = kGroupSize;
    }
    return kv;
  }
  const std::byte* pool() const { return pool_; }
  int64_t pool_bytes() const { return pool_bytes_; }

 private:
  // kDistinctPages random pages (N(0,1) values, keys with per-channel offsets), stored in the
  // format, then repeated through the pool.
  void Fill() {
    std::mt19937 rng(5);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const int bits = kernels::PageFormatBits(format_);
    const DType dtype = bits > 0 ? DType::kF16 : kernels::PageFormatDType(format_);
    std::vector<std::byte> page(kernels::PageBytes(kPageTokens, kHeadDim, dtype));
    const int64_t elems = int64_t{kPageTokens} * kHeadDim;
    const int64_t distinct = std::min<int64_t>(kDistinctPages, pages_);
    for (int64_t p = 0; p < distinct; ++p) {
      for (int64_t i = 0; i < 2 * elems; ++i) {
        const float offset = i < elems ? 0.5f * static_cast<float>(i % kHeadDim % 7) : 0.0f;
        StoreFromFloat(page.data(), dtype, i, offset + normal(rng));
      }
      std::byte* slot = pool_ + p * slot_bytes_;
      if (bits > 0) {
        const kernels::QuantParams params{bits, kGroupSize};
        if (!kernels::QuantizePage(page.data(), dtype, kPageTokens, kHeadDim, params, slot).ok()) {
          std::abort();
        }
      } else {
        std::memcpy(slot, page.data(), page.size());
      }
    }
    const int64_t block = distinct * slot_bytes_;
    for (int64_t at = block; at < pool_bytes_; at += block) {
      std::memcpy(pool_ + at, pool_, std::min(block, pool_bytes_ - at));
    }
  }

  PageFormat format_;
  int64_t pages_ = 0;
  int64_t slot_bytes_ = 0;
  int64_t pool_bytes_ = 0;
  std::byte* pool_ = nullptr;
  std::vector<int32_t> indptr_, indices_, last_;
  std::vector<uint8_t> formats_;
};

template <typename Fn>
double MedianSeconds(int reps, Fn fn) {
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Options {
  std::vector<int64_t> tokens = {65536, int64_t{1} << 20};
  std::vector<int> threads = {1, 2};
  std::vector<PageFormat> formats = {PageFormat::kF16, PageFormat::kBF16, PageFormat::kInt8,
                                     PageFormat::kInt4, PageFormat::kInt2};
  int reps = 7;
  bool json = false;
};

bool ParseFormat(const std::string& name, PageFormat* out) {
  for (int f = 0; f < kernels::kNumPageFormats; ++f) {
    if (name == kernels::PageFormatName(static_cast<PageFormat>(f))) {
      *out = static_cast<PageFormat>(f);
      return true;
    }
  }
  return false;
}

Options ParseOptions(int argc, char** argv) {
  Options o;
  auto fail = [](const std::string& arg) {
    std::fprintf(stderr, "decode_roofline: bad argument %s\n", arg.c_str());
    std::exit(2);
  };
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const std::string value = i + 1 < argc ? argv[i + 1] : "";
    if (arg == "--json") {
      o.json = true;
      continue;
    }
    if (value.empty()) fail(arg);
    ++i;
    if (arg == "--tokens" || arg == "--threads") {
      std::vector<int64_t> list;
      for (absl::string_view part : absl::StrSplit(value, ',')) {
        int64_t n = 0;
        if (!absl::SimpleAtoi(part, &n) || n < 1) fail(arg);
        list.push_back(n);
      }
      if (arg == "--tokens") {
        o.tokens = list;
      } else {
        o.threads.assign(list.begin(), list.end());
      }
    } else if (arg == "--formats") {
      o.formats.clear();
      for (absl::string_view part : absl::StrSplit(value, ',')) {
        PageFormat f;
        if (!ParseFormat(std::string(part), &f)) fail(arg);
        o.formats.push_back(f);
      }
    } else if (arg == "--reps") {
      if (!absl::SimpleAtoi(value, &o.reps) || o.reps < 1) fail(arg);
    } else {
      fail(arg);
    }
  }
  return o;
}

}  // namespace
}  // namespace headwise::bench

int main(int argc, char** argv) {
  using namespace headwise::bench;  // NOLINT: a program's main.
  const Options opt = ParseOptions(argc, argv);
  std::printf("%-5s %8s %3s %10s %8s %8s %9s %11s %7s %9s %6s\n", "fmt", "tokens", "thr",
              "kernel_ms", "KV_GB/s", "mem_GB/s", "peak_GMA", "roofline_ms", "ratio", "Mtok/s",
              "vs_f16");
  std::vector<float> q(kQHeads * kHeadDim), o(q.size()), lse(kQHeads);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& x : q) x = normal(rng);
  for (int64_t tokens : opt.tokens) {
    std::map<int, double> f16_rate;
    for (PageFormat format : opt.formats) {
      const FormatCache cache(format, tokens);
      for (int threads : opt.threads) {
        headwise::kernels::DecodeArgs args;
        args.q = q.data();
        args.num_q_heads = kQHeads;
        args.o = o.data();
        args.lse = lse.data();
        args.num_threads = threads;
        const auto kv = cache.view();
        if (!headwise::kernels::DecodeAttention(kv, args).ok()) return 1;  // Also a warm-up.
        // Kernel, bandwidth and multiply-add peak measured in turn, rep by rep, so that load from
        // other users of the machine hits all three alike; medians of each.
        std::vector<double> kernel_t, read_t, peak_r;
        for (int r = 0; r < opt.reps; ++r) {
          kernel_t.push_back(MedianSeconds(1, [&] { (void)DecodeAttention(kv, args); }));
          read_t.push_back(MedianSeconds(1, [&] {
            volatile float sink = SumBytesAsF32(cache.pool(), cache.pool_bytes(), threads);
            (void)sink;
          }));
          peak_r.push_back(PeakMultiplyAddsOnThreads(threads));
        }
        const double kernel_s = Median(kernel_t);
        const double read_s = Median(read_t);
        const double peak = Median(peak_r);
        const double madds = 2.0 * (kQHeads / kKvHeads) * kHeadDim * double(tokens) * kKvHeads;
        const double roofline_s = std::max(read_s, madds / peak);
        const double rate = double(tokens) * kKvHeads / kernel_s;
        if (format == PageFormat::kF16) f16_rate[threads] = rate;
        const double vs_f16 = f16_rate.count(threads) ? rate / f16_rate[threads] : 0.0;
        const char* name = headwise::kernels::PageFormatName(format);
        std::printf("%-5s %8lld %3d %10.3f %8.2f %8.2f %9.1f %11.3f %7.2f %9.1f %6.2f\n", name,
                    static_cast<long long>(tokens), threads, kernel_s * 1e3,
                    cache.pool_bytes() / kernel_s / 1e9, cache.pool_bytes() / read_s / 1e9,
                    peak / 1e9, roofline_s * 1e3, roofline_s / kernel_s, rate / 1e6, vs_f16);
        if (opt.json) {
          std::printf(
              "{\"format\":\"%s\",\"tokens\":%lld,\"threads\":%d,\"kernel_s\":%.6g,"
              "\"read_s\":%.6g,\"madd_s\":%.6g,\"roofline_s\":%.6g,\"bytes\":%lld}\n",
              name, static_cast<long long>(tokens), threads, kernel_s, read_s, madds / peak,
              roofline_s, static_cast<long long>(cache.pool_bytes()));
        }
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
