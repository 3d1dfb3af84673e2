//! Scaled dot-product attention with grouped-query heads over a KV cache, for one decode token
//! or a causal prefill block.

use rayon::prelude::*;

use crate::kernels::matvec::rows_body;
use crate::kernels::scale;
use crate::kernels::softmax::softmax_lanes;
use crate::pool;
use crate::simd::lanes::Simd;
use crate::simd::reduce::axpy_lanes;
use crate::simd::weight::F32;
use crate::simd::{run, Isa, WithSimd};

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

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Key/value heads per position.
    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads
    }

    /// Elements per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Forgets every position (the storage is kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Forgets the positions from `len` on (no-op when it holds fewer).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
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

/// Cached positions per block: 64 rows of a 128-wide head are 32 KiB of keys or values.
const POS_BLOCK: usize = 64;
/// Below this many multiply-adds (scores plus weighted values) a call runs on the calling thread.
const SERIAL_WORK: usize = 1 << 16;

/// Causal attention of `T` query rows against the cache, parallel over (row, KV head) pairs
/// when there is enough work. The query heads that share a KV head are computed together, so
/// each key and value row is read once for all of them.
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
    attention_on(Isa::active(), q, cache, n_heads, scale, out)
}

/// [`attention`] on a given instruction set.
///
/// # Panics
/// As [`attention`], and when the CPU does not support `isa`.
pub fn attention_on(
    isa: Isa,
    q: &[f32],
    cache: &KvCache,
    n_heads: usize,
    scale: f32,
    out: &mut [f32],
) {
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
    let n_kv = cache.n_kv_heads();
    let group = n_heads / n_kv;
    let first_pos = cache.len() - t_count;
    // Unit `u = t * n_kv + kv`: query row t, the `group` heads of KV head kv, whose outputs are
    // contiguous in `out` (as their queries are in `q`).
    let one = |scores: &mut Vec<f32>, u: usize, o: &mut [f32]| {
        let (t, kv) = (u / n_kv, u % n_kv);
        let visible = first_pos + t + 1;
        scores.clear();
        scores.resize(group * visible, 0.0);
        run(
            isa,
            Group {
                q: &q[u * group * d..(u + 1) * group * d],
                keys: &cache.keys(kv)[..visible * d],
                values: &cache.values(kv)[..visible * d],
                d,
                scale,
                scores,
                out: o,
            },
        );
    };
    let work = 2 * t_count * n_heads * cache.len() * d;
    let unit = group * d;
    if work < SERIAL_WORK {
        let mut scores = Vec::new();
        for (u, o) in out.chunks_exact_mut(unit).enumerate() {
            one(&mut scores, u, o);
        }
    } else {
        pool::install(|| {
            out.par_chunks_exact_mut(unit)
                .enumerate()
                .for_each_init(Vec::new, |scores, (u, o)| one(scores, u, o))
        });
    }
}

/// The query heads of one KV head, for one query row.
struct Group<'a> {
    /// `[group, d]`
    q: &'a [f32],
    /// `[visible, d]`
    keys: &'a [f32],
    values: &'a [f32],
    d: usize,
    scale: f32,
    /// `[group, visible]`
    scores: &'a mut [f32],
    /// `[group, d]`
    out: &'a mut [f32],
}

impl WithSimd for Group<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let d = self.d;
        let visible = self.keys.len() / d;
        // Positions in blocks, so that the block's keys and values stay in L1/L2 while every
        // head of the group reads them.
        for p0 in (0..visible).step_by(POS_BLOCK) {
            let pb = POS_BLOCK.min(visible - p0);
            let keys = &self.keys[p0 * d..(p0 + pb) * d];
            for (h, qh) in self.q.chunks_exact(d).enumerate() {
                let s = &mut self.scores[h * visible + p0..][..pb];
                // SAFETY: keys holds pb = s.len() rows of d = qh.len() f32.
                unsafe { rows_body::<S, F32>(keys.as_ptr().cast(), qh, s) };
            }
        }
        for s in self.scores.chunks_exact_mut(visible) {
            scale(s, self.scale);
            softmax_lanes::<S>(s);
        }
        self.out.fill(0.0);
        for p0 in (0..visible).step_by(POS_BLOCK) {
            let pb = POS_BLOCK.min(visible - p0);
            let values = &self.values[p0 * d..(p0 + pb) * d];
            for (h, oh) in self.out.chunks_exact_mut(d).enumerate() {
                weighted_sum_lanes::<S>(&self.scores[h * visible + p0..][..pb], values, oh);
            }
        }
    }
}

/// `out += sum_p w[p] * values[p]` for the rows of `values` (`[w.len(), out.len()]`), keeping a
/// few vectors of `out` in registers across all the rows.
#[inline(always)]
fn weighted_sum_lanes<S: Simd>(w: &[f32], values: &[f32], out: &mut [f32]) {
    const V: usize = 4;
    let d = out.len();
    let (v, o) = (values.as_ptr(), out.as_mut_ptr());
    let mut c = 0;
    // SAFETY: columns c..c + V * LANES (or c + LANES) are below d; values has w.len() rows of d.
    unsafe {
        while c + V * S::LANES <= d {
            let mut acc = [S::zero(); V];
            for (j, a) in acc.iter_mut().enumerate() {
                *a = S::load(o.add(c + j * S::LANES));
            }
            for (p, wp) in w.iter().enumerate() {
                let wv = S::splat(*wp);
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = S::fma(wv, S::load(v.add(p * d + c + j * S::LANES)), *a);
                }
            }
            for (j, a) in acc.iter().enumerate() {
                S::store(o.add(c + j * S::LANES), *a);
            }
            c += V * S::LANES;
        }
    }
    for (p, wp) in w.iter().enumerate() {
        axpy_lanes::<S>(*wp, &values[p * d + c..(p + 1) * d], &mut out[c..]);
    }
}
