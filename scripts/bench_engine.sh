#!/usr/bin/env bash
# The engine's decode step next to the raw kernel (device_only, one Llama-3-8B layer at 4K, 64K
# and 2^20 tokens, 1 and 2 compute threads) and layer_offload's copy overlap (4 layers x 64K):
# bench/engine_step_bench.cc, figures in bench/RESULTS.md ("Engine decode step vs kernel").
#
#   scripts/bench_engine.sh                 # everything (about 2 minutes, 8.2 GiB peak RSS)
#   scripts/bench_engine.sh --lengths 4096,65536 --no_offload    # any engine_step_bench flags
#
# Builds into $BUILD_DIR (default build-bench, RelWithDebInfo like the other benchmarks) without
# running scripts/setup.sh: the dependencies must already be installed. Writes the output to
# $BUILD_DIR/bench/engine_step_bench.txt as well as to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

build="${BUILD_DIR:-build-bench}"
if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo
fi
cmake --build "$build" -j"$(nproc)" --target engine_step_bench
echo "lscpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; $(uname -r)"
/usr/bin/time -f 'peak RSS %M KiB, wall %e s' "$build/bench/engine_step_bench" "$@" 2>&1 |
  tee "$build/bench/engine_step_bench.txt"
