//! The interface between the decoder loop and a device: a [`Backend`] runs the two segments of a
//! layer (attention, FFN) plus the embedding and the logits; a [`Reduce`] hook combines the
//! segments' partial sums across ranks (unless the backend summed them on its device already)
//! and exchanges rows between them for expert dispatch. The CPU and CUDA backends implement it,
//! and the decoder loop ([`crate::engine::Engine`]) is written once over both.

use std::ops::Range;

use shardline_tensor::DType;

use crate::config::ModelSpec;
use crate::error::{ModelError, Result};

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

    /// [`Backend::ffn`] for several rows, with the other ranks at hand: a backend whose experts
    /// are split over ranks may send rows to the ranks that hold their experts and take the
    /// results back (see [`crate::dispatch`]); it says what it wrote to `out`. By default the
    /// same as [`Backend::ffn`], a partial sum.
    fn ffn_routed(
        &mut self,
        layer: usize,
        x: &[f32],
        out: &mut [f32],
        ranks: &mut dyn Reduce,
    ) -> Result<FfnPart> {
        let _ = ranks;
        self.ffn(layer, x, out)?;
        Ok(FfnPart::Sum)
    }

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

/// What an FFN segment wrote to its `out`, and so how the ranks put their parts together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnPart {
    /// A partial sum of every row: the parts are added (all-reduce).
    Sum,
    /// The whole update of this rank's own rows ([`crate::dispatch::own_rows`]) and nothing
    /// else: the rows are gathered (all-gather, half the bytes of an all-reduce).
    OwnRows,
}

/// An exchange in flight (see [`Reduce::all_to_all_v`]); [`Pending::wait`] gives what arrived.
pub struct Pending(Box<dyn FnOnce() -> Result<Vec<f32>>>);

impl Pending {
    /// An exchange that completes when `wait` returns.
    pub fn new(wait: impl FnOnce() -> Result<Vec<f32>> + 'static) -> Pending {
        Pending(Box::new(wait))
    }

    /// An exchange already done.
    pub fn ready(received: Vec<f32>) -> Pending {
        Pending::new(move || Ok(received))
    }

    /// Waits for the exchange; returns the received floats, in rank order of the senders.
    pub fn wait(self) -> Result<Vec<f32>> {
        (self.0)()
    }
}

/// What the engine needs from the other ranks: the sum of the segments' partial sums (an
/// all-reduce), the logits' slices (an all-gather) and, for expert dispatch, all-to-all(v).
pub trait Reduce {
    /// Ranks in the job.
    fn world(&self) -> usize;

    /// This rank (`0..world`).
    fn rank(&self) -> usize;

    fn all_reduce_sum(&mut self, x: &mut [f32]) -> Result<()>;

    /// Every rank's `local` (all the same length), in rank order, into `out`.
    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()>;

    /// Starts an all-to-all(v): `send_counts[p]` consecutive floats of `send` go to rank p, and
    /// `recv_counts[p]` floats come from rank p (received in rank order). Every rank starts the
    /// same exchanges in the same order; they may complete in the background until waited for.
    fn all_to_all_v(
        &mut self,
        send: Vec<f32>,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Pending>;
}

/// The reduce of a single rank: its partial sum is already the whole sum.
pub struct SingleRank;

impl Reduce for SingleRank {
    fn world(&self) -> usize {
        1
    }

    fn rank(&self) -> usize {
        0
    }

    fn all_reduce_sum(&mut self, _x: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(local);
        Ok(())
    }

    fn all_to_all_v(
        &mut self,
        send: Vec<f32>,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Pending> {
        if send_counts != [send.len()] || recv_counts != [send.len()] {
            return Err(ModelError::Invalid(format!(
                "all-to-all on one rank: {} floats with counts {send_counts:?} sent and {recv_counts:?} expected",
                send.len()
            )));
        }
        Ok(Pending::ready(send))
    }
}
