// Content addresses of prefix blocks (docs/scale-out.md). A prefix block is `block_tokens`
// consecutive tokens of a sequence, starting at a multiple of block_tokens; block_tokens is a
// multiple of the layout's page_tokens, so a block is whole pages in every (layer, kv head).
//
// The hash of block i is chained, as vLLM's and LMCache's are:
//   h_0     = SHA-256(seed || tokens of block 0)
//   h_i     = SHA-256(h_{i-1} || tokens of block i)          (i >= 1)
//   seed    = SHA-256("headwise-prefix-v1" || scope || model || layout fields || block_tokens)
// truncated to 128 bits, tokens as little-endian int32. So a block's hash names its tokens AND
// every token before it, under one model, one page layout and one sharing scope (a tenant, or a
// share group): blocks of different scopes never match. The hash is the same in every process
// and on every machine (it is the key of the remote tier).
//
// Thread-safety: pure functions.
#ifndef HEADWISE_CACHESVC_PREFIX_BLOCK_HASH_H_
#define HEADWISE_CACHESVC_PREFIX_BLOCK_HASH_H_

#include <compare>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/types/span.h"
#include "cachesvc/base/layout.h"

namespace headwise {

struct BlockHash {
  uint64_t hi = 0;
  uint64_t lo = 0;
  auto operator<=>(const BlockHash&) const = default;
  template <typename H>
  friend H AbslHashValue(H h, const BlockHash& b) {
    return H::combine(std::move(h), b.hi, b.lo);
  }
  // 32 lowercase hex digits, hi first.
  std::string ToHex() const;
};

// What a block's hash depends on besides its tokens.
struct PrefixIdentity {
  // Who may share: a tenant name, or a share group's name (prefixed so the two never collide).
  std::string scope;
  // The model: the layout's name as the client registered it (clients of one model register the
  // same name on every daemon).
  std::string model;
  ModelLayout layout;
  int64_t block_tokens = 0;
};

// The chain's seed for `identity`.
BlockHash PrefixSeed(const PrefixIdentity& identity);

// The chained hashes of every FULL block of `tokens` (tokens.size() / block_tokens of them),
// starting from `seed`. REQUIRES: block_tokens >= 1.
std::vector<BlockHash> ChainBlockHashes(const BlockHash& seed, absl::Span<const int32_t> tokens,
                                        int64_t block_tokens);

// SHA-256 of `bytes` truncated to 128 bits (the remote tier's payload checksum).
BlockHash Sha256Prefix(std::string_view bytes);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_PREFIX_BLOCK_HASH_H_
