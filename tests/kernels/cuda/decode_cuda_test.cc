// The CUDA decode and merge kernels against a float64 reference computed here from the same
// stored (rounded) page values. Tests that need a GPU skip when DeviceAvailable() is false;
// the argument-validation tests run everywhere, since validation happens before any CUDA call.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "cachesvc/base/dtype.h"
#include "kernels/attention.h"
#include "kernels/cuda/attention_cuda.h"

namespace headwise::kernels::cuda {
namespace {

constexpr double kRelTol = 1e-5;  // f32 accumulation against the float64 reference.
constexpr float kInf = std::numeric_limits<float>::infinity();

#define SKIP_WITHOUT_GPU()                                                        \
  do {                                                                            \
    if (!DeviceAvailable()) {                                                     \
      GTEST_SKIP() << "no CUDA device (cudaGetDeviceCount reports none): the "    \
                      "CUDA kernels are compiled but not exercised on this host"; \
    }                                                                             \
  } while (false)

// A device allocation owned by the test, uploaded from and downloaded to host vectors.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) {
    // Never a null pointer, even for an empty array: the API rejects null required arrays.
    EXPECT_EQ(cudaMalloc(&ptr_, std::max<size_t>(bytes, 16)), cudaSuccess);
  }
  template <typename T>
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size() * sizeof(T)) {
    EXPECT_EQ(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  template <typename T>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  template <typename T>
  std::vector<T> Download(size_t count) const {
    std::vector<T> host(count);
    EXPECT_EQ(cudaMemcpy(host.data(), ptr_, count * sizeof(T), cudaMemcpyDeviceToHost),
              cudaSuccess);
    return host;
  }

 private:
  void* ptr_ = nullptr;
};

// Uniform in ±[0.1, 1]: never zero, both signs.
float RandomNonZero(std::mt19937& rng) {
  std::uniform_real_distribution<float> magnitude(0.1f, 1.0f);
  return std::bernoulli_distribution(0.5)(rng) ? magnitude(rng) : -magnitude(rng);
}

// One sequence's paged KV for one layer, on the host, with its CSR table.
struct HostKv {
  int num_kv_heads = 0;
  int page_tokens = 0;
  int head_dim = 0;
  DType dtype = DType::kF32;
  int64_t num_slots = 0;
  std::vector<std::byte> pool;
  std::vector<int32_t> indptr;
  std::vector<int32_t> indices;
  std::vector<int32_t> last_page_len;
  std::vector<int32_t> page_len;  // Per CSR page position (sparse heads); empty: dense rule.
  std::vector<float> bias;        // Empty: no bias.

  // Valid tokens of CSR page position j of head h.
  int PageTokens(int h, int j) const {
    if (!page_len.empty()) return page_len[j];
    return j == indptr[h + 1] - 1 ? last_page_len[h] : page_tokens;
  }
  int64_t HeadTokens(int h) const {
    int64_t n = 0;
    for (int j = indptr[h]; j < indptr[h + 1]; ++j) n += PageTokens(h, j);
    return n;
  }
  // Stored element `d` of the K (v = false) or V row of token `t` of slot `slot`.
  double Load(int64_t slot, bool v, int t, int d) const {
    const int64_t element = slot * 2 * page_tokens * head_dim +
                            (v ? int64_t{page_tokens} * head_dim : 0) + int64_t{t} * head_dim + d;
    return LoadAsFloat(pool.data(), dtype, element);
  }
};

// Fills the pool of `kv` (its CSR counts already set): pages go to randomly shuffled slots of a
// pool with spare slots, so the table is out of order and not contiguous. Every element is
// random and non-zero, including the rows past a partial page.
void FillPool(HostKv& kv, bool with_bias, std::mt19937& rng) {
  const int page_tokens = kv.page_tokens;
  const int head_dim = kv.head_dim;
  const DType dtype = kv.dtype;
  const int total_pages = kv.indptr.back();
  kv.num_slots = total_pages + 7;
  std::vector<int32_t> slots(kv.num_slots);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng);
  kv.indices.assign(slots.begin(), slots.begin() + total_pages);

  const int64_t elements = kv.num_slots * 2 * page_tokens * head_dim;
  kv.pool.resize(elements * DTypeSize(dtype));
  for (int64_t i = 0; i < elements; ++i)
    StoreFromFloat(kv.pool.data(), dtype, i, RandomNonZero(rng));
  if (with_bias) {
    std::uniform_real_distribution<float> bias(0.0f, 2.0f);  // ln(n) for up to ~7 merged.
    kv.bias.resize(kv.num_slots * page_tokens);
    for (float& b : kv.bias) b = bias(rng);
  }
}

// The shape of a layout whose CSR table is still empty (indptr = {0}).
HostKv NoPages(int num_kv_heads, int page_tokens, int head_dim, DType dtype) {
  HostKv kv;
  kv.num_kv_heads = num_kv_heads;
  kv.page_tokens = page_tokens;
  kv.head_dim = head_dim;
  kv.dtype = dtype;
  kv.indptr.push_back(0);
  return kv;
}

// Heads hold `head_tokens[h]` tokens, every page full but the last (last_page_len).
HostKv MakeKv(const std::vector<int>& head_tokens, int page_tokens, int head_dim, DType dtype,
              bool with_bias, std::mt19937& rng) {
  HostKv kv = NoPages(static_cast<int>(head_tokens.size()), page_tokens, head_dim, dtype);
  for (int tokens : head_tokens) {
    const int pages = (tokens + page_tokens - 1) / page_tokens;
    kv.indptr.push_back(kv.indptr.back() + pages);
    kv.last_page_len.push_back(pages == 0 ? 1 : tokens - (pages - 1) * page_tokens);
  }
  FillPool(kv, with_bias, rng);
  return kv;
}

// Sparse heads (after token-level eviction): head h has head_pages[h] pages, each holding a
// random count in 1..page_tokens (page_len); no last_page_len.
HostKv MakeSparseKv(const std::vector<int>& head_pages, int page_tokens, int head_dim, DType dtype,
                    bool with_bias, std::mt19937& rng) {
  HostKv kv = NoPages(static_cast<int>(head_pages.size()), page_tokens, head_dim, dtype);
  std::uniform_int_distribution<int32_t> count(1, page_tokens);
  for (int pages : head_pages) {
    kv.indptr.push_back(kv.indptr.back() + pages);
    for (int k = 0; k < pages; ++k) kv.page_len.push_back(count(rng));
  }
  FillPool(kv, with_bias, rng);
  return kv;
}

// float64 decode reference over the stored values.
struct Reference {
  std::vector<double> o;            // [num_q_heads][head_dim]
  std::vector<double> o_scale;      // [num_q_heads][head_dim]: sum_i p_i |v_i|, the error scale.
  std::vector<double> lse;          // [num_q_heads]
  std::vector<double> token_probs;  // [pages][page_tokens]
  std::vector<double> page_mass;    // [pages]
};

Reference ComputeReference(const HostKv& kv, const std::vector<float>& q, int num_q_heads,
                           double scale) {
  const int group = num_q_heads / kv.num_kv_heads;
  const int d_max = kv.head_dim;
  Reference ref;
  ref.o.assign(int64_t{num_q_heads} * d_max, 0.0);
  ref.o_scale.assign(int64_t{num_q_heads} * d_max, 0.0);
  ref.lse.assign(num_q_heads, -std::numeric_limits<double>::infinity());
  ref.token_probs.assign(int64_t{kv.indptr.back()} * kv.page_tokens, 0.0);
  ref.page_mass.assign(kv.indptr.back(), 0.0);
  for (int qh = 0; qh < num_q_heads; ++qh) {
    const int h = qh / group;
    if (kv.HeadTokens(h) == 0) continue;
    std::vector<double> logits;
    for (int j = kv.indptr[h]; j < kv.indptr[h + 1]; ++j) {
      const int tokens = kv.PageTokens(h, j);
      for (int t = 0; t < tokens; ++t) {
        double dot = 0.0;
        for (int d = 0; d < d_max; ++d)
          dot += double{q[int64_t{qh} * d_max + d]} * kv.Load(kv.indices[j], false, t, d);
        const double bias =
            kv.bias.empty() ? 0.0 : kv.bias[int64_t{kv.indices[j]} * kv.page_tokens + t];
        logits.push_back(dot * scale + bias);
      }
    }
    const double m = *std::max_element(logits.begin(), logits.end());
    double sum = 0.0;
    for (double x : logits) sum += std::exp(x - m);
    ref.lse[qh] = m + std::log(sum);
    size_t i = 0;
    for (int j = kv.indptr[h]; j < kv.indptr[h + 1]; ++j) {
      const int tokens = kv.PageTokens(h, j);
      for (int t = 0; t < tokens; ++t, ++i) {
        const double p = std::exp(logits[i] - ref.lse[qh]);
        ref.token_probs[int64_t{j} * kv.page_tokens + t] += p / group;
        ref.page_mass[j] += p / group;
        for (int d = 0; d < d_max; ++d) {
          const double v = kv.Load(kv.indices[j], true, t, d);
          ref.o[int64_t{qh} * d_max + d] += p * v;
          ref.o_scale[int64_t{qh} * d_max + d] += p * std::abs(v);
        }
      }
    }
  }
  return ref;
}

struct DecodeCase {
  DType dtype;
  int head_dim;
  int group_size;
};

void PrintTo(const DecodeCase& c, std::ostream* os) {
  *os << DTypeName(c.dtype) << " head_dim=" << c.head_dim << " group=" << c.group_size;
}

std::string CaseName(const testing::TestParamInfo<DecodeCase>& info) {
  return std::string(DTypeName(info.param.dtype)) + "_d" + std::to_string(info.param.head_dim) +
         "_g" + std::to_string(info.param.group_size);
}

// Uploads `host`, then decodes with automatic, single and several splits, with and without lse
// (the latter uses the workspace lse for token_probs), and checks every output against `ref`.
// Sparse hosts (page_len) are uploaded without last_page_len.
void CheckOnDevice(const HostKv& host, const std::vector<float>& q, int num_q_heads,
                   const Reference& ref, cudaStream_t stream) {
  const DeviceBuffer pool(host.pool);
  const DeviceBuffer indptr(host.indptr);
  const DeviceBuffer indices(host.indices);
  const DeviceBuffer last_page_len(host.last_page_len);
  const DeviceBuffer page_len(host.page_len);
  const DeviceBuffer bias(host.bias);
  const DeviceBuffer q_dev(q);
  const int pages = host.indptr.back();
  const int page_tokens = host.page_tokens;
  const int head_dim = host.head_dim;
  PagedKvView kv;
  kv.pool = pool.get<std::byte>();
  kv.indptr = indptr.get<int32_t>();
  kv.indices = indices.get<int32_t>();
  kv.last_page_len = host.page_len.empty() ? last_page_len.get<int32_t>() : nullptr;
  kv.page_len = host.page_len.empty() ? nullptr : page_len.get<int32_t>();
  kv.token_bias = host.bias.empty() ? nullptr : bias.get<float>();
  kv.num_slots = host.num_slots;
  kv.num_kv_heads = host.num_kv_heads;
  kv.page_tokens = page_tokens;
  kv.head_dim = head_dim;
  kv.dtype = host.dtype;

  for (int splits : {0, 1, 3}) {
    for (bool with_lse : {true, false}) {
      SCOPED_TRACE(testing::Message() << "splits=" << splits << " lse=" << with_lse);
      DeviceBuffer o(int64_t{num_q_heads} * head_dim * sizeof(float));
      DeviceBuffer lse(num_q_heads * sizeof(float));
      DeviceBuffer probs(int64_t{pages} * page_tokens * sizeof(float));
      DeviceBuffer mass(pages * sizeof(float));
      // Poison the outputs so unwritten entries show up.
      ASSERT_EQ(cudaMemset(probs.get<float>(), 0x7f, int64_t{pages} * page_tokens * 4),
                cudaSuccess);
      ASSERT_EQ(cudaMemset(mass.get<float>(), 0x7f, int64_t{pages} * 4), cudaSuccess);
      DecodeArgs args;
      args.q = q_dev.get<float>();
      args.num_q_heads = num_q_heads;
      args.o = o.get<float>();
      args.lse = with_lse ? lse.get<float>() : nullptr;
      args.token_probs = probs.get<float>();
      args.page_mass = mass.get<float>();
      DecodeOptions options;
      options.num_splits = splits;
      ASSERT_TRUE(DecodeAttention(kv, args, stream, options).ok());
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);

      const std::vector<float> got_o = o.Download<float>(int64_t{num_q_heads} * head_dim);
      for (size_t i = 0; i < got_o.size(); ++i) {
        ASSERT_NEAR(got_o[i], ref.o[i], kRelTol * ref.o_scale[i] + 1e-30) << "o element " << i;
      }
      if (with_lse) {
        const std::vector<float> got_lse = lse.Download<float>(num_q_heads);
        for (int qh = 0; qh < num_q_heads; ++qh) {
          if (std::isinf(ref.lse[qh])) {
            EXPECT_EQ(got_lse[qh], -kInf) << "query head " << qh;
          } else {
            EXPECT_NEAR(got_lse[qh], ref.lse[qh], kRelTol * std::max(1.0, std::abs(ref.lse[qh])))
                << "query head " << qh;
          }
        }
      }
      // Rows past a page's valid count are 0 in both the reference and the kernel.
      const std::vector<float> got_probs = probs.Download<float>(int64_t{pages} * page_tokens);
      for (size_t i = 0; i < got_probs.size(); ++i) {
        ASSERT_NEAR(got_probs[i], ref.token_probs[i], kRelTol * ref.token_probs[i] + 1e-12)
            << "token_probs entry " << i;
      }
      const std::vector<float> got_mass = mass.Download<float>(pages);
      for (int j = 0; j < pages; ++j) {
        EXPECT_NEAR(got_mass[j], ref.page_mass[j], kRelTol * ref.page_mass[j] + 1e-12)
            << "page " << j;
      }
    }
  }
}

// Builds a layout with `make(with_bias, rng)` for each bias setting, and checks it on the device.
template <typename MakeHost>
void CheckCase(const DecodeCase& c, uint32_t seed, MakeHost make) {
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  for (bool with_bias : {false, true}) {
    SCOPED_TRACE(testing::Message() << "bias=" << with_bias);
    std::mt19937 rng(seed + c.head_dim * 10 + c.group_size + (with_bias ? 7 : 0));
    const HostKv host = make(with_bias, rng);
    const int num_q_heads = host.num_kv_heads * c.group_size;
    std::vector<float> q(int64_t{num_q_heads} * c.head_dim);
    for (float& x : q) x = RandomNonZero(rng);
    const Reference ref = ComputeReference(host, q, num_q_heads, 1.0 / std::sqrt(c.head_dim));
    CheckOnDevice(host, q, num_q_heads, ref, stream);
  }
  ASSERT_EQ(cudaStreamDestroy(stream), cudaSuccess);
}

class DecodeCudaTest : public testing::TestWithParam<DecodeCase> {};

// Dense heads (last_page_len). Head 1 is empty, head 0 ends on a partial page, head 2 on a full
// one, head 3 holds one token.
TEST_P(DecodeCudaTest, MatchesFloat64Reference) {
  SKIP_WITHOUT_GPU();
  const DecodeCase c = GetParam();
  CheckCase(c, 1234, [&](bool with_bias, std::mt19937& rng) {
    return MakeKv({37, 0, 80, 1}, 16, c.head_dim, c.dtype, with_bias, rng);
  });
}

// Sparse heads (page_len, no last_page_len): every page holds a random count 1..16; head 1 has
// no pages.
TEST_P(DecodeCudaTest, SparsePagesMatchFloat64Reference) {
  SKIP_WITHOUT_GPU();
  const DecodeCase c = GetParam();
  CheckCase(c, 4321, [&](bool with_bias, std::mt19937& rng) {
    return MakeSparseKv({9, 0, 14, 1}, 16, c.head_dim, c.dtype, with_bias, rng);
  });
}

std::vector<DecodeCase> AllCases() {
  std::vector<DecodeCase> cases;
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int head_dim : {64, 128}) {
      for (int group_size : {1, 4, 8}) cases.push_back({dtype, head_dim, group_size});
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(DtypesHeadDimsGroups, DecodeCudaTest, testing::ValuesIn(AllCases()),
                         CaseName);

// The other compiled head sizes, and a group larger than one block's query chunk (8), in f16.
TEST(DecodeCudaOtherShapesTest, MatchesFloat64Reference) {
  SKIP_WITHOUT_GPU();
  struct Shape {
    int head_dim;
    int group_size;
  };
  for (const Shape shape :
       {Shape{8, 2}, Shape{16, 3}, Shape{32, 1}, Shape{96, 4}, Shape{256, 2}, Shape{64, 12}}) {
    SCOPED_TRACE(testing::Message()
                 << "head_dim=" << shape.head_dim << " group=" << shape.group_size);
    std::mt19937 rng(shape.head_dim * 31 + shape.group_size);
    const HostKv host = MakeKv({21, 50}, 8, shape.head_dim, DType::kF16, true, rng);
    const int num_q_heads = host.num_kv_heads * shape.group_size;
    std::vector<float> q(int64_t{num_q_heads} * shape.head_dim);
    for (float& x : q) x = RandomNonZero(rng);
    const float scale = 0.3f;
    const Reference ref = ComputeReference(host, q, num_q_heads, scale);

    const DeviceBuffer pool(host.pool), indptr(host.indptr), indices(host.indices),
        last_page_len(host.last_page_len), bias(host.bias), q_dev(q);
    DeviceBuffer o(int64_t{num_q_heads} * shape.head_dim * sizeof(float));
    DeviceBuffer lse(num_q_heads * sizeof(float));
    PagedKvView kv;
    kv.pool = pool.get<std::byte>();
    kv.indptr = indptr.get<int32_t>();
    kv.indices = indices.get<int32_t>();
    kv.last_page_len = last_page_len.get<int32_t>();
    kv.token_bias = bias.get<float>();
    kv.num_slots = host.num_slots;
    kv.num_kv_heads = host.num_kv_heads;
    kv.page_tokens = host.page_tokens;
    kv.head_dim = shape.head_dim;
    kv.dtype = DType::kF16;
    DecodeArgs args;
    args.q = q_dev.get<float>();
    args.num_q_heads = num_q_heads;
    args.scale = scale;
    args.o = o.get<float>();
    args.lse = lse.get<float>();
    ASSERT_TRUE(DecodeAttention(kv, args, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> got_o = o.Download<float>(int64_t{num_q_heads} * shape.head_dim);
    for (size_t i = 0; i < got_o.size(); ++i) {
      ASSERT_NEAR(got_o[i], ref.o[i], kRelTol * ref.o_scale[i]) << "o element " << i;
    }
    const std::vector<float> got_lse = lse.Download<float>(num_q_heads);
    for (int qh = 0; qh < num_q_heads; ++qh) {
      EXPECT_NEAR(got_lse[qh], ref.lse[qh], kRelTol * std::max(1.0, std::abs(ref.lse[qh])));
    }
  }
}

// 20 parts (more than one launch merges), o_out aliasing part 0, and a row where one part and
// a row where every part is empty (lse = -inf).
TEST(MergeAttentionStatesCudaTest, MatchesFloat64Reference) {
  SKIP_WITHOUT_GPU();
  constexpr int kParts = 20;
  constexpr int kRows = 5;
  constexpr int kHeadDim = 64;
  std::mt19937 rng(99);
  std::normal_distribution<float> lse_dist(0.0f, 3.0f);
  std::vector<std::vector<float>> o(kParts, std::vector<float>(kRows * kHeadDim));
  std::vector<std::vector<float>> lse(kParts, std::vector<float>(kRows));
  for (int i = 0; i < kParts; ++i) {
    for (float& x : o[i]) x = RandomNonZero(rng);
    for (int r = 0; r < kRows; ++r) lse[i][r] = lse_dist(rng);
    lse[i][4] = -kInf;  // Row 4: no part has tokens.
  }
  lse[3][1] = -kInf;  // Row 1: part 3 has no tokens.

  std::vector<double> ref_o(kRows * kHeadDim, 0.0);
  std::vector<double> ref_scale(kRows * kHeadDim, 0.0);
  std::vector<double> ref_lse(kRows, -std::numeric_limits<double>::infinity());
  for (int r = 0; r < kRows; ++r) {
    double m = -std::numeric_limits<double>::infinity();
    for (int i = 0; i < kParts; ++i) m = std::max(m, double{lse[i][r]});
    if (std::isinf(m)) continue;
    double sum = 0.0;
    for (int i = 0; i < kParts; ++i) sum += std::exp(lse[i][r] - m);
    ref_lse[r] = m + std::log(sum);
    for (int i = 0; i < kParts; ++i) {
      const double w = std::exp(lse[i][r] - ref_lse[r]);
      for (int d = 0; d < kHeadDim; ++d) {
        ref_o[r * kHeadDim + d] += w * o[i][r * kHeadDim + d];
        ref_scale[r * kHeadDim + d] += w * std::abs(o[i][r * kHeadDim + d]);
      }
    }
  }

  std::vector<std::unique_ptr<DeviceBuffer>> o_dev, lse_dev;
  std::vector<const float*> o_ptrs, lse_ptrs;
  for (int i = 0; i < kParts; ++i) {
    o_dev.push_back(std::make_unique<DeviceBuffer>(o[i]));
    lse_dev.push_back(std::make_unique<DeviceBuffer>(lse[i]));
    o_ptrs.push_back(o_dev.back()->get<float>());
    lse_ptrs.push_back(lse_dev.back()->get<float>());
  }
  DeviceBuffer lse_out(kRows * sizeof(float));
  float* o_out = o_dev[0]->get<float>();  // Aliases part 0.
  ASSERT_TRUE(MergeAttentionStates(o_ptrs.data(), lse_ptrs.data(), kParts, kRows, kHeadDim, o_out,
                                   lse_out.get<float>(), nullptr)
                  .ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got_o = o_dev[0]->Download<float>(kRows * kHeadDim);
  const std::vector<float> got_lse = lse_out.Download<float>(kRows);
  for (int i = 0; i < kRows * kHeadDim; ++i) {
    ASSERT_NEAR(got_o[i], ref_o[i], kRelTol * ref_scale[i]) << "o element " << i;
  }
  for (int r = 0; r < kRows; ++r) {
    if (std::isinf(ref_lse[r])) {
      EXPECT_EQ(got_lse[r], -kInf) << "row " << r;
    } else {
      EXPECT_NEAR(got_lse[r], ref_lse[r], kRelTol * std::max(1.0, std::abs(ref_lse[r])));
    }
  }
}

// Validation happens on the host before any CUDA call, so these run without a GPU. The
// pointers are never dereferenced.
class DecodeCudaValidationTest : public testing::Test {
 protected:
  DecodeCudaValidationTest() {
    kv_.pool = reinterpret_cast<const std::byte*>(dummy_);
    kv_.indptr = dummy_;
    kv_.indices = dummy_;
    kv_.last_page_len = dummy_;
    kv_.num_slots = 1;
    kv_.num_kv_heads = 2;
    kv_.page_tokens = 16;
    kv_.head_dim = 128;
    kv_.dtype = DType::kF16;
    args_.q = out_;
    args_.o = out_;
    args_.num_q_heads = 8;
  }
  int32_t dummy_[4] = {};
  float out_[4] = {};
  PagedKvView kv_;
  DecodeArgs args_;
};

TEST_F(DecodeCudaValidationTest, RejectsUnsupportedHeadDim) {
  kv_.head_dim = 48;
  EXPECT_EQ(DecodeAttention(kv_, args_, nullptr).code(), absl::StatusCode::kInvalidArgument);
  kv_.head_dim = 512;
  EXPECT_EQ(DecodeAttention(kv_, args_, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(DecodeCudaValidationTest, RejectsQueryHeadsNotAMultipleOfKvHeads) {
  args_.num_q_heads = 7;
  EXPECT_EQ(DecodeAttention(kv_, args_, nullptr).code(), absl::StatusCode::kInvalidArgument);
  args_.num_q_heads = 0;
  EXPECT_EQ(DecodeAttention(kv_, args_, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(DecodeCudaValidationTest, RejectsNullRequiredPointers) {
  args_.q = nullptr;
  EXPECT_EQ(DecodeAttention(kv_, args_, nullptr).code(), absl::StatusCode::kInvalidArgument);
  args_.q = out_;
  kv_.indptr = nullptr;
  EXPECT_EQ(DecodeAttention(kv_, args_, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(DecodeCudaValidationTest, RejectsUnknownDtypeAndBadSizes) {
  kv_.dtype = static_cast<DType>(200);
  EXPECT_EQ(DecodeAttention(kv_, args_, nullptr).code(), absl::StatusCode::kInvalidArgument);
  kv_.dtype = DType::kBF16;
  kv_.page_tokens = 0;
  EXPECT_EQ(DecodeAttention(kv_, args_, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(DecodeCudaValidationTest, NeedsLastPageLenOrPageLen) {
  kv_.last_page_len = nullptr;
  EXPECT_EQ(DecodeAttention(kv_, args_, nullptr).code(), absl::StatusCode::kInvalidArgument);
  if (DeviceAvailable()) return;  // The dummy pointers are host memory: never launch on them.
  kv_.page_len = dummy_;  // page_len alone is enough; the call then fails only for the device.
  EXPECT_EQ(DecodeAttention(kv_, args_, nullptr).code(), absl::StatusCode::kFailedPrecondition);
}

TEST(MergeAttentionStatesCudaValidationTest, RejectsBadArguments) {
  float dummy[4] = {};
  const float* parts[2] = {dummy, nullptr};
  EXPECT_EQ(MergeAttentionStates(parts, parts, 2, 1, 4, dummy, dummy, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MergeAttentionStates(parts, parts, 0, 1, 4, dummy, dummy, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MergeAttentionStates(parts, parts, 1, 1, 4, nullptr, dummy, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

// Without a device, a well-formed call fails with a status instead of crashing.
TEST_F(DecodeCudaValidationTest, WithoutDeviceReturnsFailedPrecondition) {
  if (DeviceAvailable()) GTEST_SKIP() << "a CUDA device is present: nothing to check";
  const absl::Status status = DecodeAttention(kv_, args_, nullptr);
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
}

TEST(CudaHeadDimTest, SupportedSetIsTheCompiledOne) {
  for (int d : {8, 16, 32, 64, 96, 128, 256}) EXPECT_TRUE(IsSupportedHeadDim(d)) << d;
  for (int d : {0, 4, 48, 80, 100, 512}) EXPECT_FALSE(IsSupportedHeadDim(d)) << d;
}

}  // namespace
}  // namespace headwise::kernels::cuda
