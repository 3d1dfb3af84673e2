#!/usr/bin/env python3
"""Build the test vectors for shardline-tensor's ggml block formats with the `gguf` package.

For every format the Rust crate reads (Q4_0, Q8_0, Q4_K, Q5_K, Q6_K) this writes random blocks (random
bytes whose f16 scales are finite, some of them subnormal or negative) plus hand-made edge cases (zero
scales, the largest and smallest quant values, the largest f16 scale), and the f32 values that
`gguf.quants.dequantize` gives for them: gguf-py follows ggml's dequantize_row_* operation for
operation, so the Rust dequantizers must reproduce these bits exactly. It also writes f32 rows and the
Q8_0 bytes `gguf.quants.quantize` makes of them, and f32 rows with the Q8_K blocks of a numpy
transcription of ggml's quantize_row_q8_K_ref (gguf-py has no Q8_K quantizer).

Usage: python3 -m pip install --user gguf numpy && python3 scripts/make_quant_vectors.py [--out DIR]
The output is a pure function of SEED and the installed gguf/numpy versions (written with gguf 0.19.0
and numpy 2.4.6). Files, all little-endian (crates/shardline-tensor/tests/it/quant_vectors.rs reads them):

  dequant_<format>.bin   b"SLQD", u32 ggml type id, u32 block count, the blocks, then the f32 values
  quantize_q8_0.bin      b"SLQ8", u32 element count, the f32 inputs, then the Q8_0 blocks
  quantize_q8_k.bin      b"SLQK", u32 element count, the f32 inputs, then per 256 inputs:
                         f32 d, 256 x i8 quants, 16 x i16 sums of 16 quants
"""

import argparse
import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

SEED = 20240611
QK_K = 256
OUT = Path(__file__).resolve().parent.parent / "crates/shardline-tensor/tests/data/quant"

F16_MAX = 0x7BFF  # 65504
F16_MIN_SUBNORMAL = 0x0001
F16_ONE = 0x3C00
F16_NEG_ONE = 0xBC00


def f16_bytes(bits: int) -> bytes:
    return struct.pack("<H", bits)


def random_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` random finite f16 bit patterns of either sign, spread over every exponent."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
    finite = (bits & 0x7C00) != 0x7C00
    return np.where(finite, bits, bits & ~np.uint16(0x4000))


def moderate_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` random f16 values of a realistic magnitude (1e-4 .. 1e-1), mostly positive."""
    mag = np.exp(rng.uniform(np.log(1e-4), np.log(1e-1), size=n)).astype(np.float16)
    sign = np.where(rng.random(n) < 0.9, 1, -1).astype(np.float16)
    return (mag * sign).view(np.uint16)


# Where each format keeps its f16 scales (byte offsets in a block).
SCALE_OFFSETS = {
    T.Q4_0: [0],
    T.Q8_0: [0],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}


def random_blocks(rng: np.random.Generator, qtype: T, n: int, scales) -> np.ndarray:
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n, type_size), dtype=np.uint16).astype(np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        blocks[:, off : off + 2] = scales(rng, n).astype("<u2").view(np.uint8).reshape(n, 2)
    return blocks


def edge_blocks(qtype: T) -> list[bytes]:
    """Zero scales, extreme quants and extreme scales, per format."""
    out = []
    if qtype in (T.Q4_0, T.Q8_0):
        payload = 16 if qtype == T.Q4_0 else 32
        for d in (0x0000, 0x8000, F16_ONE, F16_NEG_ONE, F16_MAX, F16_MAX | 0x8000, F16_MIN_SUBNORMAL):
            for q in (0x00, 0xFF, 0x80, 0x7F, 0x88, 0x77):
                out.append(f16_bytes(d) + bytes([q]) * payload)
    elif qtype in (T.Q4_K, T.Q5_K):
        for d, dmin in ((0, 0), (F16_ONE, F16_ONE), (F16_MAX, F16_MAX), (F16_NEG_ONE, F16_MIN_SUBNORMAL)):
            for scales, qs in ((0xFF, 0xFF), (0x00, 0x00), (0x3F, 0xF0), (0xC0, 0x0F)):
                qh = b"" if qtype == T.Q4_K else bytes([qs]) * 32
                out.append(f16_bytes(d) + f16_bytes(dmin) + bytes([scales]) * 12 + qh + bytes([qs]) * 128)
    else:  # Q6_K
        for d in (0x0000, F16_NEG_ONE, F16_MAX, F16_MIN_SUBNORMAL):
            for ql, qh, sc in ((0xFF, 0xFF, 0x7F), (0x00, 0x00, 0x80), (0xFF, 0xFF, 0x80), (0x0F, 0x55, 0x01)):
                out.append(bytes([ql]) * 128 + bytes([qh]) * 64 + bytes([sc]) * 16 + f16_bytes(d))
    return out


def write_dequant(rng: np.random.Generator, out: Path, qtype: T, n_random: int, n_moderate: int) -> int:
    edges = np.frombuffer(b"".join(edge_blocks(qtype)), dtype=np.uint8)
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = np.concatenate([
        random_blocks(rng, qtype, n_random, random_f16),
        random_blocks(rng, qtype, n_moderate, moderate_f16),
        edges.reshape(-1, type_size),
    ])
    with np.errstate(over="ignore", invalid="ignore"):
        values = dequantize(blocks, qtype)
    assert values.dtype == np.float32
    path = out / f"dequant_{qtype.name.lower()}.bin"
    with open(path, "wb") as f:
        f.write(b"SLQD" + struct.pack("<II", int(qtype), blocks.shape[0]))
        f.write(blocks.tobytes())
        f.write(values.astype("<f4").tobytes())
    return path.stat().st_size


def activation_rows(rng: np.random.Generator, n_blocks: int, block: int) -> np.ndarray:
    """Rows of `n_blocks` blocks: Gaussian blocks of many magnitudes, plus blocks that are all zero,
    hold exact rounding ties, only tiny values (subnormal f16 scale), or overflow the f16 scale."""
    scales = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), size=(n_blocks, 1)))
    x = (rng.standard_normal((n_blocks, block)) * scales).astype(np.float32)
    x[0] = 0.0
    # max |x| = 127 gives d = 1, so every k + 0.5 is a tie (ggml's roundf rounds away from zero).
    ties = np.arange(block, dtype=np.float32) - block / 2 + 0.5
    x[1] = ties
    x[1, 0] = 127.0
    x[2] = ties * np.float32(1e-9)
    x[3] = x[3] / np.abs(x[3]).max() * np.float32(2e7)
    x[4, :] = -3.0
    return x.reshape(-1)


def write_q8_0_quantize(rng: np.random.Generator, out: Path) -> int:
    x = activation_rows(rng, 48, 32)
    with np.errstate(over="ignore"):
        q = quantize(x, T.Q8_0)
    path = out / "quantize_q8_0.bin"
    with open(path, "wb") as f:
        f.write(b"SLQ8" + struct.pack("<I", x.size))
        f.write(x.astype("<f4").tobytes())
        f.write(q.tobytes())
    return path.stat().st_size


def q8_k_reference(x: np.ndarray) -> bytes:
    """ggml's quantize_row_q8_K_ref, in f32 like the C code: iscale = -127/max (max is the element of
    largest magnitude, with its sign), q = min(127, nearest_int(iscale*x)) with ties to even,
    d = 1/iscale; an all-zero block gives d = 0 and zero quants."""
    out = bytearray()
    for blk in x.reshape(-1, QK_K):
        amax_i = int(np.argmax(np.abs(blk)))  # first index of the largest |x|, as ggml's `>` scan
        mx = blk[amax_i]
        if mx == 0:
            d = np.float32(0)
            qs = np.zeros(QK_K, dtype=np.int32)
        else:
            iscale = np.float32(-127.0) / mx
            qs = np.minimum(127, np.rint(iscale * blk).astype(np.int32))
            d = np.float32(1.0) / iscale
        assert d.dtype == np.float32
        sums = qs.reshape(16, 16).sum(axis=1)
        out += struct.pack("<f", d) + qs.astype(np.int8).tobytes() + sums.astype("<i2").tobytes()
    return bytes(out)


def write_q8_k_quantize(rng: np.random.Generator, out: Path) -> int:
    x = activation_rows(rng, 8, QK_K)
    path = out / "quantize_q8_k.bin"
    with open(path, "wb") as f:
        f.write(b"SLQK" + struct.pack("<I", x.size))
        f.write(x.astype("<f4").tobytes())
        f.write(q8_k_reference(x))
    return path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    total = 0
    for qtype, n_random, n_moderate in ((T.Q4_0, 32, 32), (T.Q8_0, 32, 32), (T.Q4_K, 6, 6),
                                        (T.Q5_K, 6, 6), (T.Q6_K, 6, 6)):
        total += write_dequant(rng, args.out, qtype, n_random, n_moderate)
    total += write_q8_0_quantize(rng, args.out)
    total += write_q8_k_quantize(rng, args.out)
    print(f"wrote {total} bytes to {args.out}")


if __name__ == "__main__":
    main()
