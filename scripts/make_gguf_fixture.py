#!/usr/bin/env python3
"""Converts the repo's Hugging Face fixtures to GGUF, laid out as llama.cpp's
`convert_hf_to_gguf.py` lays them out, for the GGUF loader's tests
(crates/shardline-model/tests/it/gguf.rs).

    python3 -m venv /tmp/ggufenv && /tmp/ggufenv/bin/pip install gguf numpy
    /tmp/ggufenv/bin/python scripts/make_gguf_fixture.py            # every fixture below
    /tmp/ggufenv/bin/python scripts/make_gguf_fixture.py mixtral-tiny

Each `fixtures/NAME` becomes `fixtures/NAME-gguf/model.gguf` (or split shards
`model-0000K-of-0000N.gguf`), holding only the GGUF: the tests compare its logits with the
reference.json of `fixtures/NAME` and its spec and tokenizer with that folder's config.json and
tokenizer.json. What the converter does, and this script repeats:

- metadata: `general.architecture` is `llama` for Llama and Mixtral (experts in
  `llama.expert_count` / `llama.expert_used_count`), `qwen2moe`, `qwen3moe`; the
  `{arch}.*` hyper-parameters from config.json (TextModel.set_gguf_parameters and the arch's
  own additions); `general.file_type`.
- tensors: GGUF names (`blk.N.attn_q.weight`, ...); for `llama` the q and k projections (and
  biases) permuted for llama.cpp's interleaved rope (LlamaModel.permute); experts stacked into
  one 3-D tensor per projection (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`); 1-D tensors,
  norms and the router (`ffn_gate_inp`) in f32, other matrices in the output type.
- tokenizer: `gpt2` model, tokens by id and merges from tokenizer.json (the writer leaves an
  empty merges list out), token types (control for special added tokens), bos/eos ids from
  config.json, `tokenizer.ggml.pre` = `gpt-2` (the fixtures' pre-tokenizer is GPT-2's byte-level
  regex; the real converter identifies a pre-tokenizer by hashing its output and would not know
  these made-up tokenizers).

Needs the PyPI `gguf` package (llama.cpp's gguf-py) and numpy; no torch. The output is a pure
function of the input files.
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
    sys.exit("needs the `gguf` package: python3 -m pip install gguf numpy")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

# fixture -> (output type, max tensors per shard or 0 for one file)
PLAN = {
    "llama-tiny": ("f32", 0),
    "mixtral-tiny": ("f32", 0),
    "mixtral-tiny-f16": ("f16", 0),
    "mixtral-tiny-bf16": ("bf16", 16),
    "qwen2-moe-tiny": ("f32", 0),
    "qwen3-moe-tiny": ("f32", 0),
}

ARCH = {
    "LlamaForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3MoeForCausalLM": "qwen3moe",
}

FILE_TYPE = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
}


def read_safetensors(path):
    """name -> float32 array (bf16 and f16 widened exactly)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = raw[base + a : base + b]
        dt = info["dtype"]
        if dt == "F32":
            x = np.frombuffer(buf, dtype="<f4")
        elif dt == "F16":
            x = np.frombuffer(buf, dtype="<f2").astype(np.float32)
        elif dt == "BF16":
            x = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"{path}: tensor {name} has dtype {dt}")
        out[name] = x.reshape(info["shape"]).copy()
    return out


def permute(w, n_head, n_head_kv):
    """llama.cpp's q/k row order: within each head, the rows of the two rope halves interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_name(hf):
    """GGUF name of a non-expert HF tensor name."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")
    assert parts[0] == "model" and parts[1] == "layers", hf
    bid = int(parts[2])
    rest = ".".join(parts[3:])
    table = {
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
    stem, suffix = rest.rsplit(".", 1)
    return f"blk.{bid}.{table[stem]}.{suffix}"


# HF expert projection -> GGUF stacked tensor
EXPERT_PROJ = {
    "w1": "ffn_gate_exps",
    "w3": "ffn_up_exps",
    "w2": "ffn_down_exps",
    "gate_proj": "ffn_gate_exps",
    "up_proj": "ffn_up_exps",
    "down_proj": "ffn_down_exps",
}


def rope_theta(cfg):
    rp = cfg.get("rope_parameters") or {}
    return rp.get("rope_theta", cfg.get("rope_theta", 10000.0))


def convert(name, out_type, split_max_tensors):
    src = FIXTURES / name
    cfg = json.loads((src / "config.json").read_text())
    hf_arch = cfg["architectures"][0]
    arch = ARCH[hf_arch]
    out_dir = FIXTURES / f"{name}-gguf"
    out_dir.mkdir(exist_ok=True)
    for old in out_dir.glob("*.gguf"):
        old.unlink()
    writer = gguf.GGUFWriter(
        out_dir / "model.gguf", arch, split_max_tensors=split_max_tensors
    )

    # --- metadata (TextModel.set_gguf_parameters and the arch's additions) ---
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
    writer.add_rope_freq_base(rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if "num_local_experts" in cfg:
        writer.add_expert_count(cfg["num_local_experts"])
    if "num_experts_per_tok" in cfg:
        writer.add_expert_used_count(cfg["num_experts_per_tok"])
    if "head_dim" in cfg:
        writer.add_key_length(cfg["head_dim"])
        writer.add_value_length(cfg["head_dim"])
    writer.add_file_type(FILE_TYPE[out_type])
    if arch == "llama":
        writer.add_vocab_size(cfg["vocab_size"])
        writer.add_rope_dimension_count(
            cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        )
    else:
        if "num_experts" in cfg:
            writer.add_expert_count(cfg["num_experts"])
        writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if "shared_expert_intermediate_size" in cfg:
            writer.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # --- tokenizer (TextModel._set_vocab_gpt2) ---
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    n_vocab = cfg["vocab_size"]
    by_id = {i: t for t, i in vocab.items()}
    special = {a["id"]: a for a in tok.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_vocab):
        if i in special:
            tokens.append(special[i]["content"])
            types.append(
                gguf.TokenType.CONTROL if special[i]["special"] else gguf.TokenType.USER_DEFINED
            )
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        if isinstance(cfg.get(key), int):
            add(cfg[key])

    # --- tensors (ModelBase.prepare_tensors and the arch's modify_tensors) ---
    weights = read_safetensors(src / "model.safetensors")
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    experts = {}  # (bid, gguf name) -> {expert: array}
    out = []  # (gguf name, array)
    for hf in sorted(weights):
        w = weights[hf]
        parts = hf.split(".")
        if "experts" in parts and "shared_expert" not in parts:
            bid, e = int(parts[2]), int(parts[parts.index("experts") + 1])
            experts.setdefault((bid, EXPERT_PROJ[parts[-2]]), {})[e] = w
            continue
        if arch == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias")):
            w = permute(w, n_head, n_head)
        if arch == "llama" and hf.endswith(("k_proj.weight", "k_proj.bias")):
            w = permute(w, n_head, n_kv)
        out.append((gguf_name(hf), w))
    for (bid, proj), by_e in sorted(experts.items()):
        out.append((f"blk.{bid}.{proj}.weight", np.stack([by_e[e] for e in sorted(by_e)])))
    for gname, w in out:
        f32 = (
            w.ndim <= 1
            or gname.endswith("_norm.weight")
            or not gname.endswith(".weight")
            or ".ffn_gate_inp.weight" in gname
        )
        if f32 or out_type == "f32":
            writer.add_tensor(gname, w.astype(np.float32))
        elif out_type == "f16":
            writer.add_tensor(gname, w.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType.BF16
            writer.add_tensor(gname, gguf.quants.quantize(w.astype(np.float32), qtype), raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for f in sorted(out_dir.glob("*.gguf")):
        print(f"{f.relative_to(ROOT)}: {f.stat().st_size} bytes")


# Training text of the tokenizer fixtures: fixed, so the output is too.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts routes each token to a few
experts; the router picks the top two of eight. Shardline runs Mixtral, Qwen2-MoE, Qwen3-MoE and
Llama on CPUs and GPUs, splitting the experts over ranks. Numbers: 1, 12, 123, 1234, 2024, 3.14.
Unicode: \u00fcn\u00efc\u00f6d\u00e9, na\u00efve caf\u00e9, \u4f60\u597d\u4e16\u754c, \U0001f999 emoji.
Tabs\tand  double  spaces,
new lines and 'quotes' don't break it. It's, I'll, we've, they're, she'd.
"""

SAMPLES = [
    "Hello world",
    "The router picks the top two experts.",
    " leading space and  two  spaces",
    "new\nline\ttab",
    "digits 12345 and 3.14159",
    "\u00fcn\u00efc\u00f6d\u00e9 \u4f60\u597d \U0001f999 unseen: \u0416\u0436",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]


def tokenizer_fixtures():
    """fixtures/tokenizers-gguf: vocab-only GGUFs of a SentencePiece BPE tokenizer (with the ids
    sentencepiece itself gives for SAMPLES) and of a Llama-3-style byte-level BPE tokenizer (with
    its tokenizer.json), as the converter writes them (_set_vocab_sentencepiece, _set_vocab_gpt2).
    Needs `sentencepiece` and `tokenizers` besides `gguf`."""
    import tempfile

    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Regex

    out = FIXTURES / "tokenizers-gguf"
    out.mkdir(exist_ok=True)
    specials = ["<|im_start|>", "<|im_end|>"]
    corpus = CORPUS * 3

    # --- SentencePiece BPE, as Llama 2 / Mistral / Mixtral ship it ---
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "corpus.txt").write_text(corpus)
        spm.SentencePieceTrainer.train(
            input=str(Path(tmp) / "corpus.txt"), model_prefix=str(Path(tmp) / "m"),
            model_type="bpe", vocab_size=420, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, allow_whitespace_only_pieces=True,
            user_defined_symbols=specials, character_coverage=1.0, num_threads=1,
            minloglevel=2,
        )
        sp = spm.SentencePieceProcessor(model_file=str(Path(tmp) / "m.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        t = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            t = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            t = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            t = gguf.TokenType.BYTE
        elif sp.IdToPiece(i) in specials:
            t = gguf.TokenType.USER_DEFINED
        tokens.append(sp.IdToPiece(i).encode())
        scores.append(sp.GetScore(i))
        types.append(t)
    w = gguf.GGUFWriter(out / "spm.gguf", "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    # llama.cpp adds BOS for SentencePiece models. Texts with special tokens are left out:
    # sentencepiece puts its dummy-prefix space before a leading user-defined symbol, llama.cpp
    # (and transformers' Llama tokenizer) after it.
    expected = [
        {"text": t, "ids": [sp.bos_id()] + sp.encode(t)} for t in SAMPLES if "<|" not in t
    ]
    lines = ",\n".join(json.dumps(e, ensure_ascii=False) for e in expected)
    (out / "spm-expected.json").write_text(f"[\n{lines}\n]\n")

    # --- byte-level BPE with Llama 3's split and special tokens ---
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(llama3), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    bpe_specials = ["<|begin_of_text|>", "<|end_of_text|>"] + specials
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=bpe_specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([corpus], trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    tok.save(str(out / "bpe-tokenizer.json"))
    tj = json.loads((out / "bpe-tokenizer.json").read_text())
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    special_ids = {tok.token_to_id(s) for s in bpe_specials}
    w = gguf.GGUFWriter(out / "bpe.gguf", "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list([by_id[i] for i in range(len(by_id))])
    w.add_token_types([
        gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL
        for i in range(len(by_id))
    ])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(bos)
    w.add_eos_token_id(tok.token_to_id("<|end_of_text|>"))
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    for f in sorted(out.iterdir()):
        print(f"{f.relative_to(ROOT)}: {f.stat().st_size} bytes")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "names", nargs="*",
        help=f"fixtures to convert (default: {', '.join(PLAN)} and the tokenizer fixtures)",
    )
    ap.add_argument("--no-tokenizers", action="store_true", help="skip fixtures/tokenizers-gguf")
    args = ap.parse_args()
    for name in args.names or PLAN:
        if name not in PLAN:
            sys.exit(f"unknown fixture {name} (known: {', '.join(PLAN)})")
        convert(name, *PLAN[name])
    if not args.names and not args.no_tokenizers:
        tokenizer_fixtures()


if __name__ == "__main__":
    main()
