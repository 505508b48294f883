"""Ingest of a long prompt's K/V through the daemon from Python, against memcpy.

Starts a headwised (temporary socket and data dir), registers a Llama-3-8B-shaped layout (32
layers, 32 query heads over 8 KV heads, head_dim 128, f16, 64-token pages) and ingests --tokens
tokens (default 32768: 4 GiB of K/V) in --chunk-token chunks (default 128: 16 MiB per call) with
append_layers_staged: the chunk is written into one staging region as a [32, 2, T, 8, 128] array,
then one AppendLayers call appends it to every layer. Prints the wall time of the calls alone
(an engine that writes its K/V straight into the region), of the calls plus the client's write
into the region, and of a numpy memcpy of the same bytes (into one hot buffer, and into fresh
memory: the ingest touches the daemon's pool pages for the first time).

    HEADWISE_PY_STUBS=build/python/headwise_pb .venv/bin/python \
        clients/python/examples/ingest_bench.py --headwised build/cachesvc/daemon/headwised
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import headwise  # noqa: E402

TOKEN = "ingest-token"


def start_daemon(binary, work_dir, device_budget):
    socket = os.path.join(work_dir, "headwised.sock")
    log = open(os.path.join(work_dir, "headwised.log"), "wb")
    proc = subprocess.Popen([binary, f"--socket={socket}", f"--data_dir={work_dir}/data",
                             "--metrics=none", f"--token={TOKEN}",
                             f"--device_budget={device_budget}"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    give_up = time.monotonic() + 30
    while time.monotonic() < give_up:
        if proc.poll() is not None:
            sys.exit(f"headwised exited with {proc.returncode}")
        if os.path.exists(socket):
            try:
                return proc, headwise.Client("unix://" + socket, token=TOKEN)
            except headwise.HeadwiseError:
                pass
        time.sleep(0.05)
    proc.kill()
    sys.exit("headwised did not start")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--headwised", required=True, help="path of the headwised binary")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--chunk-tokens", type=int, default=128)
    args = parser.parse_args()
    layers, kv_heads, head_dim, T = 32, 8, 128, args.chunk_tokens
    chunks = args.tokens // T
    work_dir = tempfile.mkdtemp(prefix="hwingest.", dir="/tmp")
    total = 2 * layers * args.tokens * kv_heads * head_dim * 2
    budget = f"{(total >> 20) + 1024}MiB"
    proc, client = start_daemon(args.headwised, work_dir, budget)
    try:
        layout = client.register_layout("llama3-8b", layers, 32, kv_heads, head_dim, dtype="f16",
                                        page_tokens=64)
        rng = np.random.default_rng(1)
        chunk = rng.standard_normal((layers, 2, T, kv_heads, head_dim)).astype(np.float16)
        nbytes = layout.staged_layers_bytes(T)
        assert chunk.nbytes == nbytes
        with client.open_staging(nbytes) as region:
            view = region.array(0, chunk.shape, np.float16)
            seq = client.create_sequence("llama3-8b")
            calls = 0.0
            start = time.perf_counter()
            for i in range(chunks):
                view[...] = chunk  # the client's copy into the region
                t0 = time.perf_counter()
                length = client.append_layers_staged(seq, region, 0, T)
                calls += time.perf_counter() - t0
            with_copy = time.perf_counter() - start
            assert length == chunks * T, length
            client.release(seq)
        dst = np.empty_like(chunk)
        start = time.perf_counter()
        for i in range(chunks):
            np.copyto(dst, chunk)
        memcpy = time.perf_counter() - start
        # The daemon's pool pages are touched for the first time by this ingest (the kernel
        # zeroes them as they fault in); the same first-touch cost for a plain copy:
        fresh = np.empty((chunks,) + chunk.shape, np.float16)
        start = time.perf_counter()
        for i in range(chunks):
            np.copyto(fresh[i], chunk)
        memcpy_fresh = time.perf_counter() - start
        del fresh
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(work_dir, ignore_errors=True)
    gib = chunks * nbytes / (1 << 30)
    print(f"ingest {chunks * T} tokens x {layers} layers = {gib:.2f} GiB in {chunks} AppendLayers "
          f"calls of {nbytes >> 20} MiB")
    print(f"  calls alone      {calls:8.3f} s  {gib / calls:6.2f} GiB/s")
    print(f"  calls + write    {with_copy:8.3f} s  {gib / with_copy:6.2f} GiB/s")
    print(f"  memcpy (numpy), one hot 16 MiB destination  {memcpy:8.3f} s  "
          f"{gib / memcpy:6.2f} GiB/s  -> calls reach {memcpy / calls:.2f} of it")
    print(f"  memcpy (numpy), fresh 4 GiB destination     {memcpy_fresh:8.3f} s  "
          f"{gib / memcpy_fresh:6.2f} GiB/s  -> calls reach {memcpy_fresh / calls:.2f} of it")


if __name__ == "__main__":
    main()
