#!/usr/bin/env python3
"""Writes a Hugging Face model directory with random weights at a real model's shapes (the same
presets as `shardline --preset`), for runs that need a checkpoint on disk: `config.json`,
`model.safetensors` (bf16 or f32) and `tokenizer.json` (copied from a repo fixture; its text is
gibberish anyway). Only numpy is needed: the safetensors container is written directly (a JSON
header and the raw tensors).

    python3 scripts/write_random_model.py --preset mixtral-mini --layers 8 --out /tmp/mini
"""

import argparse
import json
import os
import shutil
import struct

import numpy as np

# (hidden, heads, kv heads, head_dim, experts, top-k, expert intermediate, vocab, qk_norm)
PRESETS = {
    "mixtral-8x7b": (4096, 32, 8, 128, 8, 2, 14336, 32000, False),
    "qwen3-30b-a3b": (2048, 32, 4, 128, 128, 8, 768, 151936, True),
    "mixtral-mini": (1024, 8, 2, 128, 8, 2, 3584, 32000, False),
}


def config(preset, layers, dtype):
    h, nh, nkv, hd, e, k, inter, vocab, qk_norm = PRESETS[preset]
    common = {
        "hidden_size": h,
        "num_hidden_layers": layers,
        "num_attention_heads": nh,
        "num_key_value_heads": nkv,
        "head_dim": hd,
        "vocab_size": vocab,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6 if qk_norm else 1e-5,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }
    if qk_norm:
        return {
            **common,
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "num_experts": e,
            "num_experts_per_tok": k,
            "moe_intermediate_size": inter,
            "intermediate_size": inter,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    return {
        **common,
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": e,
        "num_experts_per_tok": k,
        "intermediate_size": inter,
    }


def tensors(preset, layers):
    """(name, shape) of every tensor, in the names transformers uses."""
    h, nh, nkv, hd, e, _, inter, vocab, qk_norm = PRESETS[preset]
    yield "model.embed_tokens.weight", (vocab, h)
    for i in range(layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (h,)
        yield f"{p}.post_attention_layernorm.weight", (h,)
        yield f"{p}.self_attn.q_proj.weight", (nh * hd, h)
        yield f"{p}.self_attn.k_proj.weight", (nkv * hd, h)
        yield f"{p}.self_attn.v_proj.weight", (nkv * hd, h)
        yield f"{p}.self_attn.o_proj.weight", (h, nh * hd)
        if qk_norm:
            yield f"{p}.self_attn.q_norm.weight", (hd,)
            yield f"{p}.self_attn.k_norm.weight", (hd,)
            yield f"{p}.mlp.gate.weight", (e, h)
            for x in range(e):
                yield f"{p}.mlp.experts.{x}.gate_proj.weight", (inter, h)
                yield f"{p}.mlp.experts.{x}.up_proj.weight", (inter, h)
                yield f"{p}.mlp.experts.{x}.down_proj.weight", (h, inter)
        else:
            yield f"{p}.block_sparse_moe.gate.weight", (e, h)
            for x in range(e):
                yield f"{p}.block_sparse_moe.experts.{x}.w1.weight", (inter, h)
                yield f"{p}.block_sparse_moe.experts.{x}.w3.weight", (inter, h)
                yield f"{p}.block_sparse_moe.experts.{x}.w2.weight", (h, inter)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (vocab, h)


def random_bytes(rng, shape, dtype):
    """Matrices uniform with variance 1/cols, vectors near 1 (as shardline's RandomWeights)."""
    if len(shape) == 2:
        half = np.sqrt(3.0 / shape[1])
        v = rng.uniform(-half, half, size=shape).astype(np.float32)
    else:
        v = (1.0 + rng.uniform(-0.05, 0.05, size=shape)).astype(np.float32)
    if dtype == "float32":
        return v.tobytes()
    bits = v.view(np.uint32)
    # bf16: round to nearest even on the top 16 bits.
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).tobytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config(args.preset, args.layers, args.dtype), f, indent=1)
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copy(os.path.join(here, "..", "fixtures", "llama-tiny", "tokenizer.json"), args.out)
    es = 4 if args.dtype == "float32" else 2
    st_dtype = "F32" if args.dtype == "float32" else "BF16"
    header, offset = {}, 0
    specs = list(tensors(args.preset, args.layers))
    for name, shape in specs:
        n = int(np.prod(shape)) * es
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    rng = np.random.default_rng(args.seed)
    with open(os.path.join(args.out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for _, shape in specs:
            f.write(random_bytes(rng, shape, args.dtype))
    print(f"wrote {args.out}: {args.preset}, {args.layers} layers, {offset / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
