//! Token embedding lookup.

use crate::quant::dequantize_row;
use crate::simd::weight::widen;
use crate::simd::Isa;
use crate::{DType, TensorView};

/// Copies row `token` of the `[vocab, hidden]` table into `out`, widened to f32 (dequantized
/// for a block format).
///
/// # Panics
/// When `token` is out of range or `out` is not one row long; the model checks token ids first.
pub fn embedding(table: &TensorView, token: usize, out: &mut [f32]) {
    let dims = table.shape().dims();
    assert_eq!(dims.len(), 2, "embedding: table must be 2-D");
    assert!(token < dims[0], "embedding: token {token} out of range");
    assert_eq!(out.len(), dims[1], "embedding: out length");
    let row_bytes = table
        .dtype()
        .row_bytes(dims[1])
        .expect("rows of whole blocks, checked by the view");
    let row = &table.bytes()[token * row_bytes..(token + 1) * row_bytes];
    match table.dtype() {
        DType::Quant(q) => dequantize_row(q, row, out).expect("one row, lengths checked above"),
        dtype => widen(Isa::active(), dtype, row, out),
    }
}
