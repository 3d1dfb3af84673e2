#!/usr/bin/env python3
"""torch.distributed/gloo peer of `shardline bench comm`: the same collectives over TCP loopback.

Spawns --ranks processes on this host. For each op, dtype and size: a barrier, then the timed op, on
every rank; the time of an iteration is the slowest rank's (the per-rank times are max-reduced at the
end, outside the timing). `bytes` is the largest buffer an op touches on one rank, as nccl-tests
counts it: the all_reduce/broadcast buffer, the all_gather output, the reduce_scatter input, the whole
all_to_all send buffer, one send_recv message (each rank exchanges with rank ^ 1; with an odd world
the last rank sits out). gbps = bytes / median time. Rank 0 prints the records.

Usage: python3 bench/peers/gloo_comm.py [--ranks 2] [--ops all_reduce,...] [--dtypes f32,f16,bf16]
         [--sizes 8,64,...] [--iters N] [--timeout 60] [--json FILE]
"""

import argparse
import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from benchlib import Sink, gbps, stats

OPS = ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "send_recv"]
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_SIZES = [8, 64, 512, 4096, 8192, 65536, 1048576, 16777216]


def default_iters(nbytes):
    """At least 100 iterations for the small (sub-millisecond) cases; fewer for the multi-MB ones."""
    if nbytes <= 65536:
        return 200
    if nbytes <= 1 << 20:
        return 100
    return 30


def make_op(op, nbytes, dtype, rank, world):
    """The op as a closure over preallocated buffers, and the bytes it moves (rounded to whole elements)."""
    esize = torch.tensor([], dtype=dtype).element_size()
    chunk = max(1, nbytes // esize // world)  # elements per rank for the split ops
    if op in ("all_reduce", "broadcast", "send_recv"):
        n = max(1, nbytes // esize)
    else:
        n = chunk * world
    buf = torch.ones(n, dtype=dtype)
    if op == "all_reduce":
        return (lambda: dist.all_reduce(buf)), n * esize
    if op == "broadcast":
        return (lambda: dist.broadcast(buf, src=0)), n * esize
    if op == "all_gather":
        out = torch.empty(n, dtype=dtype)
        parts = list(out.split(chunk))
        mine = torch.ones(chunk, dtype=dtype)
        return (lambda: dist.all_gather(parts, mine)), n * esize
    if op == "reduce_scatter":
        out = torch.empty(chunk, dtype=dtype)
        parts = list(buf.split(chunk))
        return (lambda: dist.reduce_scatter(out, parts)), n * esize
    if op == "all_to_all":
        out = torch.empty(n, dtype=dtype)
        return (lambda: dist.all_to_all_single(out, buf)), n * esize
    if op == "send_recv":
        peer = rank ^ 1
        recv = torch.empty(n, dtype=dtype)

        def exchange():
            if peer >= world:
                return
            reqs = [dist.isend(buf, peer), dist.irecv(recv, peer)]
            for r in reqs:
                r.wait()

        return exchange, n * esize
    raise ValueError(f"unknown op {op}")


def run_case(op, dtype_name, nbytes, iters, rank, world):
    """Times one case on this rank; returns the slowest rank's sample per iteration (on every rank)."""
    fn, actual = make_op(op, nbytes, DTYPES[dtype_name], rank, world)
    for _ in range(max(3, iters // 10)):
        dist.barrier()
        fn()
    local = torch.empty(iters, dtype=torch.float64)
    for i in range(iters):
        dist.barrier()
        t0 = time.perf_counter_ns()
        fn()
        local[i] = (time.perf_counter_ns() - t0) / 1e3
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return local.tolist(), actual


def probe(op, dtype_name, rank, world):
    """Whether gloo supports this op and dtype: every rank tries, all agree (an error on one is fatal)."""
    try:
        fn, _ = make_op(op, 64, DTYPES[dtype_name], rank, world)
        fn()
        ok = 1.0
    except (RuntimeError, ValueError) as e:
        ok, err = 0.0, e
    flag = torch.tensor([ok])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if flag.item() == 0 and rank == 0:
        reason = err if ok == 0 else "failed on another rank"
        print(f"gloo_comm: skipping {op} {dtype_name}: not supported by gloo here ({reason})", file=sys.stderr)
    return flag.item() == 1


def worker(rank, args, port):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=args.ranks,
        timeout=datetime.timedelta(seconds=args.timeout),
    )
    sink = Sink(args.json if rank == 0 else None)
    try:
        for op in args.ops:
            for dtype in args.dtypes:
                if not probe(op, dtype, rank, args.ranks):
                    continue
                for nbytes in args.sizes:
                    iters = args.iters or default_iters(nbytes)
                    samples, actual = run_case(op, dtype, nbytes, iters, rank, args.ranks)
                    if rank == 0:
                        st = stats(samples)
                        sink.write(
                            "comm",
                            st,
                            op=op,
                            transport="tcp",
                            dtype=dtype,
                            ranks=args.ranks,
                            bytes=actual,
                            gbps=gbps(actual, st["median_us"]),
                            peer="gloo",
                        )
    finally:
        sink.close()
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def csv(kind, allowed=None, conv=str):
    def parse(text):
        items = [conv(x) for x in text.split(",") if x]
        bad = [x for x in items if allowed is not None and x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"bad {kind} {bad or text!r}; choose from {allowed}")
        return items

    return parse


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--ops", type=csv("op", OPS), default=OPS)
    ap.add_argument("--dtypes", type=csv("dtype", list(DTYPES)), default=["f32"])
    ap.add_argument("--sizes", type=csv("size", conv=int), default=DEFAULT_SIZES, help="bytes, comma-separated")
    ap.add_argument("--iters", type=int, default=0, help="timed iterations per case (default: by size)")
    ap.add_argument("--timeout", type=int, default=60, help="seconds any rank may wait for the others")
    ap.add_argument("--json", help="also write the records to this file")
    args = ap.parse_args()
    if args.ranks < 1 or args.iters < 0 or any(s < 1 for s in args.sizes):
        ap.error("--ranks and every size must be at least 1, --iters at least 0")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.start_processes(worker, args=(args, free_port()), nprocs=args.ranks, join=False, start_method="spawn")
    # Each case is bounded by the gloo timeout; the whole run by one per case plus start-up.
    deadline = time.monotonic() + args.timeout * (1 + len(args.ops) * len(args.dtypes) * len(args.sizes))
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            print("gloo_comm: ranks did not finish before the deadline; killed them", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
