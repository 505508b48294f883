#!/usr/bin/env python3
"""Attention through headwised, checked against numpy.

Connects to a running daemon, registers a small GQA layout (f32 storage), appends random K/V to
every layer, attends random queries, and recomputes each layer's attention with numpy in float64:

    o[h] = softmax(q[h] . K[:, h // g]^T / sqrt(D)) . V[:, h // g]
    lse[h] = log(sum(exp(q[h] . K[:, h // g]^T / sqrt(D))))

Prints the largest relative difference |a - b| / (1 + |b|) and exits 1 when it exceeds 1e-5.

    python clients/python/examples/numpy_attention.py --target unix://./var/headwised.sock \\
        --token dev-token
"""

import argparse
import sys

import numpy as np

import headwise


def reference_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray):
    """q [Hq, D]; k, v [T, Hkv, D] -> o [Hq, D], lse [Hq], in float64."""
    hq, d = q.shape
    group = hq // k.shape[1]
    k64 = k.astype(np.float64)[:, np.arange(hq) // group, :]  # [T, Hq, D]
    v64 = v.astype(np.float64)[:, np.arange(hq) // group, :]
    scores = np.einsum("hd,thd->ht", q.astype(np.float64), k64) / np.sqrt(d)  # [Hq, T]
    m = scores.max(axis=1, keepdims=True)
    p = np.exp(scores - m)
    denom = p.sum(axis=1, keepdims=True)
    o = np.einsum("ht,thd->hd", p / denom, v64)
    lse = (m + np.log(denom))[:, 0]
    return o, lse


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    d = np.abs(a - b) / (1.0 + np.abs(b))
    return float(np.nanmax(d)) if not np.isnan(d).any() else float("inf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="unix://./var/headwised.sock")
    parser.add_argument("--token", default=None, help="default: $HEADWISE_TOKEN or dev-token")
    parser.add_argument("--tokens", type=int, default=300, help="cached tokens per layer")
    parser.add_argument("--page-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    layers, q_heads, kv_heads, head_dim = 2, 8, 2, 64
    with headwise.Client(args.target, token=args.token) as client:
        # Pages of page_tokens * head_dim * 4 bytes * 2 (K and V): 16 f32 tokens of 64 elements
        # is 8 KiB. A daemon serves layouts of any page size side by side.
        layout = client.register_layout("numpy-attention-example", layers, q_heads, kv_heads,
                                        head_dim, dtype="f32", page_tokens=args.page_tokens)
        seq = client.create_sequence("numpy-attention-example")
        try:
            # Random K/V, never all zeros; every layer appends the same number of tokens per step.
            ks = [rng.standard_normal((args.tokens, kv_heads, head_dim)).astype(np.float32)
                  for _ in range(layers)]
            vs = [rng.standard_normal((args.tokens, kv_heads, head_dim)).astype(np.float32)
                  for _ in range(layers)]
            half = args.tokens // 2
            for lo, hi in ((0, half), (half, args.tokens)):
                for layer in range(layers):
                    length = client.append(seq, layer, ks[layer][lo:hi], vs[layer][lo:hi])
                    assert length == hi, (length, hi)

            worst = 0.0
            for layer in range(layers):
                q = rng.standard_normal((q_heads, head_dim)).astype(np.float32)
                o, lse = client.attend(seq, layer, q)
                ref_o, ref_lse = reference_attention(q, ks[layer], vs[layer])
                diff = max(max_rel_diff(o, ref_o), max_rel_diff(lse, ref_lse))
                print(f"layer {layer}: {args.tokens} tokens, o[0,:4]={np.round(o[0, :4], 4)}, "
                      f"lse[:4]={np.round(lse[:4], 4)}, max rel diff {diff:.3e}")
                worst = max(worst, diff)
            info = client.get_sequence(seq)
            print(f"sequence {seq.handle}: lengths {list(info.layer_lengths)}, "
                  f"{info.pages} pages, layout {layout.num_q_heads}q/{layout.num_kv_heads}kv")
        finally:
            client.release(seq)

    print(f"max relative difference vs numpy: {worst:.3e}")
    if not worst <= 1e-5:
        print("FAIL: above 1e-5", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
