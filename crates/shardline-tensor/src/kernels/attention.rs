//! Scaled dot-product attention with grouped-query heads over a KV cache, for one decode token
//! or a causal prefill block.

use rayon::prelude::*;

use crate::kernels::{axpy, softmax};
use crate::pool;
use crate::simd::{reduce, Isa};

/// Keys and values of one layer, laid out `[kv_head][position][head_dim]` so that one head's
/// history is contiguous.
#[derive(Clone, Debug)]
pub struct KvCache {
    n_kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvCache {
    /// An empty cache for up to `capacity` positions.
    pub fn new(n_kv_heads: usize, head_dim: usize, capacity: usize) -> KvCache {
        let n = n_kv_heads * head_dim * capacity;
        KvCache {
            n_kv_heads,
            head_dim,
            capacity,
            len: 0,
            k: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Forgets every position (the storage is kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends `T` positions; `k` and `v` are `[T, n_kv_heads * head_dim]`.
    ///
    /// # Panics
    /// When the cache would overflow its capacity; callers check the prompt length first.
    pub fn append(&mut self, k: &[f32], v: &[f32]) {
        let row = self.n_kv_heads * self.head_dim;
        assert!(
            row > 0 && k.len().is_multiple_of(row) && k.len() == v.len(),
            "kv append: lengths"
        );
        let t = k.len() / row;
        assert!(self.len + t <= self.capacity, "kv append: cache full");
        let d = self.head_dim;
        for step in 0..t {
            let pos = self.len + step;
            for h in 0..self.n_kv_heads {
                let src = step * row + h * d;
                let dst = (h * self.capacity + pos) * d;
                self.k[dst..dst + d].copy_from_slice(&k[src..src + d]);
                self.v[dst..dst + d].copy_from_slice(&v[src..src + d]);
            }
        }
        self.len += t;
    }

    /// Keys of `kv_head` for positions `0..len`, `[len, head_dim]`.
    pub fn keys(&self, kv_head: usize) -> &[f32] {
        let start = kv_head * self.capacity * self.head_dim;
        &self.k[start..start + self.len * self.head_dim]
    }

    /// Values of `kv_head` for positions `0..len`, `[len, head_dim]`.
    pub fn values(&self, kv_head: usize) -> &[f32] {
        let start = kv_head * self.capacity * self.head_dim;
        &self.v[start..start + self.len * self.head_dim]
    }
}

/// Below this many multiply-adds (scores plus weighted values) a call runs on the calling thread.
const SERIAL_WORK: usize = 1 << 16;

/// Causal attention of `T` query rows against the cache, parallel over (row, head) pairs when
/// there is enough work.
///
/// `q` is `[T, n_heads * head_dim]` and its row `t` sits at position `cache.len() - T + t` (the
/// block's keys and values must already be appended); `out` has the shape of `q`. Query head `h`
/// reads KV head `h / (n_heads / n_kv_heads)`. Scores are scaled by `scale` (usually
/// `1/sqrt(head_dim)`).
///
/// # Panics
/// When the lengths disagree, `n_heads` is not a multiple of the cache's KV heads, or there are
/// more query rows than cached positions.
pub fn attention(q: &[f32], cache: &KvCache, n_heads: usize, scale: f32, out: &mut [f32]) {
    let d = cache.head_dim();
    let row = n_heads * d;
    assert!(
        row > 0 && q.len().is_multiple_of(row) && q.len() == out.len(),
        "attention: lengths"
    );
    assert!(
        cache.n_kv_heads() > 0 && n_heads.is_multiple_of(cache.n_kv_heads()),
        "attention: heads vs kv heads"
    );
    let t_count = q.len() / row;
    assert!(
        t_count <= cache.len(),
        "attention: queries beyond the cache"
    );
    let group = n_heads / cache.n_kv_heads();
    let first_pos = cache.len() - t_count;
    let isa = Isa::active();
    // One (row, head) pair: `i = t * n_heads + h`, writing `oh`, the head's slice of out.
    let one = |scores: &mut Vec<f32>, i: usize, oh: &mut [f32]| {
        let (t, h) = (i / n_heads, i % n_heads);
        let visible = first_pos + t + 1;
        let qh = &q[i * d..(i + 1) * d];
        let keys = cache.keys(h / group);
        let values = cache.values(h / group);
        scores.clear();
        scores.extend(
            keys.chunks_exact(d)
                .take(visible)
                .map(|kp| reduce::dot(isa, qh, kp) * scale),
        );
        softmax(scores);
        oh.fill(0.0);
        for (w, vp) in scores.iter().zip(values.chunks_exact(d)) {
            axpy(*w, vp, oh);
        }
    };
    let work = 2 * t_count * n_heads * cache.len() * d;
    if work < SERIAL_WORK {
        let mut scores = Vec::with_capacity(cache.len());
        for (i, oh) in out.chunks_exact_mut(d).enumerate() {
            one(&mut scores, i, oh);
        }
    } else {
        pool::install(|| {
            out.par_chunks_exact_mut(d).enumerate().for_each_init(
                || Vec::with_capacity(cache.len()),
                |scores, (i, oh)| one(scores, i, oh),
            )
        });
    }
}
