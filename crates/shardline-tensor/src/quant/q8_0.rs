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
    for (x, block) in x.chunks_exact(QK).zip(out.chunks_exact_mut(q8_0::BYTES)) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block[..q8_0::QS].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for (q, &v) in block[q8_0::QS..].iter_mut().zip(x) {
            // |v * id| <= 127 (up to rounding, which `round` cannot push past 127.5).
            *q = (v * id).round() as i8 as u8;
        }
    }
    Ok(())
}
