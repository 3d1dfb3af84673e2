//! Token embedding lookup.

use crate::simd::weight::widen;
use crate::simd::Isa;
use crate::TensorView;

/// Copies row `token` of the `[vocab, hidden]` table into `out`, widened to f32.
///
/// # Panics
/// When `token` is out of range or `out` is not one row long; the model checks token ids first.
pub fn embedding(table: &TensorView, token: usize, out: &mut [f32]) {
    let dims = table.shape().dims();
    assert_eq!(dims.len(), 2, "embedding: table must be 2-D");
    assert!(token < dims[0], "embedding: token {token} out of range");
    assert_eq!(out.len(), dims[1], "embedding: out length");
    let es = table.dtype().size_in_bytes();
    let row = &table.bytes()[token * dims[1] * es..(token + 1) * dims[1] * es];
    widen(Isa::active(), table.dtype(), row, out);
}
