// Prefix blocks in the engine (Engine::PinBlocks / CreateSequenceFromBlocks / ReadBlock /
// ImportBlock) and the PrefixCache over it: reused pages attend exactly like the originals
// (float64 reference on fresh random K/V), are held once (tier bytes), and evict by the policy.
#include <memory>
#include <string>
#include <vector>

#include "cachesvc/engine.h"
#include "cachesvc/prefix/block_hash.h"
#include "cachesvc/prefix/prefix_cache.h"
#include "gtest/gtest.h"
#include "tests/engine/engine_test_base.h"

namespace headwise {
namespace {

using engine_testing::EngineTest;
using engine_testing::Spec;
using testing::KvHistory;
using Mode = headwise::v1::Placement;

constexpr int kBlockTokens = 8;  // Two pages of SmallLayout's 4 tokens.

class PrefixEngineTest : public EngineTest {
 protected:
  void SetUp() override {
    EngineOptions options;
    options.device_budget_bytes = 1 << 20;
    options.host_budget_bytes = 1 << 20;
    MakeEngine(options, engine_testing::SmallLayout());
  }
  int64_t BlockBytes() const { return kBlockTokens * layout_.token_bytes(); }
  // A sequence of `blocks` full blocks (one append step per block) recorded in `history`.
  SequenceId Filled(KvHistory& history, int blocks, Mode::Mode mode, uint32_t seed) {
    auto seq = engine_->CreateSequence("small", Spec(mode));
    EXPECT_TRUE(seq.ok()) << seq.status();
    for (int b = 0; b < blocks; ++b) AppendStep(*seq, history, kBlockTokens, seed + b);
    return *seq;
  }
  std::vector<BlockPagesId> Ids(const std::vector<PinnedBlock>& pins) {
    std::vector<BlockPagesId> ids;
    for (const PinnedBlock& p : pins) ids.push_back(p.id);
    return ids;
  }
};

TEST_F(PrefixEngineTest, ReusedBlocksAttendLikeTheOriginalAndAreHeldOnce) {
  KvHistory history(layout_);
  const SequenceId a = Filled(history, 3, Mode::DEVICE_ONLY, 11);
  const std::vector<float> before = AttendAndCheck(a, history, 5);
  auto pins = engine_->PinBlocks(a, kBlockTokens, 0, 10);
  ASSERT_TRUE(pins.ok()) << pins.status();
  ASSERT_EQ(pins->size(), 3u);
  EXPECT_EQ((*pins)[1].first_position, kBlockTokens);
  EXPECT_EQ((*pins)[0].bytes, BlockBytes());
  EXPECT_EQ((*pins)[0].tier, Tier::kDevice);
  ASSERT_TRUE(engine_->Release(a).ok());
  const EngineStats held = engine_->GetStats();
  EXPECT_EQ(static_cast<int64_t>(held.device.used_bytes) % BlockBytes(), 0);

  auto b = engine_->CreateSequenceFromBlocks("small", Spec(Mode::DEVICE_ONLY), Ids(*pins));
  ASSERT_TRUE(b.ok()) << b.status();
  // No second copy: the tier holds the same bytes and every page of b is shared with the pins.
  EXPECT_EQ(engine_->GetStats().device.used_bytes, held.device.used_bytes);
  EXPECT_EQ(engine_->GetStats().device_pages, held.device_pages);
  auto stats = engine_->GetSequenceStats(*b);
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->length, 3 * kBlockTokens);
  EXPECT_EQ(stats->device_bytes, 3 * BlockBytes());
  EXPECT_EQ(stats->shared_pages, stats->device_pages);
  EXPECT_EQ(AttendAndCheck(*b, history, 5), before);  // Same pages, same kernel: bit-equal.

  // The reuser appends past the prefix; the pinned pages are unchanged for the next one.
  AppendStep(*b, history, 5, 99);
  AttendAndCheck(*b, history, 6);
  auto c = engine_->CreateSequenceFromBlocks("small", Spec(Mode::DEVICE_ONLY), Ids(*pins));
  ASSERT_TRUE(c.ok());
  history.Truncate(3 * kBlockTokens);
  EXPECT_EQ(AttendAndCheck(*c, history, 5), before);
  for (const PinnedBlock& p : *pins) ASSERT_TRUE(engine_->UnpinBlock(p.id).ok());
  ASSERT_TRUE(engine_->Release(*b).ok());
  ASSERT_TRUE(engine_->Release(*c).ok());
  EXPECT_EQ(engine_->GetStats().device.used_bytes, 0u);
  EXPECT_EQ(engine_->pinned_blocks(), 0);
}

TEST_F(PrefixEngineTest, PinsStopAtTheFirstBlockThatIsNotWhole) {
  KvHistory history(layout_);
  const SequenceId a = Filled(history, 2, Mode::LAYER_OFFLOAD, 3);
  AppendStep(a, history, kBlockTokens - 1, 7);  // A third block, one token short.
  auto pins = engine_->PinBlocks(a, kBlockTokens, 0, 10);
  ASSERT_TRUE(pins.ok());
  ASSERT_EQ(pins->size(), 2u);
  EXPECT_EQ((*pins)[0].tier, Tier::kHost);
  // From block 1 only, and nothing past the end.
  auto later = engine_->PinBlocks(a, kBlockTokens, 1, 10);
  ASSERT_TRUE(later.ok());
  EXPECT_EQ(later->size(), 1u);
  EXPECT_FALSE(engine_->PinBlocks(a, 6, 0, 1).ok());  // Not a multiple of the page.
  // Out of order, or in another tier than the spec's home tier: refused, nothing created.
  const int64_t sequences = engine_->GetStats().sequences;
  EXPECT_EQ(engine_
                ->CreateSequenceFromBlocks("small", Spec(Mode::LAYER_OFFLOAD),
                                           {(*pins)[1].id, (*pins)[0].id})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->CreateSequenceFromBlocks("small", Spec(Mode::DEVICE_ONLY), {(*pins)[0].id})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->GetStats().sequences, sequences);
  // A host-tier reuser of the pins attends like the original.
  auto b = engine_->CreateSequenceFromBlocks("small", Spec(Mode::LAYER_OFFLOAD), Ids(*pins));
  ASSERT_TRUE(b.ok());
  history.Truncate(2 * kBlockTokens);
  AttendAndCheck(*b, history, 9);
}

TEST_F(PrefixEngineTest, ReadAndImportRoundTrip) {
  KvHistory history(layout_);
  const SequenceId a = Filled(history, 2, Mode::DEVICE_ONLY, 21);
  auto pins = engine_->PinBlocks(a, kBlockTokens, 0, 2);
  ASSERT_TRUE(pins.ok());
  std::vector<BlockPagesId> imported;
  for (const PinnedBlock& p : *pins) {
    auto bytes = engine_->ReadBlock(p.id);
    ASSERT_TRUE(bytes.ok());
    ASSERT_EQ(static_cast<int64_t>(bytes->size()), BlockBytes());
    const auto* data = reinterpret_cast<const std::byte*>(bytes->data());
    auto wrong = engine_->ImportBlock("small", Tier::kHost, p.first_position, kBlockTokens,
                                      absl::MakeSpan(data, bytes->size() - 1));
    EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument);
    auto in = engine_->ImportBlock("small", Tier::kHost, p.first_position, kBlockTokens,
                                   absl::MakeSpan(data, bytes->size()));
    ASSERT_TRUE(in.ok()) << in.status();
    imported.push_back(in->id);
  }
  ASSERT_TRUE(engine_->Release(a).ok());
  auto b = engine_->CreateSequenceFromBlocks("small", Spec(Mode::HEAD_OFFLOAD), imported);
  ASSERT_TRUE(b.ok()) << b.status();
  AttendAndCheck(*b, history, 4);
}

// The cache: LRU over blocks of one tier with a budget of two blocks.
TEST_F(PrefixEngineTest, CacheReusesTheLongestPrefixAndEvictsByPolicy) {
  PrefixCacheOptions options;
  options.engine = engine_.get();
  options.device_budget_bytes = 2 * BlockBytes();
  auto cache = PrefixCache::Create(options);
  ASSERT_TRUE(cache.ok()) << cache.status();
  PrefixIdentity identity{"tenant", "small", layout_, kBlockTokens};
  const BlockHash seed = PrefixSeed(identity);
  std::vector<int32_t> tokens(3 * kBlockTokens);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(1000 + i);
  const std::vector<BlockHash> hashes = ChainBlockHashes(seed, tokens, kBlockTokens);

  PrefixRequest request{"small", Spec(Mode::DEVICE_ONLY), Tier::kDevice, kBlockTokens, BlockBytes(),
                        hashes};
  auto first = (*cache)->Start(request);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->cached_tokens, 0);
  KvHistory history(layout_);
  for (int b = 0; b < 3; ++b) AppendStep(first->id, history, kBlockTokens, 40 + b);
  AttendAndCheck(first->id, history, 2);
  (*cache)->Publish(first->id, kBlockTokens, hashes, first->hit_blocks);
  ASSERT_TRUE(engine_->Release(first->id).ok());
  // Budget of two blocks, LRU: blocks 0 and 1 were inserted, block 2 evicted block 0. The
  // longest cached prefix of the same tokens is therefore empty.
  PrefixCacheStats s = (*cache)->Stats();
  EXPECT_EQ(s.tiers[0].inserted_blocks, 3);
  EXPECT_EQ(s.tiers[0].evicted_blocks, 1);
  EXPECT_EQ(s.tiers[0].resident_bytes, static_cast<uint64_t>(2 * BlockBytes()));
  EXPECT_EQ(engine_->GetStats().device.used_bytes, static_cast<uint64_t>(2 * BlockBytes()));
  auto miss = (*cache)->Start(request);
  ASSERT_TRUE(miss.ok());
  EXPECT_EQ(miss->cached_tokens, 0);
  ASSERT_TRUE(engine_->Release(miss->id).ok());

  // Two blocks fit: publish 0..1 of a fresh sequence, then the same prefix is found whole.
  const std::vector<BlockHash> two(hashes.begin(), hashes.begin() + 2);
  PrefixRequest short_request = request;
  short_request.hashes = two;
  auto second = (*cache)->Start(short_request);
  ASSERT_TRUE(second.ok());
  KvHistory history2(layout_);
  for (int b = 0; b < 2; ++b) AppendStep(second->id, history2, kBlockTokens, 40 + b);
  (*cache)->Publish(second->id, kBlockTokens, two, second->hit_blocks);
  ASSERT_TRUE(engine_->Release(second->id).ok());
  auto hit = (*cache)->Start(request);
  ASSERT_TRUE(hit.ok());
  EXPECT_EQ(hit->cached_tokens, 2 * kBlockTokens);
  AttendAndCheck(hit->id, history2, 2);
  s = (*cache)->Stats();
  EXPECT_EQ(s.tiers[0].hit_blocks, 2);
  EXPECT_EQ(s.tiers[0].bytes_saved, static_cast<uint64_t>(2 * BlockBytes()));
  EXPECT_EQ(s.lookups, 4);
  EXPECT_EQ(s.miss_blocks, 3 + 3 + 2 + 1);
  // Another scope's hashes of the same tokens never match.
  PrefixIdentity other = identity;
  other.scope = "other";
  const std::vector<BlockHash> theirs = ChainBlockHashes(PrefixSeed(other), tokens, kBlockTokens);
  PrefixRequest their_request = request;
  their_request.hashes = theirs;
  auto none = (*cache)->Start(their_request);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->cached_tokens, 0);
}

}  // namespace
}  // namespace headwise
