#!/usr/bin/env python3
"""PyTorch peer of `shardline bench decode`: one MoE decoder layer's decode step, written plainly in torch.

The layer does the same work as Shardline's: rms_norm, q/k/v projections, (Qwen3: per-head q/k
rms_norm), rotary embedding, KV append, grouped-query attention over kv_len cached positions plus the
new one, o_proj, residual, rms_norm, router softmax, top-k (renormalised), the k selected experts'
SwiGLU, weighted sum, residual. Random weights at the preset's real shapes; each iteration decodes
one hidden state from a pool of 16 (so routing varies) through --layers layers; the KV slot of the
new token is overwritten every step, so the attended length stays kv_len + 1. Layers are cycled
over enough copies that their weights total at least --cold-mb (256 MB: more than a CPU's L3 or a
GPU's L2), so no step finds its weights in cache. On CUDA, each step is timed with CUDA events.

`--check-fixture DIR...` instead runs whole fixtures (fixtures/README.md: Mixtral, Qwen2-MoE,
Qwen3-MoE, Llama) token by token through the same layer code and compares every logit row with the
fixture's reference.

Usage: python3 bench/peers/torch_decode.py [--preset mixtral-mini|mixtral-8x7b|qwen3-30b-a3b]
         [--dtype f32|bf16|f16] [--device cpu|cuda] [--layers N] [--kv-len 128] [--mode eager|compile]
         [--threads N] [--json FILE]
"""

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchlib import Sink, gbps, measure


@dataclass(frozen=True)
class Spec:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    inter: int
    qk_norm: bool
    renormalise: bool
    eps: float
    rope_theta: float


PRESETS = {
    "mixtral-mini": Spec(1024, 8, 2, 128, 8, 2, 3584, False, True, 1e-5, 1e6),
    "mixtral-8x7b": Spec(4096, 32, 8, 128, 8, 2, 14336, False, True, 1e-5, 1e6),
    "qwen3-30b-a3b": Spec(2048, 32, 4, 128, 128, 8, 768, True, True, 1e-6, 1e6),
}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
POOL = 16


def rms_norm(x, w, eps):
    """HF's RMSNorm: statistics in f32, result in the input's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope_tables(spec, positions, device):
    inv_freq = spec.rope_theta ** (-torch.arange(0, spec.head_dim, 2, dtype=torch.float64) / spec.head_dim)
    ang = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float().to(device), ang.sin().float().to(device)


def rope(x, cos, sin):
    """Half-rotation rotary embedding (HF Llama/Mixtral/Qwen layout) of x [heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def attention_update(x, w, k_cache, v_cache, pos, cos, sin, spec):
    """o_proj(attention(rope(q), cache + rope(k), v)) for x [1, hidden] at position `pos`: the
    residual update (on a tensor-parallel rank, its partial sum over this rank's heads)."""
    h = rms_norm(x, w["in_norm"], spec.eps)
    q = F.linear(h, w["wq"], w.get("bq")).view(spec.heads, spec.head_dim)
    k = F.linear(h, w["wk"], w.get("bk")).view(spec.kv_heads, spec.head_dim)
    v = F.linear(h, w["wv"], w.get("bv")).view(spec.kv_heads, spec.head_dim)
    if spec.qk_norm:
        q = rms_norm(q, w["q_norm"], spec.eps)
        k = rms_norm(k, w["k_norm"], spec.eps)
    q = rope(q, cos, sin)
    k = rope(k, cos, sin)
    k_cache[:, pos] = k
    v_cache[:, pos] = v
    keys = k_cache[:, : pos + 1]
    values = v_cache[:, : pos + 1]
    group = spec.heads // spec.kv_heads
    q = q.view(spec.kv_heads, group, spec.head_dim)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() / math.sqrt(spec.head_dim)
    probs = scores.softmax(-1).to(values.dtype)
    out = torch.matmul(probs, values).reshape(1, spec.heads * spec.head_dim)
    return F.linear(out, w["wo"])


def attention_block(x, w, k_cache, v_cache, pos, cos, sin, spec):
    """x plus the attention update."""
    return x + attention_update(x, w, k_cache, v_cache, pos, cos, sin, spec)


def route(x, w, spec):
    """The FFN input and the top-k experts' ids and weights for x [1, hidden]."""
    h = rms_norm(x, w["post_norm"], spec.eps)
    probs = F.linear(h, w["router"]).float().softmax(-1)
    top_w, top_i = probs.topk(spec.top_k, dim=-1)
    if spec.renormalise:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    return h, top_i[0], top_w[0]


def expert(h, w1, w3, w2):
    return F.linear(F.silu(F.linear(h, w1)) * F.linear(h, w3), w2)


class Layer:
    """One decoder layer's step; `compile` wraps each dense part in torch.compile.

    The expert loop stays in Python, reading the chosen ids on the host, as HF's MoE blocks do:
    compiling through it would specialise on the expert ids. The benchmark's presets are MoE layers;
    for checking fixtures the layer also takes q/k/v biases (`bq`...), a Qwen2-MoE shared expert with
    its sigmoid gate (`shared_*`), and a dense SwiGLU (no `router`: `w1`/`w3`/`w2` are one matrix each).
    """

    def __init__(self, spec, compile_mode):
        self.spec = spec
        wrap = torch.compile if compile_mode else (lambda f: f)
        self.attention = wrap(attention_block)
        self.route = wrap(route)
        self.expert = wrap(expert)

    def __call__(self, x, w, k_cache, v_cache, pos, cos, sin):
        x = self.attention(x, w, k_cache, v_cache, pos, cos, sin, self.spec)
        if "router" not in w:
            h = rms_norm(x, w["post_norm"], self.spec.eps)
            return x + self.expert(h, w["w1"], w["w3"], w["w2"])
        h, ids, weights = self.route(x, w, self.spec)
        y = torch.zeros_like(x)
        for e, we in zip(ids.tolist(), weights.tolist(), strict=True):
            y = y + we * self.expert(h, w["w1"][e], w["w3"][e], w["w2"][e])
        if "shared_w1" in w:
            gate = torch.sigmoid(F.linear(h, w["shared_gate"]))
            y = y + gate * self.expert(h, w["shared_w1"], w["shared_w3"], w["shared_w2"])
        return x + y


def random_layer(spec, dtype, device, gen):
    def mat(*shape):
        t = torch.randn(*shape, generator=gen, device=device) / math.sqrt(shape[-1])
        return t.to(dtype)

    def norm(n):
        return (1 + 0.1 * torch.randn(n, generator=gen, device=device)).to(dtype)

    w = {
        "in_norm": norm(spec.hidden),
        "wq": mat(spec.heads * spec.head_dim, spec.hidden),
        "wk": mat(spec.kv_heads * spec.head_dim, spec.hidden),
        "wv": mat(spec.kv_heads * spec.head_dim, spec.hidden),
        "wo": mat(spec.hidden, spec.heads * spec.head_dim),
        "post_norm": norm(spec.hidden),
        "router": mat(spec.experts, spec.hidden),
        "w1": mat(spec.experts, spec.inter, spec.hidden),
        "w3": mat(spec.experts, spec.inter, spec.hidden),
        "w2": mat(spec.experts, spec.hidden, spec.inter),
    }
    if spec.qk_norm:
        w["q_norm"] = norm(spec.head_dim)
        w["k_norm"] = norm(spec.head_dim)
    return w


def nbytes(t):
    return t.numel() * t.element_size()


def bytes_read_per_layer(w, spec):
    """Attention, norms and router weights, plus the top_k experts' three matrices."""
    total = sum(nbytes(t) for name, t in w.items() if name not in ("w1", "w2", "w3"))
    per_expert = sum(nbytes(w[name][0]) for name in ("w1", "w2", "w3"))
    return total + spec.top_k * per_expert


def bench(args):
    spec = PRESETS[args.preset]
    dtype = DTYPES[args.dtype]
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)  # on the device: 8x7b's experts are 5.6 GB in f32
    first = random_layer(spec, dtype, device, gen)
    layer_total = sum(nbytes(t) for t in first.values())
    copies = max(args.layers, math.ceil((args.cold_mb << 20) / layer_total))
    weights = [first] + [{k: t.clone() for k, t in first.items()} for _ in range(copies - 1)]
    kv_shape = (spec.kv_heads, args.kv_len + 1, spec.head_dim)
    caches = [
        tuple(torch.randn(kv_shape, generator=gen, device=device).to(dtype) for _ in range(2)) for _ in range(copies)
    ]
    pool = [torch.randn(1, spec.hidden, generator=gen, device=device).to(dtype) for _ in range(POOL)]
    cos, sin = rope_tables(spec, args.kv_len + 1, device)
    cos, sin = cos[args.kv_len], sin[args.kv_len]
    layer = Layer(spec, args.mode == "compile")
    cuda = device.type == "cuda"

    def step(i):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        x = pool[i % POOL]
        for j in range(args.layers):
            c = (i * args.layers + j) % copies
            x = layer(x, weights[c], caches[c][0], caches[c][1], args.kv_len, cos, sin)
        if cuda:
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3
        return None

    # torch.compile compiles on the first calls: warm up long enough to leave that out.
    warmup = max(copies, 3) + (5 if args.mode == "compile" else 0)
    st = measure(step, warmup=warmup, self_timed=cuda)
    per_layer = {k: round(v / args.layers, 3) if k != "iters" else v for k, v in st.items()}
    read = bytes_read_per_layer(first, spec)
    fields = {
        "model": args.preset,
        "device": args.device,
        "dtype": args.dtype,
        "tp": 1,
        "ep": 1,
        "exec": "split",
        "peer_mode": args.mode,
        "layers": args.layers,
        "kv_len": args.kv_len,
        "weight_bytes_per_layer": read,
        "gbps": gbps(read, per_layer["median_us"]),
        "comm_us_per_layer": 0,
        "copies": copies,
        "peer": "torch",
    }
    if not cuda:
        fields["threads"] = torch.get_num_threads()
    with Sink(args.json) as sink:
        sink.write("decode", per_layer, **fields)


# Per architecture: the FFN's module name, its expert matrices' names (gate, up, down), whether the
# attention has per-head q/k norms.
ARCHS = {
    "MixtralForCausalLM": ("block_sparse_moe", ("w1", "w3", "w2"), False),
    "Qwen2MoeForCausalLM": ("mlp", ("gate_proj", "up_proj", "down_proj"), False),
    "Qwen3MoeForCausalLM": ("mlp", ("gate_proj", "up_proj", "down_proj"), True),
    "LlamaForCausalLM": ("mlp", ("gate_proj", "up_proj", "down_proj"), False),
}


def load_fixture(path):
    """A fixture (fixtures/README.md) as (spec, per-layer weight dicts, embed, final norm, lm_head), in f32."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "config.json").read_text())
    arch = cfg["architectures"][0]
    if arch not in ARCHS:
        raise SystemExit(f"{path}: --check-fixture supports {sorted(ARCHS)}, not {arch}")
    ffn, names, qk_norm = ARCHS[arch]
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    rope = cfg.get("rope_parameters") or {}
    spec = Spec(
        hidden=cfg["hidden_size"],
        heads=cfg["num_attention_heads"],
        kv_heads=cfg["num_key_value_heads"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        experts=experts,
        top_k=cfg.get("num_experts_per_tok", 0),
        inter=cfg.get("moe_intermediate_size") or cfg["intermediate_size"],
        qk_norm=qk_norm,
        renormalise=cfg.get("norm_topk_prob", True),
        eps=cfg["rms_norm_eps"],
        rope_theta=rope.get("rope_theta", cfg.get("rope_theta")),
    )
    t = {k: v.float() for k, v in load_file(path / "model.safetensors").items()}
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w = {"in_norm": t[p + "input_layernorm.weight"], "post_norm": t[p + "post_attention_layernorm.weight"]}
        for proj in "qkvo":
            w["w" + proj] = t[p + f"self_attn.{proj}_proj.weight"]
            if p + f"self_attn.{proj}_proj.bias" in t:
                w["b" + proj] = t[p + f"self_attn.{proj}_proj.bias"]
        if qk_norm:
            w["q_norm"] = t[p + "self_attn.q_norm.weight"]
            w["k_norm"] = t[p + "self_attn.k_norm.weight"]
        for short, name in zip(("w1", "w3", "w2"), names, strict=True):
            if experts:
                w[short] = torch.stack([t[p + f"{ffn}.experts.{e}.{name}.weight"] for e in range(experts)])
                if p + f"{ffn}.shared_expert.{name}.weight" in t:
                    w["shared_" + short] = t[p + f"{ffn}.shared_expert.{name}.weight"]
            else:
                w[short] = t[p + f"{ffn}.{name}.weight"]
        if experts:
            w["router"] = t[p + f"{ffn}.gate.weight"]
        if "shared_w1" in w:
            w["shared_gate"] = t[p + f"{ffn}.shared_expert_gate.weight"]
        layers.append(w)
    lm_head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return spec, layers, t["model.embed_tokens.weight"], t["model.norm.weight"], lm_head


@torch.no_grad()
def check_fixture(path):
    """Runs the fixture's prompt and greedy tokens one at a time; compares every logit row."""
    spec, layers, embed, final_norm, lm_head = load_fixture(path)
    ref = json.loads((path / "reference.json").read_text())
    tokens = ref["prompt_ids"] + ref["greedy_ids"][:-1]
    expected = torch.tensor(ref["prefill_logits"] + ref["decode_logits"])
    n = len(tokens)
    cos, sin = rope_tables(spec, n, "cpu")
    caches = [
        (torch.zeros(spec.kv_heads, n, spec.head_dim), torch.zeros(spec.kv_heads, n, spec.head_dim)) for _ in layers
    ]
    layer = Layer(spec, compile_mode=False)
    rows = []
    for pos, tok in enumerate(tokens):
        x = embed[tok][None, :]
        for w, (kc, vc) in zip(layers, caches, strict=True):
            x = layer(x, w, kc, vc, pos, cos[pos], sin[pos])
        rows.append(F.linear(rms_norm(x, final_norm, spec.eps), lm_head)[0])
    got = torch.stack(rows)
    diff = (got - expected).abs().max().item()
    p = len(ref["prompt_ids"])
    greedy_ok = got[p - 1 :].argmax(-1).tolist() == ref["greedy_ids"]
    tol = 1e-4 if ref["dtype"] == "float32" else 1e-3
    ok = diff <= tol and greedy_ok
    print(f"{path}: max |logit diff| {diff:.2e} (tolerance {tol:g}), greedy {'agrees' if greedy_ok else 'DIFFERS'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="mixtral-mini")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--kv-len", type=int, default=128)
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    ap.add_argument("--cold-mb", type=int, default=256, help="cycle layer copies totalling at least this")
    ap.add_argument("--json", help="also write the record to this file")
    ap.add_argument("--check-fixture", type=Path, nargs="+", metavar="DIR", help="check the layer code instead")
    args = ap.parse_args()
    if args.layers < 1 or args.kv_len < 0 or args.threads < 1:
        ap.error("--layers and --threads must be at least 1, --kv-len at least 0")
    torch.set_num_threads(args.threads)
    if args.check_fixture:
        ok = True
        for path in args.check_fixture:
            try:
                ok &= check_fixture(path)
            except (OSError, KeyError, ValueError) as e:  # a missing file or tensor, bad JSON
                print(f"{path}: cannot check: {type(e).__name__}: {e}", file=sys.stderr)
                ok = False
        return 0 if ok else 1
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    with torch.inference_mode():
        bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
