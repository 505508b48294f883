#!/usr/bin/env bash
# The main job of what exists so far: set up, then the decode-attention benchmark summary
# (Headwise's CPU kernel against memory bandwidth, a scalar version and PyTorch).
# Pass --full for the 1M-token shapes too.
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/bench_attention.sh "$@"
