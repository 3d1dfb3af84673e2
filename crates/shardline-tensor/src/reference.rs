//! Plain, obviously-correct implementations of the kernels, computed in f64 where it helps, for
//! tests to compare the optimised kernels with. Slow on purpose: no SIMD, no threads, no tiling.

use crate::TensorView;

/// Deterministic pseudo-random values in [-1, 1) from a linear congruential generator: varied,
/// repeatable inputs for tests and benchmarks (not statistical quality).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

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

/// `Y = X W^T` for `x` of `m` rows, as `m` reference matvecs.
pub fn matmul(w: &TensorView, x: &[f32], m: usize) -> Vec<f32> {
    let k = w.shape().dims()[1];
    (0..m)
        .flat_map(|r| matvec(w, &x[r * k..(r + 1) * k]))
        .collect()
}

/// RMS norm of each row of `weight.len()` elements, in f64.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let d = weight.len();
    x.chunks_exact(d)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            row.iter()
                .zip(weight)
                .map(move |(&v, &g)| (v as f64 * inv * g as f64) as f32)
        })
        .collect()
}

/// Half-rotation rotary embedding of rows of `n_heads * head_dim`, row `t` at `start_pos + t`.
/// The angle is defined as transformers computes it, `pos * inv_freq[i]` in f32 with
/// `inv_freq[i] = 1 / theta^(2i / head_dim)`; the rotation is computed in f64.
pub fn rope(x: &[f32], head_dim: usize, n_heads: usize, start_pos: usize, theta: f64) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = x.to_vec();
    for (t, row) in out.chunks_exact_mut(n_heads * head_dim).enumerate() {
        let pos = (start_pos + t) as f32;
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let inv_freq = (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32;
                let angle = (pos * inv_freq) as f64;
                let (x1, x2) = (head[i] as f64, head[i + half] as f64);
                head[i] = (x1 * angle.cos() - x2 * angle.sin()) as f32;
                head[i + half] = (x2 * angle.cos() + x1 * angle.sin()) as f32;
            }
        }
    }
    out
}

/// `silu(gate) * up` in f64.
pub fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let g = g as f64;
            (g / (1.0 + (-g).exp()) * u as f64) as f32
        })
        .collect()
}

/// Softmax in f64.
pub fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let e: Vec<f64> = x.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|v| (v / sum) as f32).collect()
}

/// Indices of the `k` largest values, largest first, ties to the lower index (a stable sort).
pub fn top_k(x: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
    idx.truncate(k);
    idx
}

/// Row `token` of the table, widened to f32.
pub fn embedding(table: &TensorView, token: usize) -> Vec<f32> {
    let hidden = table.shape().dims()[1];
    (0..hidden)
        .map(|i| table.get_f32(token * hidden + i))
        .collect()
}

/// `sum_i x[i]` in f64.
pub fn sum(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64).sum()
}

/// Causal grouped-query attention in f64. `q` is `[T, n_heads * d]`; `k` and `v` are
/// `[len, n_kv_heads * d]` (token-major, as appended to the cache); query row `t` sits at
/// position `len - T + t`.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_heads: usize,
    n_kv_heads: usize,
    d: usize,
    scale: f32,
) -> Vec<f32> {
    let row = n_heads * d;
    let kv_row = n_kv_heads * d;
    let len = k.len() / kv_row;
    let t_count = q.len() / row;
    let group = n_heads / n_kv_heads;
    let mut out = vec![0.0f32; q.len()];
    for t in 0..t_count {
        let visible = len - t_count + t + 1;
        for h in 0..n_heads {
            let kh = h / group;
            let qh = &q[t * row + h * d..][..d];
            let scores: Vec<f64> = (0..visible)
                .map(|p| {
                    let kp = &k[p * kv_row + kh * d..][..d];
                    let dot: f64 = qh.iter().zip(kp).map(|(&a, &b)| a as f64 * b as f64).sum();
                    dot * scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = e.iter().sum();
            for i in 0..d {
                let acc: f64 = (0..visible)
                    .map(|p| e[p] / total * v[p * kv_row + kh * d + i] as f64)
                    .sum();
                out[t * row + h * d + i] = acc as f32;
            }
        }
    }
    out
}
