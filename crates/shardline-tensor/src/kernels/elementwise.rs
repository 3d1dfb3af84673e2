//! Element-wise vector ops: residual add, scaled accumulate, scale.

/// `a += b` (residual connection).
pub fn add_assign(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "add_assign: lengths");
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// `y += alpha * x` (weighted sum of expert outputs).
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy: lengths");
    for (o, v) in y.iter_mut().zip(x) {
        *o += alpha * v;
    }
}

/// `x *= alpha`.
pub fn scale(x: &mut [f32], alpha: f32) {
    for v in x.iter_mut() {
        *v *= alpha;
    }
}
