#!/usr/bin/env python3
"""PyTorch peer of `shardline bench decode` for the whole step, written the way gpt-fast writes it.

One decode step at batch 1: a token id in, its embedding, every layer, the final RMSNorm, lm_head and
the greedy id out, fetched to the host (`.item()`, as a server does), timed on the wall clock like
Shardline's step. Random weights (seed 0) at the preset's real shapes. A layer: rms_norm, fused
q/k/v projection, (Qwen3: per-head q/k rms_norm), rotary embedding (theta 1e6) from cos/sin tables
indexed by the position tensor, the new K/V written with index_copy_ at that tensor into the layer's
static cache buffers [kv_heads, kv_len + 1, head_dim] (one per layer, as gpt-fast's KVCache: inductor
then updates them in place, where views of one [layers, ...] tensor made it copy whole caches),
scaled_dot_product_attention (enable_gqa, a boolean mask of the valid slots built from the position
tensor), o_proj, residual, rms_norm, router softmax in f32, top-k, renormalised; experts stacked as
w_gate_up [E, 2I, H] and w_down [E, H, I], the chosen ones gathered on the device by indexing with the
expert ids (no host sync), SwiGLU by einsum, weighted sum (gpt-fast's mixtral-moe).

No Python value changes between steps, so `--mode compile` (the default) compiles the step once,
whole (fullgraph=True): on CUDA with mode="reduce-overhead" (CUDA graphs) and gpt-fast's inductor
settings (coordinate-descent tuning, which also turns batch-1 matmuls into Triton GEMVs that read the
gathered experts in place); on the CPU with the default mode (the record says which, `compile_mode`).
`--mode eager` runs the same code uncompiled: its gather copies the chosen experts' weights first.

Each step's position is kv_len (the caches are random, as if prefilled, and slot kv_len is rewritten
every step, so every step attends over kv_len + 1 positions) and its token comes in turn from a pool
of 16. `head_us` is the median step of the same model with no layers, timed in the same run;
`median_us`/`p99_us` are per layer, (step - head_us) / layers, as Shardline reports them. Without
--layers, a preset gets as many layers as Shardline gives it (enough to read 256 MB a step). Memory:
all of Mixtral-8x7B (--layers 32) in bf16 needs about 93 GB.

Usage: python3 bench/peers/torch_step.py [--preset mixtral-mini|mixtral-8x7b|qwen3-30b-a3b]
         [--layers N] [--dtype bf16|f16|f32] [--device cpu|cuda] [--kv-len 128] [--mode compile|eager]
         [--iters 200] [--threads N] [--json FILE]
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchlib import Sink, gbps, stats
from torch_decode import DTYPES, PRESETS, Spec, rms_norm, rope, rope_tables

VOCAB = {"mixtral-mini": 32000, "mixtral-8x7b": 32000, "qwen3-30b-a3b": 151936, "tiny": 512}
# "tiny" is for tests only (not listed in --help): every code path (q/k norms too) at toy shapes.
ALL_PRESETS = {**PRESETS, "tiny": Spec(64, 4, 2, 16, 8, 2, 96, True, True, 1e-6, 1e6)}
POOL = 16
MIN_BYTES_PER_STEP = 256 << 20  # Shardline's default: enough layers to read this much per step


def weight_bytes_per_layer(spec, dtype):
    """What Shardline's Layer::decode_bytes counts: attention, router and top_k experts' matrices,
    plus the norms (Shardline holds those in f32)."""
    el = torch.tensor([], dtype=dtype).element_size()
    attn = (spec.heads + 2 * spec.kv_heads) * spec.head_dim * spec.hidden + spec.hidden * spec.heads * spec.head_dim
    experts = spec.top_k * 3 * spec.inter * spec.hidden
    norms = 2 * spec.hidden + (2 * spec.head_dim if spec.qk_norm else 0)
    return el * (attn + spec.experts * spec.hidden + experts) + 4 * norms


def param(t):
    return nn.Parameter(t, requires_grad=False)


class Layer(nn.Module):
    def __init__(self, spec, slots, dtype, device, gen):
        super().__init__()
        self.spec = spec

        def mat(*shape):  # drawn in f32 on the device, then cast (8x7b's w_gate_up: 3.8 GB in f32)
            return param((torch.randn(*shape, generator=gen, device=device) / math.sqrt(shape[-1])).to(dtype))

        def norm(n):
            return param((1 + 0.1 * torch.randn(n, generator=gen, device=device)).to(dtype))

        s = spec
        self.attn_norm = norm(s.hidden)
        self.wqkv = mat((s.heads + 2 * s.kv_heads) * s.head_dim, s.hidden)
        self.wo = mat(s.hidden, s.heads * s.head_dim)
        if s.qk_norm:
            self.q_norm, self.k_norm = norm(s.head_dim), norm(s.head_dim)
        self.ffn_norm = norm(s.hidden)
        self.gate = mat(s.experts, s.hidden)
        self.w_gate_up = mat(s.experts, 2 * s.inter, s.hidden)
        self.w_down = mat(s.experts, s.hidden, s.inter)
        # This layer's static KV cache, random as if kv_len tokens had been prefilled.
        shape = (s.kv_heads, slots, s.head_dim)
        self.register_buffer("k_cache", torch.randn(shape, generator=gen, device=device).to(dtype))
        self.register_buffer("v_cache", torch.randn(shape, generator=gen, device=device).to(dtype))

    def forward(self, x, pos, cos, sin, mask):
        """x [1, hidden] at position tensor `pos` [1]."""
        s = self.spec
        h = rms_norm(x, self.attn_norm, s.eps)
        q, k, v = F.linear(h, self.wqkv).split([s.heads * s.head_dim, *(2 * [s.kv_heads * s.head_dim])], dim=-1)
        q, k, v = (t.view(-1, s.head_dim) for t in (q, k, v))  # [heads, head_dim]
        if s.qk_norm:
            q, k = rms_norm(q, self.q_norm, s.eps), rms_norm(k, self.k_norm, s.eps)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        self.k_cache.index_copy_(1, pos, k[:, None])
        self.v_cache.index_copy_(1, pos, v[:, None])
        kv = self.k_cache[None], self.v_cache[None]
        y = F.scaled_dot_product_attention(q[None, :, None], *kv, attn_mask=mask, enable_gqa=True)
        x = x + F.linear(y.reshape(1, -1), self.wo)

        # MoE as gpt-fast's mixtral-moe: top-k of the f32 softmax, renormalised, the chosen experts
        # gathered on the device ([1, top_k, 2I, H] and [1, top_k, H, I]), einsums, weighted sum.
        h = rms_norm(x, self.ffn_norm, s.eps)
        probs = F.linear(h, self.gate).float().softmax(-1)
        weights, ids = probs.topk(s.top_k, dim=-1)  # [1, top_k]
        if s.renormalise:
            weights = weights / weights.sum(-1, keepdim=True)
        gate, up = torch.einsum("ti,taoi->tao", h, self.w_gate_up[ids]).chunk(2, dim=-1)
        out = torch.einsum("tao,taio->tai", F.silu(gate) * up, self.w_down[ids])
        return x + torch.einsum("tai,ta->ti", out, weights.to(out.dtype))


class Model(nn.Module):
    """Embedding, `layers` layers, final norm, lm_head; forward(token [1], pos [1]) -> greedy id [1]."""

    def __init__(self, spec, vocab, layers, kv_len, dtype, device, gen, head_of=None):
        super().__init__()
        self.spec = spec
        if head_of is None:
            self.embed = param(torch.randn(vocab, spec.hidden, generator=gen, device=device).to(dtype))
            self.norm = param((1 + 0.1 * torch.randn(spec.hidden, generator=gen, device=device)).to(dtype))
            self.lm_head = param(
                (torch.randn(vocab, spec.hidden, generator=gen, device=device) / math.sqrt(spec.hidden)).to(dtype)
            )
        else:  # the same embedding, norm and lm_head (shared, not copied): the step with no layers
            self.embed, self.norm, self.lm_head = head_of.embed, head_of.norm, head_of.lm_head
        slots = kv_len + 1
        self.layers = nn.ModuleList(Layer(spec, slots, dtype, device, gen) for _ in range(layers))
        cos, sin = rope_tables(spec, slots, device)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.register_buffer("slots", torch.arange(slots, device=device))

    def logits(self, token, pos):
        x = self.embed[token]  # [1, hidden]
        cos, sin = self.cos[pos], self.sin[pos]  # [1, head_dim]
        mask = (self.slots <= pos)[None, None, None]  # [1, 1, 1, slots]: the valid positions
        for layer in self.layers:
            x = layer(x, pos, cos, sin, mask)
        return F.linear(rms_norm(x, self.norm, self.spec.eps), self.lm_head)

    def forward(self, token, pos):
        return self.logits(token, pos).argmax(-1)


def compiled(model, device):
    """gpt-fast's compile of decode_one_token: the whole step, one graph; CUDA graphs on CUDA."""
    if device.type == "cuda":
        import torch._inductor.config as ic

        ic.coordinate_descent_tuning = True
        ic.triton.unique_kernel_names = True
        ic.fx_graph_cache = True
        mode = "reduce-overhead"
    else:
        mode = "default"
    return torch.compile(model, mode=mode, fullgraph=True), mode


def time_steps(step, tokens, pos, iters, warmup, cuda):
    """Wall-clock microseconds of each of `iters` steps after `warmup` untimed ones; each step's
    greedy id is fetched to the host."""
    samples = []
    for i in range(warmup + iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        step(tokens[i % POOL], pos).item()
        t1 = time.perf_counter_ns()
        if i >= warmup:
            samples.append((t1 - t0) / 1e3)
    return samples


def build(args):
    spec = ALL_PRESETS[args.preset]
    dtype = DTYPES[args.dtype]
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    vocab = VOCAB[args.preset]
    model = Model(spec, vocab, args.layers, args.kv_len, dtype, device, gen)
    head = Model(spec, vocab, 0, args.kv_len, dtype, device, gen, head_of=model)
    tgen = torch.Generator().manual_seed(42)
    tokens = [t.reshape(1).to(device) for t in torch.randint(vocab, (POOL,), generator=tgen)]
    pos = torch.tensor([args.kv_len], device=device)
    return spec, dtype, device, model, head, tokens, pos


def bench(args):
    spec, dtype, device, model, head, tokens, pos = build(args)
    cuda = device.type == "cuda"
    compile_mode = None
    if args.mode == "compile":
        model_step, compile_mode = compiled(model, device)
        head_step, _ = compiled(head, device)
    else:
        model_step, head_step = model, head
    warmup = max(10, args.iters // 10)  # the first steps compile and record the CUDA graph
    head_us = stats(time_steps(head_step, tokens, pos, args.iters, warmup, cuda))["median_us"]
    steps = time_steps(model_step, tokens, pos, args.iters, warmup, cuda)
    step = stats(steps)
    per_layer = stats([max(s - head_us, 0.0) / args.layers for s in steps])
    read = weight_bytes_per_layer(spec, dtype)
    fields = {
        "model": args.preset,
        "device": args.device,
        "dtype": args.dtype,
        "tp": 1,
        "ep": 1,
        "exec": "split",
        "transport": "none",
        "layers": args.layers,
        "kv_len": args.kv_len,
        "step_us": step["median_us"],
        "step_p99_us": step["p99_us"],
        "head_us": head_us,
        "weight_bytes_per_layer": read,
        "gbps": gbps(read, per_layer["median_us"]),
        "comm_us_per_layer": 0,
        "peer": "torch-step",
        "peer_mode": args.mode,
    }
    if compile_mode:
        fields["compile_mode"] = compile_mode
    if not cuda:
        fields["threads"] = torch.get_num_threads()
    with Sink(args.json) as sink:
        return sink.write("decode", per_layer, **fields)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shown = "{" + ",".join(sorted(PRESETS)) + "}"  # "tiny" is accepted but not shown
    ap.add_argument("--preset", choices=sorted(ALL_PRESETS), default="mixtral-mini", metavar=shown)
    ap.add_argument("--layers", type=int, help="default: enough to read 256 MB of weights a step, as Shardline picks")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--kv-len", type=int, default=128)
    ap.add_argument("--mode", choices=["eager", "compile"], default="compile")
    ap.add_argument("--iters", type=int, default=200, help="timed steps (after max(10, iters/10) warm-up)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    ap.add_argument("--json", help="also write the record to this file")
    args = ap.parse_args()
    if args.layers is None:
        per_layer = weight_bytes_per_layer(ALL_PRESETS[args.preset], DTYPES[args.dtype])
        args.layers = -(-MIN_BYTES_PER_STEP // per_layer)
    if args.layers < 1 or args.kv_len < 0 or args.iters < 1 or args.threads < 1:
        ap.error("--layers, --iters and --threads must be at least 1, --kv-len at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
