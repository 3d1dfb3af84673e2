//! AVX2 dot-product kernels, and the x86 pieces the AVX-512 kernels share with them.
//!
//! Quants are multiplied with `vpmaddubsw` (unsigned × signed bytes to pairs of i16) wherever one
//! side is a small unsigned quant, so no i16 sum can saturate; Q8_0 × Q8_0 widens both sides to
//! i16 first, which is exact for every byte (ggml's sign trick would be wrong for activation
//! bytes of -128, which its quantizer never writes but a Q8_0 row may hold). The integer sums are
//! exact and scaled through `accumulate` as in the scalar reference.
//!
//! Callers must run these only where the CPU has AVX2, FMA and F16C, and pass rows of whole blocks
//! with equal element counts.

use std::arch::x86_64::*;

use super::accumulate::{add_scaled, add_with_mins, BlockSums};
use super::kscale;
use super::layout::{f16_at, q4_0, q4_k, q5_k, q6_k, q8_0};
use super::BlockQ8K;

/// The integer dot product of one weight block's quants with one Q8_0 block's, as 8 i32 lanes
/// whose sum is the block's sum.
pub(super) trait BlockDot {
    /// Bytes per weight block (its quants start after the 2-byte f16 scale).
    const W_BYTES: usize;
    /// `w` and `a` point at the quants of a weight block and of a Q8_0 block (16 or 32 readable
    /// bytes, and 32), on a CPU with the implementation's features.
    unsafe fn block(w: *const u8, a: *const u8) -> __m256i;
}

/// A Q4_0 or Q8_0 row (`K`) times a Q8_0 row: blocks in groups of 8, whose sums are reduced
/// together into one vector (lane i: block 8g + i) and scaled into 8 f32 lanes, the 8 slots of
/// [`BlockSums`]; the blocks after the last group go through [`BlockSums::add`].
///
/// Safety: the CPU has AVX2, F16C and what `K` uses; `w` is whole `K` blocks and `a` as many whole
/// Q8_0 blocks.
#[inline(always)]
pub(super) unsafe fn q8_rows<K: BlockDot>(w: &[u8], a: &[u8]) -> f32 {
    let blocks = a.len() / q8_0::BYTES;
    let groups = blocks / 8;
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    let mut slots = _mm256_setzero_ps();
    for g in 0..groups {
        let mut sums = [_mm256_setzero_si256(); 8];
        let mut dw = [0u16; 8];
        let mut da = [0u16; 8];
        for i in 0..8 {
            // SAFETY: block 8g + i < blocks, and `w` and `a` hold `blocks` blocks each, so the
            // scales (2 bytes) and quants that follow them are in bounds.
            let (wb, ab) = (
                wp.add((8 * g + i) * K::W_BYTES),
                ap.add((8 * g + i) * q8_0::BYTES),
            );
            sums[i] = K::block(wb.add(2), ab.add(q8_0::QS));
            dw[i] = wb.cast::<u16>().read_unaligned();
            da[i] = ab.cast::<u16>().read_unaligned();
        }
        let sums = _mm256_cvtepi32_ps(sum_each(sums));
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(dw.as_ptr().cast()));
        let da = _mm256_cvtph_ps(_mm_loadu_si128(da.as_ptr().cast()));
        // Not fused: the scalar path rounds the product before adding.
        slots = _mm256_add_ps(slots, _mm256_mul_ps(_mm256_mul_ps(dw, da), sums));
    }
    let mut out = [0.0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), slots);
    let mut total = BlockSums::from_slots(out);
    for b in 8 * groups..blocks {
        let (wo, ao) = (b * K::W_BYTES, b * q8_0::BYTES);
        // SAFETY: b < blocks, as above.
        let sum = sum_i32(K::block(wp.add(wo + 2), ap.add(ao + q8_0::QS)));
        total.add(b, f16_at(w, wo), f16_at(a, ao), sum);
    }
    total.total()
}

/// The sum of the 8 lanes of each of `v[0..8]`, in lanes 0..8.
#[inline(always)]
pub(super) unsafe fn sum_each(v: [__m256i; 8]) -> __m256i {
    // hadd works within 128-bit halves: after two rounds, lane i of `abcd` holds the low-half sum
    // of v[i] (i < 4) and lane 4 + i its high-half sum; likewise `efgh` for v[4..8].
    let ab = _mm256_hadd_epi32(v[0], v[1]);
    let cd = _mm256_hadd_epi32(v[2], v[3]);
    let ef = _mm256_hadd_epi32(v[4], v[5]);
    let gh = _mm256_hadd_epi32(v[6], v[7]);
    let abcd = _mm256_hadd_epi32(ab, cd);
    let efgh = _mm256_hadd_epi32(ef, gh);
    let low = _mm256_permute2x128_si256::<0x20>(abcd, efgh);
    let high = _mm256_permute2x128_si256::<0x31>(abcd, efgh);
    _mm256_add_epi32(low, high)
}

/// The sum of the 8 lanes of `v`.
#[inline(always)]
pub(super) unsafe fn sum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// The 16 bytes at `p` as 32 nibbles: low nibbles in bytes 0..16, high nibbles in 16..32 (the
/// element order of a Q4_0 block).
#[inline(always)]
pub(super) unsafe fn q4_0_nibbles(p: *const u8) -> __m256i {
    let v = _mm_loadu_si128(p.cast());
    let mask = _mm_set1_epi8(0x0F);
    let low = _mm_and_si128(v, mask);
    let high = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
    _mm256_set_m128i(high, low)
}

/// `Σ_j mins[j] * (sum of activation quants in sub-block j)` from the Q8_K block sums.
#[inline(always)]
pub(super) fn min_sum(mins: &[u8; 8], a: &BlockQ8K) -> i32 {
    let bsums = a.bsums();
    (0..8)
        .map(|j| mins[j] as i32 * (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32))
        .sum()
}

/// `32 * Σ_j scale_j * (sum of activation quants under scale j)`: what Q6_K's offset of 32 takes
/// off a sum of products of unsigned quants.
#[inline(always)]
pub(super) fn q6_k_offset(scales: &[u8], a: &BlockQ8K) -> i32 {
    let sum: i32 = scales
        .iter()
        .zip(a.bsums())
        .map(|(&s, &b)| s as i8 as i32 * b as i32)
        .sum();
    32 * sum
}

struct Q8;

impl BlockDot for Q8 {
    const W_BYTES: usize = q8_0::BYTES;
    #[inline(always)]
    unsafe fn block(w: *const u8, a: *const u8) -> __m256i {
        let low = _mm256_madd_epi16(widen_i8(w), widen_i8(a));
        let high = _mm256_madd_epi16(widen_i8(w.add(16)), widen_i8(a.add(16)));
        _mm256_add_epi32(low, high)
    }
}

/// The 16 signed bytes at `p`, sign-extended to 16 i16 lanes.
#[inline(always)]
unsafe fn widen_i8(p: *const u8) -> __m256i {
    _mm256_cvtepi8_epi16(_mm_loadu_si128(p.cast()))
}

struct Q4;

impl BlockDot for Q4 {
    const W_BYTES: usize = q4_0::BYTES;
    #[inline(always)]
    unsafe fn block(w: *const u8, a: *const u8) -> __m256i {
        // Σ (q - 8) y = Σ q y - Σ 8 y, both in i16 pairs: |q y + q' y'| <= 3840, |8 y + 8 y'| <= 2048.
        let y = _mm256_loadu_si256(a.cast());
        let qy = _mm256_maddubs_epi16(q4_0_nibbles(w), y);
        let eight_y = _mm256_maddubs_epi16(_mm256_set1_epi8(8), y);
        _mm256_madd_epi16(_mm256_sub_epi16(qy, eight_y), _mm256_set1_epi16(1))
    }
}

/// Q8_0 weights · Q8_0 activations (safety: see the module documentation).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q8_0(w: &[u8], a: &[u8]) -> f32 {
    q8_rows::<Q8>(w, a)
}

/// Q4_0 weights · Q8_0 activations (safety: see the module documentation).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4_0(w: &[u8], a: &[u8]) -> f32 {
    q8_rows::<Q4>(w, a)
}

/// `Σ_j scales[j] * Σ q·y` over the 8 sub-blocks of a Q4_K block (`Q5` false; `qh` unread) or
/// a Q5_K block (`Q5` true; `qh` points at its 32 bytes of fifth bits); `qs` points at the
/// 128 quant bytes, `y` at the 256 activation quants.
#[inline(always)]
unsafe fn k_scaled_sum<const Q5: bool>(
    qs: *const u8,
    qh: *const u8,
    scales: &[u8; 8],
    y: *const i8,
) -> i32 {
    let (mask, one) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(1));
    let mut high = if Q5 {
        _mm256_loadu_si256(qh.cast())
    } else {
        _mm256_setzero_si256()
    };
    let mut sum = _mm256_setzero_si256();
    for p in 0..4 {
        // Sub-block 2p in the low nibbles of the 32 bytes, 2p + 1 in the high nibbles.
        let v = _mm256_loadu_si256(qs.add(32 * p).cast());
        let mut q0 = _mm256_and_si256(v, mask);
        let mut q1 = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
        if Q5 {
            // Bits 2p and 2p + 1 of each byte; 16-bit lanes shifted by at most 7 keep each byte's
            // bit in that byte.
            q0 = _mm256_or_si256(q0, _mm256_slli_epi16::<4>(_mm256_and_si256(high, one)));
            let h1 = _mm256_and_si256(_mm256_srli_epi16::<1>(high), one);
            q1 = _mm256_or_si256(q1, _mm256_slli_epi16::<4>(h1));
            high = _mm256_srli_epi16::<2>(high);
        }
        let p0 = _mm256_maddubs_epi16(q0, _mm256_loadu_si256(y.add(64 * p).cast()));
        let p1 = _mm256_maddubs_epi16(q1, _mm256_loadu_si256(y.add(64 * p + 32).cast()));
        sum = _mm256_add_epi32(
            sum,
            _mm256_madd_epi16(p0, _mm256_set1_epi16(scales[2 * p] as i16)),
        );
        sum = _mm256_add_epi32(
            sum,
            _mm256_madd_epi16(p1, _mm256_set1_epi16(scales[2 * p + 1] as i16)),
        );
    }
    sum_i32(sum)
}

/// Q4_K weights · Q8_K activations (safety: see the module documentation).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4_k(w: &[u8], a: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    // SAFETY (all pointer reads below): `wb` is one whole block and `ab.qs()` 256 quants, and
    // every read stays within the field it starts in.
    for (wb, ab) in w.chunks_exact(q4_k::BYTES).zip(a) {
        let (scales, mins) = kscale::unpack(kscale::packed_at(wb, q4_k::SCALES));
        let qs = wb.as_ptr().add(q4_k::QS);
        let isum = k_scaled_sum::<false>(qs, std::ptr::null(), &scales, ab.qs().as_ptr());
        let (d, dmin) = (f16_at(wb, 0), f16_at(wb, q4_k::DMIN));
        acc = add_with_mins(acc, d, dmin, ab.d(), isum, min_sum(&mins, ab));
    }
    acc
}

/// Q5_K weights · Q8_K activations (safety: see the module documentation).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q5_k(w: &[u8], a: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    // SAFETY: as in `q4_k`.
    for (wb, ab) in w.chunks_exact(q5_k::BYTES).zip(a) {
        let (scales, mins) = kscale::unpack(kscale::packed_at(wb, q5_k::SCALES));
        let (qs, qh) = (wb.as_ptr().add(q5_k::QS), wb.as_ptr().add(q5_k::QH));
        let isum = k_scaled_sum::<true>(qs, qh, &scales, ab.qs().as_ptr());
        let (d, dmin) = (f16_at(wb, 0), f16_at(wb, q5_k::DMIN));
        acc = add_with_mins(acc, d, dmin, ab.d(), isum, min_sum(&mins, ab));
    }
    acc
}

/// 6-bit quants from their low nibbles and, in the low 2 bits of each byte of `high`, their top
/// bits (`m2` is 3 in every byte).
#[inline(always)]
unsafe fn q6_k_quants(low: __m256i, high: __m256i, m2: __m256i) -> __m256i {
    _mm256_or_si256(low, _mm256_slli_epi16::<4>(_mm256_and_si256(high, m2)))
}

/// Q6_K weights · Q8_K activations (safety: see the module documentation).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q6_k(w: &[u8], a: &[BlockQ8K]) -> f32 {
    let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
    let mut acc = 0.0f32;
    // SAFETY: as in `q4_k`.
    for (wb, ab) in w.chunks_exact(q6_k::BYTES).zip(a) {
        let scales = &wb[q6_k::SCALES..q6_k::D];
        let (ql, qh, y) = (wb.as_ptr(), wb.as_ptr().add(q6_k::QH), ab.qs().as_ptr());
        let mut sum = _mm256_setzero_si256();
        for h in 0..2 {
            let ql0 = _mm256_loadu_si256(ql.add(64 * h).cast());
            let ql1 = _mm256_loadu_si256(ql.add(64 * h + 32).cast());
            let hb = _mm256_loadu_si256(qh.add(32 * h).cast());
            // 2-bit fields of 16-bit lanes shifted by at most 6 stay within their bytes.
            let quants = [
                q6_k_quants(_mm256_and_si256(ql0, m4), hb, m2),
                q6_k_quants(_mm256_and_si256(ql1, m4), _mm256_srli_epi16::<2>(hb), m2),
                q6_k_quants(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                    _mm256_srli_epi16::<4>(hb),
                    m2,
                ),
                q6_k_quants(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                    _mm256_srli_epi16::<6>(hb),
                    m2,
                ),
            ];
            for (s, q) in quants.into_iter().enumerate() {
                // Unsigned quants (0..=63): |q y + q' y'| <= 16002 fits i16.
                let prod =
                    _mm256_maddubs_epi16(q, _mm256_loadu_si256(y.add(128 * h + 32 * s).cast()));
                let j = 8 * h + 2 * s;
                let scale = _mm256_set_m128i(
                    _mm_set1_epi16(scales[j + 1] as i8 as i16),
                    _mm_set1_epi16(scales[j] as i8 as i16),
                );
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(prod, scale));
            }
        }
        let isum = sum_i32(sum) - q6_k_offset(scales, ab);
        acc = add_scaled(acc, f16_at(wb, q6_k::D), ab.d(), isum);
    }
    acc
}
