//! Decode matrix-vector product `y = W x`, W row-major `[N, K]`.

use rayon::prelude::*;

use crate::pool;
use crate::tensor::read_f32;
use crate::TensorView;

/// `y[n] = sum_k W[n, k] * x[k]` for a 2-D weight `W` of shape `[y.len(), x.len()]`.
///
/// # Panics
/// When the shapes disagree (a programming error: the model checks shapes at load time).
pub fn matvec(w: &TensorView, x: &[f32], y: &mut [f32]) {
    let dims = w.shape().dims();
    assert_eq!(
        dims,
        [y.len(), x.len()],
        "matvec: weight shape vs x/y lengths"
    );
    let k = x.len();
    let row_bytes = k * w.dtype().size_in_bytes();
    let dtype = w.dtype();
    let bytes = w.bytes();
    pool::install(|| {
        y.par_iter_mut().enumerate().for_each(|(n, out)| {
            let row = &bytes[n * row_bytes..(n + 1) * row_bytes];
            let mut acc = 0.0f32;
            for (i, xi) in x.iter().enumerate() {
                acc += read_f32(dtype, row, i) * xi;
            }
            *out = acc;
        })
    });
}
