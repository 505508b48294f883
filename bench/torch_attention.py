#!/usr/bin/env python3
"""PyTorch CPU decode attention on the shapes of bench/attention_bench.cc: the peer a user
would otherwise pick. Prints one JSON object per line.

Run with Debian's python3-torch (/usr/bin/python3). PyTorch 1.13 on the CPU has no f16
matrix multiply, so f16 storage is compared against its bf16 (oneDNN) and f32 paths, and the
faster of the two is reported as the peer.
"""
import argparse
import json
import math
import statistics
import time

import torch

HEAD_DIM = 128
GROUP = 4


def decode(q, k, v):
    # q: [H, g, D]; k, v: [H, S, D]. softmax(q k^T / sqrt(d)) v, GQA without repeating K/V.
    scores = torch.matmul(q, k.transpose(1, 2)) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)


def time_one(kv_heads, tokens, dtype, threads, reps):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(kv_heads, tokens, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(kv_heads, tokens, HEAD_DIM, generator=gen).to(dtype)
    q = torch.randn(kv_heads, GROUP, HEAD_DIM, generator=gen).to(dtype)
    decode(q, k, v)  # Warm-up.
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        decode(q, k, v)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 65536, 1 << 20])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    for tokens in args.tokens:
        for kv_heads in (1, 8):
            for threads in args.threads:
                for name, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32)):
                    reps = args.reps if tokens * kv_heads < (1 << 22) else 3
                    seconds = time_one(kv_heads, tokens, dtype, threads, reps)
                    print(json.dumps({"kv_heads": kv_heads, "tokens": tokens, "threads": threads,
                                      "torch_dtype": name, "seconds": seconds,
                                      "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
