//! Quantization of f32 values to Q4_K super-blocks with ggml's reference algorithm
//! (`quantize_row_q4_K_ref` and its `make_qkx2_quants` search), for writing Q4_K weights.
//!
//! Per 32-element sub-block, a weighted least-squares fit of `x ≈ scale * q - min` (q in 0..=15,
//! min >= 0) is searched over 21 candidate grids; the eight scales and mins are then quantized to
//! 6 bits against the largest of each (the f16 `d` and `dmin`), and every element is requantized
//! against the scale and min it will actually be dequantized with.

use half::f16;

use super::error::check_finite;
use super::kscale;
use super::layout::{q4_k, QK_K};
use super::{QuantError, QuantFormat};

/// Elements per sub-block (one 6-bit scale and min each).
const SUB: usize = 32;
/// The largest 4-bit quant.
const NMAX: u8 = 15;

/// Quantizes `x` into the Q4_K blocks `out`, which must be [`QuantFormat::row_bytes`] long.
/// `x.len()` must be a multiple of 256 and every value finite. Not bit-identical to ggml's build
/// (C compilers may fuse its multiply-adds), but the same algorithm.
pub fn quantize_row_q4_k(x: &[f32], out: &mut [u8]) -> Result<(), QuantError> {
    check_finite(x)?;
    let expected = QuantFormat::Q4K.row_bytes(x.len())?;
    if out.len() != expected {
        return Err(QuantError::Length {
            what: "Q4_K output bytes",
            expected,
            actual: out.len(),
        });
    }
    for (x, block) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(q4_k::BYTES)) {
        quantize_block(x, block);
    }
    Ok(())
}

/// ggml's `nearest_int`: round to nearest, ties to even (saturating where ggml asserts).
fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

fn quantize_block(x: &[f32], block: &mut [u8]) {
    let mut levels = [[0u8; SUB]; QK_K / SUB];
    let mut scales = [0f32; QK_K / SUB];
    let mut mins = [0f32; QK_K / SUB];
    for (j, x) in x.chunks_exact(SUB).enumerate() {
        let sum_x2 = x.iter().fold(0.0f32, |s, v| s + v * v);
        let av_x = (sum_x2 / SUB as f32).sqrt();
        let weights: [f32; SUB] = std::array::from_fn(|l| av_x + x[l].abs());
        (scales[j], mins[j]) = fit_sub_block(x, &weights, &mut levels[j]);
    }
    let max_scale = scales
        .iter()
        .fold(0.0f32, |m, &s| if s > m { s } else { m });
    let max_min = mins.iter().fold(0.0f32, |m, &s| if s > m { s } else { m });
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let ls: [u8; 8] =
        std::array::from_fn(|j| nearest_int(inv_scale * scales[j]).clamp(0, 63) as u8);
    let lm: [u8; 8] = std::array::from_fn(|j| nearest_int(inv_min * mins[j]).clamp(0, 63) as u8);
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    block[..q4_k::DMIN].copy_from_slice(&d.to_bits().to_le_bytes());
    block[q4_k::DMIN..q4_k::SCALES].copy_from_slice(&dmin.to_bits().to_le_bytes());
    block[q4_k::SCALES..q4_k::QS].copy_from_slice(&kscale::pack(&ls, &lm));

    // Requantize against the scales as stored; a sub-block whose scale rounded to 0 keeps the
    // levels of its fit (they dequantize to -min whatever they are).
    for (j, x) in x.chunks_exact(SUB).enumerate() {
        let scale = d.to_f32() * ls[j] as f32;
        if scale == 0.0 {
            continue;
        }
        let min = dmin.to_f32() * lm[j] as f32;
        for (l, &v) in levels[j].iter_mut().zip(x) {
            *l = nearest_int((v + min) / scale).clamp(0, NMAX as i32) as u8;
        }
    }
    // Sub-block 2p in the low nibbles of quant bytes 32p.., sub-block 2p + 1 in the high ones.
    let qs = &mut block[q4_k::QS..];
    for (bytes, pair) in qs.chunks_exact_mut(32).zip(levels.chunks_exact(2)) {
        for (l, byte) in bytes.iter_mut().enumerate() {
            *byte = pair[0][l] | (pair[1][l] << 4);
        }
    }
}

/// ggml's `make_qkx2_quants(32, 15, x, weights, L, &min, Laux, -1, 0.1, 20, false)`: fits
/// `x ≈ scale * l - min` with levels `l` in 0..=15 and `min >= 0`, minimising the weighted squared
/// error over the grids `iscale = (15 + rmin + rdelta * is) / (max - min)`. Returns
/// `(scale, min)` and leaves the levels in `levels`.
fn fit_sub_block(x: &[f32], weights: &[f32; SUB], levels: &mut [u8; SUB]) -> (f32, f32) {
    const RMIN: f32 = -1.0;
    const RDELTA: f32 = 0.1;
    const NSTEP: i32 = 20;
    let nmax = NMAX as f32;

    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for (&v, &w) in x.iter().zip(weights).skip(1) {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
        sum_w += w;
        sum_x += w * v;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        *levels = [0; SUB];
        return (0.0, -min);
    }
    let level =
        |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, NMAX as i32) as u8;

    let iscale = nmax / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for ((l, &v), &w) in levels.iter_mut().zip(x).zip(weights) {
        *l = level(iscale, v, min);
        let diff = scale * *l as f32 + min - v;
        best_error += w * (diff * diff);
    }
    let mut trial = [0u8; SUB];
    for is in 0..=NSTEP {
        let iscale = (RMIN + RDELTA * is as f32 + nmax) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for ((t, &v), &w) in trial.iter_mut().zip(x).zip(weights) {
            *t = level(iscale, v, min);
            let l = *t as f32;
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let error = trial
                .iter()
                .zip(x)
                .zip(weights)
                .fold(0.0f32, |e, ((&t, &v), &w)| {
                    let diff = this_scale * t as f32 + this_min - v;
                    e + w * (diff * diff)
                });
            if error < best_error {
                *levels = trial;
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}
