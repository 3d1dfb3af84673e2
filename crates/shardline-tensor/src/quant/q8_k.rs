//! Q8_K activation blocks ([`BlockQ8K`]) and the quantizer that makes them, as ggml's
//! `quantize_row_q8_K_ref`: the right-hand operand of the K-quant dot products.

use super::error::check_finite;
use super::layout::QK_K;
use super::QuantError;

/// 256 activations quantized to signed 8 bits with one f32 scale, plus the sum of each 16
/// consecutive quants (the K-quant dot products use them for the weights' mins and offsets).
///
/// Only [`quantize_row_q8_k`] makes these, so the quants are always in `-127..=127` and the sums
/// always match them.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockQ8K {
    d: f32,
    qs: [i8; QK_K],
    bsums: [i16; QK_K / 16],
}

impl BlockQ8K {
    /// The scale: element `i` stands for `d() * qs()[i]`.
    pub fn d(&self) -> f32 {
        self.d
    }

    /// The 256 quants, each in `-127..=127`.
    pub fn qs(&self) -> &[i8; QK_K] {
        &self.qs
    }

    /// `bsums()[j]` is the sum of quants `16 j .. 16 j + 16`.
    pub fn bsums(&self) -> &[i16; QK_K / 16] {
        &self.bsums
    }
}

/// Replaces the contents of `out` with the Q8_K blocks of `x`, whose length must be a multiple
/// of 256 and whose values must be finite.
///
/// Per block: `max` is the value of largest magnitude (the first, on ties), `iscale = -127 / max`,
/// `q = min(127, round_ties_even(iscale * x))` and `d = 1 / iscale`; so `max` itself maps to
/// -127. An all-zero block gets `d = 0`.
pub fn quantize_row_q8_k(x: &[f32], out: &mut Vec<BlockQ8K>) -> Result<(), QuantError> {
    check_finite(x)?;
    if !x.len().is_multiple_of(QK_K) {
        return Err(QuantError::PartialBlock {
            format: "Q8_K",
            elements: x.len(),
            block_size: QK_K,
        });
    }
    out.clear();
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2; the chunks are whole blocks.
        out.extend(
            x.chunks_exact(QK_K)
                .map(|x| unsafe { x86::quantize_block(x) }),
        );
        return Ok(());
    }
    out.extend(x.chunks_exact(QK_K).map(quantize_block));
    Ok(())
}

/// One block of [`quantize_row_q8_k`] (`x` is 256 finite values): the reference the SIMD version
/// must match bit for bit.
fn quantize_block(x: &[f32]) -> BlockQ8K {
    let mut block = BlockQ8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        return block;
    }
    let iscale = -127.0 / max;
    for (q, &v) in block.qs.iter_mut().zip(x) {
        // ggml's nearest_int rounds ties to even. ggml clamps only above: |iscale * v| <= 127
        // up to rounding, so -127 is the least value reachable and the clamp below changes nothing
        // but makes the range plain.
        *q = ((iscale * v).round_ties_even() as i32).clamp(-127, 127) as i8;
    }
    for (sum, qs) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
        *sum = qs.iter().map(|&q| q as i16).sum();
    }
    block.d = 1.0 / iscale;
    block
}

/// [`quantize_block`] with AVX2: the same operations on the same values (the largest magnitude
/// is found by a maximum, then its first occurrence; products rounded, then converted with the
/// default rounding, ties to even), so the same bits.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BlockQ8K, QK_K};

    /// Safety: the CPU has AVX2 and `x` holds 256 finite values.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_block(x: &[f32]) -> BlockQ8K {
        debug_assert_eq!(x.len(), QK_K);
        let p = x.as_ptr();
        let mut block = BlockQ8K {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        };
        let abs = |v: __m256| _mm256_andnot_ps(_mm256_set1_ps(-0.0), v);
        let mut amax = _mm256_setzero_ps();
        for i in 0..QK_K / 8 {
            amax = _mm256_max_ps(amax, abs(_mm256_loadu_ps(p.add(8 * i))));
        }
        let m = _mm_max_ps(
            _mm256_castps256_ps128(amax),
            _mm256_extractf128_ps::<1>(amax),
        );
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        if amax == 0.0 {
            return block;
        }
        // The first value of that magnitude (there is one: the maximum is one of them).
        let target = _mm256_set1_ps(amax);
        let mut first = 0;
        for i in 0..QK_K / 8 {
            let hits = _mm256_cmp_ps::<_CMP_EQ_OQ>(abs(_mm256_loadu_ps(p.add(8 * i))), target);
            let mask = _mm256_movemask_ps(hits);
            if mask != 0 {
                first = 8 * i + mask.trailing_zeros() as usize;
                break;
            }
        }
        let iscale = -127.0 / x[first];
        let scale = _mm256_set1_ps(iscale);
        // packs interleave the 128-bit lanes: 4-byte groups come out as a0 b0 c0 d0 a1 b1 c1 d1.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let q = |i: usize| _mm256_cvtps_epi32(_mm256_mul_ps(scale, _mm256_loadu_ps(p.add(8 * i))));
        for g in 0..QK_K / 32 {
            let ab = _mm256_packs_epi32(q(4 * g), q(4 * g + 1));
            let cd = _mm256_packs_epi32(q(4 * g + 2), q(4 * g + 3));
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
            // |iscale · x| <= 127 up to rounding, so neither bound changes anything (as in the
            // reference's clamp).
            let bytes = _mm256_max_epi8(bytes, _mm256_set1_epi8(-127));
            _mm256_storeu_si256(block.qs.as_mut_ptr().add(32 * g).cast(), bytes);
        }
        for (sum, qs) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *sum = qs.iter().map(|&q| q as i16).sum();
        }
        block.d = 1.0 / iscale;
        block
    }

    #[cfg(test)]
    mod tests {
        use proptest::prelude::*;

        /// Blocks of random magnitudes and signs, with repeated extremes (ties for the largest
        /// magnitude, of either sign), exact halves after scaling, zeros and signed zeros.
        fn block() -> impl Strategy<Value = Vec<f32>> {
            (
                prop::collection::vec(-1000i32..=1000, 256),
                -20i32..20,
                any::<u64>(),
            )
                .prop_map(|(ints, exp, bits)| {
                    let unit = 2f32.powi(exp);
                    ints.iter()
                        .enumerate()
                        .map(|(i, &n)| match (bits >> (i % 64)) & 3 {
                            0 if i % 5 == 0 => 1000.0 * unit * if n < 0 { -1.0 } else { 1.0 },
                            1 if i % 7 == 0 => -0.0,
                            _ => n as f32 * unit * 0.5,
                        })
                        .collect()
                })
        }

        proptest! {
            #[test]
            fn avx2_quantizer_gives_the_reference_bits(x in block()) {
                if !is_x86_feature_detected!("avx2") {
                    return Ok(());
                }
                let want = super::super::quantize_block(&x);
                // SAFETY: checked above; 256 finite values.
                let got = unsafe { super::quantize_block(&x) };
                prop_assert_eq!(got.d.to_bits(), want.d.to_bits());
                prop_assert_eq!(&got.qs[..], &want.qs[..]);
                prop_assert_eq!(got.bsums, want.bsums);
            }
        }

        #[test]
        fn avx2_quantizer_gives_the_reference_bits_for_zero_blocks() {
            if !is_x86_feature_detected!("avx2") {
                return;
            }
            for x in [[0.0f32; 256], [-0.0f32; 256]] {
                // SAFETY: checked above; 256 finite values.
                let got = unsafe { super::quantize_block(&x) };
                assert_eq!(got, super::super::quantize_block(&x));
            }
        }
    }
}
