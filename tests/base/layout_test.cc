#include "cachesvc/base/layout.h"

#include "gtest/gtest.h"

namespace headwise {
namespace {

ModelLayout Llama3_8B() {
  ModelLayout layout;
  layout.num_layers = 32;
  layout.num_q_heads = 32;
  layout.num_kv_heads = 8;
  layout.head_dim = 128;
  layout.dtype = DType::kBF16;
  layout.page_tokens = 64;
  return layout;
}

TEST(ModelLayout, Llama3SizesMatchThePublishedFigures) {
  const ModelLayout layout = Llama3_8B();
  ASSERT_TRUE(ValidateLayout(layout).ok());
  EXPECT_EQ(layout.group_size(), 4);
  EXPECT_EQ(layout.token_bytes(), 131072);                    // 128 KiB of KV per token.
  EXPECT_EQ(layout.token_bytes() << 20, int64_t{128} << 30);  // 128 GiB at 2^20 tokens.
  EXPECT_EQ(layout.page_bytes(), 32768);
}

TEST(ModelLayout, RejectsEachBadField) {
  auto expect_invalid = [](ModelLayout layout, const char* field) {
    const absl::Status status = ValidateLayout(layout);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(status.message().find(field), std::string::npos) << status;
  };
  ModelLayout l = Llama3_8B();
  l.num_layers = 0;
  expect_invalid(l, "num_layers");
  l = Llama3_8B();
  l.num_kv_heads = 0;
  expect_invalid(l, "num_kv_heads");
  l = Llama3_8B();
  l.num_q_heads = 30;
  expect_invalid(l, "num_q_heads");
  l = Llama3_8B();
  l.head_dim = 100;
  expect_invalid(l, "head_dim");
  l = Llama3_8B();
  l.page_tokens = 48;
  expect_invalid(l, "page_tokens");
  l = Llama3_8B();
  l.page_tokens = 2048;
  expect_invalid(l, "page_tokens");
  l = Llama3_8B();
  l.dtype = static_cast<DType>(9);
  expect_invalid(l, "dtype");
}

}  // namespace
}  // namespace headwise
