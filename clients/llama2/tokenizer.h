// Tokenizer: the llama2.c BPE tokenizer (`tokenizer.bin` / `tok512.bin`), with encode and decode
// exactly as llama2.c's run.c does them (karpathy/llama2.c, `encode`, `decode`).
//
// File layout: int32 max_token_length, then per token: float32 merge score, int32 byte length,
// that many bytes (no terminator). Ids 0, 1, 2 are <unk>, BOS, EOS; ids 3..258 are the byte
// tokens "<0x00>".."<0xFF>" used for byte fallback.
//
// Thread-safety: const methods may be called concurrently.
#ifndef HEADWISE_CLIENTS_LLAMA2_TOKENIZER_H_
#define HEADWISE_CLIENTS_LLAMA2_TOKENIZER_H_

#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace headwise::llama2 {

inline constexpr int kBosToken = 1;
inline constexpr int kEosToken = 2;

class Tokenizer {
 public:
  // Parses a tokenizer file held in memory with `vocab_size` entries (the model's vocab size).
  // INVALID_ARGUMENT for vocab_size < 3 or a negative length; DATA_LOSS when the bytes end
  // before the last entry.
  static absl::StatusOr<Tokenizer> Parse(const std::string& bytes, int vocab_size);
  // Reads and parses `path`; NOT_FOUND when it cannot be opened.
  static absl::StatusOr<Tokenizer> Load(const std::string& path, int vocab_size);

  // run.c's encode: optional BOS; then, unless `text` is empty, the token of " " (the dummy
  // prefix sentencepiece adds with add_dummy_prefix); then one token per UTF-8 code point (up
  // to 4 bytes), falling back to byte tokens (byte + 3) for code points not in the vocabulary;
  // then repeatedly merges the adjacent pair whose concatenation is in the vocabulary with the
  // highest score (the leftmost on ties), until no pair merges; then optional EOS. The merge
  // pass includes the BOS token, as run.c's does. Like run.c, `text` ends at its first NUL byte.
  // If " " is not in the vocabulary the dummy prefix is its byte token (run.c would index -1).
  std::vector<int> Encode(std::string_view text, bool bos, bool eos) const;

  // run.c's decode: the bytes of `token` following `prev_token`. After BOS a leading space is
  // stripped (sentencepiece's decoder does the same); a byte token "<0xXX>" decodes to that
  // single byte. Out-of-range ids decode to "".
  std::string Decode(int prev_token, int token) const;

  // The raw vocabulary entry of `token` ("" when out of range).
  const std::string& Piece(int token) const;
  float Score(int token) const { return scores_[token]; }
  int vocab_size() const { return static_cast<int>(vocab_.size()); }
  int max_token_length() const { return max_token_length_; }

  // run.c's safe_printf filter: true when `piece` is worth printing (not empty, and not a lone
  // byte that is neither printable nor whitespace).
  static bool IsPrintable(std::string_view piece);

 private:
  Tokenizer() = default;
  // The id of `piece`, or -1.
  int Lookup(const std::string& piece) const;

  int max_token_length_ = 0;
  std::vector<std::string> vocab_;
  std::vector<float> scores_;
  absl::flat_hash_map<std::string, int> ids_;
};

}  // namespace headwise::llama2

#endif  // HEADWISE_CLIENTS_LLAMA2_TOKENIZER_H_
