//! RMS normalisation, as Llama, Mixtral and Qwen use it.

use crate::simd::{reduce, Isa};

/// For each row of `x` (rows of `weight.len()` elements):
/// `out = x / sqrt(mean(x^2) + eps) * weight`, the mean accumulated in f32 (SIMD lanes).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    assert_eq!(x.len(), out.len(), "rms_norm: x vs out length");
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "rms_norm: x is not whole rows"
    );
    let isa = Isa::active();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss = reduce::dot(isa, xr, xr) / d as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * g;
        }
    }
}
