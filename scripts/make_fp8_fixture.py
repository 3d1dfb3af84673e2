#!/usr/bin/env python3
"""Makes an FP8 checkpoint laid out as the published ones (Qwen3-30B-A3B-FP8, DeepSeek-V3) from a
float fixture, for the fp8 loader's tests (crates/shardline-model/tests/it/fp8.rs).

    pip install numpy safetensors
    python3 scripts/make_fp8_fixture.py          # fixtures/qwen3-moe-tiny -> fixtures/qwen3-moe-tiny-fp8
    python3 scripts/make_fp8_fixture.py --src fixtures/NAME --out DIR

What it writes in the output folder:

- `model.safetensors`: every projection matrix (`*_proj.weight`, experts included) as `F8_E4M3`
  with its sibling `*.weight_scale_inv`, one scale per 128x128 block (partial blocks at the
  edges count as blocks): scale = amax(|block|) / 448, code = e4m3(weight / scale) rounded to
  nearest even and saturated at 448, and the real weight is code * scale. The scales of layer 0
  are stored as F32 (as DeepSeek-V3 stores them), those of later layers as BF16 (rounded first,
  then used to quantize), so both kinds are read. Everything else (embeddings, lm_head, norms,
  the MoE routers `mlp.gate`) is BF16, rounded to nearest even, as in the published
  checkpoints.
- `config.json`: the source's, with `dtype` bfloat16 and the `quantization_config` the published
  checkpoints carry (quant_method fp8, fmt e4m3, dynamic activations, weight_block_size
  [128, 128], modules_to_not_convert).
- `dequantized.safetensors`: for each quantized matrix, under its own name, the F32 product
  code * scale as this script's decoder computes it (one f32 multiplication, as a loader does).
  With the BF16 tensors of model.safetensors widened to F32 it is the f32 model the checkpoint
  stands for: the tests' reference.
- `tokenizer.json`, `generation_config.json`: copied.

Needs numpy and the safetensors package; no torch (numpy has no float8, so the e4m3 encoder and
decoder are written out here, and model.safetensors is written by hand: 8-byte header length,
JSON header, data). The output is a pure function of the input files.
"""

import argparse
import json
import shutil
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

BLOCK = 128
E4M3_MAX = 448.0


def e4m3_table():
    """The value of each e4m3fn byte: bias 7, 3 mantissa bits, subnormals, 0x7F/0xFF NaN."""
    t = np.empty(256, dtype=np.float32)
    for b in range(256):
        e, m = (b >> 3) & 0xF, b & 7
        if e == 0xF and m == 7:
            v = np.nan
        elif e == 0:
            v = m / 8 * 2.0**-6
        else:
            v = (1 + m / 8) * 2.0 ** (e - 7)
        t[b] = -v if b & 0x80 else v
    return t


E4M3 = e4m3_table()
# The 127 non-negative finite values, in code order (which is value order).
POSITIVE = E4M3[:0x7F].astype(np.float64)


def e4m3_encode(x):
    """float array -> e4m3 codes (uint8), rounded to nearest, ties to the even code (the even
    mantissa), saturated at 448."""
    a = np.minimum(np.abs(x.astype(np.float64)), E4M3_MAX)
    hi = np.searchsorted(POSITIVE, a, side="left")  # POSITIVE[hi - 1] < a <= POSITIVE[hi]
    lo = np.maximum(hi - 1, 0)
    d_lo, d_hi = a - POSITIVE[lo], POSITIVE[hi] - a
    code = np.where(d_lo < d_hi, lo, hi)
    tie = d_lo == d_hi
    code = np.where(tie, np.where(lo % 2 == 0, lo, hi), code).astype(np.uint8)
    return np.where(np.signbit(x), code | 0x80, code).astype(np.uint8)


def bf16_bits(x):
    """float32 array -> bf16 bit patterns (uint16), rounded to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def bf16_value(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def block_expand(s, shape):
    """Scales per block -> one per element of a matrix of `shape`."""
    return np.repeat(np.repeat(s, BLOCK, axis=0), BLOCK, axis=1)[: shape[0], : shape[1]]


def quantize(w, bf16_scales):
    """w (float32 [n, k]) -> (codes, scales as stored, scales as f32)."""
    n, k = w.shape
    sn, sk = -(-n // BLOCK), -(-k // BLOCK)
    amax = np.zeros((sn, sk), dtype=np.float32)
    for i in range(sn):
        for j in range(sk):
            blk = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
            amax[i, j] = np.abs(blk).max()
    scale = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1)).astype(np.float32)
    stored = bf16_bits(scale) if bf16_scales else scale
    scale = bf16_value(stored) if bf16_scales else scale
    codes = e4m3_encode(w / block_expand(scale, w.shape))
    return codes, stored, scale


def quantized_name(name, shape):
    """The published checkpoints quantize the projections, not embeddings, lm_head, norms or the
    routers."""
    return len(shape) == 2 and name.endswith("_proj.weight")


def write_safetensors(path, tensors):
    """tensors: name -> (safetensors dtype, shape, bytes), written in name order."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).resolve().parent.parent
    ap.add_argument("--src", type=Path, default=root / "fixtures/qwen3-moe-tiny")
    ap.add_argument("--out", type=Path, default=root / "fixtures/qwen3-moe-tiny-fp8")
    args = ap.parse_args()

    weights = load_file(str(args.src / "model.safetensors"))
    model, dequantized, not_converted = {}, {}, []
    for name in sorted(weights):
        w = weights[name].astype(np.float32)
        if quantized_name(name, w.shape):
            layer = int(name.split(".")[2])
            codes, stored, scale = quantize(w, bf16_scales=layer > 0)
            model[name] = ("F8_E4M3", w.shape, codes.tobytes())
            model[name + "_scale_inv"] = ("BF16" if layer > 0 else "F32", stored.shape, stored.tobytes())
            # One f32 product per element, as the loader computes it.
            dequantized[name] = E4M3[codes] * block_expand(scale, w.shape)
            assert np.isfinite(dequantized[name]).all(), name
        else:
            model[name] = ("BF16", w.shape, bf16_bits(w).tobytes())
            if len(w.shape) == 2:
                not_converted.append(name.removesuffix(".weight"))

    args.out.mkdir(parents=True, exist_ok=True)
    write_safetensors(args.out / "model.safetensors", model)
    save_file(dequantized, str(args.out / "dequantized.safetensors"))
    config = json.loads((args.src / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "modules_to_not_convert": not_converted,
        "quant_method": "fp8",
        "weight_block_size": [BLOCK, BLOCK],
    }
    (args.out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in ["tokenizer.json", "generation_config.json"]:
        shutil.copyfile(args.src / name, args.out / name)

    # What the quantization did to the weights, for fixtures/README.md.
    rel = max(
        float(np.abs(dequantized[n] - weights[n]).max() / np.abs(weights[n]).max()) for n in dequantized
    )
    print(f"{args.out}: {len(dequantized)} matrices in fp8, largest error {rel:.3g} of a matrix's largest weight")


if __name__ == "__main__":
    main()
