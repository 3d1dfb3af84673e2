//! The interface between the decoder loop and a device: a [`Backend`] runs the two segments of a
//! layer (attention, FFN) plus the embedding and the logits; a [`Reduce`] hook combines the
//! segments' partial sums across ranks (unless the backend summed them on its device already).
//! The CPU and CUDA backends implement it, and the decoder loop ([`crate::engine::Engine`]) is written once over both.

use std::ops::Range;

use shardline_tensor::DType;

use crate::config::ModelSpec;
use crate::error::Result;

/// A device that holds one rank's weights and KV cache and runs the segments on them.
pub trait Backend {
    fn spec(&self) -> &ModelSpec;

    /// The dtype of the weights (the least precise one, where they differ).
    fn weight_dtype(&self) -> DType;

    /// Positions already in the KV cache.
    fn position(&self) -> usize;

    /// How many positions the KV cache holds.
    fn capacity(&self) -> usize;

    /// Empties the KV cache and makes room for `capacity` positions.
    fn reset(&mut self, capacity: usize) -> Result<()>;

    /// `[tokens.len(), hidden]` embeddings of `tokens` (already checked against the vocabulary).
    fn embed(&self, tokens: &[u32], out: &mut [f32]) -> Result<()>;

    /// Attention segment of `layer` for `[rows, hidden]` `x` at the next positions: appends to
    /// the KV cache and writes this rank's partial residual update to `out`.
    fn attention(&mut self, layer: usize, x: &[f32], out: &mut [f32]) -> Result<()>;

    /// FFN segment of `layer`: writes this rank's partial residual update to `out`.
    fn ffn(&mut self, layer: usize, x: &[f32], out: &mut [f32]) -> Result<()>;

    /// Whether `attention` and `ffn` already return the sum over every rank (a GPU backend that
    /// all-reduces on the device), so that the engine skips its own all-reduce of them.
    fn sums_across_ranks(&self) -> bool {
        false
    }

    /// The vocabulary rows this rank's lm_head holds.
    fn vocab_rows(&self) -> Range<usize>;

    /// Final norm and this rank's lm_head rows: `[rows, vocab_rows.len()]` logits for
    /// `[rows, hidden]` `x`.
    fn logits(&mut self, x: &[f32], out: &mut [f32]) -> Result<()>;
}

/// What the engine needs from the other ranks: the sum of the segments' partial sums (an
/// all-reduce) and the logits' slices (an all-gather).
pub trait Reduce {
    /// Ranks in the job.
    fn world(&self) -> usize;

    fn all_reduce_sum(&mut self, x: &mut [f32]) -> Result<()>;

    /// Every rank's `local` (all the same length), in rank order, into `out`.
    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()>;
}

/// The reduce of a single rank: its partial sum is already the whole sum.
pub struct SingleRank;

impl Reduce for SingleRank {
    fn world(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, _x: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(local);
        Ok(())
    }
}
