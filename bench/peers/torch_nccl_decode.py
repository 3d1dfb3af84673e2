#!/usr/bin/env python3
"""PyTorch + NCCL peer of `shardline bench decode --device cuda --tp N`: one MoE layer's decode step split over N GPUs.

The layer is bench/peers/torch_decode.py's (same functions, same random-weight scheme, same KV and
input pool), split the way Shardline splits it under tensor parallelism: each rank holds its query
heads (and KV heads; one replicated head when there are fewer KV heads than ranks), o_proj's
matching columns, and every expert's slice of intermediate rows (w1/w3 rows, w2 columns); the
router is replicated. After the attention segment and after the FFN segment the partial sums are
all-reduced with torch.distributed over NCCL, then the residual is added. Each step starts after a
barrier, is timed with CUDA events, and its time is the slowest rank's. `comm_us_per_layer` is the
median of a layer's two all-reduces of the hidden state timed alone the same way.

Start it with torchrun, one process per GPU (world size 1 works too, and plain `python3` runs one rank):

    torchrun --nproc-per-node 2 bench/peers/torch_nccl_decode.py --preset mixtral-8x7b --json out.jsonl

Writes `shardline bench decode`'s keys with "peer": "torch" and "tp" the world size (rank 0 writes).
"""

import argparse
import dataclasses
import math
import os
import socket
import sys

import torch
import torch.distributed as dist

from benchlib import Sink, gbps, stats
from torch_decode import (
    DTYPES,
    POOL,
    PRESETS,
    attention_update,
    bytes_read_per_layer,
    expert,
    nbytes,
    rope_tables,
    route,
)


def rank_spec(spec, world):
    """This rank's slice of the layer (the same for every rank): heads, KV heads, expert rows."""
    if spec.heads % world or spec.inter % world:
        raise SystemExit(f"{spec.heads} heads and {spec.inter} expert rows do not split over {world} ranks")
    if spec.kv_heads >= world and spec.kv_heads % world:
        raise SystemExit(f"{spec.kv_heads} KV heads do not split over {world} ranks")
    kv = spec.kv_heads // world if spec.kv_heads >= world else 1
    return dataclasses.replace(spec, heads=spec.heads // world, kv_heads=kv, inter=spec.inter // world)


def random_rank_layer(full, local, dtype, device, gen):
    """torch_decode.random_layer's weights, at this rank's slice shapes (the router is whole)."""

    def mat(rows, cols, fan_in, lead=()):
        t = torch.randn(*lead, rows, cols, generator=gen, device=device) / math.sqrt(fan_in)
        return t.to(dtype)

    def norm(n):
        return (1 + 0.1 * torch.randn(n, generator=gen, device=device)).to(dtype)

    h, e = full.hidden, full.experts
    w = {
        "in_norm": norm(h),
        "wq": mat(local.heads * full.head_dim, h, h),
        "wk": mat(local.kv_heads * full.head_dim, h, h),
        "wv": mat(local.kv_heads * full.head_dim, h, h),
        "wo": mat(h, local.heads * full.head_dim, full.heads * full.head_dim),
        "post_norm": norm(h),
        "router": mat(e, h, h),
        "w1": mat(local.inter, h, h, (e,)),
        "w3": mat(local.inter, h, h, (e,)),
        "w2": mat(h, local.inter, full.inter, (e,)),
    }
    if full.qk_norm:
        w["q_norm"] = norm(full.head_dim)
        w["k_norm"] = norm(full.head_dim)
    return w


class TpLayer:
    """One decoder layer's step on this rank: two segments, each followed by an all-reduce."""

    def __init__(self, spec, compile_mode):
        self.spec = spec
        wrap = torch.compile if compile_mode else (lambda f: f)
        self.attention = wrap(attention_update)
        self.route = wrap(route)
        self.expert = wrap(expert)

    def __call__(self, x, w, k_cache, v_cache, pos, cos, sin):
        part = self.attention(x, w, k_cache, v_cache, pos, cos, sin, self.spec)
        dist.all_reduce(part)
        x = x + part
        h, ids, weights = self.route(x, w, self.spec)
        y = torch.zeros_like(x)
        for e, we in zip(ids.tolist(), weights.tolist(), strict=True):
            y = y + we * self.expert(h, w["w1"][e], w["w3"][e], w["w2"][e])
        dist.all_reduce(y)
        return x + y


def join():
    """Joins the torchrun job, or makes a one-rank job when started without torchrun."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise SystemExit(f"local rank {local} but {torch.cuda.device_count()} GPU(s): NCCL needs one GPU per rank")
    torch.cuda.set_device(local)
    try:
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    except TypeError:  # torch before 2.3 has no device_id
        dist.init_process_group("nccl")
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)


def nccl_version():
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def timed(fn, iters, warmup):
    """CUDA-event times of fn() in us, each after a barrier; per iteration the slowest rank's."""
    samples = []
    for i in range(warmup + iters):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        if i >= warmup:
            samples.append(start.elapsed_time(end) * 1e3)
    t = torch.tensor(samples, device="cuda", dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def bench(args):
    rank, world, device = join()
    full = PRESETS[args.preset]
    local = rank_spec(full, world)
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    first = random_rank_layer(full, local, dtype, device, gen)
    layer_total = sum(nbytes(t) for t in first.values())
    copies = max(args.layers, math.ceil((args.cold_mb << 20) / layer_total))
    weights = [first] + [{k: t.clone() for k, t in first.items()} for _ in range(copies - 1)]
    kv_shape = (local.kv_heads, args.kv_len + 1, full.head_dim)
    caches = [
        tuple(torch.randn(kv_shape, generator=gen, device=device).to(dtype) for _ in range(2)) for _ in range(copies)
    ]
    # The same inputs on every rank (the hidden state is replicated between segments).
    pool_gen = torch.Generator(device=device).manual_seed(7)
    pool = [torch.randn(1, full.hidden, generator=pool_gen, device=device).to(dtype) for _ in range(POOL)]
    cos, sin = rope_tables(full, args.kv_len + 1, device)
    cos, sin = cos[args.kv_len], sin[args.kv_len]
    layer = TpLayer(local, args.mode == "compile")

    def step(i):
        x = pool[i % POOL]
        for j in range(args.layers):
            c = (i * args.layers + j) % copies
            x = layer(x, weights[c], caches[c][0], caches[c][1], args.kv_len, cos, sin)

    warmup = max(copies, 3) + (5 if args.mode == "compile" else 0)
    per_layer = [s / args.layers for s in timed(step, args.iters, warmup)]
    buf = torch.zeros(1, full.hidden, dtype=dtype, device=device)

    def two_all_reduces(_):
        dist.all_reduce(buf)
        dist.all_reduce(buf)

    comm = stats(timed(two_all_reduces, args.iters, 10))["median_us"]
    st = stats(per_layer)
    read = bytes_read_per_layer(first, full)
    fields = {
        "model": args.preset,
        "device": "cuda",
        "device_name": torch.cuda.get_device_name(device),
        "dtype": args.dtype,
        "tp": world,
        "ep": 1,
        "exec": "split",
        "peer_mode": args.mode,
        "layers": args.layers,
        "kv_len": args.kv_len,
        "weight_bytes_per_layer": read,
        "gbps": gbps(read, st["median_us"]),
        "comm": "nccl",
        "comm_us_per_layer": comm,
        "copies": copies,
        "peer": "torch",
        "nccl": nccl_version(),
    }
    if rank == 0:
        with Sink(args.json) as sink:
            sink.write("decode", st, **fields)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="mixtral-8x7b")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--kv-len", type=int, default=128)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager")
    ap.add_argument("--cold-mb", type=int, default=256, help="cycle layer copies totalling at least this")
    ap.add_argument("--json", help="also write the record to this file (rank 0)")
    args = ap.parse_args()
    if args.layers < 1 or args.kv_len < 0 or args.iters < 1:
        ap.error("--layers and --iters must be at least 1, --kv-len at least 0")
    if not torch.cuda.is_available():
        ap.error("torch sees no CUDA device")
    with torch.inference_mode():
        bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
