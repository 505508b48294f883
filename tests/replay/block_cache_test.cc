// Hand-computed hit/miss sequences for every block cache policy, including the traces where they
// part ways, and properties checked on random traces (fresh data, seeded).
#include "cachesvc/replay/block_cache.h"

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace headwise {
namespace {

constexpr BlockId A = 1, B = 2, C = 3, D = 4, E = 5, F = 6, G = 7;

struct Outcome {
  std::string hits;  // 'H' or 'M' per reference.
  std::vector<BlockId> evicted;
};

// Replays `trace` through a new `policy` cache of `capacity` blocks.
Outcome Replay(const std::string& policy, int64_t capacity, const std::vector<BlockId>& trace) {
  auto cache = MakeBlockCache(policy, capacity, trace);
  EXPECT_TRUE(cache.ok()) << cache.status();
  Outcome run;
  for (const BlockId id : trace) {
    run.hits += (*cache)->Access(id, &run.evicted) ? 'H' : 'M';
    EXPECT_LE((*cache)->size(), capacity);
  }
  return run;
}

TEST(BlockCacheTest, LruEvictsTheLeastRecentlyUsed) {
  // cap 2: A [A], B [B A], A hit [A B], C evicts B [C A], B evicts A [B C], A evicts C [A B].
  const Outcome run = Replay("lru", 2, {A, B, A, C, B, A});
  EXPECT_EQ(run.hits, "MMHMMM");
  EXPECT_EQ(run.evicted, (std::vector<BlockId>{B, A, C}));
}

TEST(BlockCacheTest, LfuKeepsTheFrequentBlockWhereLruDropsIt) {
  // cap 2: A1, B1, A2, C evicts B (count 1) -> {A2 C1}, B evicts C -> {A2 B1}, A hit.
  const Outcome run = Replay("lfu", 2, {A, B, A, C, B, A});
  EXPECT_EQ(run.hits, "MMHMMH");
  EXPECT_EQ(run.evicted, (std::vector<BlockId>{B, C}));
}

TEST(BlockCacheTest, LfuBreaksTiesByLeastRecentUse) {
  // A B C: A and B both count 1, A older -> A goes. Then A: B and C tie, B older -> B goes.
  EXPECT_EQ(Replay("lfu", 2, {A, B, C, A}).evicted, (std::vector<BlockId>{A, B}));
  // B A B A: both count 2, B last touched before A -> C evicts B (not A, the smaller id).
  const Outcome run = Replay("lfu", 2, {B, A, B, A, C});
  EXPECT_EQ(run.hits, "MMHHM");
  EXPECT_EQ(run.evicted, (std::vector<BlockId>{B}));
}

TEST(BlockCacheTest, S3FifoFiltersOneHitWonders) {
  // cap 2: small 1, main 1, ghost 1.
  //  A A A          A in small, frequency 2
  //  B              small [B A] (the cache is not full yet)
  //  C              evict from small: A (freq 2) moves to main (freq 0), B (0) evicted -> ghost [B]
  //  A              hit in main, freq 1
  //  D              small tail C evicted -> ghost [C] (B falls out); small [D]
  //  A              hit, freq 2
  //  C              ghost hit: small tail D evicted -> ghost [D]; C enters main: main [C A]
  //  E              main over its share: A (freq 2) reinserted with 1, C (0) evicted; small [E]
  //  A              hit
  const std::vector<BlockId> trace = {A, A, A, B, C, A, D, A, C, E, A};
  const Outcome run = Replay("s3fifo", 2, trace);
  EXPECT_EQ(run.hits, "MHHMMHMHMMH");
  EXPECT_EQ(run.evicted, (std::vector<BlockId>{B, C, D, C}));
  // LRU loses A to the scans.
  EXPECT_EQ(Replay("lru", 2, trace).hits, "MHHMMMMHMMM");
}

TEST(BlockCacheTest, S3FifoFrequencyIsCappedAtThree) {
  // cap 2 again. A A A B C puts A in main (freq 0), C in small, B in the ghost. Five hits take A
  // to 3, not 5. Then each ghost hit (B, C, D, E) pushes a block into main, so the next miss
  // evicts from main: A is reinserted with 2, 1, 0 and goes at the fourth pass (G). Uncapped, it
  // would survive.
  //   B: C evicted (ghost [C]), main [B A]      D: A 3->2, B evicted; small [D]
  //   C: D evicted, main [C A]                  E: A 2->1, C evicted; small [E]
  //   D: E evicted, main [D A]                  F: A 1->0, D evicted; small [F]
  //   E: F evicted, main [E A]                  G: A (0) evicted; small [G]
  //   A: a plain miss (main evictions leave no ghost): G evicted from small.
  const Outcome run =
      Replay("s3fifo", 2, {A, A, A, B, C, A, A, A, A, A, B, D, C, E, D, F, E, G, A});
  EXPECT_EQ(run.hits, "MHHMMHHHHHMMMMMMMMM");
  EXPECT_EQ(run.evicted, (std::vector<BlockId>{B, C, B, D, C, E, D, F, A, G}));
}

TEST(BlockCacheTest, ArcAdaptsBetweenRecencyAndFrequency) {
  // cap 2, p = 0:
  //  A        T1 [A]
  //  A        hit: T2 [A]
  //  B        T1 [B]
  //  C        full: |T1| = 1 > p -> B to B1; T1 [C]
  //  A        hit in T2
  //  B        B1 hit: p = 1; |T1| = 1 is not > p -> T2's LRU A to B2; T2 [B]
  //  A        B2 hit: p = 0; |T1| = 1 > 0 -> C to B1; T2 [A B]
  //  C        B1 hit: p = 1; T1 empty -> T2's LRU B to B2; T2 [C A]
  const std::vector<BlockId> trace = {A, A, B, C, A, B, A, C};
  const Outcome run = Replay("arc", 2, trace);
  EXPECT_EQ(run.hits, "MHMMHMMM");
  EXPECT_EQ(run.evicted, (std::vector<BlockId>{B, A, C, B}));
  EXPECT_EQ(Replay("lru", 2, trace).hits, "MHMMMMHM");
}

TEST(BlockCacheTest, BeladyEvictsTheFarthestNextUseAndMayDeclineABlock) {
  // cap 2: A (next use 3), B (next 4); C is never used again: not admitted; A, B hit.
  const std::vector<BlockId> trace = {A, B, C, A, B};
  const Outcome run = Replay("belady", 2, trace);
  EXPECT_EQ(run.hits, "MMMHH");
  EXPECT_TRUE(run.evicted.empty());
  EXPECT_EQ(Replay("lru", 2, trace).hits, "MMMMM");
  // cap 2: A B C D A B: C and D are never used again, so both are declined; A and B hit.
  EXPECT_EQ(Replay("belady", 2, {A, B, C, D, A, B}).hits, "MMMMHH");
  // cap 2: A B C A C B: at C (next 4), B (next 5) is the farthest -> B evicted.
  const Outcome evicting = Replay("belady", 2, {A, B, C, A, C, B});
  EXPECT_EQ(evicting.hits, "MMMHHM");
  EXPECT_EQ(evicting.evicted, (std::vector<BlockId>{B}));
}

TEST(BlockCacheTest, BeladyInsertReportsTheDecline) {
  const std::vector<BlockId> trace = {A, B, E, A, B};
  auto cache = MakeBlockCache("belady", 2, trace);
  ASSERT_TRUE(cache.ok());
  std::vector<BlockId> evicted;
  EXPECT_TRUE((*cache)->Insert(A, &evicted));
  EXPECT_TRUE((*cache)->Insert(B, &evicted));
  EXPECT_FALSE((*cache)->Insert(E, &evicted));
  EXPECT_FALSE((*cache)->Lookup(E));
  EXPECT_TRUE(evicted.empty());
}

TEST(BlockCacheTest, BeladyStillWorksWhenCallsStrayFromItsFuture) {
  // Planned for A B A, called with C first: C was never planned (next use: never), and the
  // positions shift; the cache stays consistent and within capacity.
  auto cache = MakeBlockCache("belady", 1, std::vector<BlockId>{A, B, A});
  ASSERT_TRUE(cache.ok());
  std::vector<BlockId> evicted;
  EXPECT_FALSE((*cache)->Access(C, &evicted));
  EXPECT_TRUE((*cache)->Lookup(C));  // Room for one: admitted.
  EXPECT_FALSE((*cache)->Access(A, &evicted));
  EXPECT_EQ((*cache)->size(), 1);
  EXPECT_FALSE((*cache)->Access(B, &evicted));
  EXPECT_LE((*cache)->size(), 1);
}

TEST(BlockCacheTest, UnknownNameAndBadCapacityAreRejected) {
  const auto unknown = MakeBlockCache("mru", 4);
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("lru, lfu, s3fifo, arc, belady"), std::string::npos);
  EXPECT_FALSE(MakeBlockCache("lru", 0).ok());
  EXPECT_TRUE(BlockCachePolicyIsOffline("belady"));
  EXPECT_FALSE(BlockCachePolicyIsOffline("arc"));
}

std::vector<BlockId> RandomTrace(uint32_t seed, int length, int universe) {
  std::mt19937 rng(seed);
  // Skewed: half the references from a hot tenth of the ids.
  std::uniform_int_distribution<int> any(0, universe - 1), hot(0, universe / 10);
  std::vector<BlockId> trace;
  for (int i = 0; i < length; ++i)
    trace.push_back(static_cast<BlockId>(rng() % 2 ? any(rng) : hot(rng)));
  return trace;
}

TEST(BlockCacheTest, EveryPolicyKeepsItsInvariantsOnRandomTraces) {
  for (const std::string& policy : BlockCachePolicyNames()) {
    for (const int64_t capacity : {1, 3, 10, 40}) {
      const std::vector<BlockId> trace = RandomTrace(7 + capacity, 3000, 200);
      auto made = MakeBlockCache(policy, capacity, trace);
      ASSERT_TRUE(made.ok());
      BlockCache& cache = **made;
      EXPECT_EQ(cache.name(), policy);
      std::vector<BlockId> evicted;
      for (const BlockId id : trace) {
        evicted.clear();
        const bool hit = cache.Lookup(id);
        EXPECT_EQ(cache.Access(id, &evicted), hit);
        EXPECT_LE(cache.size(), capacity) << policy;
        for (const BlockId gone : evicted) {
          EXPECT_NE(gone, id) << policy;
          EXPECT_FALSE(cache.Lookup(gone)) << policy;
        }
        if (policy != "belady") {
          EXPECT_TRUE(cache.Lookup(id)) << policy;
        }
      }
      // Erase drops a resident block and only that.
      const int64_t before = cache.size();
      const BlockId last = trace.back();
      if (cache.Lookup(last)) {
        EXPECT_TRUE(cache.Erase(last));
        EXPECT_FALSE(cache.Lookup(last));
        EXPECT_EQ(cache.size(), before - 1);
      }
      EXPECT_FALSE(cache.Erase(1000000));
    }
  }
}

TEST(BlockCacheTest, BeladyIsTheCeilingOnRandomTraces) {
  for (uint32_t seed = 1; seed <= 5; ++seed) {
    for (const int64_t capacity : {2, 8, 32}) {
      const std::vector<BlockId> trace = RandomTrace(seed, 4000, 300);
      const size_t best = [&] {
        const std::string h = Replay("belady", capacity, trace).hits;
        return static_cast<size_t>(std::count(h.begin(), h.end(), 'H'));
      }();
      for (const std::string& policy : BlockCachePolicyNames()) {
        const std::string h = Replay(policy, capacity, trace).hits;
        EXPECT_LE(static_cast<size_t>(std::count(h.begin(), h.end(), 'H')), best)
            << policy << " capacity " << capacity << " seed " << seed;
      }
    }
  }
}

}  // namespace
}  // namespace headwise
