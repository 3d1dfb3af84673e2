#!/usr/bin/env python3
"""llama-bench's JSON (`-o json`) -> JSON-lines records with the keys of `shardline bench` (the
records half of bench/peers/llamacpp.sh; stdlib only).

    python3 bench/peers/llamacpp.py RAW.json --model FILE.gguf --dtype q4_k_m [--layers N |
        --model-dir DIR] [--device cpu] [--tag converter=numpy ...] >> OUT.jsonl
    python3 bench/peers/llamacpp.py --summary OUT.jsonl

One record per llama-bench test, `peer` "llama.cpp", `model` the GGUF path as given (Shardline's
records name a model by the path it was given, so the same path matches), `dtype` the file's
recipe (bf16, q8_0, q4_k_m), `device`, `threads`, `layers`, `kv_len` (llama-bench's n_depth), and
every field llama-bench wrote (samples included) under `llamacpp`, with the `--tag`s (the script
adds `converter` and `llama_cpp_python`, the release whose vendored llama.cpp was built: an sdist
build's own `build_commit` names no llama.cpp commit). The times follow the meaning
each key has in Shardline's records of the same bench (README, "Benchmarks"), so that
bench/peers/compare.py's ratios compare like with like:

- a prompt test (`-p N`, n_gen 0) -> bench "prefill", `path` "prefill", `rows` N: `median_us`,
  `p99_us` of the whole N-token chunk over the repetitions, `us_per_token` = median / N,
  `tokens_per_s` = N / median.
- a generation test (`-n N`, n_prompt 0) -> bench "decode", `batch` 1: `step_us`, `step_p99_us` of
  one token (a repetition's time / N), `tokens_per_s` = 1e6 / step_us, and `median_us`, `p99_us`
  per layer, step / layers (Shardline takes its measured head time off the step first; llama.cpp
  has no such split, so its per-layer figure includes the lm_head's share: compare `step_us` or
  `tokens_per_s` for the whole token). A run's KV grows from `kv_len` to kv_len + N - 1, where
  Shardline's `--kv-len K` times every step at K.
- a combined test (`-pg`) has no Shardline counterpart and is skipped with a note.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import stats  # noqa: E402


def load_tests(text):
    """llama-bench's tests from its `-o json` (a list) or `-o jsonl` (one object a line) output."""
    text = text.strip()
    if not text:
        return []
    if text.startswith("["):
        tests = json.loads(text)
    else:
        tests = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not all(isinstance(t, dict) and "samples_ns" in t for t in tests):
        raise ValueError("not llama-bench JSON: every test needs `samples_ns`")
    return tests


def r3(v):
    return round(v, 3)


def to_record(test, model, dtype, layers=None, device="cpu", extra=None):
    """The record of one llama-bench test, or None for a test with no Shardline counterpart."""
    n_prompt, n_gen = int(test.get("n_prompt", 0)), int(test.get("n_gen", 0))
    samples_us = [ns / 1e3 for ns in test["samples_ns"]]
    if not samples_us:
        raise ValueError("a llama-bench test without samples")
    common = {
        "peer": "llama.cpp",
        "model": model,
        "device": device,
        "dtype": dtype,
        "threads": test.get("n_threads"),
    }
    if layers:
        common["layers"] = layers
    common["kv_len"] = int(test.get("n_depth", 0))
    own = dict(test)
    if extra:
        own.update(extra)
    if n_prompt > 0 and n_gen == 0:
        st = stats(samples_us)
        rec = {"bench": "prefill", **st, **common, "path": "prefill", "rows": n_prompt}
        rec["us_per_token"] = r3(st["median_us"] / n_prompt)
        rec["tokens_per_s"] = r3(n_prompt * 1e6 / st["median_us"])
    elif n_gen > 0 and n_prompt == 0:
        step = stats([us / n_gen for us in samples_us])
        per_layer = layers or 1
        rec = {
            "bench": "decode",
            "median_us": r3(step["median_us"] / per_layer),
            "p99_us": r3(step["p99_us"] / per_layer),
            "iters": step["iters"],
            **common,
            "batch": 1,
            "step_us": step["median_us"],
            "step_p99_us": step["p99_us"],
            "tokens_per_s": r3(1e6 / step["median_us"]),
        }
    else:
        return None
    rec["llamacpp"] = own
    return rec


def records(tests, model, dtype, layers=None, device="cpu", extra=None):
    out = []
    for t in tests:
        rec = to_record(t, model, dtype, layers, device, extra)
        if rec is None:
            print(
                f"llamacpp.py: skipped a pp{t.get('n_prompt')}+tg{t.get('n_gen')} test (no Shardline counterpart)",
                file=sys.stderr,
            )
        else:
            out.append(rec)
    return out


def layers_of(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    return cfg.get("num_hidden_layers") or cfg.get("text_config", {}).get("num_hidden_layers")


def summary(path):
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    rows = [("bench", "dtype", "threads", "tokens/s", "us/token", "model")]
    for r in recs:
        per_token = r.get("step_us", r.get("us_per_token"))
        rows.append((r["bench"], r["dtype"], str(r.get("threads")), f"{r['tokens_per_s']:.1f}", f"{per_token:.1f}", r["model"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw", nargs="?", help="llama-bench -o json output (- for stdin)")
    ap.add_argument("--model", help="the GGUF path, as Shardline is to be given it")
    ap.add_argument("--dtype", help="the file's recipe: bf16, q8_0, q4_k_m, ...")
    ap.add_argument("--layers", type=int, help="the model's layers (decode's per-layer median_us)")
    ap.add_argument("--model-dir", help="read --layers from this directory's config.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="kept under `llamacpp` (repeatable)")
    ap.add_argument("--summary", metavar="JSONL", help="print a table of the records in JSONL instead")
    args = ap.parse_args()
    if args.summary:
        print(summary(args.summary))
        return 0
    if not (args.raw and args.model and args.dtype):
        ap.error("RAW, --model and --dtype are needed")
    text = sys.stdin.read() if args.raw == "-" else open(args.raw).read()
    layers = args.layers or (layers_of(args.model_dir) if args.model_dir else None)
    extra = {}
    for tag in args.tag:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            ap.error(f"--tag {tag}: KEY=VALUE")
        extra[key] = value
    for rec in records(load_tests(text), args.model, args.dtype, layers, args.device, extra):
        print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
