"""Tests of torch_step.py, the whole-step PyTorch peer, on the CPU at a toy shape (`--preset tiny`).

Run: python3 -m unittest discover -s bench/peers   (skipped where torch is not installed)
"""

import importlib.util
import json
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import compare

HERE = Path(__file__).resolve().parent
HAVE_TORCH = importlib.util.find_spec("torch") is not None
NO_TORCH = "torch not installed; pip install torch"

KEYS = {
    "bench", "median_us", "p99_us", "iters", "model", "device", "dtype", "tp", "ep", "exec", "transport", "layers",
    "kv_len", "step_us", "step_p99_us", "head_us", "weight_bytes_per_layer", "gbps", "comm_us_per_layer", "peer",
    "peer_mode", "threads",
}  # fmt: skip


def tiny(layers=2, kv_len=8):
    """torch_step's tiny model (f32, CPU), its 0-layer head, tokens and position."""
    import torch_step

    args = type("Args", (), {"preset": "tiny", "dtype": "f32", "device": "cpu", "layers": layers, "kv_len": kv_len})
    return torch_step.build(args)


@unittest.skipUnless(HAVE_TORCH, NO_TORCH)
class TorchStepTest(unittest.TestCase):
    def test_cli_writes_a_decode_record(self):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "step.jsonl"
            cmd = [sys.executable, str(HERE / "torch_step.py"), "--preset", "tiny", "--layers", "2", "--dtype", "f32"]
            cmd += ["--mode", "eager", "--iters", "5", "--threads", "1", "--json", str(path)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            self.assertEqual(out.returncode, 0, out.stderr)
            rec = json.loads(path.read_text())
        self.assertEqual(json.loads(out.stdout.strip().splitlines()[-1]), rec)
        self.assertEqual(set(rec), KEYS)
        self.assertEqual(list(rec)[:4], ["bench", "median_us", "p99_us", "iters"])
        expect = {"bench": "decode", "model": "tiny", "device": "cpu", "dtype": "f32", "layers": 2, "kv_len": 128}
        expect |= {"tp": 1, "ep": 1, "exec": "split", "iters": 5, "peer": "torch-step", "peer_mode": "eager"}
        self.assertEqual({k: rec[k] for k in expect}, expect)
        self.assertGreater(rec["step_us"], 0)
        self.assertLessEqual(rec["step_us"], rec["step_p99_us"])

        # It lines up with Shardline's record of the same case once the step's own timings are
        # not matched on (compare.py's RESULT_KEYS do not list them).
        ours = {"bench": "decode", "median_us": 1.0, "model": "tiny", "device": "cpu", "dtype": "f32", "tp": 1}
        ours |= {"ep": 1, "exec": "split", "transport": "none", "layers": 2, "kv_len": 128, "rss_mb_per_rank": 9.0}
        ours |= {"step_us": 3.0, "step_p99_us": 4.0, "head_us": 1.0}
        ignore = {"step_us", "step_p99_us", "head_us", "rss_mb_per_rank"}
        cases = compare.group([ours, rec], ignore)
        self.assertEqual(len(cases), 1)
        self.assertEqual(set(cases[0][1]), {"shardline", "torch-step/eager"})

    def test_step_matches_the_fixture_checked_layer_code(self):
        """The gpt-fast-style step gives the logits of torch_decode.py's layer code (which reproduces
        the repo's fixtures) on the same weights and caches."""
        import torch
        import torch.nn.functional as F
        import torch_decode

        spec, _, _, model, _, tokens, pos = tiny()
        p = int(pos)
        inter, q_rows, kv_rows = spec.inter, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        weights, caches = [], []
        for layer in model.layers:
            wq, wk, wv = layer.wqkv.split([q_rows, kv_rows, kv_rows])
            w = {"in_norm": layer.attn_norm, "wq": wq, "wk": wk, "wv": wv, "wo": layer.wo}
            w |= {"q_norm": layer.q_norm, "k_norm": layer.k_norm, "post_norm": layer.ffn_norm}
            w |= {"router": layer.gate, "w1": layer.w_gate_up[:, :inter], "w3": layer.w_gate_up[:, inter:]}
            w["w2"] = layer.w_down
            weights.append(w)
            caches.append((layer.k_cache.clone(), layer.v_cache.clone()))
        cos, sin = torch_decode.rope_tables(spec, p + 1, "cpu")
        reference = torch_decode.Layer(spec, compile_mode=False)
        with torch.no_grad():
            for token in tokens[:4]:
                x = model.embed[token]
                for w, (kc, vc) in zip(weights, caches, strict=True):
                    x = reference(x, w, kc, vc, p, cos[p], sin[p])
                expected = F.linear(torch_decode.rms_norm(x, model.norm, spec.eps), model.lm_head)
                got = model.logits(token, pos)
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
                self.assertEqual(model(token, pos).item(), expected.argmax().item())

    def test_compiled_step_matches_eager(self):
        """torch.compile(fullgraph=True) of the whole step (the CPU's default mode: needs a C++
        compiler) gives eager's greedy ids and writes the new K/V into the static cache in place."""
        import torch
        import torch_step

        spec, _, device, model, _, tokens, pos = tiny(layers=1)
        with torch.no_grad():
            eager = [model(t, pos).item() for t in tokens[:4]]
            written = model.layers[0].k_cache[:, int(pos)].clone()  # by eager's last step
            model.layers[0].k_cache[:, int(pos)] = 0
            step, mode = torch_step.compiled(model, device)
            self.assertEqual(mode, "default")
            self.assertEqual([step(t, pos).item() for t in tokens[:4]], eager)
            torch.testing.assert_close(model.layers[0].k_cache[:, int(pos)], written)


def have_cuda():
    if not HAVE_TORCH:
        return False
    import torch

    return torch.cuda.is_available()


@unittest.skipUnless(have_cuda(), "no CUDA device")
class TorchStepCudaTest(unittest.TestCase):
    def test_cuda_graph_step_matches_eager(self):
        """On CUDA, mode="reduce-overhead" records the whole step as a CUDA graph (no skip: the KV
        caches are module buffers, which CUDA graphs may mutate), compiles once for every token,
        gives eager's greedy ids on every replay and writes the new K/V into the cache."""
        import torch
        import torch_step
        from torch._dynamo.utils import counters

        a = type("Args", (), {"preset": "tiny", "dtype": "f32", "device": "cuda", "layers": 2, "kv_len": 8})
        _, _, device, model, _, tokens, pos = torch_step.build(a)
        counters.clear()
        with torch.no_grad():
            eager = [model(t, pos).item() for t in tokens]
            written = model.layers[1].v_cache[:, int(pos)].clone()
            model.layers[1].v_cache[:, int(pos)] = 0
            step, mode = torch_step.compiled(model, device)
            self.assertEqual(mode, "reduce-overhead")
            for _ in range(3):  # warm-up, recording, replays
                self.assertEqual([step(t, pos).item() for t in tokens], eager)
        self.assertEqual(counters["inductor"]["cudagraph_skips"], 0)
        self.assertEqual(counters["stats"]["unique_graphs"], 1)
        torch.testing.assert_close(model.layers[1].v_cache[:, int(pos)], written)


if __name__ == "__main__":
    unittest.main()
