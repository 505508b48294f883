#include "clients/llama2/tokenizer.h"

#include <cctype>
#include <cstdint>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "clients/llama2/checkpoint.h"

namespace headwise::llama2 {
namespace {

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Mirrors run.c's `sscanf(piece, "<0x%02hhX>", &byte_val) == 1`: "<0x" then one or two hex
// digits (sscanf reports the conversion before it checks the closing '>').
int ParseByteToken(std::string_view piece) {
  if (piece.size() < 4 || piece.substr(0, 3) != "<0x") return -1;
  int value = HexValue(piece[3]);
  if (value < 0) return -1;
  if (piece.size() > 4 && HexValue(piece[4]) >= 0) value = value * 16 + HexValue(piece[4]);
  return value;
}

}  // namespace

absl::StatusOr<Tokenizer> Tokenizer::Parse(const std::string& bytes, int vocab_size) {
  if (vocab_size < 3) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer vocab_size ", vocab_size, " < 3"));
  }
  size_t offset = 0;
  auto read = [&](void* dst, size_t n) {
    if (bytes.size() - offset < n) return false;
    std::memcpy(dst, bytes.data() + offset, n);
    offset += n;
    return true;
  };
  Tokenizer t;
  int32_t max_len = 0;
  if (!read(&max_len, sizeof(max_len))) {
    return absl::DataLossError("tokenizer file ends before max_token_length");
  }
  t.max_token_length_ = max_len;
  t.vocab_.reserve(vocab_size);
  t.scores_.reserve(vocab_size);
  for (int i = 0; i < vocab_size; ++i) {
    float score = 0;
    int32_t len = 0;
    if (!read(&score, sizeof(score)) || !read(&len, sizeof(len))) {
      return absl::DataLossError(
          absl::StrCat("tokenizer file ends at token ", i, " of ", vocab_size));
    }
    if (len < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer token ", i, " has negative length ", len));
    }
    if (bytes.size() - offset < static_cast<size_t>(len)) {
      return absl::DataLossError(
          absl::StrCat("tokenizer file ends inside token ", i, " (length ", len, ")"));
    }
    std::string piece = bytes.substr(offset, len);
    offset += len;
    // run.c keeps C strings: anything after an embedded NUL is invisible to it.
    piece.resize(std::strlen(piece.c_str()));
    t.ids_.try_emplace(piece, i);  // The first id wins for duplicate pieces.
    t.vocab_.push_back(std::move(piece));
    t.scores_.push_back(score);
  }
  return t;
}

absl::StatusOr<Tokenizer> Tokenizer::Load(const std::string& path, int vocab_size) {
  absl::StatusOr<std::string> bytes = ReadFileBytes(path);
  if (!bytes.ok()) return bytes.status();
  absl::StatusOr<Tokenizer> t = Parse(*bytes, vocab_size);
  if (!t.ok()) {
    return absl::Status(t.status().code(), absl::StrCat(path, ": ", t.status().message()));
  }
  return t;
}

int Tokenizer::Lookup(const std::string& piece) const {
  auto it = ids_.find(piece);
  return it == ids_.end() ? -1 : it->second;
}

const std::string& Tokenizer::Piece(int token) const {
  static const std::string* const kEmpty = new std::string();
  if (token < 0 || token >= vocab_size()) return *kEmpty;
  return vocab_[token];
}

std::vector<int> Tokenizer::Encode(std::string_view text, bool bos, bool eos) const {
  text = text.substr(0, std::min(text.size(), text.find('\0')));
  std::vector<int> tokens;
  tokens.reserve(text.size() + 3);
  if (bos) tokens.push_back(kBosToken);
  if (!text.empty()) {
    const int dummy_prefix = Lookup(" ");
    tokens.push_back(dummy_prefix >= 0 ? dummy_prefix : ' ' + 3);
  }

  // One token per UTF-8 code point: a lead byte starts a new buffer; continuation bytes
  // (10xxxxxx) are gathered, at most 4 bytes in all.
  std::string buffer;
  for (size_t i = 0; i < text.size(); ++i) {
    const auto byte = static_cast<unsigned char>(text[i]);
    if ((byte & 0xC0) != 0x80) buffer.clear();
    buffer.push_back(static_cast<char>(byte));
    const bool next_is_continuation =
        i + 1 < text.size() && (static_cast<unsigned char>(text[i + 1]) & 0xC0) == 0x80;
    if (next_is_continuation && buffer.size() < 4) continue;
    const int id = Lookup(buffer);
    if (id != -1) {
      tokens.push_back(id);
    } else {
      // Byte fallback: ids 0..2 are <unk>, BOS, EOS, so byte b is token b + 3.
      for (char c : buffer) tokens.push_back(static_cast<unsigned char>(c) + 3);
    }
    buffer.clear();
  }

  // Greedy BPE: merge the best-scoring adjacent pair until none is in the vocabulary.
  std::string merged;
  while (true) {
    float best_score = -1e10f;
    int best_id = -1;
    size_t best_index = 0;
    for (size_t i = 0; i + 1 < tokens.size(); ++i) {
      merged = Piece(tokens[i]);
      merged += Piece(tokens[i + 1]);
      const int id = Lookup(merged);
      if (id != -1 && scores_[id] > best_score) {
        best_score = scores_[id];
        best_id = id;
        best_index = i;
      }
    }
    if (best_id == -1) break;
    tokens[best_index] = best_id;
    tokens.erase(tokens.begin() + static_cast<std::ptrdiff_t>(best_index) + 1);
  }
  if (eos) tokens.push_back(kEosToken);
  return tokens;
}

std::string Tokenizer::Decode(int prev_token, int token) const {
  std::string_view piece = Piece(token);
  if (prev_token == kBosToken && !piece.empty() && piece[0] == ' ') piece.remove_prefix(1);
  const int byte = ParseByteToken(piece);
  // run.c points at a 2-byte "b\0" string, so byte 0 decodes to "".
  if (byte == 0) return std::string();
  if (byte > 0) return std::string(1, static_cast<char>(byte));
  return std::string(piece);
}

bool Tokenizer::IsPrintable(std::string_view piece) {
  if (piece.empty()) return false;
  if (piece.size() == 1) {
    const auto byte = static_cast<unsigned char>(piece[0]);
    return std::isprint(byte) || std::isspace(byte);
  }
  return true;
}

}  // namespace headwise::llama2
