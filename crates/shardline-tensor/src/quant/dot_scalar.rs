//! The scalar reference dot products: each quant widened and multiplied one by one, in plain
//! integer arithmetic (no tricks with offsets or precomputed sums), then scaled through
//! `accumulate`. The SIMD kernels must give the same bits.
//!
//! Callers pass rows of whole blocks with equal element counts.

use super::accumulate::{add_scaled, add_with_mins, BlockSums};
use super::kscale;
use super::layout::{f16_at, q4_0, q4_k, q5_k, q6_k, q8_0, QK};
use super::BlockQ8K;

/// Q8_0 weights · Q8_0 activations.
pub(super) fn q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sums = BlockSums::from_slots([0.0; 8]);
    let blocks = w.chunks_exact(q8_0::BYTES).zip(a.chunks_exact(q8_0::BYTES));
    for (b, (wb, ab)) in blocks.enumerate() {
        let sum = wb[q8_0::QS..]
            .iter()
            .zip(&ab[q8_0::QS..])
            .map(|(&x, &y)| x as i8 as i32 * y as i8 as i32)
            .sum();
        sums.add(b, f16_at(wb, 0), f16_at(ab, 0), sum);
    }
    sums.total()
}

/// Q4_0 weights · Q8_0 activations.
pub(super) fn q4_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sums = BlockSums::from_slots([0.0; 8]);
    let blocks = w.chunks_exact(q4_0::BYTES).zip(a.chunks_exact(q8_0::BYTES));
    for (b, (wb, ab)) in blocks.enumerate() {
        let y = &ab[q8_0::QS..];
        let mut sum = 0i32;
        for (j, &byte) in wb[q4_0::QS..].iter().enumerate() {
            sum += ((byte & 0x0F) as i32 - 8) * y[j] as i8 as i32;
            sum += ((byte >> 4) as i32 - 8) * y[j + QK / 2] as i8 as i32;
        }
        sums.add(b, f16_at(wb, 0), f16_at(ab, 0), sum);
    }
    sums.total()
}

/// Q4_K weights · Q8_K activations.
pub(super) fn q4_k(w: &[u8], a: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    for (wb, ab) in w.chunks_exact(q4_k::BYTES).zip(a) {
        let (scales, mins) = kscale::unpack(kscale::packed_at(wb, q4_k::SCALES));
        let qs = &wb[q4_k::QS..];
        let (mut isum, mut msum) = (0i32, 0i32);
        for j in 0..8 {
            let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
            let shift = 4 * (j % 2);
            let y = &ab.qs()[32 * j..32 * j + 32];
            let dot: i32 = bytes
                .iter()
                .zip(y)
                .map(|(&byte, &y)| ((byte >> shift) & 0x0F) as i32 * y as i32)
                .sum();
            let ysum: i32 = y.iter().map(|&y| y as i32).sum();
            isum += scales[j] as i32 * dot;
            msum += mins[j] as i32 * ysum;
        }
        let (d, dmin) = (f16_at(wb, 0), f16_at(wb, q4_k::DMIN));
        acc = add_with_mins(acc, d, dmin, ab.d(), isum, msum);
    }
    acc
}

/// Q5_K weights · Q8_K activations.
pub(super) fn q5_k(w: &[u8], a: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    for (wb, ab) in w.chunks_exact(q5_k::BYTES).zip(a) {
        let (scales, mins) = kscale::unpack(kscale::packed_at(wb, q5_k::SCALES));
        let qh = &wb[q5_k::QH..q5_k::QS];
        let qs = &wb[q5_k::QS..];
        let (mut isum, mut msum) = (0i32, 0i32);
        for j in 0..8 {
            let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
            let shift = 4 * (j % 2);
            let y = &ab.qs()[32 * j..32 * j + 32];
            let mut dot = 0i32;
            for l in 0..32 {
                let q = ((bytes[l] >> shift) & 0x0F) | (((qh[l] >> j) & 1) << 4);
                dot += q as i32 * y[l] as i32;
            }
            let ysum: i32 = y.iter().map(|&y| y as i32).sum();
            isum += scales[j] as i32 * dot;
            msum += mins[j] as i32 * ysum;
        }
        let (d, dmin) = (f16_at(wb, 0), f16_at(wb, q5_k::DMIN));
        acc = add_with_mins(acc, d, dmin, ab.d(), isum, msum);
    }
    acc
}

/// Q6_K weights · Q8_K activations.
pub(super) fn q6_k(w: &[u8], a: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    for (wb, ab) in w.chunks_exact(q6_k::BYTES).zip(a) {
        let (ql, qh, scales) = (
            &wb[..q6_k::QH],
            &wb[q6_k::QH..q6_k::SCALES],
            &wb[q6_k::SCALES..q6_k::D],
        );
        let mut isum = 0i32;
        for (i, &y) in ab.qs().iter().enumerate() {
            let (h, s, l) = (i / 128, i % 128 / 32, i % 32);
            let low = (ql[64 * h + 32 * (s % 2) + l] >> (4 * (s / 2))) & 0x0F;
            let high = (qh[32 * h + l] >> (2 * s)) & 3;
            let q = (low | (high << 4)) as i32 - 32;
            isum += scales[i / 16] as i8 as i32 * q * y as i32;
        }
        acc = add_scaled(acc, f16_at(wb, q6_k::D), ab.d(), isum);
    }
    acc
}
