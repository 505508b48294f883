// Helpers shared by the offload tests: random page payloads (never all zeros) and temp dirs.
#ifndef HEADWISE_TESTS_OFFLOAD_OFFLOAD_FIXTURES_H_
#define HEADWISE_TESTS_OFFLOAD_OFFLOAD_FIXTURES_H_

#include <stdlib.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace headwise::testing {

// Fills `n` bytes with random values, none of them zero, so a page that was never written (or
// was zeroed) can never compare equal to one that was.
inline void FillRandom(std::byte* data, size_t n, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> byte(1, 255);
  for (size_t i = 0; i < n; ++i) data[i] = static_cast<std::byte>(byte(rng));
}

inline std::vector<std::byte> RandomBytes(size_t n, std::mt19937_64& rng) {
  std::vector<std::byte> bytes(n);
  FillRandom(bytes.data(), n, rng);
  return bytes;
}

inline bool SameBytes(const std::byte* a, const std::byte* b, size_t n) {
  return std::memcmp(a, b, n) == 0;
}

// A fresh directory under /tmp, removed with everything in it when the object dies.
class TempDir {
 public:
  TempDir() {
    std::string pattern = "/tmp/headwise-offload-XXXXXX";
    char* made = mkdtemp(pattern.data());
    EXPECT_NE(made, nullptr);
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string Sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

}  // namespace headwise::testing

#endif  // HEADWISE_TESTS_OFFLOAD_OFFLOAD_FIXTURES_H_
