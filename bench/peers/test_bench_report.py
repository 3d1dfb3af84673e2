"""Tests of scripts/bench_report.py: Markdown tables from benchmark records, and its plots.

Run: python3 -m unittest discover -s bench/peers   (standard library only; the plot test that needs
matplotlib is skipped without it)
"""

import importlib.util
import io
import json
import subprocess
import sys
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
SCRIPT = HERE.parents[1] / "scripts" / "bench_report.py"

_spec = importlib.util.spec_from_file_location("bench_report", SCRIPT)
bench_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_report)

try:
    import matplotlib  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False


def decode(model, per_layer, step, **extra):
    rec = {
        "bench": "decode",
        "median_us": per_layer,
        "p99_us": per_layer + 1.0,
        "iters": 200,
        "model": model,
        "device": "cuda",
        "dtype": "bf16",
        "tp": 1,
        "ep": 1,
        "exec": "split",
        "layers": 8,
        "kv_len": 128,
        "step_us": step,
        "head_us": 250.1,
        "gbps": 1893.5,
        "comm_us_per_layer": 0.0,
    }
    return {**rec, **extra}


def comm(side_fields, transport, nbytes, median):
    return {
        "bench": "comm",
        "median_us": median,
        "p99_us": median * 2,
        "iters": 2000,
        "op": "all_reduce",
        "transport": transport,
        "dtype": "f32",
        "ranks": 2,
        "bytes": nbytes,
        "gbps": round(nbytes / (median * 1e3), 3),
        **side_fields,
    }


RUN = {
    "bench": "run",
    "device": "cpu",
    "prompt_tokens": 5,
    "prefill_ms": 40.25,
    "generated": 32,
    "decode_ms_per_token": 17.97,
    "tokens_per_s": 55.648,
}


def rows_of(text, kind):
    """The table rows (cells) of one kind's section."""
    section = text.split(f"## {kind} ")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]


def write_jsonl(directory, name, records):
    path = Path(directory) / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


class TableTest(unittest.TestCase):
    def test_decode_rows_name_each_side_and_keep_the_values(self):
        ours = decode("qwen3-30b-a3b", 60.1, 731.2, file="a.jsonl")
        peer = decode("qwen3-30b-a3b", 109.7, 1223.1, peer="torch-step", peer_mode="compile", file="b.jsonl")
        text = bench_report.report([ours, peer])
        self.assertIn("## decode (2 records)", text)
        rows = rows_of(text, "decode")
        header = rows[0]
        self.assertEqual(header[0], "side")
        self.assertIn("step_us", header)
        by_side = {r[0]: dict(zip(header, r)) for r in rows[2:]}
        self.assertEqual(set(by_side), {"shardline", "torch-step/compile"})
        self.assertEqual(by_side["shardline"]["median_us"], "60.1")
        self.assertEqual(by_side["shardline"]["step_us"], "731.2")
        self.assertEqual(by_side["torch-step/compile"]["step_us"], "1223.1")
        self.assertEqual(by_side["torch-step/compile"]["file"], "b.jsonl")

    def test_a_case_value_shared_by_every_row_moves_above_the_table(self):
        text = bench_report.report([decode("m1", 60.1, 731.2), decode("m2", 273.9, 1218.1)])
        self.assertIn("Same in every row: side `shardline`, device `cuda`, dtype `bf16`", text)
        header = rows_of(text, "decode")[0]
        self.assertNotIn("dtype", header)
        self.assertIn("model", header)
        # Measured values stay in the table even when equal everywhere.
        self.assertIn("head_us", header)
        self.assertIn("comm_us_per_layer", header)

    def test_kinds_come_in_a_fixed_order_and_number_columns_align_right(self):
        records = [
            comm({}, "shm", 8192, 3.2),
            RUN,
            decode("m", 60.1, 731.2),
            {"bench": "kernels", "median_us": 1200.0, "p99_us": 1300.0, "iters": 100, "kernel": "matvec",
             "dtype": "bf16", "rows": 14336, "cols": 4096, "gbps": 97.8, "isa": "avx512", "threads": 2},
        ]
        text = bench_report.report(records)
        headings = [line for line in text.splitlines() if line.startswith("## ")]
        self.assertEqual(
            headings,
            ["## decode (1 record)", "## run (1 record)", "## kernels (1 record)", "## comm (1 record)"],
        )
        comm_rows = rows_of(text, "comm")
        align = dict(zip(comm_rows[0], comm_rows[1]))
        self.assertEqual(align["bytes"], "---:")
        self.assertEqual(align["transport"], "---")

    def test_comm_table_lists_shardline_and_its_peers(self):
        text = bench_report.report([
            comm({}, "shm", 8192, 3.2),
            comm({}, "shm", 16777216, 410.5),
            comm({"peer": "gloo"}, "tcp", 8192, 45.0),
        ])
        rows = rows_of(text, "comm")
        cells = [dict(zip(rows[0], r)) for r in rows[2:]]
        self.assertEqual([c["side"] for c in cells], ["shardline", "shardline", "gloo"])
        self.assertEqual([c["bytes"] for c in cells], ["8192", "16777216", "8192"])
        self.assertEqual(cells[2]["median_us"], "45")
        self.assertIn("Same in every row: op `all_reduce`, dtype `f32`, ranks `2`.", text)

    def test_run_record_needs_no_median(self):
        rows = rows_of(bench_report.report([RUN]), "run")
        cells = dict(zip(rows[0], rows[2]))
        self.assertEqual(cells["decode_ms_per_token"], "17.97")
        self.assertEqual(cells["tokens_per_s"], "55.648")
        self.assertEqual(cells["prefill_ms"], "40.25")

    def test_an_unknown_kind_shows_every_key_and_text_is_escaped(self):
        rec = {"bench": "custom", "median_us": 1.5, "note": "a|b", "extra": [1, 2]}
        text = bench_report.report([rec])
        self.assertIn("## custom (1 record)", text)
        rows = rows_of(text, "custom")
        self.assertEqual(rows[0], ["side", "median_us", "note", "extra"])
        self.assertIn("a\\|b", text)
        self.assertIn("[1, 2]", text)

    def test_kind_filter_and_all_keys(self):
        records = [decode("m", 60.1, 731.2, rss_mb_per_rank=2000.0), RUN]
        text = bench_report.report(records, kinds={"decode"})
        self.assertNotIn("## run", text)
        self.assertNotIn("rss_mb_per_rank", text)
        self.assertIn("rss_mb_per_rank", bench_report.report(records, kinds={"decode"}, all_keys=True))

    def test_number_format(self):
        fmt = bench_report.fmt
        self.assertEqual(fmt(0.0), "0")
        self.assertEqual(fmt(12.3456), "12.346")
        self.assertEqual(fmt(2.5e-5), "2.5e-05")
        self.assertEqual(fmt(16777216), "16777216")
        self.assertEqual(fmt(None), "-")
        self.assertEqual(fmt(True), "true")


class LoadTest(unittest.TestCase):
    def test_files_of_json_lines_and_a_single_object(self):
        with tempfile.TemporaryDirectory() as d:
            a = write_jsonl(d, "decode.jsonl", [decode("m", 60.1, 731.2), decode("n", 61.0, 740.0)])
            b = Path(d) / "run.json"
            b.write_text(json.dumps(RUN, indent=2))  # a whole-file object is read too
            records = bench_report.load([a, str(b)])
        self.assertEqual([r["bench"] for r in records], ["decode", "decode", "run"])
        self.assertEqual([r["file"] for r in records], ["decode.jsonl", "decode.jsonl", "run.json"])

    def test_a_bad_line_names_file_and_line(self):
        with tempfile.TemporaryDirectory() as d:
            bad = Path(d) / "bad.jsonl"
            bad.write_text('{"bench": "comm", "median_us": 1}\nnot json\n')
            with self.assertRaises(SystemExit) as e:
                bench_report.load([str(bad)])
            self.assertIn("bad.jsonl:2", str(e.exception))
            nobench = Path(d) / "nobench.jsonl"
            nobench.write_text('{"median_us": 1}\n')
            with self.assertRaises(SystemExit) as e:
                bench_report.load([str(nobench)])
            self.assertIn("`bench`", str(e.exception))


class CliTest(unittest.TestCase):
    def test_prints_markdown_for_every_file(self):
        with tempfile.TemporaryDirectory() as d:
            a = write_jsonl(d, "decode.jsonl", [decode("qwen3-30b-a3b", 60.1, 731.2)])
            b = write_jsonl(d, "comm.jsonl", [comm({}, "shm", 8192, 3.2)])
            out = subprocess.run([sys.executable, str(SCRIPT), a, b], capture_output=True, text=True, check=True)
        self.assertIn("## decode (1 record)", out.stdout)
        self.assertIn("## comm (1 record)", out.stdout)
        self.assertIn("| shardline |", out.stdout)

    def test_no_records_is_an_error(self):
        with tempfile.TemporaryDirectory() as d:
            empty = Path(d) / "empty.jsonl"
            empty.write_text("\n")
            out = subprocess.run([sys.executable, str(SCRIPT), str(empty)], capture_output=True, text=True)
        self.assertEqual(out.returncode, 1)
        self.assertIn("no records", out.stderr)

    def test_plot_without_matplotlib_says_so_and_still_prints_tables(self):
        with tempfile.TemporaryDirectory() as d:
            a = write_jsonl(d, "comm.jsonl", [comm({}, "shm", 8192, 3.2), comm({}, "shm", 65536, 9.0)])
            plots = Path(d) / "plots"
            out, err = io.StringIO(), io.StringIO()
            blocked = {"matplotlib": None, "matplotlib.pyplot": None}
            with mock.patch.dict(sys.modules, blocked), redirect_stdout(out), redirect_stderr(err):
                code = bench_report.main(["--plot", str(plots), a])
            self.assertEqual(code, 0)
            self.assertIn("matplotlib is not installed", err.getvalue())
            self.assertIn("## comm (2 records)", out.getvalue())
            self.assertFalse(plots.exists() and any(plots.iterdir()))

    @unittest.skipUnless(HAVE_MATPLOTLIB, "matplotlib is not installed")
    def test_plot_writes_pngs(self):
        with tempfile.TemporaryDirectory() as d:
            a = write_jsonl(d, "comm.jsonl", [comm({}, "shm", 8192, 3.2), comm({}, "shm", 65536, 9.0)])
            b = write_jsonl(d, "decode.jsonl", [decode("m", 60.1, 731.2)])
            plots = Path(d) / "plots"
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                self.assertEqual(bench_report.main(["--plot", str(plots), a, b]), 0)
            names = sorted(p.name for p in plots.iterdir())
            self.assertIn("comm.png", names)
            self.assertIn("decode.png", names)
            self.assertEqual((plots / "comm.png").read_bytes()[:8], b"\x89PNG\r\n\x1a\n")


if __name__ == "__main__":
    unittest.main()
