// ReadBoundedFile / ReadBoundedFileAt: only regular files, never more than the cap, symbolic
// links only when asked, and no error message carries a byte of the file.
#include "cachesvc/base/bounded_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "gtest/gtest.h"

namespace headwise {
namespace {

namespace fs = std::filesystem;

class BoundedFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = fs::temp_directory_path() / "hwbounded.XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Write(const std::string& name, const std::string& bytes) {
    const fs::path path = dir_ / name;
    std::ofstream(path, std::ios::binary) << bytes;
    return path.string();
  }

  fs::path dir_;
};

TEST_F(BoundedFileTest, ReadsASmallFileWhole) {
  const std::string bytes("line 1\n\0binary\xff", 15);
  const std::string path = Write("f", bytes);
  absl::StatusOr<std::string> text = ReadBoundedFile(path);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, bytes);
  EXPECT_EQ(*ReadBoundedFile(Write("empty", "")), "");
}

TEST_F(BoundedFileTest, CapIsInclusiveAndLargerFilesAreRefused) {
  const std::string path = Write("f", std::string(100, 'x'));
  BoundedReadOptions options;
  options.max_bytes = 100;
  EXPECT_EQ(ReadBoundedFile(path, options)->size(), 100u);
  options.max_bytes = 99;
  absl::StatusOr<std::string> text = ReadBoundedFile(path, options);
  EXPECT_EQ(text.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(text.status().message().find("larger than the limit of 99 bytes"),
            absl::string_view::npos)
      << text.status();
  EXPECT_EQ(text.status().message().find("xxx"), absl::string_view::npos);
}

// A file whose size fstat understates (as a file that grows after fstat): /proc files report
// size 0 yet hold more. The read stops one byte past the cap and refuses.
TEST_F(BoundedFileTest, FileLargerThanFstatSaysIsRefused) {
  struct stat st;
  ASSERT_EQ(stat("/proc/self/maps", &st), 0);
  if (!S_ISREG(st.st_mode) || st.st_size != 0) GTEST_SKIP() << "/proc/self/maps not as expected";
  BoundedReadOptions options;
  options.max_bytes = 16;
  EXPECT_EQ(ReadBoundedFile("/proc/self/maps", options).status().code(),
            absl::StatusCode::kFailedPrecondition);
  options.max_bytes = 1 << 20;
  EXPECT_GT(ReadBoundedFile("/proc/self/maps", options)->size(), 16u);
}

// /dev/zero never ends: the old readers (read until EOF) grew without bound. It is refused at
// fstat, before a byte is read, through a path and through a link to it.
TEST_F(BoundedFileTest, DevicesAreRefusedWithoutReading) {
  BoundedReadOptions options;
  options.follow_final_symlink = true;
  for (const char* device : {"/dev/zero", "/dev/urandom", "/dev/null"}) {
    absl::StatusOr<std::string> text = ReadBoundedFile(device, options);
    EXPECT_EQ(text.status().code(), absl::StatusCode::kFailedPrecondition) << device;
    EXPECT_NE(text.status().message().find("not a regular file"), absl::string_view::npos);
  }
  fs::create_symlink("/dev/zero", dir_ / "zero");
  EXPECT_EQ(ReadBoundedFile((dir_ / "zero").string(), options).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

// A FIFO with no writer would block a plain open(O_RDONLY) forever.
TEST_F(BoundedFileTest, FifoIsRefusedWithoutBlocking) {
  const fs::path fifo = dir_ / "fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_EQ(ReadBoundedFile(fifo.string()).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(BoundedFileTest, DirectoryIsRefused) {
  EXPECT_EQ(ReadBoundedFile(dir_.string()).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(BoundedFileTest, SymlinksAreFollowedOnlyWhenAsked) {
  const std::string target = Write("target", "0.5\n");
  fs::create_symlink(target, dir_ / "link");
  const std::string link = (dir_ / "link").string();
  absl::StatusOr<std::string> refused = ReadBoundedFile(link);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("symbolic link"), absl::string_view::npos);
  BoundedReadOptions follow;
  follow.follow_final_symlink = true;
  EXPECT_EQ(*ReadBoundedFile(link, follow), "0.5\n");
}

TEST_F(BoundedFileTest, MissingIsNotFound) {
  EXPECT_EQ(ReadBoundedFile((dir_ / "nope").string()).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ReadBoundedFile((dir_ / "nope" / "deeper").string()).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(BoundedFileTest, UnreadableIsPermissionDenied) {
  if (geteuid() == 0) GTEST_SKIP() << "root reads files of mode 0000";
  const std::string path = Write("secret", "hidden");
  ASSERT_EQ(chmod(path.c_str(), 0), 0);
  EXPECT_EQ(ReadBoundedFile(path).status().code(), absl::StatusCode::kPermissionDenied);
}

TEST_F(BoundedFileTest, DescriptionNamesTheFile) {
  BoundedReadOptions options;
  options.description = "pattern 'a/b'";
  absl::StatusOr<std::string> text = ReadBoundedFile((dir_ / "nope").string(), options);
  EXPECT_EQ(text.status().message(), "pattern 'a/b' does not exist");
}

TEST_F(BoundedFileTest, ReadAtOpensOneComponentAndNeverFollowsALink) {
  Write("f", "abc");
  fs::create_symlink(dir_ / "f", dir_ / "link");
  const int dir_fd = open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(dir_fd, 0);
  ScopedFd closer(dir_fd);
  BoundedReadOptions options;
  options.follow_final_symlink = true;  // Ignored by ReadBoundedFileAt.
  EXPECT_EQ(*ReadBoundedFileAt(dir_fd, "f", options), "abc");
  EXPECT_EQ(ReadBoundedFileAt(dir_fd, "link", options).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ReadBoundedFileAt(dir_fd, "../f", options).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadBoundedFileAt(dir_fd, "", options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace headwise
