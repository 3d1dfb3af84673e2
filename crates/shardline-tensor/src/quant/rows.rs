//! The quantized product as the matrix kernels run it: an activation row quantized once for the
//! weight format it meets ([`QuantizedRow`]), then dotted with many consecutive weight rows
//! ([`dot_rows`]), the arguments checked once for all of them.

use super::dot::Path;
use super::{quantize_row_q8_0, quantize_row_q8_k, Activations, BlockQ8K, QuantError, QuantFormat};
use crate::Isa;

/// An f32 activation row quantized as the weights of one format pair with: Q8_0 blocks for Q4_0
/// and Q8_0 weights, Q8_K blocks for the K-quants (as llama.cpp quantizes activations).
#[derive(Clone, Debug)]
pub enum QuantizedRow {
    /// Q8_0 blocks in ggml's byte layout.
    Q8_0(Vec<u8>),
    /// Q8_K blocks.
    Q8K(Vec<BlockQ8K>),
}

impl QuantizedRow {
    /// `x` quantized for weights of `format`; `x` must be whole blocks of that format.
    pub fn for_weights(format: QuantFormat, x: &[f32]) -> Result<QuantizedRow, QuantError> {
        format.row_bytes(x.len())?;
        Ok(match format {
            QuantFormat::Q4_0 | QuantFormat::Q8_0 => {
                let mut out = vec![0u8; QuantFormat::Q8_0.row_bytes(x.len())?];
                quantize_row_q8_0(x, &mut out)?;
                QuantizedRow::Q8_0(out)
            }
            QuantFormat::Q4K | QuantFormat::Q5K | QuantFormat::Q6K => {
                let mut out = Vec::new();
                quantize_row_q8_k(x, &mut out)?;
                QuantizedRow::Q8K(out)
            }
        })
    }

    /// The row as the dot products take it.
    pub fn activations(&self) -> Activations<'_> {
        match self {
            QuantizedRow::Q8_0(b) => Activations::Q8_0(b),
            QuantizedRow::Q8K(b) => Activations::Q8K(b),
        }
    }
}

/// `out[r]` = the dot product of weight row `r` of `weights` (consecutive `format` rows of as
/// many elements as `act`) with `act`: [`super::dot`] for `out.len()` rows, checked once (and on
/// the SIMD paths with what the rows take from each activation block computed once, where that
/// pays). Each result has the bits [`super::dot`] gives that row on the same path.
pub fn dot_rows(
    isa: Isa,
    format: QuantFormat,
    weights: &[u8],
    act: Activations<'_>,
    out: &mut [f32],
) -> Result<(), QuantError> {
    let path = Path::for_isa(isa)?;
    let row_bytes = format.row_bytes(act.elements()?)?;
    check_weight_rows(format, weights, row_bytes, out.len())?;
    path.rows(format, act, weights, row_bytes, out)
}

/// Checks that `weights` is `rows` rows of `row_bytes` bytes of `format` (the size of the
/// activation row they meet).
pub(super) fn check_weight_rows(
    format: QuantFormat,
    weights: &[u8],
    row_bytes: usize,
    rows: usize,
) -> Result<(), QuantError> {
    let expected = row_bytes.checked_mul(rows).ok_or(QuantError::Overflow {
        format,
        elements: rows,
    })?;
    if weights.len() != expected {
        return Err(QuantError::Length {
            what: "weight bytes (rows times the activation row's size)",
            expected,
            actual: weights.len(),
        });
    }
    Ok(())
}
