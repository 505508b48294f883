// Chained block hashes (hand-built SHA-256 inputs) and the per-sequence token record.
#include "cachesvc/prefix/block_hash.h"

#include <cstdint>
#include <string>
#include <vector>

#include "cachesvc/prefix/sequence_tokens.h"
#include "gtest/gtest.h"

namespace headwise {
namespace {

ModelLayout Layout() {
  ModelLayout l;
  l.num_layers = 2;
  l.num_q_heads = 4;
  l.num_kv_heads = 2;
  l.head_dim = 16;
  l.dtype = DType::kF16;
  l.page_tokens = 4;
  return l;
}

std::string Bytes(const BlockHash& h) {
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>(h.hi >> (56 - 8 * i)));
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>(h.lo >> (56 - 8 * i)));
  return out;
}

std::string Le32(const std::vector<int32_t>& ids) {
  std::string out;
  for (const int32_t t : ids) {
    for (int b = 0; b < 4; ++b) out.push_back(static_cast<char>(static_cast<uint32_t>(t) >> 8 * b));
  }
  return out;
}

TEST(BlockHashTest, ChainIsShaOfThePreviousHashAndTheBlocksTokens) {
  const PrefixIdentity id{"tenant-a", "llama", Layout(), 4};
  const BlockHash seed = PrefixSeed(id);
  EXPECT_EQ(seed, Sha256Prefix("headwise-prefix-v1|8:tenant-a|5:llama|2,4,2,16," +
                               std::to_string(static_cast<int>(DType::kF16)) + ",4|4"));
  const std::vector<int32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};  // Two full blocks.
  const std::vector<BlockHash> h = ChainBlockHashes(seed, tokens, 4);
  ASSERT_EQ(h.size(), 2u);
  EXPECT_EQ(h[0], Sha256Prefix(Bytes(seed) + Le32({1, 2, 3, 4})));
  EXPECT_EQ(h[1], Sha256Prefix(Bytes(h[0]) + Le32({5, 6, 7, 8})));
  EXPECT_EQ(h[0].ToHex().size(), 32u);
  // A change in block 0 changes every later hash; a change in block 1 leaves block 0's.
  std::vector<int32_t> changed = tokens;
  changed[5] = 60;
  const std::vector<BlockHash> c = ChainBlockHashes(seed, changed, 4);
  EXPECT_EQ(c[0], h[0]);
  EXPECT_NE(c[1], h[1]);
  changed[0] = 0;
  EXPECT_NE(ChainBlockHashes(seed, changed, 4)[1], h[1]);
}

TEST(BlockHashTest, SeedDependsOnScopeModelLayoutAndBlockSize) {
  const PrefixIdentity base{"t", "m", Layout(), 4};
  PrefixIdentity scope = base, model = base, layout = base, block = base;
  scope.scope = "u";
  model.model = "n";
  layout.layout.page_tokens = 2;
  block.block_tokens = 8;
  for (const PrefixIdentity& other : {scope, model, layout, block}) {
    EXPECT_NE(PrefixSeed(other), PrefixSeed(base));
  }
  // Length prefixes: ("ab", "c") and ("a", "bc") differ.
  EXPECT_NE(PrefixSeed({"ab", "c", Layout(), 4}), PrefixSeed({"a", "bc", Layout(), 4}));
}

TEST(SequenceTokensTest, RecordsContiguousIdsAndRefusesConflicts) {
  SequenceTokens t;
  EXPECT_TRUE(t.Check(0, {}, 3).ok());  // No ids: nothing to check.
  EXPECT_EQ(t.Check(0, {1, 2}, 3).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(t.Check(0, {1, -2, 3}, 3).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(t.Check(0, {1, 2, 3}, 3).ok());
  t.Record(0, {1, 2, 3});
  // Layer 1 of the same step: equal ids are fine, different ones refused.
  EXPECT_TRUE(t.Check(0, {1, 2, 3}, 3).ok());
  EXPECT_EQ(t.Check(0, {1, 9, 3}, 3).code(), absl::StatusCode::kInvalidArgument);
  t.Record(0, {1, 2, 3});
  EXPECT_EQ(t.size(), 3);
  t.Record(3, {4, 5});
  EXPECT_EQ(std::vector<int32_t>(t.ids().begin(), t.ids().end()),
            (std::vector<int32_t>{1, 2, 3, 4, 5}));
  t.Record(7, {8});  // After a gap: not recorded.
  EXPECT_EQ(t.size(), 5);
  t.Truncate(2);
  EXPECT_EQ(t.size(), 2);
  t.Record(1, {2, 7});  // Overlaps one known id, extends by one.
  EXPECT_EQ(std::vector<int32_t>(t.ids().begin(), t.ids().end()), (std::vector<int32_t>{1, 2, 7}));
}

}  // namespace
}  // namespace headwise
