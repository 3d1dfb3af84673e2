//! Dequantization of a row of ggml blocks to f32, operation for operation as ggml's
//! `dequantize_row_*` (and gguf-py's `gguf.quants.dequantize`, which follows it): the same
//! products in the same order, never fused, so the results are bit-identical.

use super::kscale;
use super::layout::{f16_at, q4_0, q4_k, q5_k, q6_k, q8_0, QK, QK_K};
use super::{QuantError, QuantFormat};

/// Writes the values of the `format` blocks in `bytes` to `out`. `bytes` must hold exactly
/// `out.len()` elements ([`QuantFormat::row_bytes`]); otherwise nothing is written and the error
/// says why.
pub fn dequantize_row(
    format: QuantFormat,
    bytes: &[u8],
    out: &mut [f32],
) -> Result<(), QuantError> {
    let expected = format.row_bytes(out.len())?;
    if bytes.len() != expected {
        return Err(QuantError::Length {
            what: "quantized row bytes",
            expected,
            actual: bytes.len(),
        });
    }
    let blocks = bytes.chunks_exact(format.block_bytes());
    let outs = out.chunks_exact_mut(format.block_size());
    let block_fn = match format {
        QuantFormat::Q4_0 => q4_0_block,
        QuantFormat::Q8_0 => q8_0_block,
        QuantFormat::Q4K => q4_k_block,
        QuantFormat::Q5K => q5_k_block,
        QuantFormat::Q6K => q6_k_block,
    };
    for (block, y) in blocks.zip(outs) {
        block_fn(block, y);
    }
    Ok(())
}

fn q4_0_block(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    let qs = &block[q4_0::QS..q4_0::BYTES];
    for (j, &byte) in qs.iter().enumerate() {
        y[j] = ((byte & 0x0F) as i32 - 8) as f32 * d;
        y[j + QK / 2] = ((byte >> 4) as i32 - 8) as f32 * d;
    }
}

fn q8_0_block(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    for (y, &q) in y.iter_mut().zip(&block[q8_0::QS..q8_0::BYTES]) {
        *y = q as i8 as f32 * d;
    }
}

fn q4_k_block(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, q4_k::DMIN);
    let (scales, mins) = kscale::unpack(kscale::packed_at(block, q4_k::SCALES));
    let qs = &block[q4_k::QS..q4_k::BYTES];
    // Each 32 bytes of quants hold sub-block 2p in the low nibbles and 2p + 1 in the high ones.
    for (p, (bytes, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        for (half, shift) in [(0, 0), (1, 4)] {
            let j = 2 * p + half;
            let scale = d * scales[j] as f32;
            let min = dmin * mins[j] as f32;
            for (l, &byte) in bytes.iter().enumerate() {
                y[32 * half + l] = scale * ((byte >> shift) & 0x0F) as f32 - min;
            }
        }
    }
}

fn q5_k_block(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, q5_k::DMIN);
    let (scales, mins) = kscale::unpack(kscale::packed_at(block, q5_k::SCALES));
    let qh = &block[q5_k::QH..q5_k::QS];
    let qs = &block[q5_k::QS..q5_k::BYTES];
    for (p, (bytes, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        for (half, shift) in [(0, 0), (1, 4)] {
            let j = 2 * p + half;
            let scale = d * scales[j] as f32;
            let min = dmin * mins[j] as f32;
            for (l, (&byte, &high)) in bytes.iter().zip(qh).enumerate() {
                let q = ((byte >> shift) & 0x0F) | (((high >> j) & 1) << 4);
                y[32 * half + l] = scale * q as f32 - min;
            }
        }
    }
}

fn q6_k_block(block: &[u8], y: &mut [f32]) {
    let d = f16_at(block, q6_k::D);
    let ql = &block[..q6_k::QH];
    let qh = &block[q6_k::QH..q6_k::SCALES];
    let scales = &block[q6_k::SCALES..q6_k::D];
    for h in 0..QK_K / 128 {
        let (ql, qh) = (&ql[64 * h..64 * h + 64], &qh[32 * h..32 * h + 32]);
        for s in 0..4 {
            let nibbles = &ql[32 * (s % 2)..32 * (s % 2) + 32];
            let shift = if s < 2 { 0 } else { 4 };
            for l in 0..32 {
                let low = (nibbles[l] >> shift) & 0x0F;
                let high = (qh[l] >> (2 * s)) & 3;
                let q = (low | (high << 4)) as i32 - 32;
                let i = 32 * s + l;
                let scale = d * scales[8 * h + i / 16] as i8 as f32;
                y[128 * h + i] = scale * q as f32;
            }
        }
    }
}
