// Request-level replay: a hand-computed trace (hit counts, bytes, the cost model), options
// checking, and the real Mooncake conversation trace (the 0.366 ceiling; Belady above every online
// policy at every capacity).
#include "cachesvc/replay/request_replay.h"

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "cachesvc/replay/replay_report.h"
#include "gtest/gtest.h"

namespace headwise {
namespace {

DeviceProfile TestDevice() {
  return {.name = "test",
          .description = "round numbers",
          .device_bytes_per_s = 1e12,
          .link_bytes_per_s = 1e9,
          .disk_bytes_per_s = 1e8,
          .flops_per_s = 1e12,
          .device_memory_bytes = int64_t{1} << 30};
}

RequestReplayOptions TestOptions() {
  RequestReplayOptions options;
  options.token_kv_bytes = 1000;
  options.model_params = 1e9;
  options.device = TestDevice();
  return options;
}

// r1 [1 2 3] (1536 tokens), r2 [1 2 4] (1100: 512 512 76), r3 [5 2 3] (1300: 512 512 276).
RequestTrace HandTrace() {
  RequestTrace trace;
  trace.source = "hand";
  trace.requests = {
      {.arrival_s = 0, .input_tokens = 1536, .output_tokens = 1, .blocks = {1, 2, 3}},
      {.arrival_s = 1, .input_tokens = 1100, .output_tokens = 2, .blocks = {1, 2, 4}},
      {.arrival_s = 3, .input_tokens = 1300, .output_tokens = 3, .blocks = {5, 2, 3}}};
  return trace;
}

const PolicyResult& Find(const RequestReplayReport& report, const std::string& policy,
                         const std::string& capacity) {
  for (const PolicyResult& r : report.results) {
    if (r.policy == policy && r.capacity_label == capacity) return r;
  }
  ADD_FAILURE() << "no row " << policy << " " << capacity;
  static const PolicyResult kNone;
  return kNone;
}

TEST(RequestReplayTest, HandTraceCountsPrefixAndAllHits) {
  RequestReplayOptions options = TestOptions();
  options.policies = {"lru", "belady"};
  options.capacity_fractions = {0.4, 0.6};  // 2 and 3 of the 5 unique blocks.
  const auto report = ReplayRequests(HandTrace(), options);
  ASSERT_TRUE(report.ok()) << report.status();
  const TraceSummary& s = report->summary;
  EXPECT_EQ(s.requests, 3);
  EXPECT_DOUBLE_EQ(s.duration_s, 3);
  EXPECT_EQ(s.input_tokens, 3936);
  EXPECT_EQ(s.output_tokens, 6);
  EXPECT_EQ(s.p50_input_tokens, 1300);
  EXPECT_EQ(s.p99_input_tokens, 1536);
  EXPECT_EQ(s.blocks, 9);
  EXPECT_EQ(s.unique_blocks, 5);
  EXPECT_DOUBLE_EQ(s.unlimited_hit_ratio, 4.0 / 9);
  EXPECT_DOUBLE_EQ(s.input_kv_bytes, 3936e3);
  EXPECT_DOUBLE_EQ(s.prefill_s, 3936 * 2e9 / 1e12);
  ASSERT_EQ(report->results.size(), 6u);
  EXPECT_EQ(report->results[0].capacity_label, "40%");
  EXPECT_EQ(report->results[5].capacity_label, "unlimited");

  // Unlimited: r2 hits 1 2 (its prefix), r3 hits 2 3 after missing 5 (not a prefix).
  const PolicyResult& all = Find(*report, "lru", "unlimited");
  EXPECT_EQ(all.capacity_blocks, 5);
  EXPECT_EQ(all.references, 9);
  EXPECT_EQ(all.hits, 4);
  EXPECT_EQ(all.prefix_hits, 2);
  EXPECT_EQ(all.prefix_hit_tokens, 1024);
  EXPECT_EQ(all.inserted, 5);
  EXPECT_EQ(all.evicted, 0);
  EXPECT_DOUBLE_EQ(all.hit_bytes, 1024e3);
  EXPECT_DOUBLE_EQ(all.inserted_bytes, (1536 + 76 + 512) * 1e3);
  EXPECT_DOUBLE_EQ(all.prefill_saved_s, 2.048);
  EXPECT_DOUBLE_EQ(all.load_s, 1.024e-3);
  EXPECT_NEAR(all.mean_ttft_saving_ms, 1e3 * (2.048 - 1.024e-3) / 3, 1e-9);

  // LRU at 2 blocks: every reference misses. At 3: r2's 1 2 hit, r3's 2 hits; 4, 5, 3 evict.
  const PolicyResult& lru2 = Find(*report, "lru", "40%");
  EXPECT_EQ(lru2.capacity_blocks, 2);
  EXPECT_EQ(lru2.hits, 0);
  EXPECT_EQ(lru2.inserted, 9);
  EXPECT_EQ(lru2.evicted, 7);
  const PolicyResult& lru3 = Find(*report, "lru", "60%");
  EXPECT_EQ(lru3.capacity_blocks, 3);
  EXPECT_EQ(lru3.hits, 3);
  EXPECT_EQ(lru3.prefix_hits, 2);
  EXPECT_EQ(lru3.inserted, 6);
  EXPECT_EQ(lru3.evicted, 3);
  // Belady at 3 keeps 1 2 3 and declines 4 and 5: four hits, the same two in a prefix.
  const PolicyResult& opt3 = Find(*report, "belady", "60%");
  EXPECT_EQ(opt3.hits, 4);
  EXPECT_EQ(opt3.prefix_hits, 2);
  EXPECT_EQ(opt3.inserted, 3);
  EXPECT_EQ(opt3.evicted, 0);
}

TEST(RequestReplayTest, RendersTableJsonAndCsv) {
  RequestReplayOptions options = TestOptions();
  options.policies = {"arc"};
  options.capacity_fractions = {0.6};
  const auto report = ReplayRequests(HandTrace(), options);
  ASSERT_TRUE(report.ok());
  const std::string table = FormatReplayTable(*report);
  EXPECT_NE(table.find("unlimited-cache hit ratio 0.4444"), std::string::npos) << table;
  EXPECT_NE(table.find("arc      unlimited"), std::string::npos) << table;
  const std::string json = ReplayReportJson(*report);
  EXPECT_NE(json.find("\"prefix_hit_ratio\""), std::string::npos);
  EXPECT_NE(json.find("\"unique_blocks\": 5"), std::string::npos) << json;
  const std::string csv = ReplayReportCsv(*report);
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 3);
  EXPECT_NE(csv.find("arc,unlimited,5,9,4,2,0.444444,0.222222,5,0,1024,1024000,2124000,"),
            std::string::npos)
      << csv;
}

TEST(RequestReplayTest, TraceWithoutBlocksGetsOnlyTheSummary) {
  RequestTrace trace;
  trace.format = RequestTraceFormat::kAzure;
  trace.source = "azure";
  trace.requests = {{.arrival_s = 0, .input_tokens = 100, .output_tokens = 5, .blocks = {}},
                    {.arrival_s = 2, .input_tokens = 300, .output_tokens = 7, .blocks = {}}};
  const auto report = ReplayRequests(trace, TestOptions());
  ASSERT_TRUE(report.ok());
  EXPECT_TRUE(report->results.empty());
  EXPECT_EQ(report->summary.input_tokens, 400);
  EXPECT_EQ(report->summary.blocks, 0);
  EXPECT_DOUBLE_EQ(report->summary.input_kv_bytes, 400e3);
  EXPECT_NE(FormatReplayTable(*report).find("reuse cannot be computed"), std::string::npos);
}

TEST(RequestReplayTest, RejectsBadOptions) {
  const RequestTrace trace = HandTrace();
  RequestReplayOptions options = TestOptions();
  options.policies = {"lru", "clock"};
  EXPECT_FALSE(ReplayRequests(trace, options).ok());
  for (const double bad : {0.0, -0.1, 1.5}) {
    options = TestOptions();
    options.capacity_fractions = {bad};
    EXPECT_FALSE(ReplayRequests(trace, options).ok()) << bad;
  }
  options = TestOptions();
  options.device.flops_per_s = 0;
  EXPECT_FALSE(ReplayRequests(trace, options).ok());
  options = TestOptions();
  options.token_kv_bytes = 0;
  EXPECT_FALSE(ReplayRequests(trace, options).ok());
  options = TestOptions();
  options.policies.clear();
  EXPECT_FALSE(ReplayRequests(trace, options).ok());
}

TEST(RequestReplayTest, MooncakeConversationTrace) {
  const std::string path =
      std::string(HEADWISE_SHARED_DIR) + "/data/traces/mooncake/conversation_trace.jsonl";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "no " << path;
  const auto trace = LoadRequestTrace(path, RequestTraceFormat::kMooncake);
  ASSERT_TRUE(trace.ok()) << trace.status();
  const auto report = ReplayRequests(*trace, TestOptions());
  ASSERT_TRUE(report.ok()) << report.status();
  const TraceSummary& s = report->summary;
  EXPECT_EQ(s.requests, 12031);
  EXPECT_EQ(s.blocks, 288500);
  EXPECT_EQ(s.unique_blocks, 182790);
  EXPECT_NEAR(s.unlimited_hit_ratio, 0.366, 5e-4);

  std::map<std::string, std::map<std::string, const PolicyResult*>> rows;  // capacity, policy.
  for (const PolicyResult& r : report->results) rows[r.capacity_label][r.policy] = &r;
  ASSERT_EQ(rows.size(), 4u);
  EXPECT_EQ(rows["5%"]["lru"]->capacity_blocks, 9140);
  EXPECT_EQ(rows["10%"]["lru"]->capacity_blocks, 18279);
  EXPECT_EQ(rows["25%"]["lru"]->capacity_blocks, 45698);
  // Independent implementations in Python (tests/replay/reference_policies.py: OrderedDict
  // queues, a lazy heap for LFU) over the same reference string give these hits at 5, 10, 25%.
  const std::map<std::string, std::vector<int64_t>> reference = {{"lru", {56382, 80323, 101978}},
                                                                 {"lfu", {36602, 56207, 97050}},
                                                                 {"s3fifo", {54122, 70849, 99821}},
                                                                 {"arc", {60627, 82006, 96784}}};
  for (const auto& [policy, hits] : reference) {
    EXPECT_EQ(rows["5%"][policy]->hits, hits[0]) << policy;
    EXPECT_EQ(rows["10%"][policy]->hits, hits[1]) << policy;
    EXPECT_EQ(rows["25%"][policy]->hits, hits[2]) << policy;
  }
  // At most 8,138 blocks with a later use are live at once (between a block's first and last
  // use), so the optimum already reaches the ceiling at 5% (9,140 blocks).
  EXPECT_EQ(rows["5%"]["belady"]->hits, 288500 - 182790);
  for (const auto& [policy, r] : rows["unlimited"]) {
    // The ids are chained, so with room for everything every seen block is a prefix hit.
    EXPECT_EQ(r->hits, 288500 - 182790) << policy;
    EXPECT_EQ(r->prefix_hits, r->hits) << policy;
    EXPECT_EQ(r->evicted, 0) << policy;
  }
  for (const auto& [capacity, by_policy] : rows) {
    ASSERT_EQ(by_policy.size(), 5u) << capacity;
    const PolicyResult* best = by_policy.at("belady");
    for (const auto& [policy, r] : by_policy) {
      EXPECT_EQ(r->references, 288500);
      EXPECT_LE(r->hits, best->hits) << policy << " at " << capacity;
    }
  }
  // LRU and OPT are stack algorithms: more room never loses a hit.
  for (const std::string policy : {"lru", "belady"}) {
    EXPECT_LE(rows["5%"][policy]->hits, rows["10%"][policy]->hits);
    EXPECT_LE(rows["10%"][policy]->hits, rows["25%"][policy]->hits);
    EXPECT_LE(rows["25%"][policy]->hits, rows["unlimited"][policy]->hits);
  }
}

}  // namespace
}  // namespace headwise
