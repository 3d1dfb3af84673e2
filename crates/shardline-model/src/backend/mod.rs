//! The interface between the decoder loop and a device: a [`Backend`] runs the two segments of a
//! layer (attention, FFN) plus the embedding and the logits; a [`Reduce`] hook combines the
//! segments' partial sums across ranks (unless the backend summed them on its device already)
//! and exchanges rows between them for expert dispatch. The CPU and CUDA backends implement it,
//! and the decoder loop ([`crate::engine::Engine`]) is written once over both.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use std::ops::Range;

use shardline_tensor::DType;

use crate::config::ModelSpec;
use crate::error::{ModelError, Result};

/// A device that holds one rank's weights and KV cache and runs the segments on them.
pub trait Backend {
    /// The model this backend runs.
    fn spec(&self) -> &ModelSpec;

    /// The dtype of the weights (the least precise one, where they differ).
    fn weight_dtype(&self) -> DType;

    /// Positions already in the KV cache.
    fn position(&self) -> usize;

    /// How many positions the KV cache holds.
    fn capacity(&self) -> usize;

    /// Empties the KV cache and makes room for `capacity` positions.
    fn reset(&mut self, capacity: usize) -> Result<()>;

    /// Forgets the positions from `len` on (at most [`Backend::position`]): the next token goes
    /// to position `len`.
    fn truncate(&mut self, len: usize) -> Result<()>;

    /// Whether [`Backend::decode`] runs a whole decode step on the device (embedding, every
    /// layer, final norm, logits): then the engine hands it single tokens instead of driving the
    /// segments itself, wherever the ranks' sums need no host (one rank, or
    /// [`Backend::sums_across_ranks`]).
    fn decodes_whole_steps(&self) -> bool {
        false
    }

    /// One token at the next position through the whole model on the device: this rank's logits
    /// (`[vocab_rows.len()]`), or only their largest value and its vocabulary id. Only called
    /// where [`Backend::decodes_whole_steps`] says so.
    fn decode(&mut self, token: u32, want: Want) -> Result<Decoded> {
        let _ = (token, want);
        Err(ModelError::Invalid(
            "this backend runs decode steps segment by segment".into(),
        ))
    }

    /// A whole batched step on the device (embedding, every layer, final norm, logits), for the
    /// rows and tokens [`Backend::attention_paged`] takes: for the rows `sample` lists, this rank's
    /// logits or its best logit of each, as `want` asks; `None` where this backend runs batched
    /// steps segment by segment (the engine then drives them). Only called where
    /// [`Backend::decodes_whole_steps`] says so.
    fn step_paged(
        &mut self,
        tokens: &[u32],
        rows: &[PagedRow],
        sample: &[usize],
        want: Want,
    ) -> Result<Option<Sampled>> {
        let _ = (tokens, rows, sample, want);
        Ok(None)
    }

    /// `[tokens.len(), hidden]` embeddings of `tokens` (already checked against the vocabulary).
    fn embed(&self, tokens: &[u32], out: &mut [f32]) -> Result<()>;

    /// Attention segment of `layer` for `[rows, hidden]` `x` at the next positions: appends to
    /// the KV cache and writes this rank's partial residual update to `out`.
    fn attention(&mut self, layer: usize, x: &[f32], out: &mut [f32]) -> Result<()>;

    /// Makes the paged KV cache ([`crate::kv_pool`]): `blocks` blocks of every layer's keys and
    /// values, held in `dtype`, for [`Backend::attention_paged`].
    fn make_kv_pool(&mut self, blocks: usize, dtype: DType) -> Result<()> {
        let _ = (blocks, dtype);
        Err(ModelError::Unsupported(
            "a paged KV cache (batched serving) on this device".into(),
        ))
    }

    /// The attention segment of `layer` for `[rows.len(), hidden]` `x`, each row at its own
    /// position of its own sequence in the paged KV cache: writes every row's key and value into
    /// its block, then this rank's partial residual update to `out`.
    fn attention_paged(
        &mut self,
        layer: usize,
        x: &[f32],
        rows: &[PagedRow],
        out: &mut [f32],
    ) -> Result<()> {
        let _ = (layer, x, rows, out);
        Err(ModelError::Unsupported(
            "a paged KV cache (batched serving) on this device".into(),
        ))
    }

    /// FFN segment of `layer`: writes this rank's partial residual update to `out`.
    fn ffn(&mut self, layer: usize, x: &[f32], out: &mut [f32]) -> Result<()>;

    /// [`Backend::ffn`] for several rows, with the other ranks at hand: a backend whose experts
    /// are split over ranks may send rows to the ranks that hold their experts and take the
    /// results back (see [`crate::backend::cpu::dispatch`]); it says what it wrote to `out`. By default the
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

    /// The type the sums of [`Backend::sums_across_ranks`] travel in between the ranks (the
    /// engine's `sum_dtype`); a backend whose sums the engine does on the host ignores it.
    fn set_sum_dtype(&mut self, dtype: SumDType) -> Result<()> {
        let _ = dtype;
        Ok(())
    }

    /// The vocabulary rows this rank's lm_head holds.
    fn vocab_rows(&self) -> Range<usize>;

    /// Final norm and this rank's lm_head rows: `[rows, vocab_rows.len()]` logits for
    /// `[rows, hidden]` `x`.
    fn logits(&mut self, x: &[f32], out: &mut [f32]) -> Result<()>;
}

/// A backend chosen at run time (the CLI's engines) runs as the backend it boxes.
impl<T: Backend + ?Sized> Backend for Box<T> {
    fn spec(&self) -> &ModelSpec {
        (**self).spec()
    }
    fn weight_dtype(&self) -> DType {
        (**self).weight_dtype()
    }
    fn position(&self) -> usize {
        (**self).position()
    }
    fn capacity(&self) -> usize {
        (**self).capacity()
    }
    fn reset(&mut self, capacity: usize) -> Result<()> {
        (**self).reset(capacity)
    }
    fn truncate(&mut self, len: usize) -> Result<()> {
        (**self).truncate(len)
    }
    fn decodes_whole_steps(&self) -> bool {
        (**self).decodes_whole_steps()
    }
    fn decode(&mut self, token: u32, want: Want) -> Result<Decoded> {
        (**self).decode(token, want)
    }
    fn step_paged(
        &mut self,
        tokens: &[u32],
        rows: &[PagedRow],
        sample: &[usize],
        want: Want,
    ) -> Result<Option<Sampled>> {
        (**self).step_paged(tokens, rows, sample, want)
    }
    fn embed(&self, tokens: &[u32], out: &mut [f32]) -> Result<()> {
        (**self).embed(tokens, out)
    }
    fn attention(&mut self, layer: usize, x: &[f32], out: &mut [f32]) -> Result<()> {
        (**self).attention(layer, x, out)
    }
    fn make_kv_pool(&mut self, blocks: usize, dtype: DType) -> Result<()> {
        (**self).make_kv_pool(blocks, dtype)
    }
    fn attention_paged(
        &mut self,
        layer: usize,
        x: &[f32],
        rows: &[PagedRow],
        out: &mut [f32],
    ) -> Result<()> {
        (**self).attention_paged(layer, x, rows, out)
    }
    fn ffn(&mut self, layer: usize, x: &[f32], out: &mut [f32]) -> Result<()> {
        (**self).ffn(layer, x, out)
    }
    fn ffn_routed(
        &mut self,
        layer: usize,
        x: &[f32],
        out: &mut [f32],
        ranks: &mut dyn Reduce,
    ) -> Result<FfnPart> {
        (**self).ffn_routed(layer, x, out, ranks)
    }
    fn sums_across_ranks(&self) -> bool {
        (**self).sums_across_ranks()
    }
    fn set_sum_dtype(&mut self, dtype: SumDType) -> Result<()> {
        (**self).set_sum_dtype(dtype)
    }
    fn vocab_rows(&self) -> Range<usize> {
        (**self).vocab_rows()
    }
    fn logits(&mut self, x: &[f32], out: &mut [f32]) -> Result<()> {
        (**self).logits(x, out)
    }
}

/// A row of a paged step: its position in its sequence, and the sequence's block table (which
/// holds that position).
#[derive(Clone, Copy, Debug)]
pub struct PagedRow<'a> {
    /// The row's position in its sequence.
    pub pos: usize,
    /// The sequence's KV pool blocks, in position order.
    pub blocks: &'a [u32],
}

/// What a whole decode step returns ([`Backend::decode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// This rank's logits.
    Logits,
    /// The largest of this rank's logits and its vocabulary id (greedy decoding).
    Best,
}

/// A whole decode step's result, as [`Want`] asked.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    /// This rank's slice of the vocabulary's logits ([`Backend::vocab_rows`]).
    Logits(Vec<f32>),
    /// This rank's best logit.
    Best {
        /// The logit.
        value: f32,
        /// Its token id in the whole vocabulary.
        id: u32,
    },
}

/// What a batched step returns for its sampled rows ([`Backend::step_paged`]), as [`Want`] asked.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampled {
    /// This rank's slice of each row's logits, `[rows, vocab_rows.len()]`.
    Logits(Vec<f32>),
    /// This rank's best logit of each row and its token id in the whole vocabulary.
    Best(Vec<(f32, u32)>),
}

impl Sampled {
    /// The answer for a step that samples no row, in the form `want` asks for.
    pub fn none(want: Want) -> Sampled {
        match want {
            Want::Logits => Sampled::Logits(Vec::new()),
            Want::Best => Sampled::Best(Vec::new()),
        }
    }
}

/// What an FFN segment wrote to its `out`, and so how the ranks put their parts together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnPart {
    /// A partial sum of every row: the parts are added (all-reduce).
    Sum,
    /// The whole update of this rank's own rows ([`crate::backend::cpu::dispatch::own_rows`]) and nothing
    /// else: the rows are gathered (all-gather, half the bytes of an all-reduce).
    OwnRows,
}

/// The element type in which the ranks' partial sums travel between them
/// ([`Reduce::all_reduce_sum`]). The additions are done in f32 whatever it is; a 16-bit type halves
/// the bytes every layer moves, at the cost of rounding each partial sum and their total to 8
/// (bf16) or 11 (f16) significant bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SumDType {
    /// IEEE 754 single precision, 4 bytes per element.
    F32,
    /// bfloat16, 2 bytes per element.
    BF16,
    /// IEEE 754 half precision, 2 bytes per element.
    F16,
}

impl SumDType {
    /// The sums of a model whose weights are `weights` ([`Backend::weight_dtype`]): a bf16 or f16
    /// model's activations are of its own type (the precision it was trained in), so its sums go
    /// in that type; f32 and quantized models keep f32. Every rank holds the same model, so every
    /// rank gets the same answer.
    pub fn of_weights(weights: DType) -> SumDType {
        match weights {
            DType::BF16 => SumDType::BF16,
            DType::F16 => SumDType::F16,
            DType::F32 | DType::Quant(_) => SumDType::F32,
        }
    }

    /// Bytes per element between the ranks.
    pub fn size(self) -> usize {
        match self {
            SumDType::F32 => 4,
            SumDType::BF16 | SumDType::F16 => 2,
        }
    }

    /// Lower-case name, as `bench` records and logs write it.
    pub fn name(self) -> &'static str {
        match self {
            SumDType::F32 => "f32",
            SumDType::BF16 => "bf16",
            SumDType::F16 => "f16",
        }
    }
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

    /// Replaces `x` on every rank with the element-wise sum of every rank's `x`, carried between
    /// the ranks as `dtype`: each rank's `x` is rounded to it, the additions are done in f32 and
    /// each result rounded to it once, and `x` gets the sum widened back to f32. Every rank passes
    /// the same `dtype`.
    fn all_reduce_sum(&mut self, x: &mut [f32], dtype: SumDType) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;

    /// Rank 0's `buf` to every rank (each passes a buffer of the same length).
    fn broadcast_u32(&mut self, buf: &mut [u32]) -> Result<()>;

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

/// Ranks chosen at run time (one, or a group) reduce as the ranks they box.
impl<T: Reduce + ?Sized> Reduce for Box<T> {
    fn world(&self) -> usize {
        (**self).world()
    }
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn all_reduce_sum(&mut self, x: &mut [f32], dtype: SumDType) -> Result<()> {
        (**self).all_reduce_sum(x, dtype)
    }
    fn barrier(&mut self) -> Result<()> {
        (**self).barrier()
    }
    fn broadcast_u32(&mut self, buf: &mut [u32]) -> Result<()> {
        (**self).broadcast_u32(buf)
    }
    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        (**self).all_gather(local, out)
    }
    fn all_to_all_v(
        &mut self,
        send: Vec<f32>,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Pending> {
        (**self).all_to_all_v(send, send_counts, recv_counts)
    }
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

    /// One rank's partial sum is the whole sum: nothing travels, so nothing is rounded.
    fn all_reduce_sum(&mut self, _x: &mut [f32], _dtype: SumDType) -> Result<()> {
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }

    fn broadcast_u32(&mut self, _buf: &mut [u32]) -> Result<()> {
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
