#!/usr/bin/env python3
"""Markdown tables, and optionally PNG plots, from benchmark records in JSON lines.

Reads any number of files of records as `shardline bench decode|prefill|comm|kernels|serve --json`
writes them (one JSON object per line), the record of `shardline run --json`, and the peers'
records under bench/peers/ (the same keys plus `peer`, and `peer_mode` for some). Records are
grouped by their `bench` key, and each kind gets one table:

- a row per record, in the order read;
- `side` is "shardline", or the record's `peer` (with `/peer_mode` when it has one);
- `file` is the file the record came from;
- a case column whose value is the same in every row is moved out of the table, into the line
  "Same in every row" above it. Measured values always stay in the table.

Only the columns listed for a kind are shown (`--all-keys` shows every key). A kind this script
does not know gets every key of its records. `compare.py` beside the peers prints the ratio
Shardline / peer for matching cases.

With `--plot DIR` it also writes PNG plots into DIR (one per kind that has something to plot) when
matplotlib is installed. Without matplotlib it says so on stderr, writes no plot, and still prints
the tables.

Usage:
    python3 scripts/bench_report.py [--plot DIR] [--kind decode,comm] [--all-keys] FILE...
"""

import argparse
import json
import math
import os
import sys

# Keys that are measurements or provenance; every other key describes the case.
RESULT_KEYS = {
    "median_us",
    "p99_us",
    "iters",
    "gbps",
    "step_us",
    "step_p99_us",
    "head_us",
    "weight_bytes_per_layer",
    "comm_us_per_layer",
    "rss_mb_per_rank",
    "tokens_per_s",
    "step_bytes",
    "mem_read_gbps",
    "floor_us",
    "us_per_token",
    "duration_s",
    "req_per_s",
    "output_tok_per_s",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "itl_ms_p50",
    "itl_ms_p99",
    "failed",
    "prompt_tokens",
    "prefill_ms",
    "generated",
    "decode_ms_per_token",
    "copies",
    "comm_in_graph",
    "round",
}

# Per kind: a one-line description, and the columns shown in order ("side" and "file" are added
# by this script).
KINDS = {
    "decode": (
        "One decode step through the engine (`step_us`); per layer `median_us` / `p99_us` = "
        "(step - `head_us`) / layers; `gbps` = weight bytes per layer / per-layer median.",
        [
            "side", "variant", "round", "file", "model", "device", "dtype", "tp", "ep", "exec",
            "transport", "batch", "layers", "kv_len", "threads", "step_us", "median_us", "p99_us",
            "head_us", "gbps", "tokens_per_s", "comm_us_per_layer", "floor_us",
        ],
    ),
    "prefill": (
        "A prompt chunk of `rows` tokens: all at once (`path` prefill) or one decode step at a "
        "time (`path` per-token); `median_us` per chunk.",
        ["side", "file", "model", "device", "dtype", "layers", "rows", "kv_len", "path", "median_us",
         "p99_us", "us_per_token"],
    ),
    "serve": (
        "Streamed completions against a server; `median_us` / `p99_us` are end-to-end request "
        "latencies.",
        ["side", "file", "model", "concurrency", "requests", "prompt_len", "output_len",
         "output_tok_per_s", "req_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99",
         "median_us", "p99_us", "failed"],
    ),
    "run": (
        "`shardline run --json`: one generation.",
        ["side", "file", "device", "prompt_tokens", "prefill_ms", "generated", "decode_ms_per_token",
         "tokens_per_s"],
    ),
    "kernels": (
        "CPU kernels at model shapes; `gbps` counts the bytes a case must read and write.",
        ["side", "file", "kernel", "dtype", "rows", "cols", "m", "k", "kv_heads", "tokens", "isa",
         "threads", "median_us", "p99_us", "gbps"],
    ),
    "comm": (
        "Collectives; `bytes` is the whole buffer of the operation, the time the slowest rank's.",
        ["side", "file", "op", "transport", "dtype", "ranks", "bytes", "algo", "median_us", "p99_us",
         "gbps"],
    ),
}
ORDER = list(KINDS)


def side(rec):
    """Who measured: "shardline", or the peer (and its mode)."""
    if "peer" not in rec:
        return "shardline"
    return str(rec["peer"]) + (f"/{rec['peer_mode']}" if "peer_mode" in rec else "")


def _records_of(path, text):
    """The records of one file: JSON lines, or a whole file holding one object or a list."""
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if not records:
                try:
                    whole = json.loads(text)
                except json.JSONDecodeError:
                    whole = None
                if isinstance(whole, dict):
                    return [(n, whole)]
                if isinstance(whole, list):
                    return [(n, r) for r in whole]
            raise SystemExit(f"{path}:{n}: not a JSON object: {e}") from e
        records.append((n, rec))
    return records


def load(paths):
    """Every record of `paths`, each with a `file` key naming its file."""
    out = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise SystemExit(f"bench_report: cannot read {path}: {e}") from e
        for n, rec in _records_of(path, text):
            if not isinstance(rec, dict) or "bench" not in rec:
                raise SystemExit(f"{path}:{n}: a record must be a JSON object with a `bench` key")
            out.append({**rec, "file": os.path.basename(path)})
    return out


def fmt(value):
    """A cell: numbers with at most 3 decimals (as the records round them), text as is."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 0.001:
            return f"{value:.3g}"
        text = f"{value:.3f}".rstrip("0").rstrip(".")
        return "0" if text == "-0" else text
    if isinstance(value, (list, dict)):
        value = json.dumps(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def columns(kind, records, all_keys=False):
    """The columns of a kind's table: its listed keys that some record has (every key with
    `all_keys`, or for a kind not listed)."""
    present = []
    for rec in records:
        for k in rec:
            if k not in present and k not in ("bench", "peer", "peer_mode", "side"):
                present.append(k)
    listed = KINDS[kind][1] if kind in KINDS else None
    if listed is None or all_keys:
        base = [k for k in listed or [] if k in present]
        return ["side"] + base + [k for k in present if k not in base]
    return [k for k in listed if k == "side" or k in present]


def table(kind, records, all_keys=False):
    """The Markdown text for one kind: heading, description, shared values, table."""
    rows = [{**r, "side": side(r)} for r in records]
    cols = columns(kind, rows, all_keys)
    shared = []
    if len(rows) > 1:
        for k in cols:
            if k in RESULT_KEYS:
                continue
            values = [json.dumps(r.get(k), sort_keys=True) for r in rows]
            if all(v == values[0] for v in values) and rows[0].get(k) is not None:
                shared.append(k)
    cols = [k for k in cols if k not in shared]
    lines = [f"## {kind} ({len(rows)} record{'s' if len(rows) != 1 else ''})", ""]
    if kind in KINDS:
        lines += [KINDS[kind][0], ""]
    if shared:
        lines += ["Same in every row: " + ", ".join(f"{k} `{fmt(rows[0][k])}`" for k in shared) + ".", ""]
    numeric = []
    for k in cols:
        values = [r[k] for r in rows if r.get(k) is not None]
        numeric.append(bool(values) and all(_is_number(v) for v in values))
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("| " + " | ".join("---:" if num else "---" for num in numeric) + " |")
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k)) if k in r else "-" for k in cols) + " |")
    return "\n".join(lines)


def by_kind(records, kinds=None):
    """(kind, records) in the order decode, prefill, serve, run, kernels, comm, then others as
    first seen."""
    groups = {}
    for rec in records:
        groups.setdefault(str(rec["bench"]), []).append(rec)
    names = [k for k in ORDER if k in groups] + [k for k in groups if k not in ORDER]
    return [(k, groups[k]) for k in names if not kinds or k in kinds]


def report(records, kinds=None, all_keys=False):
    """The whole report: one table per kind."""
    return "\n\n".join(table(k, recs, all_keys) for k, recs in by_kind(records, kinds)) + "\n"


# ---- plots ----


def _label(rec, keys):
    """Text values as they are, numbers as key=value."""
    parts = []
    for k in keys:
        v = rec.get(k)
        if v is not None:
            parts.append(f"{k}={fmt(v)}" if _is_number(v) else fmt(v))
    return " ".join(parts)


def _varying(records, keys):
    """Of `keys`, those whose values differ between `records` (what tells them apart)."""
    return [k for k in keys if len({json.dumps(r.get(k), sort_keys=True) for r in records}) > 1]


def _bars(plt, records, keys, value, xlabel, title):
    records = [r for r in records if _is_number(r.get(value))]
    if not records:
        return None
    keys = _varying(records, keys) or keys[:1]
    labels = [_label(r, keys) for r in records]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.32 * len(records)))
    ax.barh(range(len(records)), [r[value] for r in records])
    ax.set_yticks(range(len(records)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _lines(plt, records, series_keys, x, ys, title, logx=False):
    """One subplot per (key, label) in `ys`, one line per series."""
    records = [r for r in records if _is_number(r.get(x))]
    if not records:
        return None
    series = {}
    keys = _varying(records, series_keys)
    for r in records:
        series.setdefault(_label(r, keys) or "all", []).append(r)
    if not any(len({r[x] for r in s}) > 1 for s in series.values()):
        return None
    fig, axes = plt.subplots(1, len(ys), figsize=(6 * len(ys), 4.5), squeeze=False)
    for ax, (y, ylabel) in zip(axes[0], ys):
        for name, rs in series.items():
            pts = sorted((r[x], r[y]) for r in rs if _is_number(r.get(y)))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plots(plt, kind, records):
    """(file name, figure) pairs for one kind."""
    recs = [{**r, "side": side(r)} for r in records]
    out = []
    if kind == "comm":
        keys = ["side", "op", "transport", "dtype", "ranks", "algo", "file"]
        fig = _lines(plt, recs, keys, "bytes", [("median_us", "median us"), ("gbps", "GB/s")],
                     "comm: time and bandwidth by buffer size", logx=True)
        if fig is not None:
            fig.axes[0].set_yscale("log")
            out.append(("comm.png", fig))
    elif kind == "kernels":
        keys = ["side", "kernel", "dtype", "rows", "cols", "m", "k", "tokens", "file"]
        out.append(("kernels.png", _bars(plt, recs, keys, "gbps", "GB/s", "kernels")))
    elif kind == "decode":
        keys = ["side", "variant", "model", "device", "dtype", "tp", "ep", "exec", "batch", "layers",
                "file"]
        out.append(("decode.png", _bars(plt, recs, keys, "median_us", "us per layer (median)",
                                        "decode: time per layer")))
        series = ["side", "variant", "model", "device", "dtype", "tp", "ep", "exec", "layers", "file"]
        out.append(("decode_batch.png", _lines(plt, recs, series, "batch",
                                               [("tokens_per_s", "tokens/s"), ("step_us", "step us")],
                                               "decode: batched steps")))
    elif kind == "prefill":
        keys = ["side", "model", "device", "dtype", "path", "rows", "kv_len", "layers", "file"]
        out.append(("prefill.png", _bars(plt, recs, keys, "us_per_token", "us per token",
                                         "prefill")))
    elif kind == "serve":
        series = ["side", "model", "prompt_len", "output_len", "file"]
        out.append(("serve.png", _lines(plt, recs, series, "concurrency",
                                        [("output_tok_per_s", "output tokens/s"),
                                         ("itl_ms_p50", "inter-token latency p50, ms")],
                                        "serve: load")))
    elif kind == "run":
        out.append(("run.png", _bars(plt, recs, ["side", "device", "file"], "decode_ms_per_token",
                                     "ms per token", "run: decode")))
    return [(name, fig) for name, fig in out if fig is not None]


def write_plots(records, out_dir, kinds=None, err=None):
    """Writes the plots into `out_dir`; returns the paths written ([] without matplotlib).
    Messages go to `err` (default: stderr)."""
    err = err or sys.stderr
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_report: matplotlib is not installed (pip install matplotlib); no plots written",
              file=err)
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for kind, recs in by_kind(records, kinds):
        for name, fig in plots(plt, kind, recs):
            path = os.path.join(out_dir, name)
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
            print(f"bench_report: wrote {path}", file=err)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="JSON-lines files of benchmark records")
    ap.add_argument("--plot", metavar="DIR", help="also write PNG plots into DIR (needs matplotlib)")
    ap.add_argument("--kind", default="", help="comma-separated kinds to report (default: all)")
    ap.add_argument("--all-keys", action="store_true", help="show every key as a column")
    args = ap.parse_args(argv)
    kinds = {k for k in args.kind.split(",") if k}
    records = load(args.files)
    if not records:
        print("bench_report: no records in " + ", ".join(args.files), file=sys.stderr)
        return 1
    if kinds and not any(str(r["bench"]) in kinds for r in records):
        print(f"bench_report: no records of kind {', '.join(sorted(kinds))}", file=sys.stderr)
        return 1
    sys.stdout.write(report(records, kinds, args.all_keys))
    if args.plot:
        write_plots(records, args.plot, kinds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
