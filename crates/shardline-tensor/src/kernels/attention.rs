//! Scaled dot-product attention with grouped-query heads over a KV cache, for one decode token
//! or a causal prefill block.

use crate::kernels::softmax;

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
            row > 0 && k.len() % row == 0 && k.len() == v.len(),
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

/// Causal attention of `T` query rows against the cache.
///
/// `q` is `[T, n_heads * head_dim]` and its row `t` sits at position `cache.len() - T + t` (the
/// block's keys and values must already be appended); `out` has the shape of `q`. Query head `h`
/// reads KV head `h / (n_heads / n_kv_heads)`. Scores are scaled by `scale` (usually
/// `1/sqrt(head_dim)`).
pub fn attention(q: &[f32], cache: &KvCache, n_heads: usize, scale: f32, out: &mut [f32]) {
    let d = cache.head_dim();
    let row = n_heads * d;
    assert!(
        row > 0 && q.len() % row == 0 && q.len() == out.len(),
        "attention: lengths"
    );
    assert!(
        n_heads % cache.n_kv_heads() == 0,
        "attention: heads vs kv heads"
    );
    let t_count = q.len() / row;
    assert!(
        t_count <= cache.len(),
        "attention: queries beyond the cache"
    );
    let group = n_heads / cache.n_kv_heads();
    let first_pos = cache.len() - t_count;
    let mut scores = vec![0.0f32; cache.len()];
    for t in 0..t_count {
        let visible = first_pos + t + 1;
        for h in 0..n_heads {
            let qh = &q[t * row + h * d..t * row + (h + 1) * d];
            let keys = cache.keys(h / group);
            let values = cache.values(h / group);
            let s = &mut scores[..visible];
            for (p, sp) in s.iter_mut().enumerate() {
                let kp = &keys[p * d..(p + 1) * d];
                *sp = qh.iter().zip(kp).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
            softmax(s);
            let oh = &mut out[t * row + h * d..t * row + (h + 1) * d];
            oh.fill(0.0);
            for (p, w) in s.iter().enumerate() {
                let vp = &values[p * d..(p + 1) * d];
                for (o, v) in oh.iter_mut().zip(vp) {
                    *o += w * v;
                }
            }
        }
    }
}
