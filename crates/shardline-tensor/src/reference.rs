//! Plain, obviously-correct implementations of the kernels, computed in f64 where it helps, for
//! tests to compare the optimised kernels with.

use crate::TensorView;

/// `y = W x` accumulated in f64.
pub fn matvec(w: &TensorView, x: &[f32]) -> Vec<f32> {
    let dims = w.shape().dims();
    let (n, k) = (dims[0], dims[1]);
    (0..n)
        .map(|r| {
            (0..k)
                .map(|c| w.get_f32(r * k + c) as f64 * x[c] as f64)
                .sum::<f64>() as f32
        })
        .collect()
}
