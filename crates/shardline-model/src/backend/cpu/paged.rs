//! The attention segment over the paged KV cache on the CPU, for a batch of rows that each sit at
//! their own position of their own sequence (decode rows of many sequences, and prompt chunks):
//! q/k/v for all rows at once (each weight read once), rope at each row's position, every row's
//! key and value written into its sequence's block, then each row attends over its sequence's
//! positions up to its own (so rows of one prompt chunk stay causal).

use rayon::prelude::*;
use shardline_tensor::kernels::Rope;
use shardline_tensor::pool;

use super::attention::Qkv;
use crate::backend::PagedRow;
use crate::kv_pool::BLOCK_POSITIONS;
use crate::layer::{AttentionWeights, Exec};

/// One layer's keys and values for every block of the pool, each `[blocks, kv_heads,
/// BLOCK_POSITIONS, head_dim]`.
pub(super) struct PagedLayer {
    k: Vec<f32>,
    v: Vec<f32>,
    n_kv_heads: usize,
    head_dim: usize,
}

impl PagedLayer {
    pub fn new(blocks: usize, n_kv_heads: usize, head_dim: usize) -> PagedLayer {
        let n = blocks * n_kv_heads * BLOCK_POSITIONS * head_dim;
        PagedLayer {
            k: vec![0.0; n],
            v: vec![0.0; n],
            n_kv_heads,
            head_dim,
        }
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
            self.k[at..at + d].copy_from_slice(&k[h * d..(h + 1) * d]);
            self.v[at..at + d].copy_from_slice(&v[h * d..(h + 1) * d]);
        }
    }

    /// Attention of one query head `q` (of KV head `kv_head`) over positions `0..=row.pos`.
    fn attend(&self, row: &PagedRow, kv_head: usize, q: &[f32], scale: f32, out: &mut [f32]) {
        let d = self.head_dim;
        let mut scores: Vec<f32> = (0..=row.pos)
            .map(|p| {
                let at = self.offset(row.blocks, kv_head, p);
                dot(q, &self.k[at..at + d]) * scale
            })
            .collect();
        shardline_tensor::kernels::softmax(&mut scores);
        out.fill(0.0);
        for (p, w) in scores.into_iter().enumerate() {
            let at = self.offset(row.blocks, kv_head, p);
            for (o, v) in out.iter_mut().zip(&self.v[at..at + d]) {
                *o += w * v;
            }
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
