#include "cachesvc/prefix/block_hash.h"

#include <openssl/evp.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace headwise {
namespace {

uint64_t LoadBigEndian(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | p[i];
  return v;
}

BlockHash FromDigest(const unsigned char* digest) {
  return BlockHash{LoadBigEndian(digest), LoadBigEndian(digest + 8)};
}

// One SHA-256 computation (OpenSSL's EVP interface; the SHA256_* calls are deprecated).
class Sha256 {
 public:
  Sha256() : ctx_(EVP_MD_CTX_new()) { EVP_DigestInit_ex(ctx_, EVP_sha256(), nullptr); }
  ~Sha256() { EVP_MD_CTX_free(ctx_); }
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void Update(const void* data, size_t n) { EVP_DigestUpdate(ctx_, data, n); }
  BlockHash Finish() {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    EVP_DigestFinal_ex(ctx_, digest, &len);
    return FromDigest(digest);
  }

 private:
  EVP_MD_CTX* ctx_;
};

void AddHash(Sha256& ctx, const BlockHash& h) {
  unsigned char bytes[16];
  for (int i = 0; i < 8; ++i) {
    bytes[i] = static_cast<unsigned char>(h.hi >> (56 - 8 * i));
    bytes[8 + i] = static_cast<unsigned char>(h.lo >> (56 - 8 * i));
  }
  ctx.Update(bytes, sizeof(bytes));
}

void AddTokens(Sha256& ctx, absl::Span<const int32_t> tokens) {
  unsigned char buf[1024];
  size_t n = 0;
  for (const int32_t t : tokens) {
    const auto u = static_cast<uint32_t>(t);
    for (int b = 0; b < 4; ++b) buf[n++] = static_cast<unsigned char>(u >> (8 * b));
    if (n == sizeof(buf)) {
      ctx.Update(buf, n);
      n = 0;
    }
  }
  ctx.Update(buf, n);
}

}  // namespace

std::string BlockHash::ToHex() const { return absl::StrFormat("%016x%016x", hi, lo); }

BlockHash PrefixSeed(const PrefixIdentity& identity) {
  const ModelLayout& l = identity.layout;
  // Length-prefixed fields, so no two identities serialize alike.
  const std::string text = absl::StrCat(
      "headwise-prefix-v1|", identity.scope.size(), ":", identity.scope, "|", identity.model.size(),
      ":", identity.model, "|", l.num_layers, ",", l.num_q_heads, ",", l.num_kv_heads, ",",
      l.head_dim, ",", static_cast<int>(l.dtype), ",", l.page_tokens, "|", identity.block_tokens);
  return Sha256Prefix(text);
}

std::vector<BlockHash> ChainBlockHashes(const BlockHash& seed, absl::Span<const int32_t> tokens,
                                        int64_t block_tokens) {
  std::vector<BlockHash> out;
  const auto n = static_cast<int64_t>(tokens.size()) / block_tokens;
  out.reserve(static_cast<size_t>(n));
  BlockHash prev = seed;
  for (int64_t b = 0; b < n; ++b) {
    Sha256 ctx;
    AddHash(ctx, prev);
    AddTokens(ctx, tokens.subspan(static_cast<size_t>(b * block_tokens),
                                  static_cast<size_t>(block_tokens)));
    prev = ctx.Finish();
    out.push_back(prev);
  }
  return out;
}

BlockHash Sha256Prefix(std::string_view bytes) {
  Sha256 ctx;
  ctx.Update(bytes.data(), bytes.size());
  return ctx.Finish();
}

}  // namespace headwise
