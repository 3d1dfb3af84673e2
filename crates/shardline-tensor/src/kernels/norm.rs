//! RMS normalisation, as Llama, Mixtral and Qwen use it.

/// For each row of `x` (rows of `weight.len()` elements):
/// `out = x / sqrt(mean(x^2) + eps) * weight`, the mean accumulated in f32.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    assert_eq!(x.len(), out.len(), "rms_norm: x vs out length");
    assert!(d > 0 && x.len() % d == 0, "rms_norm: x is not whole rows");
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * g;
        }
    }
}
