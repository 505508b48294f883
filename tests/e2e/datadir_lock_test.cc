// One daemon per data directory (issue 14, item 6), with two real `headwised` processes: a second
// daemon on a data directory in use fails at once with a message naming the directory and the
// holder, and touches nothing of the first one's (its spill store, its durable log, its socket);
// the lock of a killed daemon does not block the next start.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/e2e/daemon_process.h"
#include "tests/e2e/e2e_helpers.h"

namespace headwise::testing {
namespace {

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// The sorted names of the entries of `dir` (recursively), to show nothing was added or removed.
std::vector<std::string> Entries(const std::string& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(dir, ec)) {
    names.push_back(std::filesystem::relative(entry.path(), dir).string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

TEST(DataDirLockTest, ASecondDaemonOnTheSameDataDirFailsAtOnceAndHarmsNothing) {
  TempDir first_dir, second_dir;
  DaemonOptions first_options;
  first_options.work_dir = first_dir.path();
  absl::StatusOr<std::unique_ptr<DaemonProcess>> first = DaemonProcess::Start(first_options);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string data_dir = first_dir.path() + "/data";

  absl::StatusOr<std::unique_ptr<client::Client>> c = (*first)->Connect("");
  ASSERT_TRUE(c.ok()) << c.status();
  const ModelLayout layout = TestLayout();
  ASSERT_TRUE((*c)->RegisterLayout(kLayoutName, layout).ok());
  absl::StatusOr<client::Sequence> durable =
      (*c)->CreateSequence(kLayoutName, v1::PolicySpec(), /*durable=*/true);
  ASSERT_TRUE(durable.ok()) << durable.status();
  std::mt19937 rng(11);
  for (int layer = 0; layer < layout.num_layers; ++layer) {
    ASSERT_TRUE(
        (*c)->Append(*durable, layer, RandomKv(rng, layout, 40), RandomKv(rng, layout, 40), 40)
            .ok());
  }
  const std::vector<float> q = RandomQ(rng, layout);
  absl::StatusOr<client::AttendOutput> before = (*c)->Attend(*durable, 1, q);
  ASSERT_TRUE(before.ok()) << before.status();
  // The lock file names the first daemon.
  EXPECT_EQ(ReadFile(data_dir + "/headwised.lock"), absl::StrCat((*first)->pid(), "\n"));
  const std::vector<std::string> entries_before = Entries(data_dir);
  ASSERT_FALSE(entries_before.empty());

  DaemonOptions second_options;
  second_options.work_dir = second_dir.path();
  second_options.data_dir = data_dir;
  absl::StatusOr<std::unique_ptr<DaemonProcess>> second = DaemonProcess::Start(second_options);
  ASSERT_FALSE(second.ok()) << "a second daemon started on a data dir in use";
  const std::string message(second.status().message());
  EXPECT_TRUE(absl::StrContains(message, "exited with status 1")) << message;
  EXPECT_TRUE(absl::StrContains(
      message, absl::StrCat("data_dir '", data_dir, "' is in use by another headwised (pid ",
                            (*first)->pid(), ")")))
      << message;

  // Nothing of the first daemon's was touched: every entry of the data directory is still there
  // (the spill store was not wiped; the first daemon's RocksDB may have added files meanwhile),
  // the second daemon made no socket, and the first still serves the same data and takes
  // durable appends.
  const std::vector<std::string> entries_after = Entries(data_dir);
  for (const std::string& entry : entries_before) {
    EXPECT_TRUE(std::binary_search(entries_after.begin(), entries_after.end(), entry))
        << entry << " was removed";
  }
  EXPECT_TRUE(std::binary_search(entries_before.begin(), entries_before.end(), "spill"));
  struct stat st;
  EXPECT_NE(stat((second_dir.path() + "/headwised.sock").c_str(), &st), 0);
  EXPECT_TRUE((*first)->Running());
  absl::StatusOr<client::AttendOutput> after = (*c)->Attend(*durable, 1, q);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->o, before->o);
  EXPECT_EQ(after->lse, before->lse);
  for (int layer = 0; layer < layout.num_layers; ++layer) {
    ASSERT_TRUE(
        (*c)->Append(*durable, layer, RandomKv(rng, layout, 1), RandomKv(rng, layout, 1), 1).ok());
  }

  // Killed (no cleanup at all), the first daemon leaves its lock file, which does not block the
  // next daemon: the kernel released the lock with the process. The durable sequence is back.
  c->reset();
  (*first)->Kill9();
  absl::StatusOr<std::unique_ptr<DaemonProcess>> third = DaemonProcess::Start(second_options);
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(ReadFile(data_dir + "/headwised.lock"), absl::StrCat((*third)->pid(), "\n"));
  absl::StatusOr<std::unique_ptr<client::Client>> c3 = (*third)->Connect("");
  ASSERT_TRUE(c3.ok()) << c3.status();
  absl::StatusOr<v1::SequenceInfo> info =
      (*c3)->GetSequence(client::Sequence(durable->handle(), layout));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(std::vector<int64_t>(info->layer_lengths().begin(), info->layer_lengths().end()),
            (std::vector<int64_t>{41, 41}));
}

}  // namespace
}  // namespace headwise::testing
