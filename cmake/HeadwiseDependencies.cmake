# Every third-party dependency, found once, from Debian packages (scripts/setup.sh installs them).
# docs: ../shared/docs/build-notes.md lists how each Debian package exposes itself to CMake.

find_package(absl CONFIG REQUIRED)
find_package(Protobuf REQUIRED)
find_package(gRPC CONFIG REQUIRED)
find_package(hwy CONFIG REQUIRED)
find_package(OpenMP REQUIRED)
find_package(GTest REQUIRED)
find_package(benchmark CONFIG REQUIRED)
find_package(Threads REQUIRED)
find_package(RocksDB CONFIG REQUIRED)
find_package(spdlog CONFIG REQUIRED)
find_package(nlohmann_json CONFIG REQUIRED)
# cpp-httplib: Debian builds it as a library (libcpp-httplib.so) and ships no CMake config.
find_path(HTTPLIB_INCLUDE_DIR httplib.h REQUIRED)
find_library(HTTPLIB_LIBRARY cpp-httplib REQUIRED)
# OpenSSL's libcrypto: SHA-256 of prefix block hashes and remote-tier checksums.
find_package(OpenSSL REQUIRED)
# hiredis (libhiredis-dev): the Redis Cluster client of the remote prefix tier. pkg-config only.
find_package(PkgConfig REQUIRED)
pkg_check_modules(HIREDIS REQUIRED IMPORTED_TARGET hiredis)
# redis-server and redis-cli: the cluster the remote-tier tests start.
find_program(REDIS_SERVER redis-server)
find_program(REDIS_CLI redis-cli)
