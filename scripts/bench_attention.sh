#!/usr/bin/env bash
# Decode-attention benchmark side by side: Headwise's CPU kernel, this machine's memory read
# bandwidth, a scalar implementation and PyTorch's CPU attention, on the same shapes.
#
#   scripts/bench_attention.sh          # 4K and 64K tokens (about a minute)
#   scripts/bench_attention.sh --full   # also 1M tokens (4 GiB per layer; several minutes)
# Writes build/bench/attention.json, build/bench/torch_attention.jsonl and prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."

filter='tokens:(4096|65536)/'
torch_tokens=(4096 65536)
if [ "${1:-}" = "--full" ]; then
  filter='.'
  torch_tokens=(4096 65536 1048576)
fi

scripts/setup.sh
# The PyTorch peer is Debian's python3-torch, with the OpenMP OpenBLAS (its fastest CPU path).
if ! /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  sudo_cmd=()
  [ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq python3-torch \
    libopenblas0-openmp || echo "bench: python3-torch unavailable; PyTorch column left empty"
fi

out=build/bench
./build/bench/attention_bench --benchmark_filter="$filter" \
  --benchmark_out="$out/attention.json" --benchmark_out_format=json \
  --benchmark_counters_tabular=true
rm -f "$out/torch_attention.jsonl"
if /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  /usr/bin/python3 bench/torch_attention.py --tokens "${torch_tokens[@]}" \
    > "$out/torch_attention.jsonl"
fi
echo
echo "Decode attention, head_dim 128, GQA 4 (machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
python3 bench/summarize_attention.py "$out/attention.json" "$out/torch_attention.jsonl"
