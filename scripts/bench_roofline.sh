#!/usr/bin/env bash
# Decode attention against its roofline per page format (f16, bf16, KIVI int8/int4/int2), one
# Llama-3-8B layer at 64K and 2^20 tokens, 1 and 2 threads (bench/decode_roofline.cc), then
# PyTorch 2.x's scaled_dot_product_attention on the same shapes when the project venv has torch
# >= 2 (bench/torch_sdpa.py); otherwise that column is skipped with a note.
#   scripts/bench_roofline.sh [decode_roofline flags, e.g. --tokens 65536 --reps 5]
# Peak memory: the f16 pool at 2^20 tokens, 4 GiB. Writes build/bench/roofline.txt and
# build/bench/torch_sdpa.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake --build build --target decode_roofline -j2 >/dev/null
./build/bench/decode_roofline "$@" | tee build/bench/roofline.txt
if [ -x .venv/bin/python ] && .venv/bin/python bench/torch_sdpa.py --tokens 65536 1048576 \
    > build/bench/torch_sdpa.jsonl; then
  cat build/bench/torch_sdpa.jsonl
else
  echo "bench_roofline: no torch >= 2 in .venv; PyTorch sdpa column skipped"
fi
