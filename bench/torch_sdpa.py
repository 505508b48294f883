#!/usr/bin/env python3
"""PyTorch 2.x scaled_dot_product_attention on the shapes of bench/decode_roofline.cc: one
Llama-3-8B layer (8 KV heads, 32 query heads, head_dim 128) decoding one token over `tokens`
cached tokens, in f32 and bf16, with 1 and 2 threads. GQA as PyTorch runs it fastest on the CPU:
the 4 query heads of a KV head are the query rows (q [1, 8, 4, 128], k and v [1, 8, S, 128]),
not enable_gqa=True. Prints one JSON object per line; exits 3 when torch < 2 or missing.

Run from the project venv: .venv/bin/python bench/torch_sdpa.py [--tokens ...] [--threads ...]
"""
import argparse
import json
import statistics
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    sys.exit(3)

KV_HEADS, GROUP, HEAD_DIM = 8, 4, 128


def main():
    if int(torch.__version__.split(".")[0]) < 2:
        sys.exit(3)
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[65536, 1 << 20])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    for tokens in args.tokens:
        for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            gen = torch.Generator().manual_seed(1)
            k = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=gen).to(dtype)
            v = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=gen).to(dtype)
            q = torch.randn(1, KV_HEADS, GROUP, HEAD_DIM, generator=gen).to(dtype)
            for threads in args.threads:
                torch.set_num_threads(threads)
                F.scaled_dot_product_attention(q, k, v)  # Warm-up.
                times = []
                for _ in range(args.reps):
                    start = time.perf_counter()
                    F.scaled_dot_product_attention(q, k, v)
                    times.append(time.perf_counter() - start)
                print(json.dumps({"tokens": tokens, "threads": threads, "torch_dtype": name,
                                  "seconds": statistics.median(times),
                                  "torch": torch.__version__}), flush=True)
            del k, v


if __name__ == "__main__":
    main()
