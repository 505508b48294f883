#include "cachesvc/planner/layout_presets.h"

#include <cstdint>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cachesvc/base/bounded_file.h"
#include "cachesvc/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace headwise {
namespace {

struct Preset {
  const char* name;
  int layers;
  int q_heads;
  int kv_heads;
};

// head_dim 128, bf16, 64-token pages for all of them.
constexpr Preset kPresets[] = {
    {"llama-3-8b", 32, 32, 8},   // meta-llama/Meta-Llama-3-8B
    {"llama-2-7b", 32, 32, 32},  // meta-llama/Llama-2-7b-hf (MHA)
    {"mistral-7b", 32, 32, 8},   // mistralai/Mistral-7B-v0.1 .. v0.3
    {"qwen2.5-7b", 28, 28, 4},   // Qwen/Qwen2.5-7B (hidden 3584 = 28 x 128)
};

}  // namespace

std::vector<std::string> LayoutPresetNames() {
  std::vector<std::string> names;
  for (const Preset& p : kPresets) names.push_back(p.name);
  return names;
}

absl::StatusOr<ModelLayout> LayoutPreset(std::string_view name) {
  const std::string lower = absl::AsciiStrToLower(std::string(name));
  for (const Preset& p : kPresets) {
    if (lower != p.name) continue;
    ModelLayout layout;
    layout.num_layers = p.layers;
    layout.num_q_heads = p.q_heads;
    layout.num_kv_heads = p.kv_heads;
    layout.head_dim = 128;
    layout.dtype = DType::kBF16;
    layout.page_tokens = 64;
    return layout;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown layout '", std::string(name),
      "'; presets: ", absl::StrJoin(LayoutPresetNames(), ", "), " (or use --layout-file)"));
}

absl::StatusOr<ModelLayout> ParseLayoutJson(std::string_view text, std::string_view source_name) {
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("layout file ", std::string(source_name), ": ", why));
  };
  const nlohmann::json json =
      nlohmann::json::parse(text.begin(), text.end(), /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded()) return bad("not valid JSON");
  if (!json.is_object()) return bad("expected a JSON object");
  ModelLayout layout;
  const struct {
    const char* key;
    int* field;
    bool required;
  } ints[] = {{"layers", &layout.num_layers, true},
              {"q_heads", &layout.num_q_heads, true},
              {"kv_heads", &layout.num_kv_heads, true},
              {"head_dim", &layout.head_dim, true},
              {"page_tokens", &layout.page_tokens, false}};
  for (const auto& [key, value] : json.items()) {
    bool known = key == "dtype" || key == "name";
    for (const auto& f : ints) known = known || key == f.key;
    if (!known) {
      return bad(absl::StrCat("unknown key \"", key,
                              "\" (expected layers, q_heads, kv_heads, head_dim, dtype, "
                              "page_tokens, name)"));
    }
  }
  for (const auto& f : ints) {
    const auto it = json.find(f.key);
    if (it == json.end()) {
      if (f.required) return bad(absl::StrCat("missing required integer \"", f.key, "\""));
      continue;
    }
    if (!it->is_number_integer()) return bad(absl::StrCat("\"", f.key, "\" must be an integer"));
    const int64_t v = it->is_number_unsigned()
                          ? static_cast<int64_t>(std::min<uint64_t>(
                                it->get<uint64_t>(), std::numeric_limits<int64_t>::max()))
                          : it->get<int64_t>();
    if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max()) {
      return bad(absl::StrCat("\"", f.key, "\" is out of range: ", v));
    }
    *f.field = static_cast<int>(v);
  }
  if (const auto it = json.find("dtype"); it != json.end()) {
    if (!it->is_string()) return bad("\"dtype\" must be a string (f32, f16, bf16)");
    absl::StatusOr<DType> dtype = ParseDType(it->get<std::string>());
    if (!dtype.ok()) return bad(dtype.status().message());
    layout.dtype = *dtype;
  }
  if (const auto it = json.find("name"); it != json.end() && !it->is_string()) {
    return bad("\"name\" must be a string");
  }
  if (absl::Status valid = ValidateLayout(layout); !valid.ok()) return bad(valid.message());
  return layout;
}

absl::StatusOr<ModelLayout> LoadLayoutFile(const std::string& path) {
  BoundedReadOptions options;
  options.max_bytes = kMaxLayoutFileBytes;
  options.follow_final_symlink = true;  // The user names the file on their own machine.
  options.description = absl::StrCat("layout file ", path);
  absl::StatusOr<std::string> text = ReadBoundedFile(path, options);
  if (!text.ok()) {
    return absl::Status(text.status().code(),
                        absl::StrCat("cannot open ", text.status().message()));
  }
  return ParseLayoutJson(*text, path);
}

}  // namespace headwise
