//! Packed tile kernels for Q8_0, Q4_K and Q5_K weights against many activation rows: each group of
//! weight rows is rearranged once (see `tile`'s driver) so that every i32 lane of a vector holds
//! products of one sub-block only, and the activation rows are rearranged the same way once when
//! quantized ([`pack_acts_q8_0`], [`pack_acts_q8_k`]).
//!
//! A unit holds 8 sub-blocks of 32 elements (Q4_K, Q5_K: the 8 of a block; Q8_0: 8 consecutive
//! blocks) as 8 vectors, vector `t` taking bytes `4t..4t + 4` of sub-block `i` into lane `i`
//! (an 8 × 8 transpose of 32-bit words). Eight multiply-adds of four bytes (`vpdpbusd`, or
//! `vpmaddubsw` then one `vpmaddwd` for all eight on AVX2) then leave each sub-block's integer dot
//! product in its own lane, scaled once per unit in f32 by a vector of the sub-blocks' scales:
//! a quarter of the multiplies of the unpacked kernels, which scale each sub-block's products in
//! i16 (`vpmaddwd` with the scales) before adding them.
//!
//! Q4_K's and Q5_K's min term takes the activation sums of each sub-block, scaled by the activation scale
//! once when packed. Q8_0's signed weights go into `vpdpbusd` offset by 128, the offset's share
//! `-128 Σ y` (per lane) starting the sums; on AVX2 they use the sign trick instead.

use std::arch::x86_64::*;

use super::kscale;
use super::layout::{f16_at, q4_k, q5_k, q8_0, QK};
use super::tile::{ActRow, IntOps, TileKernel};
use super::BlockQ8K;

/// Sub-blocks (and i32 lanes) per unit.
const SUBS: usize = 8;
/// Bytes of rearranged quants per unit.
const QUANTS: usize = SUBS * 32;

/// Bytes per packed Q8_K activation unit (for Q4_K and Q5_K weights): the quants, the sums of each 32 times the scale (8
/// f32), and the scale (f32).
pub(super) const K_ACT_BYTES: usize = QUANTS + 4 * SUBS + 4;
/// Bytes per packed Q8_0 activation unit: the quants, `-128` times the sum of each block (8 i32),
/// and the blocks' scales (8 f32).
pub(super) const Q8_ACT_BYTES: usize = QUANTS + 4 * SUBS + 4 * SUBS;

/// `out[32 t + 4 i + j]` = `sub(i)[4 t + j]`: the byte order of a packed unit.
fn transpose_bytes(sub: impl Fn(usize) -> [u8; 32], out: &mut [u8]) {
    for i in 0..SUBS {
        let s = sub(i);
        for t in 0..SUBS {
            out[32 * t + 4 * i..32 * t + 4 * i + 4].copy_from_slice(&s[4 * t..4 * t + 4]);
        }
    }
}

/// Appends the packed units of a row of Q8_K blocks (for Q4_K and Q5_K weights) to `out`.
pub(super) fn pack_acts_q8_k(blocks: &[BlockQ8K], out: &mut Vec<u8>) {
    for b in blocks {
        let at = out.len();
        out.resize(at + K_ACT_BYTES, 0);
        let unit = &mut out[at..];
        transpose_bytes(
            |i| std::array::from_fn(|l| b.qs()[32 * i + l] as u8),
            &mut unit[..QUANTS],
        );
        for i in 0..SUBS {
            let sum = b.bsums()[2 * i] as i32 + b.bsums()[2 * i + 1] as i32;
            let scaled = b.d() * sum as f32;
            unit[QUANTS + 4 * i..QUANTS + 4 * i + 4].copy_from_slice(&scaled.to_le_bytes());
        }
        unit[QUANTS + 4 * SUBS..].copy_from_slice(&b.d().to_le_bytes());
    }
}

/// Appends the packed Q8_0 units of a row of Q8_0 blocks (ggml bytes) to `out`, the last unit
/// filled up with zero blocks.
pub(super) fn pack_acts_q8_0(row: &[u8], out: &mut Vec<u8>) {
    for unit_blocks in row.chunks(SUBS * q8_0::BYTES) {
        let at = out.len();
        out.resize(at + Q8_ACT_BYTES, 0);
        let unit = &mut out[at..];
        let block = |i: usize| unit_blocks.get(i * q8_0::BYTES..(i + 1) * q8_0::BYTES);
        transpose_bytes(
            |i| match block(i) {
                Some(b) => std::array::from_fn(|l| b[q8_0::QS + l]),
                None => [0; QK],
            },
            &mut unit[..QUANTS],
        );
        for i in 0..SUBS {
            let (start, scale) = match block(i) {
                Some(b) => {
                    let sum: i32 = b[q8_0::QS..].iter().map(|&y| y as i8 as i32).sum();
                    (-128 * sum, f16_at(b, 0))
                }
                None => (0, 0.0),
            };
            let s = QUANTS + 4 * i;
            unit[s..s + 4].copy_from_slice(&start.to_le_bytes());
            let s = QUANTS + 4 * SUBS + 4 * i;
            unit[s..s + 4].copy_from_slice(&scale.to_le_bytes());
        }
    }
}

/// Stores the 8 × 8 transpose of the 32-bit words of `rows` at `out` (vector `t` holds word `t`
/// of every row, row `i` in lane `i`).
#[inline(always)]
unsafe fn store_transposed(rows: [__m256i; SUBS], out: *mut u8) {
    // (No closures here: they would not inherit the caller's target features.)
    let r = rows;
    let t = [
        _mm256_unpacklo_epi32(r[0], r[1]),
        _mm256_unpackhi_epi32(r[0], r[1]),
        _mm256_unpacklo_epi32(r[2], r[3]),
        _mm256_unpackhi_epi32(r[2], r[3]),
        _mm256_unpacklo_epi32(r[4], r[5]),
        _mm256_unpackhi_epi32(r[4], r[5]),
        _mm256_unpacklo_epi32(r[6], r[7]),
        _mm256_unpackhi_epi32(r[6], r[7]),
    ];
    // Words 0, 1, 2, 3 of rows 0-3 (then 4-7) in the low 128-bit lane, words 4-7 in the high.
    let u = [
        _mm256_unpacklo_epi64(t[0], t[2]),
        _mm256_unpackhi_epi64(t[0], t[2]),
        _mm256_unpacklo_epi64(t[1], t[3]),
        _mm256_unpackhi_epi64(t[1], t[3]),
        _mm256_unpacklo_epi64(t[4], t[6]),
        _mm256_unpackhi_epi64(t[4], t[6]),
        _mm256_unpacklo_epi64(t[5], t[7]),
        _mm256_unpackhi_epi64(t[5], t[7]),
    ];
    for w in 0..4 {
        let low = _mm256_permute2x128_si256::<0x20>(u[w], u[w + 4]);
        let high = _mm256_permute2x128_si256::<0x31>(u[w], u[w + 4]);
        _mm256_storeu_si256(out.add(32 * w).cast(), low);
        _mm256_storeu_si256(out.add(32 * (w + 4)).cast(), high);
    }
}

/// The 8 bytes of `b` (0 first) as f32 lanes.
#[inline(always)]
unsafe fn widen_u8(b: u64) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(b as i64)))
}

/// Q4_K (`Q5` false) or Q5_K (`Q5` true) weights packed: per block the 8 vectors of quants (as
/// bytes), then `d · scale_i` and `dmin · min_i` (8 f32 each, exact: 11-bit by 6-bit products).
pub(super) struct KPacked<const Q5: bool>;

impl<const Q5: bool> KPacked<Q5> {
    /// Where the packed scales and the nibbles lie in a block.
    const SCALES: usize = if Q5 { q5_k::SCALES } else { q4_k::SCALES };
    const QS: usize = if Q5 { q5_k::QS } else { q4_k::QS };
}

impl<const Q5: bool> TileKernel for KPacked<Q5> {
    const W_BYTES: usize = if Q5 { q5_k::BYTES } else { q4_k::BYTES };
    const PACKED_BYTES: usize = QUANTS + 2 * 4 * SUBS;

    #[inline(always)]
    unsafe fn pack(w: *const u8, _blocks: usize, out: *mut u8) {
        let (mask, one) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(1));
        let mut high = _mm256_setzero_si256();
        if Q5 {
            high = _mm256_loadu_si256(w.add(q5_k::QH).cast());
        }
        let mut sub = [_mm256_setzero_si256(); SUBS];
        for p in 0..4 {
            let v = _mm256_loadu_si256(w.add(Self::QS + 32 * p).cast());
            sub[2 * p] = _mm256_and_si256(v, mask);
            sub[2 * p + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
            if Q5 {
                // Bits 2p and 2p + 1 of each high byte, as bit 4 (16-bit shifts by at most 4
                // keep each byte's bit in that byte).
                let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(high, one));
                let h1 =
                    _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<1>(high), one));
                sub[2 * p] = _mm256_or_si256(sub[2 * p], h0);
                sub[2 * p + 1] = _mm256_or_si256(sub[2 * p + 1], h1);
                high = _mm256_srli_epi16::<2>(high);
            }
        }
        store_transposed(sub, out);
        let (scales, mins) = kscale::unpack_words(&*w.add(Self::SCALES).cast::<[u8; 12]>());
        let dd = _mm_cvtph_ps(_mm_cvtsi32_si128(w.cast::<i32>().read_unaligned()));
        let d = _mm256_broadcastss_ps(dd);
        let dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(dd));
        let out = out.add(QUANTS).cast::<f32>();
        _mm256_storeu_ps(out, _mm256_mul_ps(d, widen_u8(scales)));
        _mm256_storeu_ps(out.add(SUBS), _mm256_mul_ps(dmin, widen_u8(mins)));
    }

    #[inline(always)]
    unsafe fn block<O: IntOps, const C: usize>(
        w: *const u8,
        a: &[ActRow; C],
        u: usize,
        acc: &mut [__m256; C],
    ) {
        let y: [*const u8; C] = std::array::from_fn(|c| a[c].blocks.add(u * K_ACT_BYTES));
        // Q5_K's quants (below 32) fill AVX2's i16 lanes in 4 additions, Q4_K's in 8.
        let run = if Q5 && !O::WIDE { SUBS / 2 } else { SUBS };
        let mut sum = [_mm256_setzero_si256(); C];
        for t0 in (0..SUBS).step_by(run) {
            let mut part = [_mm256_setzero_si256(); C];
            for t in t0..t0 + run {
                let q = _mm256_loadu_si256(w.add(32 * t).cast());
                for (y, part) in y.iter().zip(part.iter_mut()) {
                    *part = O::dot_small(*part, q, _mm256_loadu_si256(y.add(32 * t).cast()));
                }
            }
            for (sum, part) in sum.iter_mut().zip(part) {
                *sum = if t0 == 0 {
                    O::small_lanes(part)
                } else {
                    _mm256_add_epi32(*sum, O::small_lanes(part))
                };
            }
        }
        let scales = _mm256_loadu_ps(w.add(QUANTS).cast());
        let mins = _mm256_loadu_ps(w.add(QUANTS + 4 * SUBS).cast());
        for (c, acc) in acc.iter_mut().enumerate() {
            let y = y[c].add(QUANTS).cast::<f32>();
            let da = _mm256_broadcast_ss(&*y.add(SUBS));
            let sum = _mm256_cvtepi32_ps(sum[c]);
            *acc = _mm256_fmadd_ps(sum, _mm256_mul_ps(scales, da), *acc);
            *acc = _mm256_fnmadd_ps(mins, _mm256_loadu_ps(y), *acc);
        }
    }
}

/// Q8_0 weights packed: per 8 blocks the 8 vectors of quants, then the blocks' scales (8 f32).
pub(super) struct Q8Packed;

impl TileKernel for Q8Packed {
    const W_BYTES: usize = q8_0::BYTES;
    const UNIT_BLOCKS: usize = SUBS;
    const PACKED_BYTES: usize = QUANTS + 4 * SUBS;

    #[inline(always)]
    unsafe fn pack(w: *const u8, blocks: usize, out: *mut u8) {
        let mut sub = [_mm256_setzero_si256(); SUBS];
        let mut scales = [0f32; SUBS];
        for i in 0..blocks {
            let b = w.add(i * q8_0::BYTES);
            sub[i] = _mm256_loadu_si256(b.add(q8_0::QS).cast());
            scales[i] = f16_at(std::slice::from_raw_parts(b, 2), 0);
        }
        store_transposed(sub, out);
        _mm256_storeu_ps(out.add(QUANTS).cast(), _mm256_loadu_ps(scales.as_ptr()));
    }

    #[inline(always)]
    unsafe fn block<O: IntOps, const C: usize>(
        w: *const u8,
        a: &[ActRow; C],
        u: usize,
        acc: &mut [__m256; C],
    ) {
        let y: [*const u8; C] = std::array::from_fn(|c| a[c].blocks.add(u * Q8_ACT_BYTES));
        let mut sum = [_mm256_setzero_si256(); C];
        if O::BIASED {
            for (y, sum) in y.iter().zip(sum.iter_mut()) {
                *sum = _mm256_loadu_si256(y.add(QUANTS).cast());
            }
        }
        for t in 0..SUBS {
            let q = _mm256_loadu_si256(w.add(32 * t).cast());
            let p = O::prepare_i8(q);
            for (y, sum) in y.iter().zip(sum.iter_mut()) {
                *sum = O::dot_i8(*sum, p, q, _mm256_loadu_si256(y.add(32 * t).cast()));
            }
        }
        let scales = _mm256_loadu_ps(w.add(QUANTS).cast());
        for (c, acc) in acc.iter_mut().enumerate() {
            let da = _mm256_loadu_ps(y[c].add(QUANTS + 4 * SUBS).cast());
            let sum = _mm256_cvtepi32_ps(sum[c]);
            *acc = _mm256_fmadd_ps(sum, _mm256_mul_ps(scales, da), *acc);
        }
    }
}
