#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite with ctest.
#
#   scripts/test.sh            # normal build in build/
#   scripts/test.sh --asan     # ASan + UBSan build in build-asan/
#   scripts/test.sh --tsan     # ThreadSanitizer build in build-tsan/
# Tests that need a GPU skip cleanly on machines without one.
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir="build"
setup_args=()
for arg in "$@"; do
  case "$arg" in
    --asan) build_dir=build-asan; setup_args+=(--asan) ;;
    --tsan) build_dir=build-tsan; setup_args+=(--tsan) ;;
    *) echo "test.sh: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done

scripts/setup.sh "${setup_args[@]}"
ctest_args=()
if [ "$build_dir" = build-tsan ]; then
  # Only the suites labelled "tsan"; scripts/tsan.supp explains what is suppressed and why.
  ctest_args=(-L tsan)
  export TSAN_OPTIONS="${TSAN_OPTIONS:-} suppressions=$PWD/scripts/tsan.supp halt_on_error=1"
fi
cd "$build_dir"
ctest --output-on-failure -j "$(nproc)" --timeout 900 "${ctest_args[@]}"
