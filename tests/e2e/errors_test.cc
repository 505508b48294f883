// Bad input against a real daemon with two tenants: each mistake gets its exact status code
// (service.proto's list) and the daemon keeps serving the other tenant's client.
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "headwise/v1/service.grpc.pb.h"
#include "tests/e2e/daemon_process.h"
#include "tests/e2e/e2e_helpers.h"

namespace headwise::testing {
namespace {

using absl::StatusCode;
using client::AttendOutput;
using client::Client;
using client::Sequence;
using client::StagingRegion;

constexpr char kTwoTenants[] = R"pb(
  tenants { name: "alpha" token: "alpha-token" }
  tenants { name: "beta" token: "beta-token" }
  max_message_bytes: 1048576
  max_staging_region_bytes: 4194304
)pb";

class ErrorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    DaemonOptions options;
    options.work_dir = dir_.path();
    options.config_textproto = kTwoTenants;
    absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon = DaemonProcess::Start(options);
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = *std::move(daemon);
    for (auto [token, out] : {std::pair{"alpha-token", &alpha_}, std::pair{"beta-token", &beta_}}) {
      absl::StatusOr<std::unique_ptr<Client>> c = daemon_->Connect(token);
      ASSERT_TRUE(c.ok()) << c.status();
      *out = *std::move(c);
      ASSERT_TRUE((*out)->RegisterLayout(kLayoutName, layout_).ok());
    }
    // Each tenant gets a sequence with some tokens in it.
    for (auto [c, seq] :
         {std::pair{alpha_.get(), &alpha_seq_}, std::pair{beta_.get(), &beta_seq_}}) {
      absl::StatusOr<Sequence> s = c->CreateSequence(kLayoutName, v1::PolicySpec(), false);
      ASSERT_TRUE(s.ok()) << s.status();
      *seq = *s;
      for (int layer = 0; layer < layout_.num_layers; ++layer) {
        ASSERT_TRUE(
            c->Append(*seq, layer, RandomKv(rng_, layout_, 20), RandomKv(rng_, layout_, 20), 20)
                .ok());
      }
    }
    q_ = RandomQ(rng_, layout_);
    absl::StatusOr<AttendOutput> out = beta_->Attend(beta_seq_, 0, q_);
    ASSERT_TRUE(out.ok()) << out.status();
    beta_reference_ = *out;
  }

  // The daemon still runs and still serves beta, with the same answer as before.
  void ExpectStillServing() {
    ASSERT_TRUE(daemon_->Running()) << daemon_->LogTail();
    absl::StatusOr<AttendOutput> out = beta_->Attend(beta_seq_, 0, q_);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->o, beta_reference_.o);
    EXPECT_EQ(out->lse, beta_reference_.lse);
  }

  // A raw stub for requests the typed client cannot express.
  std::unique_ptr<v1::Headwise::Stub> RawStub() {
    return v1::Headwise::NewStub(
        grpc::CreateChannel(daemon_->target(), grpc::InsecureChannelCredentials()));
  }
  static void Authorize(grpc::ClientContext& context, const std::string& token) {
    context.AddMetadata("authorization", "Bearer " + token);
  }

  TempDir dir_;
  ModelLayout layout_ = TestLayout();
  std::mt19937 rng_{99};
  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<Client> alpha_, beta_;
  Sequence alpha_seq_, beta_seq_;
  std::vector<float> q_;
  AttendOutput beta_reference_;
};

TEST_F(ErrorsTest, WrongShapeAndDtypeAreInvalidArgument) {
  // Payload of 10 tokens declared as 11.
  EXPECT_EQ(
      alpha_->Append(alpha_seq_, 0, RandomKv(rng_, layout_, 10), RandomKv(rng_, layout_, 10), 11)
          .status()
          .code(),
      StatusCode::kInvalidArgument);
  // q one head short.
  std::vector<float> short_q(q_.begin(), q_.end() - layout_.head_dim);
  EXPECT_EQ(alpha_->Attend(alpha_seq_, 0, short_q).status().code(), StatusCode::kInvalidArgument);
  // Layer out of range, both ends.
  EXPECT_EQ(alpha_->Attend(alpha_seq_, layout_.num_layers, q_).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(alpha_->Attend(alpha_seq_, -1, q_).status().code(), StatusCode::kInvalidArgument);

  auto stub = RawStub();
  // K/V as f32 in an f16 layout, with a payload that matches the f32 size.
  {
    v1::AppendRequest request;
    request.set_handle(alpha_seq_.handle());
    request.set_layer(0);
    for (v1::Tensor* t : {request.mutable_k(), request.mutable_v()}) {
      t->set_dtype(v1::DTYPE_F32);
      t->add_shape(1);
      t->add_shape(layout_.num_kv_heads);
      t->add_shape(layout_.head_dim);
      t->set_data(std::string(size_t{4} * layout_.num_kv_heads * layout_.head_dim, '\x3c'));
    }
    grpc::ClientContext context;
    Authorize(context, "alpha-token");
    v1::AppendResponse response;
    EXPECT_EQ(stub->Append(&context, request, &response).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
  // Right byte count, wrong shape: [1][2*kv_heads][head_dim/2].
  {
    v1::AppendRequest request;
    request.set_handle(alpha_seq_.handle());
    request.set_layer(0);
    for (v1::Tensor* t : {request.mutable_k(), request.mutable_v()}) {
      t->set_dtype(v1::DTYPE_F16);
      t->add_shape(1);
      t->add_shape(2 * layout_.num_kv_heads);
      t->add_shape(layout_.head_dim / 2);
      t->set_data(std::string(size_t{2} * layout_.num_kv_heads * layout_.head_dim, '\x3c'));
    }
    grpc::ClientContext context;
    Authorize(context, "alpha-token");
    v1::AppendResponse response;
    EXPECT_EQ(stub->Append(&context, request, &response).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
  // q as f16.
  {
    v1::AttendRequest request;
    request.set_handle(alpha_seq_.handle());
    request.set_layer(0);
    request.mutable_q()->set_dtype(v1::DTYPE_F16);
    request.mutable_q()->add_shape(layout_.num_q_heads);
    request.mutable_q()->add_shape(layout_.head_dim);
    request.mutable_q()->set_data(
        std::string(size_t{2} * layout_.num_q_heads * layout_.head_dim, '\x3c'));
    grpc::ClientContext context;
    Authorize(context, "alpha-token");
    v1::AttendResponse response;
    EXPECT_EQ(stub->Attend(&context, request, &response).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
  // Nothing was appended by any of it.
  absl::StatusOr<v1::SequenceInfo> info = alpha_->GetSequence(alpha_seq_);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->layer_lengths(0), 20);
  EXPECT_EQ(info->layer_lengths(1), 20);
  ExpectStillServing();
}

TEST_F(ErrorsTest, UnknownForgedAndOtherTenantsHandlesAreNotFound) {
  std::string forged = alpha_seq_.handle();
  forged[7] = forged[7] == '0' ? '1' : '0';
  for (const std::string& handle :
       {std::string(32, 'a'), forged, std::string("not-a-handle"), std::string()}) {
    const Sequence bad(handle, layout_);
    EXPECT_EQ(alpha_->Attend(bad, 0, q_).status().code(), StatusCode::kNotFound) << handle;
    EXPECT_EQ(alpha_->GetSequence(bad).status().code(), StatusCode::kNotFound) << handle;
    EXPECT_EQ(alpha_->Release(bad).code(), StatusCode::kNotFound) << handle;
  }
  // Beta's handle from alpha: indistinguishable from one that never existed.
  EXPECT_EQ(alpha_->Attend(beta_seq_, 0, q_).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(alpha_->GetSequence(beta_seq_).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(alpha_->Append(beta_seq_, 0, RandomKv(rng_, layout_, 1), RandomKv(rng_, layout_, 1), 1)
                .status()
                .code(),
            StatusCode::kNotFound);
  EXPECT_EQ(alpha_->Fork(beta_seq_).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(alpha_->Truncate(beta_seq_, 0).code(), StatusCode::kNotFound);
  EXPECT_EQ(alpha_->Release(beta_seq_).code(), StatusCode::kNotFound);
  absl::StatusOr<std::vector<v1::SequenceInfo>> alpha_list = alpha_->ListSequences();
  ASSERT_TRUE(alpha_list.ok());
  ASSERT_EQ(alpha_list->size(), 1u);
  EXPECT_EQ((*alpha_list)[0].handle(), alpha_seq_.handle());
  // A stream on beta's handle ends NOT_FOUND.
  absl::StatusOr<std::unique_ptr<client::DecodeStream>> stream =
      alpha_->OpenDecodeStream(beta_seq_);
  ASSERT_TRUE(stream.ok());
  EXPECT_EQ((*stream)
                ->Step(0, q_, RandomKv(rng_, layout_, 1), RandomKv(rng_, layout_, 1))
                .status()
                .code(),
            StatusCode::kNotFound);
  // An unknown layout.
  EXPECT_EQ(
      alpha_->CreateSequence("no-such-layout", layout_, v1::PolicySpec(), false).status().code(),
      StatusCode::kNotFound);
  ExpectStillServing();
}

// A batch of alpha's naming beta's sequence: that item alone is NOT_FOUND, beta's sequence is
// untouched, and alpha's item equals one DecodeStep (on a fork with the same contents).
TEST_F(ErrorsTest, DecodeStepBatchItemOfAnotherTenantIsNotFoundAlone) {
  absl::StatusOr<Sequence> twin = alpha_->Fork(alpha_seq_);
  ASSERT_TRUE(twin.ok()) << twin.status();
  const std::vector<float> q = RandomQ(rng_, layout_);
  const std::vector<std::byte> k = RandomKv(rng_, layout_, 1), v = RandomKv(rng_, layout_, 1);
  const std::vector<Client::DecodeBatchItem> items = {{alpha_seq_, q, k, v, 0},
                                                      {beta_seq_, q, k, v, 0}};
  auto results = alpha_->DecodeStepBatch(0, items);
  ASSERT_TRUE(results.ok()) << results.status();
  ASSERT_EQ(results->size(), 2u);
  ASSERT_TRUE((*results)[0].ok()) << (*results)[0].status();
  EXPECT_EQ((*results)[1].status().code(), StatusCode::kNotFound);
  absl::StatusOr<AttendOutput> want = alpha_->DecodeStep(*twin, 0, q, k, v);
  ASSERT_TRUE(want.ok()) << want.status();
  EXPECT_EQ((*results)[0]->o, want->o);
  EXPECT_EQ((*results)[0]->lse, want->lse);
  EXPECT_EQ((*results)[0]->layer_length, 21);
  absl::StatusOr<v1::SequenceInfo> beta_info = beta_->GetSequence(beta_seq_);
  ASSERT_TRUE(beta_info.ok());
  EXPECT_EQ(beta_info->layer_lengths(0), 20);
  // A repeated sequence refuses the whole batch.
  const std::vector<Client::DecodeBatchItem> twice = {{*twin, q, k, v, 0}, {*twin, q, k, v, 0}};
  EXPECT_EQ(alpha_->DecodeStepBatch(1, twice).status().code(), StatusCode::kInvalidArgument);
  ExpectStillServing();
}

TEST_F(ErrorsTest, MissingOrWrongTokenIsUnauthenticated) {
  auto stub = RawStub();
  {
    grpc::ClientContext context;  // No metadata at all.
    v1::HealthResponse response;
    EXPECT_EQ(stub->Health(&context, v1::HealthRequest(), &response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext context;
    context.AddMetadata("authorization", "alpha-token");  // Not "Bearer <token>".
    v1::StatsResponse response;
    EXPECT_EQ(stub->Stats(&context, v1::StatsRequest(), &response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  absl::StatusOr<std::unique_ptr<Client>> wrong = daemon_->Connect("gamma-token");
  ASSERT_FALSE(wrong.ok());
  EXPECT_EQ(wrong.status().code(), StatusCode::kUnauthenticated);
  client::ClientOptions options = daemon_->ClientOptionsFor("alpha-token-but-longer");
  options.check_health = false;
  absl::StatusOr<std::unique_ptr<Client>> c = Client::Connect(options);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ((*c)->Attend(alpha_seq_, 0, q_).status().code(), StatusCode::kUnauthenticated);
  EXPECT_EQ((*c)->ListSequences().status().code(), StatusCode::kUnauthenticated);
  absl::StatusOr<std::unique_ptr<client::DecodeStream>> stream = (*c)->OpenDecodeStream(alpha_seq_);
  ASSERT_TRUE(stream.ok());
  EXPECT_EQ((*stream)
                ->Step(0, q_, RandomKv(rng_, layout_, 1), RandomKv(rng_, layout_, 1))
                .status()
                .code(),
            StatusCode::kUnauthenticated);
  ExpectStillServing();
}

TEST_F(ErrorsTest, OversizedMessageIsResourceExhausted) {
  // 2400 tokens of K and V (256 bytes per token each): 1.2 MB, over the daemon's 1 MiB limit,
  // under the client's 64 MiB.
  constexpr int kTokens = 2400;
  const auto k = RandomKv(rng_, layout_, kTokens);
  const auto v = RandomKv(rng_, layout_, kTokens);
  EXPECT_EQ(alpha_->Append(alpha_seq_, 0, k, v, kTokens).status().code(),
            StatusCode::kResourceExhausted);
  absl::StatusOr<v1::SequenceInfo> info = alpha_->GetSequence(alpha_seq_);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->layer_lengths(0), 20);
  // The same bytes staged go through.
  absl::StatusOr<StagingRegion> region = alpha_->OpenStaging(k.size() + v.size());
  ASSERT_TRUE(region.ok()) << region.status();
  std::memcpy(region->data(), k.data(), k.size());
  std::memcpy(region->data() + k.size(), v.data(), v.size());
  absl::StatusOr<int64_t> length = alpha_->Append(alpha_seq_, 0, *region, 0, k.size(), kTokens);
  ASSERT_TRUE(length.ok()) << length.status();
  EXPECT_EQ(*length, 20 + kTokens);
  // A region above the daemon's maximum.
  EXPECT_EQ(alpha_->OpenStaging(uint64_t{8} << 20).status().code(), StatusCode::kInvalidArgument);
  ExpectStillServing();
}

TEST_F(ErrorsTest, StagingOutOfRangeIsInvalidArgument) {
  absl::StatusOr<StagingRegion> region = alpha_->OpenStaging(64 * 1024);
  ASSERT_TRUE(region.ok()) << region.status();
  const uint64_t size = region->size();
  const uint64_t kv_bytes = uint64_t{2} * layout_.num_kv_heads * layout_.head_dim;  // 1 token.
  // K runs past the end; an offset past the end; an offset that overflows offset + length.
  for (uint64_t offset : {size - kv_bytes + 2, size + 4096, ~uint64_t{0} - 8}) {
    EXPECT_EQ(alpha_->Append(alpha_seq_, 0, *region, offset, 0, 1).status().code(),
              StatusCode::kInvalidArgument)
        << offset;
  }
  // The output placement past the end.
  EXPECT_EQ(alpha_->Attend(alpha_seq_, 0, *region, 0, size - 8).status().code(),
            StatusCode::kInvalidArgument);
  // Another tenant's region.
  absl::StatusOr<StagingRegion> beta_region = beta_->OpenStaging(4096);
  ASSERT_TRUE(beta_region.ok());
  EXPECT_EQ(alpha_->Attend(alpha_seq_, 0, *beta_region, 0, 2048).status().code(),
            StatusCode::kInvalidArgument);
  // A closed region.
  const std::string shm_name = region->shm_name();
  StagingRegion moved = std::move(*region);
  ASSERT_TRUE(moved.Close().ok());
  EXPECT_EQ(alpha_->Attend(alpha_seq_, 0, moved, 0, 0).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(ShmNames(shm_name.substr(shm_name.find_first_not_of('/'))).empty())
      << "CloseStaging left " << shm_name;
  absl::StatusOr<v1::SequenceInfo> info = alpha_->GetSequence(alpha_seq_);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->layer_lengths(0), 20);
  ExpectStillServing();
}

TEST_F(ErrorsTest, ReleasedSequenceIsNotFound) {
  ASSERT_TRUE(alpha_->Release(alpha_seq_).ok());
  EXPECT_EQ(alpha_->Attend(alpha_seq_, 0, q_).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(alpha_->Append(alpha_seq_, 0, RandomKv(rng_, layout_, 1), RandomKv(rng_, layout_, 1), 1)
                .status()
                .code(),
            StatusCode::kNotFound);
  EXPECT_EQ(
      alpha_->DecodeStep(alpha_seq_, 0, q_, RandomKv(rng_, layout_, 1), RandomKv(rng_, layout_, 1))
          .status()
          .code(),
      StatusCode::kNotFound);
  EXPECT_EQ(alpha_->GetSequence(alpha_seq_).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(alpha_->Fork(alpha_seq_).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(alpha_->Truncate(alpha_seq_, 0).code(), StatusCode::kNotFound);
  EXPECT_EQ(alpha_->Release(alpha_seq_).code(), StatusCode::kNotFound);
  absl::StatusOr<std::vector<v1::SequenceInfo>> list = alpha_->ListSequences();
  ASSERT_TRUE(list.ok());
  EXPECT_TRUE(list->empty());
  ExpectStillServing();
}

TEST_F(ErrorsTest, LayoutConflictsAreAlreadyExistsOrInvalid) {
  ModelLayout other = layout_;
  other.num_q_heads = 4;
  EXPECT_EQ(alpha_->RegisterLayout(kLayoutName, other).code(), StatusCode::kAlreadyExists);
  // Layout names are per tenant: beta may use the name for another layout.
  ASSERT_TRUE(alpha_->RegisterLayout("shared-name", layout_).ok());
  EXPECT_EQ(beta_->RegisterLayout("shared-name", other).code(), StatusCode::kOk);
  ModelLayout invalid = layout_;
  invalid.head_dim = 65;
  EXPECT_EQ(alpha_->RegisterLayout("bad", invalid).code(), StatusCode::kInvalidArgument);
  ExpectStillServing();
}

// service.proto: "FAILED_PRECONDITION an operation out of order (e.g. a layer appended ahead of
// the others)".
TEST_F(ErrorsTest, OutOfOrderAppendIsFailedPrecondition) {
  // Layer 0 appends 5 tokens, then layer 0 again before layer 1 caught up: out of order.
  ASSERT_TRUE(
      alpha_->Append(alpha_seq_, 0, RandomKv(rng_, layout_, 5), RandomKv(rng_, layout_, 5), 5)
          .ok());
  const absl::StatusCode code =
      alpha_->Append(alpha_seq_, 0, RandomKv(rng_, layout_, 5), RandomKv(rng_, layout_, 5), 5)
          .status()
          .code();
  EXPECT_EQ(code, StatusCode::kFailedPrecondition);
  absl::StatusOr<v1::SequenceInfo> info = alpha_->GetSequence(alpha_seq_);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->layer_lengths(0), 25);
  EXPECT_EQ(info->layer_lengths(1), 20);
  ExpectStillServing();
}

}  // namespace
}  // namespace headwise::testing
