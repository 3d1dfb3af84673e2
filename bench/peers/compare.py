#!/usr/bin/env python3
"""One table from the JSON-lines files of `shardline bench` and its peers: each case, every side's time.

A side is "shardline" for a record without a `peer` key, else its `peer` (plus `peer_mode`, e.g.
"torch/compile"). Records describe the same case when they agree on every case key that both have
(bench, kernel/op/model, dtype, shape or bytes, ranks, transport, ...); a key only one side writes
(e.g. a peer's `kv_len`) does not split a case. Measured values (times, gbps, byte counts read) never
do. Columns: each side's median_us (gbps) and, for each peer, the ratio shardline/peer of the medians
(below 1: Shardline is faster).

Usage: python3 bench/peers/compare.py [--ignore KEY,...] A.jsonl B.jsonl ...
  --ignore transport  compares e.g. Shardline's shm with a peer's shared-memory transport named otherwise.
"""

import argparse
import json
import sys

# Keys that are results or provenance, never part of what a case is.
RESULT_KEYS = {
    "median_us",
    "p99_us",
    "iters",
    "gbps",
    "weight_bytes_per_layer",
    "comm_us_per_layer",
    "peer",
    "peer_mode",
    "copies",
    "threads",
    "comm_in_graph",
    "nccl",
    "step_us",
    "step_p99_us",
    "head_us",
    "rss_mb_per_rank",
    "compile_mode",
    "tokens_per_s",
    "us_per_token",
    "step_bytes",
    "mem_read_gbps",
    "floor_us",
    "llamacpp",
}


def load(paths):
    records = []
    for path in paths:
        try:
            with open(path) as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"{path}:{n}: not a JSON object: {e}") from e
                    if not isinstance(rec, dict) or "bench" not in rec or "median_us" not in rec:
                        raise SystemExit(f"{path}:{n}: a record needs `bench` and `median_us`")
                    records.append(rec)
        except OSError as e:
            raise SystemExit(f"compare: cannot read {path}: {e}") from e
    return records


def side(rec):
    if "peer" not in rec:
        return "shardline"
    return rec["peer"] + (f"/{rec['peer_mode']}" if "peer_mode" in rec else "")


def case_of(rec, ignore):
    return {k: v for k, v in rec.items() if k not in RESULT_KEYS and k not in ignore}


def same_case(a, b):
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def group(records, ignore):
    """Cases in first-seen order, each a (case dict, {side: record}); a side's later duplicate wins."""
    cases = []
    for rec in records:
        c = case_of(rec, ignore)
        for known, sides in cases:
            if known["bench"] == c["bench"] and same_case(known, c):
                known.update(c)  # the union of keys names the case best
                sides[side(rec)] = rec
                break
        else:
            cases.append((c, {side(rec): rec}))
    return cases


def label(case):
    order = ["bench", "kernel", "op", "model", "transport", "device", "dtype", "ranks", "m", "rows", "cols", "bytes"]
    keys = [k for k in order if k in case] + sorted(k for k in case if k not in order)
    return " ".join(str(case[k]) if k in ("bench", "kernel", "op", "model") else f"{k}={case[k]}" for k in keys)


def cell(rec):
    if rec is None:
        return "-"
    g = rec.get("gbps")
    return f"{rec['median_us']:.1f}" + (f" ({g:.3g})" if isinstance(g, (int, float)) else "")


def table(cases):
    sides = []
    for _, by_side in cases:
        sides += [s for s in by_side if s not in sides]
    sides.sort(key=lambda s: s != "shardline")
    peers = [s for s in sides if s != "shardline"] if "shardline" in sides else []
    header = ["case"] + [f"{s} us (GB/s)" for s in sides] + [f"shardline/{p}" for p in peers]
    rows = [header]
    for case, by_side in cases:
        row = [label(case)] + [cell(by_side.get(s)) for s in sides]
        ours = by_side.get("shardline")
        for p in peers:
            theirs = by_side.get(p)
            ok = ours and theirs and theirs["median_us"] > 0
            row.append(f"{ours['median_us'] / theirs['median_us']:.2f}" if ok else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--ignore", default="", help="comma-separated case keys not to match on")
    args = ap.parse_args()
    ignore = {k for k in args.ignore.split(",") if k}
    records = load(args.files)
    if not records:
        print("compare: no records in " + ", ".join(args.files), file=sys.stderr)
        return 1
    print(table(group(records, ignore)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
