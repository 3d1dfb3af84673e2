#!/usr/bin/env python3
"""PyTorch CPU peer of `shardline bench kernels`: matvec, small-M matmul and the machine's read bandwidth.

matvec is `y = W x` for W [rows, cols] row-major, done as models do it (`F.linear(x[1, cols], W)`);
matmul is `Y = X W^T` with X [m, cols]. Weights are kept out of cache by cycling over copies of W
whose total is at least --cold-bytes. gbps counts the bytes of W read per call (x and y are tiny).
mem_read sums a large f32 buffer. One JSON object per line, with the keys `shardline bench kernels`
writes (README.md, "Benchmarks") plus "peer": "torch".

Usage: python3 bench/peers/torch_kernels.py [--threads N] [--dtypes f32,f16,bf16] [--json FILE]
"""

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from benchlib import Sink, gbps, measure

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
MATVEC_SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 3584), (3584, 1024)]
MATMUL_SHAPES = [(m, 4096, 4096) for m in (2, 4, 8, 16, 128)]  # (m, rows, cols)


def cold_copies(one, cold_bytes):
    """Enough copies of a weight that cycling through them never finds it in cache."""
    n = max(1, math.ceil(cold_bytes / (one.numel() * one.element_size())))
    return [one] + [one.clone() for _ in range(n - 1)]


def bench_linear(sink, name, dtype_name, m, rows, cols, cold_bytes, **extra):
    dtype = DTYPES[dtype_name]
    weights = cold_copies(torch.randn(rows, cols).to(dtype), cold_bytes)
    x = torch.randn(m, cols).to(dtype)
    n = len(weights)

    def step(i):
        F.linear(x, weights[i % n])

    st = measure(step, warmup=max(3, n))
    fields = {"kernel": name, "dtype": dtype_name, "rows": rows, "cols": cols}
    if name == "matmul":
        fields["m"] = m
    w_bytes = rows * cols * weights[0].element_size()
    sink.write("kernels", st, **fields, gbps=gbps(w_bytes, st["median_us"]), copies=n, **extra)


def bench_mem_read(sink, nbytes, **extra):
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    st = measure(lambda i: buf.sum(), warmup=3, min_iters=20)
    sink.write("kernels", st, kernel="mem_read", dtype="f32", bytes=nbytes, gbps=gbps(nbytes, st["median_us"]), **extra)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--dtypes", default="f32,f16,bf16", help="comma-separated subset of f32,f16,bf16")
    ap.add_argument("--cold-mb", type=int, default=256, help="cycle weight copies totalling at least this")
    ap.add_argument("--mem-mb", type=int, default=1024, help="mem_read buffer size")
    ap.add_argument("--json", help="also write the records to this file")
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"unknown dtype(s) {bad}; choose from {sorted(DTYPES)}")
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    extra = {"threads": args.threads, "peer": "torch"}
    cold = args.cold_mb << 20
    with Sink(args.json) as sink:
        bench_mem_read(sink, args.mem_mb << 20, **extra)
        for dtype in dtypes:
            for rows, cols in MATVEC_SHAPES:
                bench_linear(sink, "matvec", dtype, 1, rows, cols, cold, **extra)
            for m, rows, cols in MATMUL_SHAPES:
                bench_linear(sink, "matmul", dtype, m, rows, cols, cold, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
