#!/usr/bin/env python3
"""Prints the kernel timeline that the CUDA kernels' probe recorded (docs/architecture.md, "GPU
kernel design notes", Timeline probe; docs/performance.md, "Where a layer's time goes").

Usage: python3 scripts/gpu-timeline.py FILE

FILE holds the bytes that `CudaDevice::timeline()` returns after steps run with kernels compiled
with SHARDLINE_NVRTC_OPTIONS=-DSHARDLINE_TIMELINE. No shardline command writes this file: the
program that ran the steps saves those bytes itself. Kernel names come from the source lines of
crates/shardline-cuda/src/common.cuh and kernels.cu in this checkout, so the kernels must have
been compiled from the same source.

The file holds four little-endian u64s per warp (grid id | source line << 32 | SM << 48; start;
PDL wait returned; end; in ns of %globaltimer). One line per kernel launch of the last step, in
the order their waits returned, times in us from the first one: when its first warp started,
when its first wait returned, when its warps ended (median, 90th percentile, last), its busy
time (last end - first return) and the gap from the previous launch's last end to its return.
"""

import re
import statistics
import struct
import sys
from pathlib import Path

SOURCES = ["crates/shardline-cuda/src/common.cuh", "crates/shardline-cuda/src/kernels.cu"]
# A launch more than this far (ns) from the next one belongs to an earlier step.
STEP_GAP_NS = 100_000


def kernel_names(root):
    """Source line of each `let_next_start();` (in the text NVRTC compiles) -> its function."""
    lines = []
    for src in SOURCES:
        lines += (root / src).read_text().splitlines()
    names, current = {}, "?"
    for number, line in enumerate(lines, 1):
        if "__global__" in line or line.lstrip().startswith("__device__"):
            called = [n for n in re.findall(r"(\w+)\s*\(", line) if n != "__launch_bounds__"]
            if called:
                current = called[0]
        if "let_next_start();" in line:
            names[number] = current
    return names


def launches(data):
    by_grid = {}
    for off in range(0, len(data) - 31, 32):
        meta, start, release, end = struct.unpack_from("<4Q", data, off)
        if meta == 0 or start == 0 or release == 0 or end == 0:
            continue
        grid, line, sm = meta & 0xFFFFFFFF, (meta >> 32) & 0xFFFF, meta >> 48
        by_grid.setdefault(grid, []).append((start, release, end, line, sm))
    out = sorted(by_grid.values(), key=lambda warps: min(w[1] for w in warps))
    # Keep the last step: the trailing launches with no long pause between them.
    first = len(out) - 1
    while first > 0 and min(w[1] for w in out[first]) - max(w[2] for w in out[first - 1]) < STEP_GAP_NS:
        first -= 1
    return out[first:]


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gpu-timeline.py FILE")
    data = Path(sys.argv[1]).read_bytes()
    names = kernel_names(Path(__file__).resolve().parent.parent)
    steps = launches(data)
    if not steps:
        sys.exit(f"{sys.argv[1]}: no records (were the kernels built with -DSHARDLINE_TIMELINE?)")
    t0 = min(w[1] for w in steps[0])
    us = lambda ns: (ns - t0) / 1000.0
    print(f"{'kernel':<24}{'warps':>7}{'SMs':>5}{'start':>9}{'return':>9}{'end50':>9}{'end90':>9}"
          f"{'last':>9}{'busy':>7}{'gap':>6}")
    previous_end = None
    for warps in steps:
        ends = sorted(w[2] for w in warps)
        ret, last = min(w[1] for w in warps), ends[-1]
        gap = "" if previous_end is None else f"{(ret - previous_end) / 1000:6.2f}"
        name = names.get(warps[0][3], f"line {warps[0][3]}")
        print(f"{name:<24}{len(warps):>7}{len({w[4] for w in warps}):>5}"
              f"{us(min(w[0] for w in warps)):>9.2f}{us(ret):>9.2f}{us(statistics.median(ends)):>9.2f}"
              f"{us(ends[int(0.9 * (len(ends) - 1))]):>9.2f}{us(last):>9.2f}{(last - ret) / 1000:>7.2f}{gap}")
        previous_end = last
    print(f"step: {us(max(w[2] for warps in steps for w in warps)):.2f} us from the first return")


if __name__ == "__main__":
    main()
