// The planner's inputs: byte sizes, layout presets and files, device profiles.
#include <cstdint>
#include <string>

#include "cachesvc/planner/byte_size.h"
#include "cachesvc/planner/device_profile.h"
#include "cachesvc/planner/layout_presets.h"
#include "gtest/gtest.h"

namespace headwise {
namespace {

TEST(ByteSize, ParsesUnits) {
  const struct {
    const char* text;
    int64_t bytes;
  } cases[] = {
      {"1GiB", int64_t{1} << 30},
      {"512MiB", int64_t{512} << 20},
      {"1.5GB", 1500000000},
      {"4096", 4096},
      {"0", 0},
      {"1gib", int64_t{1} << 30},
      {"2 KiB", 2048},
      {"1.5KiB", 1536},
      {"7B", 7},
      {"1TiB", int64_t{1} << 40},
      {"0.5MB", 500000},
      {" 3MiB ", 3 << 20},
      {"1.", 1},
      {".5KB", 500},
  };
  for (const auto& c : cases) {
    absl::StatusOr<int64_t> bytes = ParseByteSize(c.text);
    ASSERT_TRUE(bytes.ok()) << c.text << ": " << bytes.status();
    EXPECT_EQ(*bytes, c.bytes) << c.text;
  }
}

TEST(ByteSize, RejectsMalformed) {
  for (const char* text : {"", "GiB", "-1GiB", "+1", "1e9", "1.2.3", "1 GiBs", "1XB", "1GiB/s",
                           "99999999999TiB", "."}) {
    absl::StatusOr<int64_t> bytes = ParseByteSize(text);
    EXPECT_EQ(bytes.status().code(), absl::StatusCode::kInvalidArgument) << text;
  }
}

TEST(ByteSize, Formats) {
  EXPECT_EQ(FormatBytes(int64_t{1} << 30), "1.00 GiB");
  EXPECT_EQ(FormatBytes(int64_t{512} << 20), "512.00 MiB");
  EXPECT_EQ(FormatBytes(37), "37 B");
  EXPECT_EQ(FormatRate(3.35e12), "3.35 TB/s");
  EXPECT_EQ(FormatRate(55e9), "55 GB/s");
}

TEST(LayoutPresets, AreValidAndMatchTheModels) {
  const struct {
    const char* name;
    int layers, q_heads, kv_heads;
  } expected[] = {{"llama-3-8b", 32, 32, 8},
                  {"llama-2-7b", 32, 32, 32},
                  {"mistral-7b", 32, 32, 8},
                  {"qwen2.5-7b", 28, 28, 4}};
  ASSERT_EQ(LayoutPresetNames().size(), std::size(expected));
  for (const auto& e : expected) {
    absl::StatusOr<ModelLayout> layout = LayoutPreset(e.name);
    ASSERT_TRUE(layout.ok()) << layout.status();
    EXPECT_TRUE(ValidateLayout(*layout).ok()) << e.name;
    EXPECT_EQ(layout->num_layers, e.layers) << e.name;
    EXPECT_EQ(layout->num_q_heads, e.q_heads) << e.name;
    EXPECT_EQ(layout->num_kv_heads, e.kv_heads) << e.name;
    EXPECT_EQ(layout->head_dim, 128) << e.name;
    EXPECT_EQ(layout->dtype, DType::kBF16) << e.name;
    EXPECT_EQ(layout->page_tokens, 64) << e.name;
  }
  EXPECT_TRUE(LayoutPreset("Llama-3-8B").ok());
  absl::StatusOr<ModelLayout> unknown = LayoutPreset("gpt-5");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("qwen2.5-7b"), std::string::npos);
}

TEST(LayoutFile, ParsesAndDefaults) {
  absl::StatusOr<ModelLayout> layout = ParseLayoutJson(
      R"({"name": "tiny", "layers": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 64,
          "dtype": "bf16", "page_tokens": 16})",
      "tiny.json");
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->num_layers, 2);
  EXPECT_EQ(layout->num_q_heads, 4);
  EXPECT_EQ(layout->num_kv_heads, 2);
  EXPECT_EQ(layout->head_dim, 64);
  EXPECT_EQ(layout->dtype, DType::kBF16);
  EXPECT_EQ(layout->page_tokens, 16);

  layout = ParseLayoutJson(R"({"layers": 1, "q_heads": 1, "kv_heads": 1, "head_dim": 8})", "x");
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->dtype, DType::kF16);
  EXPECT_EQ(layout->page_tokens, 64);
}

TEST(LayoutFile, RejectsBadFilesNamingTheProblem) {
  const struct {
    const char* json;
    const char* message;
  } cases[] = {
      {"{", "not valid JSON"},
      {"[1, 2]", "expected a JSON object"},
      {R"({"q_heads": 4, "kv_heads": 2, "head_dim": 64})", "missing required integer \"layers\""},
      {R"({"layers": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 64, "layer": 3})",
       "unknown key \"layer\""},
      {R"({"layers": "2", "q_heads": 4, "kv_heads": 2, "head_dim": 64})",
       "\"layers\" must be an integer"},
      {R"({"layers": 2.5, "q_heads": 4, "kv_heads": 2, "head_dim": 64})",
       "\"layers\" must be an integer"},
      {R"({"layers": 99999999999, "q_heads": 4, "kv_heads": 2, "head_dim": 64})", "out of range"},
      {R"({"layers": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 64, "dtype": "int8"})", "int8"},
      {R"({"layers": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 64, "dtype": 2})",
       "\"dtype\" must be a string"},
      {R"({"layers": 2, "q_heads": 6, "kv_heads": 4, "head_dim": 64})",
       "num_q_heads must be a multiple"},
      {R"({"layers": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 100})", "head_dim"},
      {R"({"layers": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 64, "page_tokens": 48})",
       "page_tokens"},
      {R"({"layers": 0, "q_heads": 4, "kv_heads": 2, "head_dim": 64})", "num_layers"},
  };
  for (const auto& c : cases) {
    absl::StatusOr<ModelLayout> layout = ParseLayoutJson(c.json, "bad.json");
    ASSERT_EQ(layout.status().code(), absl::StatusCode::kInvalidArgument) << c.json;
    EXPECT_NE(layout.status().message().find("bad.json"), std::string::npos) << c.json;
    EXPECT_NE(layout.status().message().find(c.message), std::string::npos)
        << c.json << " -> " << layout.status().message();
  }
  EXPECT_EQ(LoadLayoutFile("/nonexistent/layout.json").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(DeviceProfiles, PresetsAreValid) {
  for (const std::string& name : DeviceProfileNames()) {
    absl::StatusOr<DeviceProfile> profile = DeviceProfileByName(name, /*measure_cpu=*/false);
    ASSERT_TRUE(profile.ok()) << name;
    if (name == "cpu") continue;  // Bandwidths unmeasured here.
    EXPECT_TRUE(ValidateDeviceProfile(*profile).ok()) << name;
    // A GPU's memory is faster than its host link, which is faster than its disk.
    EXPECT_GT(profile->device_bytes_per_s, 10 * profile->link_bytes_per_s) << name;
    EXPECT_GT(profile->link_bytes_per_s, profile->disk_bytes_per_s) << name;
  }
  EXPECT_EQ(DeviceProfileByName("tpu").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(DeviceProfiles, CpuMeasuresMemoryBandwidth) {
  // A small buffer keeps the test quick; any real machine reads memory faster than 100 MB/s.
  const double bw = MeasureMemoryBandwidth(int64_t{32} << 20);
  EXPECT_GT(bw, 1e8);
  EXPECT_LT(bw, 1e14);
}

}  // namespace
}  // namespace headwise
