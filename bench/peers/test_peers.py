"""Tests of the peers' shared pieces: statistics as Shardline computes them, and compare.py's matching.

Run: python3 -m unittest discover -s bench/peers   (standard library only; no torch needed)
"""

import json
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import compare
from benchlib import Sink, gbps, stats

HERE = Path(__file__).resolve().parent


class StatsTest(unittest.TestCase):
    def test_median_and_nearest_rank_p99_like_record_rs(self):
        st = stats([float(x) for x in range(1, 101)])  # 1..100
        self.assertEqual(st, {"median_us": 50.5, "p99_us": 99.0, "iters": 100})
        st = stats([3.0, 1.0, 2.0])
        self.assertEqual(st, {"median_us": 2.0, "p99_us": 3.0, "iters": 3})

    def test_no_samples_is_an_error(self):
        with self.assertRaises(ValueError):
            stats([])

    def test_gbps(self):
        self.assertEqual(gbps(2_000_000, 1000.0), 2.0)  # 2 MB in 1 ms

    def test_sink_writes_bench_and_stats_first(self):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "out.jsonl"
            with Sink(path) as sink:
                sink.write("kernels", stats([1.0, 2.0]), kernel="matvec", peer="torch")
            rec = json.loads(path.read_text())
            self.assertEqual(list(rec)[:4], ["bench", "median_us", "p99_us", "iters"])
            self.assertEqual(rec["kernel"], "matvec")


def rec(median, **case):
    return {"bench": "comm", "median_us": median, "p99_us": median, "iters": 100, **case}


class CompareTest(unittest.TestCase):
    def test_matches_on_shared_case_keys_only(self):
        ours = rec(10.0, op="all_reduce", dtype="f32", ranks=2, bytes=8192, transport="tcp", gbps=0.8)
        gloo = rec(200.0, op="all_reduce", dtype="f32", ranks=2, bytes=8192, transport="tcp", peer="gloo", extra=1)
        other_size = rec(300.0, op="all_reduce", dtype="f32", ranks=2, bytes=65536, transport="tcp", peer="gloo")
        cases = compare.group([ours, gloo, other_size], ignore=set())
        self.assertEqual(len(cases), 2)
        self.assertEqual(set(cases[0][1]), {"shardline", "gloo"})
        self.assertEqual(set(cases[1][1]), {"gloo"})

    def test_ignore_lets_transports_line_up(self):
        shm = rec(5.0, op="all_reduce", bytes=8, transport="shm")
        mpi = rec(7.0, op="all_reduce", bytes=8, transport="vader", peer="openmpi")
        self.assertEqual(len(compare.group([shm, mpi], ignore=set())), 2)
        self.assertEqual(len(compare.group([shm, mpi], ignore={"transport"})), 1)

    def test_peer_mode_is_a_side_not_a_case(self):
        eager = {"bench": "decode", "median_us": 4000.0, "model": "m", "peer": "torch", "peer_mode": "eager"}
        comp = {**eager, "median_us": 5000.0, "peer_mode": "compile"}
        ours = {"bench": "decode", "median_us": 2000.0, "model": "m"}
        table = compare.table(compare.group([ours, eager, comp], ignore=set()))
        header, _, row = table.splitlines()
        self.assertIn("shardline/torch/eager", header)
        self.assertEqual(row.split()[-2:], ["0.50", "0.40"])

    def test_cli_rejects_a_malformed_line(self):
        with tempfile.TemporaryDirectory() as d:
            bad = Path(d) / "bad.jsonl"
            bad.write_text('{"bench": "comm", "median_us": 1}\nnot json\n')
            out = subprocess.run(
                [sys.executable, str(HERE / "compare.py"), str(bad)], capture_output=True, text=True, check=False
            )
            self.assertNotEqual(out.returncode, 0)
            self.assertIn("bad.jsonl:2", out.stderr)


class FixtureTest(unittest.TestCase):
    """torch_decode.py's layer code, written apart from transformers, reproduces every repo fixture's
    reference (needs torch and safetensors)."""

    def test_layer_code_reproduces_the_fixtures(self):
        try:
            import safetensors  # noqa: F401
            import torch_decode
        except ImportError as e:
            self.skipTest(f"torch/safetensors not installed ({e}); pip install torch safetensors")
        fixtures = sorted(p for p in (HERE.parent.parent / "fixtures").iterdir() if p.is_dir())
        self.assertEqual(len(fixtures), 6)
        for path in fixtures:
            with self.subTest(path.name):
                self.assertTrue(torch_decode.check_fixture(path))


if __name__ == "__main__":
    unittest.main()
