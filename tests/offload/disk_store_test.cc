#include "offload/disk_store.h"

#include <random>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "tests/offload/offload_fixtures.h"

namespace headwise {
namespace {

using ::headwise::testing::RandomBytes;
using ::headwise::testing::TempDir;

constexpr size_t kPage = 32 * 1024;

PageKey Key(uint64_t hi, uint64_t lo, int layer, int head, uint32_t ordinal) {
  return PageKey{SequenceId(hi, lo), LayerId(layer), HeadId(head), ordinal};
}

std::unique_ptr<DiskStore> OpenAt(const std::string& path) {
  DiskStoreOptions options;
  options.path = path;
  auto store = DiskStore::Open(options);
  EXPECT_TRUE(store.ok()) << store.status();
  return store.ok() ? *std::move(store) : nullptr;
}

TEST(PageKeyTest, EncodingRoundTripsAndSortsLikeTheTuple) {
  const PageKey key = Key(0x0123456789abcdef, 0xfedcba9876543210, 1023, 255, 0xdeadbeef);
  auto encoded = EncodePageKey(key);
  ASSERT_TRUE(encoded.ok());
  EXPECT_EQ(encoded->size(), kPageKeyBytes);
  EXPECT_EQ((*encoded)[0], '\x01');  // big-endian: most significant byte first
  auto decoded = DecodePageKey(*encoded);
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(*decoded, key);

  const std::vector<PageKey> ordered = {Key(0, 1, 0, 0, 0),   Key(0, 1, 0, 0, 1),
                                        Key(0, 1, 0, 0, 256), Key(0, 1, 0, 1, 0),
                                        Key(0, 1, 1, 0, 0),   Key(0, 2, 0, 0, 0),
                                        Key(1, 0, 0, 0, 0),   Key(~0ull, ~0ull, 65535, 65535, ~0u)};
  for (size_t i = 0; i + 1 < ordered.size(); ++i) {
    EXPECT_LT(*EncodePageKey(ordered[i]), *EncodePageKey(ordered[i + 1])) << i;
  }
  EXPECT_EQ(EncodePageKey(Key(0, 0, 65536, 0, 0)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodePageKey(Key(0, 0, 0, -1, 0)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodePageKey("short").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(DiskStoreTest, OpenRequiresAPathAndHonoursCreateIfMissing) {
  TempDir dir;
  EXPECT_EQ(DiskStore::Open(DiskStoreOptions{}).status().code(),
            absl::StatusCode::kInvalidArgument);
  DiskStoreOptions options;
  options.path = dir.Sub("absent");
  options.create_if_missing = false;
  EXPECT_EQ(DiskStore::Open(options).status().code(), absl::StatusCode::kNotFound);
}

TEST(DiskStoreTest, PageRoundTripMissingAndWrongSize) {
  TempDir dir;
  auto store = OpenAt(dir.Sub("db"));
  ASSERT_NE(store, nullptr);
  std::mt19937_64 rng(3);
  const auto page = RandomBytes(kPage, rng);
  const PageKey key = Key(7, 8, 3, 2, 41);
  ASSERT_TRUE(store->PutPage(key, page).ok());

  std::vector<std::byte> out(kPage);
  ASSERT_TRUE(store->GetPage(key, absl::MakeSpan(out)).ok());
  EXPECT_EQ(out, page);

  EXPECT_EQ(store->GetPage(key.Next(), absl::MakeSpan(out)).code(), absl::StatusCode::kNotFound);

  std::vector<std::byte> wrong(kPage / 2, std::byte{0x5a});
  EXPECT_EQ(store->GetPage(key, absl::MakeSpan(wrong)).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(wrong, std::vector<std::byte>(kPage / 2, std::byte{0x5a})) << "untouched on error";

  ASSERT_TRUE(store->DeletePage(key).ok());
  EXPECT_EQ(store->GetPage(key, absl::MakeSpan(out)).code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store->DeletePage(key).ok()) << "deleting an absent page is OK";

  const DiskStoreStats stats = store->Stats();
  EXPECT_EQ(stats.bytes_written, kPage);
  EXPECT_EQ(stats.bytes_read, kPage);
  EXPECT_EQ(stats.pages_written, 1u);
  EXPECT_EQ(stats.pages_read, 1u);
  EXPECT_EQ(stats.pages_deleted, 2u);  // delete operations, present or not
}

TEST(DiskStoreTest, ReopenPersistsPagesAndRecords) {
  TempDir dir;
  std::mt19937_64 rng(5);
  std::vector<std::pair<PageKey, std::vector<std::byte>>> pages;
  for (uint32_t i = 0; i < 12; ++i)
    pages.emplace_back(Key(1, 2, 0, i % 3, i), RandomBytes(kPage, rng));
  {
    auto store = OpenAt(dir.Sub("db"));
    ASSERT_NE(store, nullptr);
    for (size_t i = 0; i < pages.size(); ++i) {
      // Half synced, half only in the WAL: both must survive a close and reopen.
      ASSERT_TRUE(store->PutPage(pages[i].first, pages[i].second, /*sync=*/i % 2 == 0).ok());
    }
    ASSERT_TRUE(store->Put(RecordFamily::kSequences, "seq/1", "length=4096", true).ok());
    ASSERT_TRUE(store->Put(RecordFamily::kPageMeta, "meta/a", "tier=disk").ok());
    ASSERT_TRUE(store->Flush().ok());
    const DiskStoreStats stats = store->Stats();
    EXPECT_GT(stats.blob_files, 0u) << "32 KiB payloads must be stored as blobs";
    EXPECT_EQ(stats.pages_stored, pages.size());
  }
  auto store = OpenAt(dir.Sub("db"));
  ASSERT_NE(store, nullptr);
  std::vector<std::byte> out(kPage);
  for (const auto& [key, bytes] : pages) {
    ASSERT_TRUE(store->GetPage(key, absl::MakeSpan(out)).ok());
    EXPECT_EQ(out, bytes);
  }
  EXPECT_EQ(*store->Get(RecordFamily::kSequences, "seq/1"), "length=4096");
  EXPECT_EQ(*store->Get(RecordFamily::kPageMeta, "meta/a"), "tier=disk");
  // Families are separate namespaces.
  EXPECT_EQ(store->Get(RecordFamily::kPageMeta, "seq/1").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(DiskStoreTest, BatchIsAtomicAndIterateSeesPrefixInOrder) {
  TempDir dir;
  auto store = OpenAt(dir.Sub("db"));
  ASSERT_NE(store, nullptr);
  std::mt19937_64 rng(9);
  const auto page = RandomBytes(kPage, rng);
  DiskStore::Batch batch(store.get());
  ASSERT_TRUE(batch.PutPage(Key(4, 4, 1, 1, 0), page).ok());
  ASSERT_TRUE(batch.Put(RecordFamily::kSequences, "s/b", "2").ok());
  ASSERT_TRUE(batch.Put(RecordFamily::kSequences, "s/a", "1").ok());
  ASSERT_TRUE(batch.Put(RecordFamily::kSequences, "t/z", "other").ok());
  EXPECT_EQ(batch.count(), 4);
  EXPECT_EQ(store->Get(RecordFamily::kSequences, "s/a").status().code(),
            absl::StatusCode::kNotFound)
      << "nothing is visible before Write";
  ASSERT_TRUE(store->Write(batch, /*sync=*/true).ok());
  EXPECT_EQ(batch.count(), 0);

  std::vector<std::pair<std::string, std::string>> seen;
  ASSERT_TRUE(store
                  ->Iterate(RecordFamily::kSequences, "s/",
                            [&](std::string_view k, std::string_view v) {
                              seen.emplace_back(k, v);
                              return true;
                            })
                  .ok());
  const std::vector<std::pair<std::string, std::string>> expected = {{"s/a", "1"}, {"s/b", "2"}};
  EXPECT_EQ(seen, expected);
  std::vector<std::byte> out(kPage);
  ASSERT_TRUE(store->GetPage(Key(4, 4, 1, 1, 0), absl::MakeSpan(out)).ok());
  EXPECT_EQ(out, page);
  ASSERT_TRUE(store->Delete(RecordFamily::kSequences, "s/a").ok());
  EXPECT_EQ(store->Get(RecordFamily::kSequences, "s/a").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(DiskStoreTest, DeleteSequencePagesRemovesOnlyThatSequence) {
  TempDir dir;
  auto store = OpenAt(dir.Sub("db"));
  ASSERT_NE(store, nullptr);
  std::mt19937_64 rng(11);
  const auto page = RandomBytes(4096 + 16, rng);
  const std::vector<PageKey> doomed = {Key(5, ~0ull, 0, 0, 0), Key(5, ~0ull, 65535, 65535, ~0u)};
  const std::vector<PageKey> kept = {Key(5, ~0ull - 1, 9, 9, 9), Key(6, 0, 0, 0, 0)};
  for (const PageKey& k : doomed) ASSERT_TRUE(store->PutPage(k, page).ok());
  for (const PageKey& k : kept) ASSERT_TRUE(store->PutPage(k, page).ok());
  ASSERT_TRUE(store->DeleteSequencePages(SequenceId(5, ~0ull)).ok());
  std::vector<std::byte> out(page.size());
  for (const PageKey& k : doomed) {
    EXPECT_EQ(store->GetPage(k, absl::MakeSpan(out)).code(), absl::StatusCode::kNotFound);
  }
  for (const PageKey& k : kept) EXPECT_TRUE(store->GetPage(k, absl::MakeSpan(out)).ok());
}

TEST(DiskStoreTest, GetPagesReportsPerKey) {
  TempDir dir;
  auto store = OpenAt(dir.Sub("db"));
  ASSERT_NE(store, nullptr);
  std::mt19937_64 rng(13);
  const auto a = RandomBytes(kPage, rng);
  const auto b = RandomBytes(kPage, rng);
  ASSERT_TRUE(store->PutPage(Key(1, 1, 0, 0, 0), a).ok());
  ASSERT_TRUE(store->PutPage(Key(1, 1, 0, 0, 2), b).ok());
  std::vector<std::byte> out_a(kPage), out_missing(kPage), out_b(kPage);
  const std::vector<PageKey> keys = {Key(1, 1, 0, 0, 0), Key(1, 1, 0, 0, 1), Key(1, 1, 0, 0, 2)};
  const std::vector<absl::Span<std::byte>> outs = {
      absl::MakeSpan(out_a), absl::MakeSpan(out_missing), absl::MakeSpan(out_b)};
  const std::vector<absl::Status> statuses = store->GetPages(keys, outs);
  ASSERT_EQ(statuses.size(), 3u);
  EXPECT_TRUE(statuses[0].ok());
  EXPECT_EQ(statuses[1].code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(statuses[2].ok());
  EXPECT_EQ(out_a, a);
  EXPECT_EQ(out_b, b);
}

}  // namespace
}  // namespace headwise
