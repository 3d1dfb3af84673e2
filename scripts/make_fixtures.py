#!/usr/bin/env python3
"""Build the repo's tiny random model fixtures (Mixtral, Qwen2-MoE, Qwen3-MoE, Llama) with `transformers`.

Each fixture folder holds a Hugging Face model (config.json, generation_config.json, model.safetensors),
a byte-level tokenizer.json with 256 tokens and no merges, and reference.json: the prompt, the prefill
logits, the greedy tokens and the per-step decode logits, all computed in float32 by transformers from
the weights as stored (bf16/f16 weights are upcast). fixtures/README.md describes the format.

Usage: python3 scripts/make_fixtures.py [--out fixtures] [--seed N] [--only NAME ...]
The output is a pure function of the seed and the installed torch/transformers versions.
"""

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

DEFAULT_SEED = 4711
VOCAB = 256
PROMPT_LEN = 9
DECODE_STEPS = 7
# A reference is only useful if a correct implementation cannot flip a decision through rounding:
# every greedy pick must win by this much (logits), every router top-k cut by this much (router logits).
MIN_GREEDY_MARGIN = 0.1
MIN_ROUTER_MARGIN = 2e-3
# Tiny random models like to repeat one token; a greedy run that visits several tokens checks more.
MIN_DISTINCT_GREEDY = 4
MAX_PROMPT_TRIES = 200

COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "hidden_act": "silu", "max_position_embeddings": 128}

# name -> (model class, config class, config kwargs, stored weight dtype, legacy config keys, notes)
FIXTURES = {
    "mixtral-tiny": (
        MixtralForCausalLM,
        MixtralConfig,
        dict(
            COMMON,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,  # != hidden / heads (16): q_proj is [96, 64]
            intermediate_size=64,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_theta=1e6,
            rms_norm_eps=1e-5,
        ),
        torch.float32,
        False,
        "4 experts top-2, GQA 4 heads / 2 KV heads, head_dim 24 != hidden/heads",
    ),
    "mixtral-tiny-bf16": (
        MixtralForCausalLM,
        MixtralConfig,
        dict(
            COMMON,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=48,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_theta=1e6,
            rms_norm_eps=1e-5,
        ),
        torch.bfloat16,
        True,
        "bf16 weights, legacy config keys, multi-query attention (1 KV head)",
    ),
    "mixtral-tiny-f16": (
        MixtralForCausalLM,
        MixtralConfig,
        dict(
            COMMON,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=8,
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            rope_theta=1e6,
            rms_norm_eps=1e-5,
        ),
        torch.float16,
        False,
        "f16 weights, 8 experts top-2, 8 heads / 4 KV heads",
    ),
    "qwen2-moe-tiny": (
        Qwen2MoeForCausalLM,
        Qwen2MoeConfig,
        dict(
            COMMON,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=96,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=False,
            qkv_bias=True,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
        ),
        torch.float32,
        False,
        "8 experts top-3 not renormalised, shared expert with sigmoid gate, q/k/v bias, GQA 4 / 2",
    ),
    "qwen3-moe-tiny": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig,
        dict(
            COMMON,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,  # != hidden / heads (16): q_proj is [128, 64]
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
        ),
        torch.float32,
        False,
        "8 experts top-3 renormalised, per-head q/k RMSNorm, GQA 4 / 2, head_dim 32 != hidden/heads",
    ),
    "llama-tiny": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(
            COMMON,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=128,
            tie_word_embeddings=True,
            rope_theta=5e5,
            rms_norm_eps=1e-5,
        ),
        torch.float32,
        True,
        "dense SwiGLU, tied embeddings (no lm_head tensor), legacy config keys, GQA 8 / 2",
    ),
}


def byte_to_unicode():
    """GPT-2's byte -> printable character table, the alphabet of every byte-level BPE vocab.

    Written out because the tokenizers library exposes the alphabet but not the mapping.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def write_tokenizer(path):
    """Byte-level BPE with one token per byte (id = byte value) and no merges."""
    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))
    # A round trip through the saved file must give back the bytes of any text.
    loaded = Tokenizer.from_file(str(path))
    text = "Shardline: héllo 🙂\n"
    ids = loaded.encode(text).ids
    if ids != list(text.encode("utf-8")) or loaded.decode(ids) != text:
        raise RuntimeError(f"{path}: byte-level round trip failed: {ids}")


def randomise(model, gen):
    """Replace HF's init (std 0.02, unit norms, zero biases) with values that make every feature matter.

    Matrices get std 1/sqrt(fan_in) so activations stay O(1) and logits are well separated; norm
    weights are 1 + noise and biases are noise, so ignoring either changes the logits.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("embed_tokens.weight"):
                # Small next to the layers' outputs: with tied embeddings a large one makes every
                # greedy pick repeat the input token, whatever the attention computed.
                p.copy_(0.25 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    model.tie_weights()


def router_recorder(model):
    """Hooks every MoE router (`mlp.gate`); collects, per call, the gap between its k-th and (k+1)-th
    logits (the closest call of the top-k cut). Returns (gaps, remove)."""
    gaps = []
    handles = []
    k = getattr(model.config, "num_experts_per_tok", 0)
    for name, module in model.named_modules():
        if name.endswith("mlp.gate") and hasattr(module, "weight"):

            def hook(mod, args):
                logits = torch.nn.functional.linear(args[0].reshape(-1, mod.weight.shape[1]), mod.weight)
                top = logits.topk(k + 1, dim=-1).values
                gaps.append((top[:, k - 1] - top[:, k]).min().item())

            handles.append(module.register_forward_pre_hook(hook))
    return gaps, lambda: [h.remove() for h in handles]


def margin(row):
    top = row.topk(2).values
    return (top[0] - top[1]).item()


@torch.no_grad()
def run_reference(model, prompt):
    """Prefill the prompt, then decode greedily; check the cache against full-sequence forwards."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    prefill = out.logits[0]
    cache = out.cache
    greedy = [int(prefill[-1].argmax())]
    margins = [margin(prefill[-1])]
    decode = []
    for _ in range(DECODE_STEPS):
        out = model(input_ids=torch.tensor([[greedy[-1]]]), cache=cache, use_cache=True)
        cache = out.cache
        row = out.logits[0, -1]
        decode.append(row)
        greedy.append(int(row.argmax()))
        margins.append(margin(row))
    full = model(input_ids=torch.tensor([prompt + greedy[:-1]]), use_cache=False).logits[0]
    incremental = torch.cat([prefill, torch.stack(decode)])
    diff = (full - incremental).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"KV-cache decode differs from a full forward by {diff}")
    return prefill, greedy, torch.stack(decode), min(margins)


def legacy_keys(config):
    """Rewrite transformers 5's `rope_parameters`/`dtype` as the older top-level `rope_theta`/`torch_dtype`."""
    rope = config.pop("rope_parameters")
    if rope.get("rope_type", "default") != "default":
        raise RuntimeError(f"legacy keys cannot express rope_type {rope['rope_type']}")
    config["rope_theta"] = rope["rope_theta"]
    config["torch_dtype"] = config.pop("dtype")
    return config


def rows(t):
    return [[float(x) for x in r] for r in t.tolist()]


def build(name, out_dir, seed):
    model_cls, config_cls, kwargs, dtype, legacy, notes = FIXTURES[name]
    # One generator per fixture, seeded from (seed, name), so fixtures do not depend on each other.
    fixture_seed = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    gen = torch.Generator().manual_seed(fixture_seed)
    torch.manual_seed(fixture_seed)

    config = config_cls(**kwargs)
    model = model_cls(config)
    randomise(model, gen)
    model = model.to(dtype)

    target = out_dir / name
    # Written to a scratch folder next to the target and moved into place only when complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir))
    try:
        model.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        if legacy:
            cfg = legacy_keys(cfg)
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        write_tokenizer(tmp / "tokenizer.json")

        # The reference comes from the files as written, loaded back and upcast to float32.
        ref_model, info = model_cls.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
        ref_model.eval()
        # Every stored tensor must be one the model uses, and every weight it uses must be stored.
        if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
            raise RuntimeError(f"{name}: reloading the saved weights did not match exactly: {info}")
        router_gaps, remove_hooks = router_recorder(ref_model)
        for attempt in range(MAX_PROMPT_TRIES):
            router_gaps.clear()
            prompt = torch.randint(3, VOCAB, (PROMPT_LEN,), generator=gen).tolist()
            prefill, greedy, decode, greedy_margin = run_reference(ref_model, prompt)
            router_margin = min(router_gaps, default=float("inf"))
            if (
                greedy_margin >= MIN_GREEDY_MARGIN
                and router_margin >= MIN_ROUTER_MARGIN
                and len(set(greedy)) >= MIN_DISTINCT_GREEDY
            ):
                break
        else:
            raise RuntimeError(f"{name}: no prompt in {MAX_PROMPT_TRIES} tries met the margin/variety bars")
        remove_hooks()

        reference = {
            "source": f"transformers {transformers.__version__}, torch {torch.__version__}",
            # The stored weights' dtype (it sets the tolerance); the logits are float32 whatever it is.
            "dtype": str(dtype).removeprefix("torch."),
            "prompt_ids": prompt,
            "prefill_logits": rows(prefill),
            "greedy_ids": greedy,
            "decode_logits": rows(decode),
        }
        (tmp / "reference.json").write_text(json.dumps(reference) + "\n")
        size = (tmp / "model.safetensors").stat().st_size
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        target.chmod(0o755)  # mkdtemp made it private
        for f in target.iterdir():
            f.chmod(0o644)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"{name} ({notes}): {size} B weights, prompt tries {attempt + 1}, "
        f"min greedy margin {greedy_margin:.3f}, min router margin {router_margin:.4f}"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "fixtures")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--only", nargs="*", choices=sorted(FIXTURES), help="build only these fixtures")
    args = ap.parse_args()
    transformers.utils.logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # reduction order, hence the last bits of every logit, fixed
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or FIXTURES:
        build(name, args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
