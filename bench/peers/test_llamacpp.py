"""Tests of bench/peers/llamacpp.py: llama-bench's JSON -> Shardline-style records (no build needed)."""

import json
import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402
import llamacpp  # noqa: E402


def bench_test(n_prompt, n_gen, samples_ns, **over):
    """One test object as llama-bench -o json writes it (fields of test::get_fields, in order)."""
    avg = sum(samples_ns) / len(samples_ns)
    n = n_prompt + n_gen
    t = {
        "build_commit": "a1b2c3d",
        "build_number": 7342,
        "cpu_info": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
        "gpu_info": "",
        "backends": "CPU",
        "model_filename": "/tmp/mini/mixtral-mini-q8_0.gguf",
        "model_type": "llama 8x?B Q8_0",
        "model_size": 572620800,
        "model_n_params": 538968064,
        "n_batch": 2048,
        "n_ubatch": 512,
        "n_threads": 2,
        "cpu_mask": "0x0",
        "cpu_strict": False,
        "poll": 50,
        "type_k": "f16",
        "type_v": "f16",
        "n_gpu_layers": 99,
        "n_cpu_moe": 0,
        "split_mode": "layer",
        "main_gpu": 0,
        "no_kv_offload": False,
        "flash_attn": -1,
        "devices": "auto",
        "tensor_split": "0.00",
        "tensor_buft_overrides": "none",
        "load_mode": "mmap",
        "lazy_mode": "off",
        "embeddings": False,
        "no_op_offload": 0,
        "no_host": False,
        "repack": True,
        "fit_target": 0,
        "fit_min_ctx": 0,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "n_depth": 0,
        "test_time": "2026-12-07T18:30:00Z",
        "avg_ns": int(avg),
        "stddev_ns": 1000,
        "avg_ts": n * 1e9 / avg,
        "stddev_ts": 0.5,
        "samples_ns": samples_ns,
        "samples_ts": [n * 1e9 / s for s in samples_ns],
    }
    t.update(over)
    return t


PP = bench_test(128, 0, [1_610_000_000, 1_590_000_000, 1_600_000_000, 1_650_000_000, 1_580_000_000])
TG = bench_test(0, 64, [2_560_000_000, 2_496_000_000, 2_528_000_000, 2_624_000_000, 2_592_000_000])
SAMPLE = json.dumps([PP, TG], indent=2)


class LoadTests(unittest.TestCase):
    def test_json_array_and_jsonl(self):
        self.assertEqual(len(llamacpp.load_tests(SAMPLE)), 2)
        jsonl = "\n".join(json.dumps(t) for t in (PP, TG)) + "\n"
        self.assertEqual(llamacpp.load_tests(jsonl), llamacpp.load_tests(SAMPLE))
        self.assertEqual(llamacpp.load_tests("  \n"), [])

    def test_not_llama_bench_output_is_an_error(self):
        with self.assertRaises(ValueError):
            llamacpp.load_tests('[{"n_prompt": 128}]')


class Records(unittest.TestCase):
    def setUp(self):
        self.recs = llamacpp.records(llamacpp.load_tests(SAMPLE), "/tmp/mini/mixtral-mini-q8_0.gguf", "q8_0", layers=4)

    def test_prompt_test_is_a_prefill_of_the_whole_chunk(self):
        pre = self.recs[0]
        self.assertEqual(list(pre)[:4], ["bench", "median_us", "p99_us", "iters"])
        self.assertEqual(pre["bench"], "prefill")
        self.assertEqual(pre["path"], "prefill")
        self.assertEqual(pre["rows"], 128)
        self.assertEqual(pre["iters"], 5)
        self.assertEqual(pre["median_us"], 1_600_000.0)  # median of the 5 runs, whole chunk
        self.assertEqual(pre["p99_us"], 1_650_000.0)
        self.assertEqual(pre["us_per_token"], 12_500.0)
        self.assertEqual(pre["tokens_per_s"], 80.0)

    def test_generation_test_is_a_decode_step_per_token(self):
        dec = self.recs[1]
        self.assertEqual(dec["bench"], "decode")
        self.assertEqual(dec["batch"], 1)
        self.assertEqual(dec["step_us"], 40_000.0)  # 2.56 s / 64 tokens, the median run
        self.assertEqual(dec["step_p99_us"], 41_000.0)
        self.assertEqual(dec["tokens_per_s"], 25.0)
        self.assertEqual(dec["median_us"], 10_000.0)  # per layer, as Shardline's median_us
        self.assertEqual(dec["p99_us"], 10_250.0)
        self.assertEqual(dec["iters"], 5)

    def test_case_keys_and_llama_cpp_fields(self):
        for rec in self.recs:
            self.assertEqual(rec["peer"], "llama.cpp")
            self.assertEqual(rec["model"], "/tmp/mini/mixtral-mini-q8_0.gguf")
            self.assertEqual(rec["dtype"], "q8_0")
            self.assertEqual(rec["device"], "cpu")
            self.assertEqual(rec["threads"], 2)
            self.assertEqual(rec["layers"], 4)
            self.assertEqual(rec["kv_len"], 0)
            self.assertEqual(rec["llamacpp"]["build_commit"], "a1b2c3d")
            self.assertEqual(len(rec["llamacpp"]["samples_ns"]), 5)
        json.dumps(self.recs)  # plain JSON all through

    def test_without_layers_decode_median_is_per_token(self):
        dec = llamacpp.to_record(TG, "m.gguf", "bf16")
        self.assertNotIn("layers", dec)
        self.assertEqual(dec["median_us"], dec["step_us"])

    def test_depth_is_the_kv_len_and_extra_fields_are_kept(self):
        rec = llamacpp.to_record(bench_test(0, 16, [800_000_000], n_depth=512), "m.gguf", "bf16", 2, extra={"converter": "numpy"})
        self.assertEqual(rec["kv_len"], 512)
        self.assertEqual(rec["step_us"], 50_000.0)
        self.assertEqual(rec["llamacpp"]["converter"], "numpy")

    def test_combined_test_is_skipped(self):
        pg = bench_test(128, 64, [4_000_000_000])
        self.assertIsNone(llamacpp.to_record(pg, "m.gguf", "bf16", 4))

    def test_matches_shardline_records_of_the_same_file_in_compare(self):
        ours = {
            "bench": "decode", "median_us": 8000.0, "p99_us": 8500.0, "iters": 200,
            "model": "/tmp/mini/mixtral-mini-q8_0.gguf", "device": "cpu", "dtype": "q8_0", "tp": 1,
            "ep": 1, "exec": "split", "transport": "none", "layers": 4, "kv_len": 0, "threads": 2,
            "step_us": 36000.0, "head_us": 4000.0, "batch": 1, "tokens_per_s": 27.778,
            "step_bytes": 123, "mem_read_gbps": 9.5, "floor_us": 13.0, "gbps": 5.0,
        }
        cases = compare.group([ours, self.recs[1]], ignore=set())
        self.assertEqual(len(cases), 1)
        self.assertEqual(set(cases[0][1]), {"shardline", "llama.cpp"})
        prefill = {"bench": "prefill", "median_us": 1.0, "p99_us": 1.0, "iters": 10,
                   "model": "/tmp/mini/mixtral-mini-q8_0.gguf", "device": "cpu", "dtype": "q8_0",
                   "path": "prefill", "layers": 4, "rows": 128, "kv_len": 0, "us_per_token": 0.01}
        self.assertEqual(len(compare.group([prefill, self.recs[0]], ignore=set())), 1)


class Cli(unittest.TestCase):
    def test_raw_json_to_jsonl_and_summary(self):
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.json"
            raw.write_text(SAMPLE)
            (Path(tmp) / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
            run = subprocess.run(
                [sys.executable, str(HERE / "llamacpp.py"), str(raw), "--model", "x.gguf", "--dtype",
                 "q4_k_m", "--model-dir", tmp, "--tag", "converter=numpy", "--tag", "llama_cpp_python=0.3.36"],
                capture_output=True, text=True, check=True,
            )
            lines = [json.loads(line) for line in run.stdout.splitlines()]
            self.assertEqual([r["bench"] for r in lines], ["prefill", "decode"])
            self.assertEqual(lines[1]["layers"], 4)
            self.assertEqual(lines[1]["llamacpp"]["converter"], "numpy")
            self.assertEqual(lines[1]["llamacpp"]["llama_cpp_python"], "0.3.36")
            out = Path(tmp) / "out.jsonl"
            out.write_text(run.stdout)
            table = subprocess.run(
                [sys.executable, str(HERE / "llamacpp.py"), "--summary", str(out)],
                capture_output=True, text=True, check=True,
            ).stdout
            self.assertIn("decode", table)
            self.assertIn("25.0", table)
            # compare.py reads the records as they are
            subprocess.run([sys.executable, str(HERE / "compare.py"), str(out)], capture_output=True, check=True)


if __name__ == "__main__":
    os.chdir(HERE)
    unittest.main()
