//! Prefill matrix product `Y = X W^T` for a small number of rows M.

use crate::kernels::matvec;
use crate::TensorView;

/// `y[m, n] = sum_k x[m, k] * W[n, k]`; `x` is `[m, K]`, `y` is `[m, N]`, W is `[N, K]`.
///
/// # Panics
/// When the shapes disagree.
pub fn matmul(w: &TensorView, x: &[f32], m: usize, y: &mut [f32]) {
    let dims = w.shape().dims();
    let (n, k) = (dims[0], dims[1]);
    assert_eq!(x.len(), m * k, "matmul: x length");
    assert_eq!(y.len(), m * n, "matmul: y length");
    for (xr, yr) in x.chunks_exact(k.max(1)).zip(y.chunks_exact_mut(n.max(1))) {
        matvec(w, xr, yr);
    }
}
