//! AVX-512 dot-product kernels with VNNI: `vpdpbusd` (unsigned × signed bytes summed in fours into
//! i32) for the 32-element Q4_0/Q8_0 blocks, and 512-bit `vpmaddubsw` plus `vpdpwssd` (i16 pairs
//! times the sub-block scales, accumulated in i32) for two K-quant sub-blocks at a time.
//!
//! The integer sums are exact and scaled through `accumulate` as in the scalar reference, so the
//! results equal the other paths' bit for bit. Callers must run these only where the CPU has
//! AVX-512F/BW/VL, AVX-512 VNNI and AVX2/FMA/F16C, and pass rows of whole blocks with equal
//! element counts.

use std::arch::x86_64::*;

use super::accumulate::{add_scaled, add_with_mins};
use super::dot_avx2::{min_sum, q4_0_nibbles, q6_k_offset, q8_rows, BlockDot};
use super::kscale;
use super::layout::{f16_at, q4_0, q4_k, q5_k, q6_k, q8_0};
use super::BlockQ8K;

struct Q8;

impl BlockDot for Q8 {
    const W_BYTES: usize = q8_0::BYTES;
    #[inline(always)]
    unsafe fn block(w: *const u8, a: *const u8) -> __m256i {
        // Σ x y = Σ (x + 128) y - Σ 128 y, with x + 128 as an unsigned byte: exact for every byte.
        let bias = _mm256_set1_epi8(i8::MIN);
        let (x, y) = (_mm256_loadu_si256(w.cast()), _mm256_loadu_si256(a.cast()));
        let zero = _mm256_setzero_si256();
        let biased = _mm256_dpbusd_epi32(zero, _mm256_xor_si256(x, bias), y);
        _mm256_sub_epi32(biased, _mm256_dpbusd_epi32(zero, bias, y))
    }
}

struct Q4;

impl BlockDot for Q4 {
    const W_BYTES: usize = q4_0::BYTES;
    #[inline(always)]
    unsafe fn block(w: *const u8, a: *const u8) -> __m256i {
        // Σ (q - 8) y = Σ q y - Σ 8 y.
        let y = _mm256_loadu_si256(a.cast());
        let zero = _mm256_setzero_si256();
        let qy = _mm256_dpbusd_epi32(zero, q4_0_nibbles(w), y);
        _mm256_sub_epi32(qy, _mm256_dpbusd_epi32(zero, _mm256_set1_epi8(8), y))
    }
}

/// Q8_0 weights · Q8_0 activations (safety: see the module documentation).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q8_0(w: &[u8], a: &[u8]) -> f32 {
    q8_rows::<Q8>(w, a)
}

/// Q4_0 weights · Q8_0 activations (safety: see the module documentation).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q4_0(w: &[u8], a: &[u8]) -> f32 {
    q8_rows::<Q4>(w, a)
}

/// 16-bit lanes holding `low` in the lower 256 bits and `high` in the upper 256.
#[inline(always)]
unsafe fn halves_i16(low: i16, high: i16) -> __m512i {
    _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_set1_epi16(low)),
        _mm256_set1_epi16(high),
    )
}

/// `Σ_j scales[j] * Σ q·y` over the 8 sub-blocks of a Q4_K block (`Q5` false; `qh` unread) or a
/// Q5_K block (`Q5` true; `qh` points at its 32 bytes of fifth bits); `qs` points at the 128
/// quant bytes, `y` at the 256 activation quants. Sub-blocks `2p` and `2p + 1` share
/// one 512-bit vector: the 32 quant bytes in both halves, shifted right by 0 and 4.
#[inline(always)]
unsafe fn k_scaled_sum<const Q5: bool>(
    qs: *const u8,
    qh: *const u8,
    scales: &[u8; 8],
    y: *const i8,
) -> i32 {
    let (mask, one) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(1));
    let nibble_shift = halves_i16(0, 4);
    // Bit 2p of each high byte for the lower half, bit 2p + 1 for the upper; 16-bit lanes shifted
    // by at most 7 keep each byte's bit in that byte.
    let mut high = if Q5 {
        _mm512_srlv_epi16(
            _mm512_broadcast_i64x4(_mm256_loadu_si256(qh.cast())),
            halves_i16(0, 1),
        )
    } else {
        _mm512_setzero_si512()
    };
    let mut sum = _mm512_setzero_si512();
    for p in 0..4 {
        let v = _mm512_broadcast_i64x4(_mm256_loadu_si256(qs.add(32 * p).cast()));
        let mut q = _mm512_and_si512(_mm512_srlv_epi16(v, nibble_shift), mask);
        if Q5 {
            q = _mm512_or_si512(q, _mm512_slli_epi16::<4>(_mm512_and_si512(high, one)));
            high = _mm512_srli_epi16::<2>(high);
        }
        let prod = _mm512_maddubs_epi16(q, _mm512_loadu_si512(y.add(64 * p).cast()));
        let scale = halves_i16(scales[2 * p] as i16, scales[2 * p + 1] as i16);
        sum = _mm512_dpwssd_epi32(sum, prod, scale);
    }
    _mm512_reduce_add_epi32(sum)
}

/// Q4_K weights · Q8_K activations (safety: see the module documentation).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
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
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
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

/// 6-bit quants of 64 elements: low nibbles from `low`, top bits from the low 2 bits of each byte
/// of `high` (`m2` is 3 in every byte).
#[inline(always)]
unsafe fn q6_k_quants(low: __m512i, high: __m512i, m2: __m512i) -> __m512i {
    _mm512_or_si512(low, _mm512_slli_epi16::<4>(_mm512_and_si512(high, m2)))
}

/// Q6_K weights · Q8_K activations (safety: see the module documentation).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q6_k(w: &[u8], a: &[BlockQ8K]) -> f32 {
    let (m4, m2) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(3));
    // 16-bit lane i of a product vector covers elements 2i, 2i + 1 of its 64, so lanes 8k..8k + 8
    // take scale k of those 64: `scale_index + 4 * part` picks scales 8h + 4 part + k.
    let scale_index: [i16; 32] = std::array::from_fn(|i| (i / 8) as i16);
    let scale_index = _mm512_loadu_si512(scale_index.as_ptr().cast());
    let mut acc = 0.0f32;
    // SAFETY: as in `q4_k`.
    for (wb, ab) in w.chunks_exact(q6_k::BYTES).zip(a) {
        let scales = &wb[q6_k::SCALES..q6_k::D];
        let scales16 = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128(
            scales.as_ptr().cast(),
        )));
        let (ql, qh, y) = (wb.as_ptr(), wb.as_ptr().add(q6_k::QH), ab.qs().as_ptr());
        let mut sum = _mm512_setzero_si512();
        for h in 0..2 {
            // Elements 128h + 0..64 (quants 0..32 and 32..64 of the group: low nibbles of the 64
            // low bytes, bits 0-1 and 2-3 of the high bytes), then 128h + 64..128 (high
            // nibbles, bits 4-5 and 6-7). 2-bit fields of 16-bit lanes shifted by at most 6 stay
            // within their bytes.
            let low = _mm512_loadu_si512(ql.add(64 * h).cast());
            let high = _mm512_broadcast_i64x4(_mm256_loadu_si256(qh.add(32 * h).cast()));
            let quants = [
                q6_k_quants(
                    _mm512_and_si512(low, m4),
                    _mm512_srlv_epi16(high, halves_i16(0, 2)),
                    m2,
                ),
                q6_k_quants(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(low), m4),
                    _mm512_srlv_epi16(high, halves_i16(4, 6)),
                    m2,
                ),
            ];
            for (part, q) in quants.into_iter().enumerate() {
                // Unsigned quants (0..=63): |q y + q' y'| <= 16002 fits i16.
                let prod =
                    _mm512_maddubs_epi16(q, _mm512_loadu_si512(y.add(128 * h + 64 * part).cast()));
                let index =
                    _mm512_add_epi16(scale_index, _mm512_set1_epi16((8 * h + 4 * part) as i16));
                sum = _mm512_dpwssd_epi32(sum, prod, _mm512_permutexvar_epi16(index, scales16));
            }
        }
        let isum = _mm512_reduce_add_epi32(sum) - q6_k_offset(scales, ab);
        acc = add_scaled(acc, f16_at(wb, q6_k::D), ab.d(), isum);
    }
    acc
}
