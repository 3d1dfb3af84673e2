//! Quantization of f32 values to Q8_0 blocks, as ggml's `quantize_row_q8_0_ref` (and gguf-py's
//! Q8_0 quantizer, which matches it bit for bit): `d = max|x| / 127`, `q = round(x / d)` with
//! halves rounded away from zero, computed as `x * (1 / d)`, and `d` stored as f16.

use half::f16;

use super::error::check_finite;
use super::layout::{q8_0, QK};
use super::{QuantError, QuantFormat};

/// Quantizes `x` into the Q8_0 blocks `out`, which must be [`QuantFormat::row_bytes`] long.
/// `x.len()` must be a multiple of 32 and every value finite. A block whose scale exceeds the f16
/// range (values beyond about ±8.3e6) gets an infinite scale, as in ggml.
pub fn quantize_row_q8_0(x: &[f32], out: &mut [u8]) -> Result<(), QuantError> {
    check_finite(x)?;
    let expected = QuantFormat::Q8_0.row_bytes(x.len())?;
    if out.len() != expected {
        return Err(QuantError::Length {
            what: "Q8_0 output bytes",
            expected,
            actual: out.len(),
        });
    }
    let blocks = x.chunks_exact(QK).zip(out.chunks_exact_mut(q8_0::BYTES));
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        for (x, block) in blocks {
            // SAFETY: the CPU has AVX2; `x` is 32 values and `block` one block.
            unsafe { x86::quantize_block(x, block) };
        }
        return Ok(());
    }
    for (x, block) in blocks {
        quantize_block(x, block);
    }
    Ok(())
}

/// One block of [`quantize_row_q8_0`] (32 finite values into 34 bytes): the reference the SIMD
/// version must match bit for bit.
fn quantize_block(x: &[f32], block: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    block[..q8_0::QS].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
    for (q, &v) in block[q8_0::QS..].iter_mut().zip(x) {
        // |v * id| <= 127 (up to rounding, which `round` cannot push past 127.5).
        *q = (v * id).round() as i8 as u8;
    }
}

/// [`quantize_block`] with AVX2: the same operations on the same values, with `round` (halves
/// away from zero) as the truncation plus the sign where the truncated part is at least a half
/// (exact: the part is the difference of two nearby floats), so the same bits.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{q8_0, QK};

    /// Safety: the CPU has AVX2, `x` holds 32 finite values and `block` 34 bytes.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_block(x: &[f32], block: &mut [u8]) {
        debug_assert!(x.len() == QK && block.len() == q8_0::BYTES);
        let p = x.as_ptr();
        let sign = _mm256_set1_ps(-0.0);
        let v = [0, 1, 2, 3].map(|i| _mm256_loadu_ps(p.add(8 * i)));
        let abs = v.map(|v| _mm256_andnot_ps(sign, v));
        let amax = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
        let m = _mm_max_ps(
            _mm256_castps256_ps128(amax),
            _mm256_extractf128_ps::<1>(amax),
        );
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block[..q8_0::QS].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        let (id, half, one) = (_mm256_set1_ps(id), _mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
        let q = v.map(|v| {
            let x = _mm256_mul_ps(v, id);
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(x);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(x, t));
            let step = _mm256_or_ps(_mm256_and_ps(x, sign), one);
            let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half), step);
            _mm256_cvttps_epi32(_mm256_add_ps(t, up))
        });
        // packs interleave the 128-bit lanes: 4-byte groups come out as a0 b0 c0 d0 a1 b1 c1 d1.
        let ab = _mm256_packs_epi32(q[0], q[1]);
        let cd = _mm256_packs_epi32(q[2], q[3]);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
        _mm256_storeu_si256(block.as_mut_ptr().add(q8_0::QS).cast(), bytes);
    }

    #[cfg(test)]
    mod tests {
        use proptest::prelude::*;

        /// Blocks whose scaled values land on exact halves (multiples of `amax / 254`), and
        /// random ones, of either sign, with zeros and signed zeros.
        fn block() -> impl Strategy<Value = Vec<f32>> {
            (
                prop::collection::vec(-254i32..=254, 32),
                prop::collection::vec(any::<f32>(), 32),
                -30i32..30,
                any::<u32>(),
            )
                .prop_map(|(halves, noise, exp, bits)| {
                    let unit = 2f32.powi(exp);
                    let mut x: Vec<f32> = halves
                        .iter()
                        .zip(&noise)
                        .enumerate()
                        .map(|(i, (&h, &n))| match (bits >> i) & 1 {
                            0 => h as f32 * unit / 2.0,
                            _ if n.is_finite() => (n % 1000.0) * unit,
                            _ => -0.0,
                        })
                        .collect();
                    x[(bits % 32) as usize] = 127.0 * unit;
                    x
                })
        }

        proptest! {
            #[test]
            fn avx2_quantizer_gives_the_reference_bits(x in block()) {
                if !is_x86_feature_detected!("avx2") {
                    return Ok(());
                }
                let (mut want, mut got) = ([0u8; 34], [0u8; 34]);
                super::super::quantize_block(&x, &mut want);
                // SAFETY: checked above; 32 finite values and a block.
                unsafe { super::quantize_block(&x, &mut got) };
                prop_assert_eq!(got, want);
            }
        }

        #[test]
        fn avx2_quantizer_gives_the_reference_bits_for_zero_blocks() {
            if !is_x86_feature_detected!("avx2") {
                return;
            }
            for x in [[0.0f32; 32], [-0.0f32; 32]] {
                let (mut want, mut got) = ([0u8; 34], [0u8; 34]);
                super::super::quantize_block(&x, &mut want);
                // SAFETY: checked above; 32 finite values and a block.
                unsafe { super::quantize_block(&x, &mut got) };
                assert_eq!(got, want);
            }
        }
    }
}
