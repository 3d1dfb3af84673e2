//! The attention segment over the paged KV cache on the CPU, for a batch of rows that each sit at
//! their own position of their own sequence (decode rows of many sequences, and prompt chunks):
//! q/k/v for all rows at once (each weight read once), rope at each row's position, every row's
//! key and value written into its sequence's block, then each row attends over its sequence's
//! positions up to its own (so rows of one prompt chunk stay causal).
//!
//! The cache holds f32, or bf16 or f16 for half the bytes: a key or value is rounded once, when
//! it is written, and read back as f32 for the products, which stay in f32.

use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;
use shardline_tensor::kernels::Rope;
use shardline_tensor::{pool, DType};

use super::attention::Qkv;
use crate::backend::PagedRow;
use crate::kv_pool::BLOCK_POSITIONS;
use crate::layer::{AttentionWeights, Exec};

/// A value type the paged cache holds.
trait KvElem: Copy + Default + Send + Sync {
    /// `src` rounded into `dst` (of the same length).
    fn store(src: &[f32], dst: &mut [Self]);
    /// `src` as f32: `src` itself, or widened into `buf` (of the same length).
    fn load<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
}

impl KvElem for f32 {
    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn load<'a>(src: &'a [f32], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

// half's slice conversions pick the CPU's conversion instructions at run time (F16C for f16).
impl KvElem for bf16 {
    fn store(src: &[f32], dst: &mut [bf16]) {
        dst.convert_from_f32_slice(src);
    }
    fn load<'a>(src: &'a [bf16], buf: &'a mut [f32]) -> &'a [f32] {
        src.convert_to_f32_slice(buf);
        buf
    }
}

impl KvElem for f16 {
    fn store(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
    fn load<'a>(src: &'a [f16], buf: &'a mut [f32]) -> &'a [f32] {
        src.convert_to_f32_slice(buf);
        buf
    }
}

/// One layer's keys and values of one value type, each `[blocks, kv_heads, BLOCK_POSITIONS,
/// head_dim]`.
struct Planes<E> {
    k: Vec<E>,
    v: Vec<E>,
}

impl<E: KvElem> Planes<E> {
    fn new(n: usize) -> Self {
        Planes {
            k: vec![E::default(); n],
            v: vec![E::default(); n],
        }
    }

    /// Stores `k` and `v` (`d` values each) at element `at`.
    fn write(&mut self, at: usize, k: &[f32], v: &[f32]) {
        let d = k.len();
        E::store(k, &mut self.k[at..at + d]);
        E::store(v, &mut self.v[at..at + d]);
    }

    /// Attention of `q` over the positions whose values start at `starts`, into `out`.
    fn attend(
        &self,
        starts: impl Iterator<Item = usize> + Clone,
        q: &[f32],
        scale: f32,
        out: &mut [f32],
    ) {
        let d = q.len();
        // One position's key or value widened to f32 at a time (16-bit caches): head_dim
        // values, on the stack.
        let mut buf = [0.0f32; MAX_HEAD_DIM];
        let buf = &mut buf[..d];
        let mut scores: Vec<f32> = starts
            .clone()
            .map(|at| dot(q, E::load(&self.k[at..at + d], buf)) * scale)
            .collect();
        shardline_tensor::kernels::softmax(&mut scores);
        out.fill(0.0);
        for (at, w) in starts.zip(scores) {
            let row = E::load(&self.v[at..at + d], buf);
            for (o, v) in out.iter_mut().zip(row) {
                *o += w * v;
            }
        }
    }
}

/// The widest head the paged cache takes (every model Shardline runs has 64 or 128).
pub(super) const MAX_HEAD_DIM: usize = 256;

/// One layer's cache in the value type chosen for the pool.
enum Store {
    F32(Planes<f32>),
    Bf16(Planes<bf16>),
    F16(Planes<f16>),
}

/// One layer's keys and values for every block of the pool.
pub(super) struct PagedLayer {
    store: Store,
    n_kv_heads: usize,
    head_dim: usize,
}

impl PagedLayer {
    /// A layer's cache of `blocks` blocks of `dtype` values (f32, bf16 or f16), or `None` for a
    /// type the CPU does not hold.
    pub fn new(blocks: usize, n_kv_heads: usize, head_dim: usize, dtype: DType) -> Option<Self> {
        let n = blocks * n_kv_heads * BLOCK_POSITIONS * head_dim;
        let store = match dtype {
            DType::F32 => Store::F32(Planes::new(n)),
            DType::BF16 => Store::Bf16(Planes::new(n)),
            DType::F16 => Store::F16(Planes::new(n)),
            _ => return None,
        };
        Some(PagedLayer {
            store,
            n_kv_heads,
            head_dim,
        })
    }

    /// Start of the `head_dim` values of `kv_head` at position `pos` of a sequence with `blocks`.
    fn offset(&self, blocks: &[u32], kv_head: usize, pos: usize) -> usize {
        let block = blocks[pos / BLOCK_POSITIONS] as usize;
        ((block * self.n_kv_heads + kv_head) * BLOCK_POSITIONS + pos % BLOCK_POSITIONS)
            * self.head_dim
    }

    /// Writes one row's `[kv_heads * head_dim]` key and value at its position.
    fn write(&mut self, row: &PagedRow, k: &[f32], v: &[f32]) {
        let d = self.head_dim;
        for h in 0..self.n_kv_heads {
            let at = self.offset(row.blocks, h, row.pos);
            let (k, v) = (&k[h * d..(h + 1) * d], &v[h * d..(h + 1) * d]);
            match &mut self.store {
                Store::F32(p) => p.write(at, k, v),
                Store::Bf16(p) => p.write(at, k, v),
                Store::F16(p) => p.write(at, k, v),
            }
        }
    }

    /// Attention of one query head `q` (of KV head `kv_head`) over positions `0..=row.pos`.
    fn attend(&self, row: &PagedRow, kv_head: usize, q: &[f32], scale: f32, out: &mut [f32]) {
        let starts = (0..=row.pos).map(|p| self.offset(row.blocks, kv_head, p));
        match &self.store {
            Store::F32(p) => p.attend(starts, q, scale, out),
            Store::Bf16(p) => p.attend(starts, q, scale, out),
            Store::F16(p) => p.attend(starts, q, scale, out),
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums, so the compiler keeps them in one vector register.
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl AttentionWeights {
    /// The attention segment for `[rows.len(), hidden]` `x` over the paged cache `cache`; writes
    /// `[rows.len(), hidden]` to `out`. The caller has checked that every row's blocks hold its
    /// position and that the rope table reaches it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_paged(
        &self,
        x: &[f32],
        rows: &[PagedRow],
        eps: f32,
        cache: &mut PagedLayer,
        rope: &Rope,
        exec: Exec,
        out: &mut [f32],
    ) {
        let Qkv { mut q, mut k, v } = self.project(x, eps, exec);
        let (qw, kw) = (q.len() / rows.len(), k.len() / rows.len());
        for (r, row) in rows.iter().enumerate() {
            rope.apply(&mut q[r * qw..(r + 1) * qw], self.n_heads, row.pos);
            rope.apply(&mut k[r * kw..(r + 1) * kw], self.n_kv_heads, row.pos);
            cache.write(row, &k[r * kw..(r + 1) * kw], &v[r * kw..(r + 1) * kw]);
        }
        let d = self.head_dim;
        let group = self.n_heads / self.n_kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut att = vec![0.0f32; q.len()];
        let cache = &*cache;
        pool::install(|| {
            att.par_chunks_mut(d)
                .zip(q.par_chunks(d))
                .enumerate()
                .for_each(|(i, (o, qh))| {
                    let (r, head) = (i / self.n_heads, i % self.n_heads);
                    cache.attend(&rows[r], head / group, qh, scale, o);
                });
        });
        self.output(&att, out);
    }
}
