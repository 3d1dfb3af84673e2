#!/usr/bin/env python3
"""Converts a Hugging Face model directory to one GGUF file, laid out as llama.cpp's
`convert_hf_to_gguf.py` lays it out, without torch: the fallback converter of
bench/peers/llamacpp.sh.

    PYTHONPATH=.../vendor/llama.cpp/gguf-py python3 bench/peers/hf_to_gguf.py MODEL_DIR OUT.gguf [--outtype bf16]

The layout is scripts/make_gguf_fixture.py's (which the GGUF loader's tests check against the
fixtures' reference logits): `general.architecture` `llama` for Llama and Mixtral, `qwen2moe`,
`qwen3moe`; GGUF tensor names; for `llama` the q/k rows permuted for the interleaved rope; experts
stacked into `ffn_{gate,up,down}_exps`; norms, 1-D tensors and the router in f32, the other
matrices in --outtype (bf16 from a bf16 checkpoint is copied bit for bit); a `gpt2` tokenizer from
tokenizer.json (byte-level BPE only), padded with `[PADn]` tokens to `vocab_size` (a tokenizer
without merges gets one that never applies: llama.cpp needs the key), the
pre-tokenizer named from the tokenizer's own split (`gpt-2`, `llama-bpe`, `qwen2`) rather than by
hashing its output as the real converter does, so made-up tokenizers convert too.

Unlike the fixture script it streams: one tensor in memory at a time (the checkpoint is
memory-mapped), so a checkpoint of any size converts in little memory. Needs numpy and gguf-py
(the vendored llama.cpp/gguf-py, or the PyPI `gguf` package).
"""

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np

try:
    import gguf
except ImportError:
    sys.exit("hf_to_gguf.py needs gguf-py: PYTHONPATH=.../llama.cpp/gguf-py or pip install gguf")

ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3MoeForCausalLM": "qwen3moe",
}

FILE_TYPE = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
}

# HF layer tensor stem -> GGUF name (blk.N.<name>.weight)
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}

GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# HF expert projection -> GGUF stacked tensor
EXPERT_PROJ = {
    "w1": "ffn_gate_exps",
    "w3": "ffn_up_exps",
    "w2": "ffn_down_exps",
    "gate_proj": "ffn_gate_exps",
    "up_proj": "ffn_up_exps",
    "down_proj": "ffn_down_exps",
}

# transformers' splits of byte-level BPE tokenizers, by llama.cpp's pre-tokenizer name.
SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


class Checkpoint:
    """The safetensors of a model directory, memory-mapped: name -> (file, dtype, shape, offset)."""

    def __init__(self, model_dir):
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            raise SystemExit(f"{model_dir}: no *.safetensors")
        self.entries = {}
        self.maps = {}
        for name in files:
            path = model_dir / name
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            self.maps[name] = np.memmap(path, dtype=np.uint8, mode="r")
            for tname, info in header.items():
                if tname == "__metadata__":
                    continue
                a, b = info["data_offsets"]
                self.entries[tname] = (name, info["dtype"], tuple(info["shape"]), 8 + n + a, 8 + n + b)

    def dtype(self, name):
        return self.entries[name][1]

    def shape(self, name):
        return self.entries[name][2]

    def raw(self, name):
        """The tensor as stored: float32, float16, or the uint16 bits of bf16."""
        file, dt, shape, a, b = self.entries[name]
        np_dt = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}.get(dt)
        if np_dt is None:
            raise SystemExit(f"tensor {name}: dtype {dt} is not F32, F16 or BF16")
        return self.maps[file][a:b].view(np_dt).reshape(shape)

    def f32(self, name):
        x = self.raw(name)
        if self.dtype(name) == "BF16":
            return (x.astype(np.uint32) << 16).view(np.float32)
        return x.astype(np.float32)


def permute(w, n_head, n_head_kv):
    """llama.cpp's q/k row order: within each head, the rows of the two rope halves interleaved
    (convert_hf_to_gguf.py's LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_name(hf):
    if hf in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf]
    parts = hf.split(".")
    if parts[:2] != ["model", "layers"]:
        raise SystemExit(f"tensor {hf}: not a name this converter knows")
    stem, suffix = ".".join(parts[3:]).rsplit(".", 1)
    if stem not in LAYER_NAMES:
        raise SystemExit(f"tensor {hf}: not a name this converter knows")
    return f"blk.{int(parts[2])}.{LAYER_NAMES[stem]}.{suffix}"


def keeps_f32(gname, ndim):
    return ndim <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight") or ".ffn_gate_inp." in gname


def rope_theta(cfg):
    rp = cfg.get("rope_parameters") or {}
    return rp.get("rope_theta", cfg.get("rope_theta", 10000.0))


def pre_tokenizer_name(tok):
    """llama.cpp's name (`tokenizer.ggml.pre`) of a byte-level BPE tokenizer.json's split."""
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
        byte_level = any(s.get("type") == "ByteLevel" for s in steps)
        for name, split in SPLITS.items():
            if byte_level and regexes == [split]:
                return name
    raise SystemExit(
        "tokenizer.json: not a byte-level BPE with a split this converter knows (gpt-2, llama-bpe, "
        "qwen2); use llama.cpp's convert_hf_to_gguf.py (bench/peers/llamacpp.sh --converter llama.cpp)"
    )


def add_metadata(w, cfg, arch, out_type, name):
    """TextModel.set_gguf_parameters and the arch's additions."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if "num_local_experts" in cfg:
        w.add_expert_count(cfg["num_local_experts"])
    if "num_experts_per_tok" in cfg:
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if "head_dim" in cfg:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_file_type(FILE_TYPE[out_type])
    if arch == "llama":
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    else:
        if "num_experts" in cfg:
            w.add_expert_count(cfg["num_experts"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if "shared_expert_intermediate_size" in cfg:
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def inert_merge(tokens, types):
    """A merge for a tokenizer that has none (the repo's made-up byte-level tokenizers): llama.cpp
    refuses a `gpt2` vocabulary without `tokenizer.ggml.merges`, and gguf-py writes no empty array.
    The merge joins `a` and `1`, which every byte-level split (gpt-2, llama-bpe, qwen2) puts in
    different words, so it never applies; its result takes the first padding slot."""
    if "a" not in tokens or "1" not in tokens or gguf.TokenType.UNUSED not in types:
        print("hf_to_gguf.py: warning: the tokenizer has no merges and no room for an inert one; "
              "llama.cpp will not load the file", file=sys.stderr)
        return None
    pad = types.index(gguf.TokenType.UNUSED)
    tokens[pad] = "a1"
    types[pad] = gguf.TokenType.NORMAL
    return "a 1"


def add_tokenizer(w, cfg, tok):
    """TextModel._set_vocab_gpt2, with the pre-tokenizer named from the split."""
    if tok.get("model", {}).get("type") != "BPE":
        raise SystemExit("tokenizer.json: not a BPE model; use llama.cpp's convert_hf_to_gguf.py")
    pre = pre_tokenizer_name(tok)
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    special = {a["id"]: a for a in tok.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(cfg["vocab_size"]):
        if i in special:
            tokens.append(special[i]["content"])
            types.append(gguf.TokenType.CONTROL if special[i]["special"] else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    if not merges:
        merges = [m for m in [inert_merge(tokens, types)] if m]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        if isinstance(cfg.get(key), int):
            add(cfg[key])


def plan_tensors(ckpt, cfg, arch):
    """(GGUF name, HF names, permutation) in output order: the checkpoint's other tensors sorted by
    name, then the stacked experts by layer and projection (as make_gguf_fixture.py orders them)."""
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    plain, experts = [], {}
    for hf in sorted(ckpt.entries):
        parts = hf.split(".")
        if "experts" in parts and "shared_expert" not in parts:
            bid, e = int(parts[2]), int(parts[parts.index("experts") + 1])
            experts.setdefault((bid, EXPERT_PROJ[parts[-2]]), {})[e] = hf
            continue
        perm = None
        if arch == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias")):
            perm = (n_head, n_head)
        elif arch == "llama" and hf.endswith(("k_proj.weight", "k_proj.bias")):
            perm = (n_head, n_kv)
        plain.append((gguf_name(hf), [hf], perm))
    for (bid, proj), by_e in sorted(experts.items()):
        plain.append((f"blk.{bid}.{proj}.weight", [by_e[e] for e in sorted(by_e)], None))
    return plain


def tensor_data(ckpt, hf_names, perm, gname, out_type):
    """The output tensor's array and its GGML type (None: the writer's own from the numpy dtype)."""
    ndim = len(ckpt.shape(hf_names[0])) + (len(hf_names) > 1)
    f32 = keeps_f32(gname, ndim) or out_type == "f32"
    passthrough = not f32 and out_type == "bf16" and all(ckpt.dtype(h) == "BF16" for h in hf_names)
    get = ckpt.raw if passthrough else ckpt.f32
    parts = [get(h) for h in hf_names]
    x = np.stack(parts) if len(parts) > 1 else parts[0]
    if perm is not None:
        x = permute(x, *perm)
    if passthrough:
        return np.ascontiguousarray(x), gguf.GGMLQuantizationType.BF16
    if f32:
        return np.ascontiguousarray(x, dtype=np.float32), None
    if out_type == "f16":
        return x.astype(np.float16), None
    return gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def convert(model_dir, out, out_type):
    cfg = json.loads((model_dir / "config.json").read_text())
    hf_arch = cfg["architectures"][0]
    if hf_arch not in ARCH:
        raise SystemExit(f"{hf_arch}: not one of {', '.join(ARCH)}; use llama.cpp's convert_hf_to_gguf.py")
    arch = ARCH[hf_arch]
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    ckpt = Checkpoint(model_dir)
    w = gguf.GGUFWriter(out, arch)
    add_metadata(w, cfg, arch, out_type, model_dir.resolve().name)
    add_tokenizer(w, cfg, tok)
    plan = plan_tensors(ckpt, cfg, arch)
    # Shapes and types first (the header precedes the data), then one tensor at a time.
    for gname, hf_names, _ in plan:
        shape = ckpt.shape(hf_names[0])
        if len(hf_names) > 1:
            shape = (len(hf_names), *shape)
        n = int(np.prod(shape))
        f32 = keeps_f32(gname, len(shape)) or out_type == "f32"
        if f32:
            w.add_tensor_info(gname, shape, np.dtype(np.float32), 4 * n)
        elif out_type == "f16":
            w.add_tensor_info(gname, shape, np.dtype(np.float16), 2 * n)
        else:
            w.add_tensor_info(gname, shape, np.dtype(np.uint16), 2 * n, raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file(out)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = 0
    for gname, hf_names, perm in plan:
        x, _ = tensor_data(ckpt, hf_names, perm, gname, out_type)
        w.write_tensor_data(x)
        total += x.nbytes
    w.close()
    print(f"{out}: {arch}, {len(plan)} tensors, {total / 1e9:.2f} GB of weights ({out_type})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--outtype", choices=sorted(FILE_TYPE), default="bf16")
    args = ap.parse_args()
    convert(args.model_dir, args.out, args.outtype)


if __name__ == "__main__":
    main()
