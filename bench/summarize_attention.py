#!/usr/bin/env python3
"""Joins attention_bench's JSON and torch_attention.py's JSON lines into one table."""
import json
import re
import sys

DTYPES = {0: "f32", 1: "f16", 2: "bf16"}


def main(bench_json, torch_jsonl):
    with open(bench_json) as f:
        runs = json.load(f)["benchmarks"]
    # The fastest PyTorch path per shape, with its dtype.
    best = {}
    try:
        with open(torch_jsonl) as f:
            for line in f:
                r = json.loads(line)
                key = (r["kv_heads"], r["tokens"], r["threads"])
                if key not in best or r["seconds"] < best[key][0]:
                    best[key] = (r["seconds"], r["torch_dtype"])
    except FileNotFoundError:
        pass
    header = ("shape", "dtype", "tokens", "thr", "median ms", "KV GB/s", "mem GB/s", "bw ratio",
              "FMA-bound GB/s", "vs scalar", "torch ms", "vs torch")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for run in runs:
        m = re.search(r"dtype:(\d+)/kv_heads:(\d+)/tokens:(\d+)/threads:(\d+)", run["name"])
        if not m or run.get("error_occurred"):
            continue
        dtype, kv_heads, tokens, threads = (int(x) for x in m.groups())
        # The kernel's median time of the back-to-back comparison runs (the counters), not
        # Google Benchmark's mean, which for the 1M shapes is a single iteration.
        ms = run["KV_MiB"] * 1048576 / (run["KV_GBps"] * 1e9) * 1e3
        shape = "1 KV head" if kv_heads == 1 else "Llama-3-8B layer"
        torch_cell, ratio_cell = "-", "-"
        if (kv_heads, tokens, threads) in best:
            seconds, tdtype = best[(kv_heads, tokens, threads)]
            torch_cell = f"{seconds * 1e3:.2f} ({tdtype})"
            ratio_cell = f"{seconds * 1e3 / ms:.1f}x"
        print(f"| {shape} | {DTYPES[dtype]} | {tokens} | {threads} | {ms:.3f} | "
              f"{run['KV_GBps']:.1f} | {run['membw_GBps']:.1f} | {run['bw_ratio']:.2f} | "
              f"{run.get('fma_bound_GBps', float('nan')):.0f} | "
              f"{run['vs_scalar']:.0f}x | {torch_cell} | {ratio_cell} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
