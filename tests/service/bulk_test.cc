// AppendLayers against the real service: inline and staged payloads land exactly where per-layer
// Appends would (checked against a float64 attention reference), refusals change nothing (bad
// payloads, a step in progress, the quota, a refusal of a later layer that rolls back the earlier
// ones), durable sequences log every layer in one write and come back after a restart, and step
// ids make a resend idempotent.
#include <cmath>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "cachesvc/service/durable_log.h"
#include "tests/service/service_fixture.h"

namespace headwise::testing {
namespace {

constexpr int kLayers = 2;
constexpr int kTokenFloats = 2 * 16;  // num_kv_heads * head_dim of TestLayout().

// K and V of every layer of one chunk: k[l], v[l] are [tokens][2][16] f32.
struct Chunk {
  int tokens = 0;
  std::vector<std::vector<float>> k, v;
};

Chunk RandomChunk(int tokens, uint32_t seed) {
  Chunk c;
  c.tokens = tokens;
  for (int l = 0; l < kLayers; ++l) {
    c.k.push_back(RandomValues(tokens * kTokenFloats, seed + 2 * l));
    c.v.push_back(RandomValues(tokens * kTokenFloats, seed + 2 * l + 1));
  }
  return c;
}

std::string Bytes(const std::vector<float>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
}

// float64 decode attention of q ([4][16]) over every token of `chunks` for one layer (GQA: query
// head qh reads kv head qh / 2), scale 1/sqrt(16).
std::vector<double> ReferenceO(const std::vector<float>& q, const std::vector<Chunk>& chunks,
                               int layer) {
  std::vector<double> o(4 * 16, 0.0);
  for (int qh = 0; qh < 4; ++qh) {
    const int h = qh / 2;
    std::vector<double> scores, values;
    for (const Chunk& c : chunks) {
      for (int t = 0; t < c.tokens; ++t) {
        double dot = 0;
        for (int d = 0; d < 16; ++d) {
          dot += double{q[qh * 16 + d]} * c.k[layer][(t * 2 + h) * 16 + d];
        }
        scores.push_back(dot / 4.0);
        for (int d = 0; d < 16; ++d) values.push_back(c.v[layer][(t * 2 + h) * 16 + d]);
      }
    }
    double max = -1e300, sum = 0;
    for (double s : scores) max = std::max(max, s);
    for (double s : scores) sum += std::exp(s - max);
    for (size_t i = 0; i < scores.size(); ++i) {
      const double p = std::exp(scores[i] - max) / sum;
      for (int d = 0; d < 16; ++d) o[qh * 16 + d] += p * values[i * 16 + d];
    }
  }
  return o;
}

class BulkTest : public ServiceTest {
 protected:
  void TearDown() override {
    DurableLog::SetWriteFaultForTesting(nullptr);
    ServiceTest::TearDown();
  }

  static headwise::v1::AppendLayersRequest InlineRequest(const std::string& handle, const Chunk& c,
                                                         uint64_t step_id = 0) {
    headwise::v1::AppendLayersRequest request;
    request.set_handle(handle);
    request.set_num_tokens(c.tokens);
    request.set_step_id(step_id);
    for (int l = 0; l < kLayers; ++l) {
      request.mutable_inline_layers()->add_k(Bytes(c.k[l]));
      request.mutable_inline_layers()->add_v(Bytes(c.v[l]));
    }
    return request;
  }

  grpc::Status AppendLayers(const headwise::v1::AppendLayersRequest& request,
                            int64_t* length = nullptr) {
    headwise::v1::AppendLayersResponse response;
    grpc::Status status = stub_->AppendLayers(Ctx().get(), request, &response);
    if (length != nullptr) *length = response.length();
    return status;
  }

  // Attention outputs of fresh queries on every layer (equal outputs: equal held tokens).
  std::vector<float> Outputs(const std::string& handle) {
    std::vector<float> all;
    for (int l = 0; l < kLayers; ++l) {
      headwise::v1::AttendResponse response;
      EXPECT_TRUE(Attend(handle, l, RandomValues(64, 900 + l), &response).ok());
      const std::vector<float> o = TensorFloats(response.o());
      all.insert(all.end(), o.begin(), o.end());
    }
    return all;
  }

  // Checks every layer's attention against the float64 reference over `chunks`.
  void ExpectMatchesReference(const std::string& handle, const std::vector<Chunk>& chunks) {
    const std::vector<float> got = Outputs(handle);
    ASSERT_EQ(got.size(), size_t{kLayers * 64});
    for (int l = 0; l < kLayers; ++l) {
      const std::vector<double> want = ReferenceO(RandomValues(64, 900 + l), chunks, l);
      for (int i = 0; i < 64; ++i) {
        EXPECT_NEAR(got[l * 64 + i], want[i], 1e-5) << "layer " << l << " element " << i;
      }
    }
  }
};

TEST_F(BulkTest, InlineChunksMatchTheFloat64Reference) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence();
  // 20 + 13 tokens: the second chunk fills a partial page and opens a new one.
  const std::vector<Chunk> chunks = {RandomChunk(20, 1), RandomChunk(13, 50)};
  int64_t length = 0;
  ASSERT_TRUE(AppendLayers(InlineRequest(handle, chunks[0]), &length).ok());
  EXPECT_EQ(length, 20);
  ASSERT_TRUE(AppendLayers(InlineRequest(handle, chunks[1]), &length).ok());
  EXPECT_EQ(length, 33);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{33, 33}));
  ExpectMatchesReference(handle, chunks);
}

TEST_F(BulkTest, StagedLayerMajorPayloadEqualsPerLayerAppends) {
  StartServer();
  RegisterLayout();
  const std::string bulk = CreateSequence();
  const std::string single = CreateSequence();
  const Chunk c = RandomChunk(37, 7);
  const size_t layer_bytes = c.tokens * kTokenFloats * sizeof(float);
  const uint64_t offset = 4096;
  auto region = OpenRegion(offset + 2 * kLayers * layer_bytes);
  ASSERT_NE(region->base, nullptr);
  for (int l = 0; l < kLayers; ++l) {
    std::memcpy(region->base + offset + 2 * l * layer_bytes, c.k[l].data(), layer_bytes);
    std::memcpy(region->base + offset + (2 * l + 1) * layer_bytes, c.v[l].data(), layer_bytes);
    ASSERT_TRUE(Append(single, l, c.k[l], c.v[l], c.tokens).ok());
  }
  headwise::v1::AppendLayersRequest request;
  request.set_handle(bulk);
  request.set_num_tokens(c.tokens);
  request.mutable_staged_layers()->set_region_id(region->id);
  request.mutable_staged_layers()->set_offset(offset);
  int64_t length = 0;
  ASSERT_TRUE(AppendLayers(request, &length).ok());
  EXPECT_EQ(length, 37);
  EXPECT_EQ(Outputs(bulk), Outputs(single));  // Bit for bit.
  ExpectMatchesReference(bulk, {c});
}

TEST_F(BulkTest, BadPayloadsAreRefusedAndChangeNothing) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence();
  const Chunk first = RandomChunk(5, 3);
  ASSERT_TRUE(AppendLayers(InlineRequest(handle, first)).ok());
  const std::vector<float> before = Outputs(handle);
  const Chunk c = RandomChunk(4, 30);

  auto missing_layer = InlineRequest(handle, c);
  missing_layer.mutable_inline_layers()->mutable_v()->RemoveLast();
  auto short_bytes = InlineRequest(handle, c);
  short_bytes.mutable_inline_layers()->mutable_k(1)->pop_back();
  auto wrong_tokens = InlineRequest(handle, c);
  wrong_tokens.set_num_tokens(5);
  auto zero_tokens = InlineRequest(handle, c);
  zero_tokens.set_num_tokens(0);
  auto no_payload = InlineRequest(handle, c);
  no_payload.clear_inline_layers();
  auto region = OpenRegion(4096);
  headwise::v1::AppendLayersRequest past_region;
  past_region.set_handle(handle);
  past_region.set_num_tokens(4);
  past_region.mutable_staged_layers()->set_region_id(region->id);
  past_region.mutable_staged_layers()->set_offset(4096 - 2 * kLayers * 4 * kTokenFloats * 4 + 1);
  auto unknown_region = past_region;
  unknown_region.mutable_staged_layers()->set_region_id("nope");
  unknown_region.mutable_staged_layers()->set_offset(0);
  for (const auto* request : {&missing_layer, &short_bytes, &wrong_tokens, &zero_tokens,
                              &no_payload, &past_region, &unknown_region}) {
    EXPECT_EQ(AppendLayers(*request).error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << request->DebugString().substr(0, 200);
  }
  auto unknown_handle = InlineRequest("0123456789abcdef0123456789abcdef", c);
  EXPECT_EQ(AppendLayers(unknown_handle).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{5, 5}));
  EXPECT_EQ(Outputs(handle), before);
}

TEST_F(BulkTest, AStepInProgressIsAFailedPreconditionAndChangesNothing) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence();
  // Layer 1 is ahead: a rollback to length 0 would wrongly remove its tokens, so the call must
  // be refused before any layer is touched.
  ASSERT_TRUE(
      Append(handle, 1, RandomValues(4 * kTokenFloats, 1), RandomValues(4 * kTokenFloats, 2), 4)
          .ok());
  EXPECT_EQ(AppendLayers(InlineRequest(handle, RandomChunk(4, 9))).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{0, 4}));
}

TEST_F(BulkTest, QuotaCountsEveryLayerAndARefusalChangesNothing) {
  // 16 tokens = one whole 16-token page per KV head: 4 KiB of K and V per layer (payload and
  // pages alike), 8 KiB for both layers. One layer fits a 6 KiB quota; the call as a whole does
  // not.
  config_.mutable_tenants(0)->mutable_quota()->set_max_device_bytes(6 * 1024);
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence();
  const Chunk c = RandomChunk(16, 4);
  EXPECT_EQ(AppendLayers(InlineRequest(handle, c)).error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{0, 0}));
  EXPECT_TRUE(Append(handle, 0, c.k[0], c.v[0], 16).ok());  // One layer alone fits.
}

// A refusal of layer 1 after layer 0 was appended: layer 0 is rolled back, the log holds
// nothing of the call, and a restart shows the state before it.
TEST_F(BulkTest, ALaterLayerRefusedRollsBackTheEarlierOnes) {
  StartServer();
  RegisterLayout();
  headwise::v1::PolicySpec h2o;  // Query-dependent: every layer's append logs its decisions.
  h2o.mutable_eviction()->mutable_h2o()->set_heavy_tokens(30);
  h2o.mutable_eviction()->mutable_h2o()->set_recent_tokens(30);
  const std::string handle = CreateSequence(/*durable=*/true, kAliceToken, h2o);
  const Chunk first = RandomChunk(6, 11);
  ASSERT_TRUE(AppendLayers(InlineRequest(handle, first)).ok());
  const std::vector<float> before = Outputs(handle);
  int decisions = 0;
  DurableLog::SetWriteFaultForTesting([&](std::string_view what) {
    if (what == "PutAppendDecisions" && ++decisions == 2) {
      return absl::UnavailableError("injected: disk gone");
    }
    return absl::OkStatus();
  });
  const grpc::Status refused = AppendLayers(InlineRequest(handle, RandomChunk(9, 40)));
  DurableLog::SetWriteFaultForTesting(nullptr);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(refused.error_message().find("layer 1"), std::string::npos) << refused.error_message();
  EXPECT_EQ(decisions, 2);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{6, 6}));
  EXPECT_EQ(Outputs(handle), before);
  Restart();
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{6, 6}));
  EXPECT_EQ(Outputs(handle), before);
}

TEST_F(BulkTest, DurableSequencesLogEveryLayerInOneWriteAndComeBack) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence(/*durable=*/true);
  std::vector<std::string> writes;
  DurableLog::SetWriteFaultForTesting([&](std::string_view what) {
    writes.emplace_back(what);
    return absl::OkStatus();
  });
  const std::vector<Chunk> chunks = {RandomChunk(17, 21), RandomChunk(3, 22)};
  for (const Chunk& c : chunks) ASSERT_TRUE(AppendLayers(InlineRequest(handle, c)).ok());
  DurableLog::SetWriteFaultForTesting(nullptr);
  EXPECT_EQ(writes, (std::vector<std::string>{"PutAppends", "PutAppends"}));
  const std::vector<float> before = Outputs(handle);
  Restart();
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{20, 20}));
  EXPECT_EQ(Outputs(handle), before);
  ExpectMatchesReference(handle, chunks);
}

TEST_F(BulkTest, AFailedLogWriteChangesNothing) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence(/*durable=*/true);
  DurableLog::SetWriteFaultForTesting([](std::string_view what) {
    return what == "PutAppends" ? absl::UnavailableError("injected") : absl::OkStatus();
  });
  EXPECT_EQ(AppendLayers(InlineRequest(handle, RandomChunk(4, 5))).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  DurableLog::SetWriteFaultForTesting(nullptr);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{0, 0}));
  Restart();
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{0, 0}));
}

TEST_F(BulkTest, AResentStepIdIsAnsweredWithoutAppendingAgain) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence();
  const Chunk c = RandomChunk(6, 60);
  int64_t length = 0;
  ASSERT_TRUE(AppendLayers(InlineRequest(handle, c, /*step_id=*/77), &length).ok());
  ASSERT_TRUE(AppendLayers(InlineRequest(handle, c, /*step_id=*/77), &length).ok());
  EXPECT_EQ(length, 6);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{6, 6}));
  // The same id with another token count was reused: refused.
  EXPECT_EQ(AppendLayers(InlineRequest(handle, RandomChunk(2, 61), 77)).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  // An id that is the last step of layer 0 only was reused too.
  for (int layer = 0; layer < kLayers; ++layer) {
    headwise::v1::AppendRequest request;
    request.set_handle(handle);
    request.set_layer(layer);
    *request.mutable_k() = F32Tensor(RandomValues(2 * kTokenFloats, 1 + layer), {2, 2, 16});
    *request.mutable_v() = F32Tensor(RandomValues(2 * kTokenFloats, 3 + layer), {2, 2, 16});
    request.set_step_id(99 + layer);
    headwise::v1::AppendResponse response;
    ASSERT_TRUE(stub_->Append(Ctx().get(), request, &response).ok());
  }
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{8, 8}));
  EXPECT_EQ(AppendLayers(InlineRequest(handle, RandomChunk(2, 62), 99)).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{8, 8}));
  // 77 is no longer the last step of any layer: a new call.
  ASSERT_TRUE(AppendLayers(InlineRequest(handle, c, 77), &length).ok());
  EXPECT_EQ(length, 14);
}

}  // namespace
}  // namespace headwise::testing
