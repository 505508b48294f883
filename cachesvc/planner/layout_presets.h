// Model layouts the planner knows by name, and small JSON layout files for the others.
#ifndef HEADWISE_CACHESVC_PLANNER_LAYOUT_PRESETS_H_
#define HEADWISE_CACHESVC_PLANNER_LAYOUT_PRESETS_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "cachesvc/base/layout.h"

namespace headwise {

// Preset names, in display order: "llama-3-8b" (32 layers, 32 q / 8 kv heads), "llama-2-7b"
// (32, 32 / 32), "mistral-7b" (32, 32 / 8), "qwen2.5-7b" (28, 28 / 4). All have head_dim 128,
// bf16 storage and 64-token pages (the models' config.json: num_hidden_layers,
// num_attention_heads, num_key_value_heads, hidden_size / num_attention_heads).
std::vector<std::string> LayoutPresetNames();

// The preset `name` (case-insensitive). INVALID_ARGUMENT for an unknown name, listing the
// presets.
absl::StatusOr<ModelLayout> LayoutPreset(std::string_view name);

// Parses a layout file: one JSON object with the integer fields "layers", "q_heads", "kv_heads",
// "head_dim" (required) and "page_tokens" (default 64), the string "dtype" ("f32", "f16",
// "bf16"; default "f16", ModelLayout's default) and an optional string "name" (ignored).
// INVALID_ARGUMENT naming `source_name` when the text is not JSON, is not an object, a required
// field is missing, a field has the wrong type or is out of int range, a key is unknown (to catch
// typos), or the layout fails ValidateLayout.
absl::StatusOr<ModelLayout> ParseLayoutJson(std::string_view text, std::string_view source_name);

// Largest layout file LoadLayoutFile reads.
inline constexpr uint64_t kMaxLayoutFileBytes = uint64_t{1} << 20;

// Reads the file at `path` (a regular file of at most kMaxLayoutFileBytes, through
// ReadBoundedFile) and parses it as ParseLayoutJson. NOT_FOUND when it does not exist,
// FAILED_PRECONDITION when it is not a regular file or is too large, PERMISSION_DENIED when it
// cannot be read; each message starts "cannot open layout file <path>".
absl::StatusOr<ModelLayout> LoadLayoutFile(const std::string& path);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_PLANNER_LAYOUT_PRESETS_H_
