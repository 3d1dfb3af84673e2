//! [`Engine`]: the decoder loop, written once over any [`Backend`]: embed, then per layer the
//! attention segment, a reduce, the residual add, the FFN segment, a reduce (or, where the FFN
//! dispatched the rows to the experts' ranks, a gather of each rank's own rows), the residual
//! add; then the logits. Prefill passes the whole prompt at once; decode passes one token, whose
//! FFN needs no dispatch: every rank holds the same row and runs the chosen experts it holds.
//! Where the backend runs a whole decode step on its device ([`Backend::decodes_whole_steps`]) and
//! no sum has to pass through the host, a decode token (or a batched step over the paged KV cache)
//! goes to it in one call instead.

use shardline_tensor::kernels::add_assign;

use crate::backend::cpu::dispatch::gather_own_rows;
use crate::backend::{Backend, Decoded, FfnPart, PagedRow, Reduce, Sampled, SumDType, Want};
use crate::error::{ModelError, Result};

/// Which rows of logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// One row per input token (for checking against a reference).
    All,
    /// Only the last token's row (for generation).
    Last,
}

/// Prompt tokens run at once when only the last logits are wanted (bounds activation memory:
/// a chunk's expert intermediates are `rows x 2 x intermediate` floats).
pub const PREFILL_CHUNK: usize = 512;

/// The decoder loop of one rank: its device and the hook that combines the ranks' parts.
pub struct Engine<B, R> {
    /// The device holding this rank's weights and KV cache.
    pub backend: B,
    /// The exchange with the other ranks ([`crate::SingleRank`] alone).
    pub reduce: R,
    /// The type the segments' partial sums travel in between the ranks: f32, unless set to the
    /// model's activation type ([`SumDType::of_weights`]: half the bytes, at the cost of a
    /// rounding) before the first step. Every rank must use the same.
    pub sum_dtype: SumDType,
}

impl<B: Backend, R: Reduce> Engine<B, R> {
    /// An engine over `backend`, combining parts through `reduce` in f32.
    pub fn new(backend: B, reduce: R) -> Self {
        Engine {
            backend,
            reduce,
            sum_dtype: SumDType::F32,
        }
    }

    /// Starts a new sequence that will need `positions` positions in all (prompt + generation).
    pub fn start(&mut self, positions: usize) -> Result<()> {
        let spec = self.backend.spec();
        let max = spec.max_positions;
        if positions > max {
            return Err(ModelError::TooLong {
                needed: positions,
                max,
            });
        }
        if let Some(window) = spec.sliding_window.filter(|&w| positions > w) {
            return Err(ModelError::Invalid(format!(
                "the prompt and generation need {positions} positions, more than the config's sliding_window ({window}); sliding-window attention is not implemented"
            )));
        }
        self.backend.reset(positions)
    }

    /// Forgets the positions from `len` on: the next token goes to position `len`.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.backend.truncate(len)
    }

    /// Runs `tokens` at the next positions and returns their logits (`[rows, vocab]`).
    pub fn forward(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        let local = match self.whole_step(tokens, Want::Logits)? {
            Some(Decoded::Logits(local)) => local,
            _ => self.forward_local(tokens, which)?,
        };
        self.check_finite(&local)?;
        self.gather_logits(&local)
    }

    /// Fails when this rank's logits hold a NaN or an infinity (bad weights or config numbers
    /// would otherwise come out as text of NUL characters), naming the position.
    fn check_finite(&self, logits: &[f32]) -> Result<()> {
        if logits.iter().all(|v| v.is_finite()) {
            Ok(())
        } else {
            Err(ModelError::NonFinite {
                position: self.backend.position(),
            })
        }
    }

    /// Runs `tokens` at the next positions and returns the greedy choice after the last one. Over
    /// several ranks this is a distributed argmax: each rank sends only its best (logit, id).
    pub fn forward_argmax(&mut self, tokens: &[u32]) -> Result<u32> {
        let (value, id) = match self.whole_step(tokens, Want::Best)? {
            Some(Decoded::Best { value, id }) => (value, id),
            _ => {
                let local = self.forward_local(tokens, Logits::Last)?;
                self.row_best(&local)
            }
        };
        Ok(self.pick_best(&[(value, id)])?[0])
    }

    /// This rank's best `(logit, vocabulary id)` of one row of its logits; the logit is NaN where
    /// the row holds a value that is not finite ([`Engine::pick_best`] refuses it).
    fn row_best(&self, row: &[f32]) -> (f32, u32) {
        let i = crate::sampler::argmax(row);
        let value = if row.iter().all(|v| v.is_finite()) {
            row[i]
        } else {
            f32::NAN
        };
        (value, (self.backend.vocab_rows().start + i) as u32)
    }

    /// The greedy token of each row from every rank's best `(logit, id)` of it: each rank sends
    /// only those. A row whose best is not finite (on the device a NaN never wins, so a row of
    /// them gives no finite best) is an error.
    fn pick_best(&mut self, mine: &[(f32, u32)]) -> Result<Vec<u32>> {
        if mine.iter().any(|(v, _)| !v.is_finite()) {
            return Err(ModelError::NonFinite {
                position: self.backend.position(),
            });
        }
        // Ids are exact in f32 up to 2^24, far above any vocabulary.
        let flat: Vec<f32> = mine.iter().flat_map(|&(v, id)| [v, id as f32]).collect();
        let world = self.reduce.world();
        if world == 1 {
            return Ok(mine.iter().map(|&(_, id)| id).collect());
        }
        let mut all = vec![0.0f32; flat.len() * world];
        self.reduce.all_gather(&flat, &mut all)?;
        Ok((0..mine.len())
            .map(|row| {
                all.chunks_exact(flat.len())
                    .map(|rank| (rank[2 * row], rank[2 * row + 1] as u32))
                    .fold((u32::MAX, f32::NEG_INFINITY), |(bi, bv), (v, i)| {
                        if v > bv || (v == bv && i < bi) {
                            (i, v)
                        } else {
                            (bi, bv)
                        }
                    })
                    .0
            })
            .collect())
    }

    /// A decode token's whole step on the backend's device, where it runs one and no sum has to
    /// pass through the host; `None` otherwise (the engine drives the segments).
    fn whole_step(&mut self, tokens: &[u32], want: Want) -> Result<Option<Decoded>> {
        if tokens.len() != 1 || !self.steps_on_device() {
            return Ok(None);
        }
        self.check_tokens(tokens)?;
        self.backend.decode(tokens[0], want).map(Some)
    }

    /// Whether whole steps run on the backend's device: it runs them, and no sum has to pass
    /// through the host.
    fn steps_on_device(&self) -> bool {
        self.backend.decodes_whole_steps()
            && (self.reduce.world() == 1 || self.backend.sums_across_ranks())
    }

    /// Checks that `tokens` are in the vocabulary and fit in the KV cache.
    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let spec = self.backend.spec();
        let vocab = spec.vocab;
        if tokens.is_empty() {
            return Err(ModelError::Invalid("no tokens to run".into()));
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::TokenOutOfRange { id, vocab });
        }
        let needed = self.backend.position() + tokens.len();
        if needed > self.backend.capacity() {
            let max = spec.max_positions;
            return Err(if needed > max {
                ModelError::TooLong { needed, max }
            } else {
                ModelError::KvFull {
                    needed,
                    capacity: self.backend.capacity(),
                }
            });
        }
        Ok(())
    }

    /// This rank's logits (`[rows, vocab_rows.len()]`) for `tokens`.
    fn forward_local(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        self.check_tokens(tokens)?;
        let h = self.backend.spec().hidden;
        if which == Logits::Last && tokens.len() > PREFILL_CHUNK {
            // Only the last row is wanted: run the prompt in chunks to bound activation memory.
            let (head, tail) = tokens.split_at(tokens.len() - PREFILL_CHUNK);
            for chunk in head.chunks(PREFILL_CHUNK) {
                self.run_layers(chunk)?;
            }
            return self.forward_local(tail, which);
        }
        let x = self.run_layers(tokens)?;
        let rows = match which {
            Logits::All => &x[..],
            Logits::Last => &x[x.len() - h..],
        };
        let mut logits = vec![0.0f32; rows.len() / h * self.backend.vocab_rows().len()];
        self.backend.logits(rows, &mut logits)?;
        Ok(logits)
    }

    /// Every rank's slice of the logits put together: `[rows, vocab]`.
    fn gather_logits(&mut self, local: &[f32]) -> Result<Vec<f32>> {
        let world = self.reduce.world();
        // No rows (a step of prompt chunks only): every rank has none, so nothing to gather.
        if world == 1 || local.is_empty() {
            return Ok(local.to_vec());
        }
        let vocab = self.backend.spec().vocab;
        let chunk = vocab.div_ceil(world);
        let mine = self.backend.vocab_rows().len();
        let rows = local.len() / mine.max(1);
        // Equal-sized pieces for the all-gather: pad this rank's rows to `chunk`.
        let mut padded = vec![f32::NEG_INFINITY; rows * chunk];
        for (p, l) in padded
            .chunks_exact_mut(chunk)
            .zip(local.chunks_exact(mine.max(1)))
        {
            p[..mine].copy_from_slice(&l[..mine]);
        }
        let mut all = vec![0.0f32; world * rows * chunk];
        self.reduce.all_gather(&padded, &mut all)?;
        let mut logits = vec![0.0f32; rows * vocab];
        for (rank, piece) in all.chunks_exact(rows * chunk).enumerate() {
            let start = (rank * chunk).min(vocab);
            let n = ((rank + 1) * chunk).min(vocab) - start;
            for (row, p) in piece.chunks_exact(chunk).enumerate() {
                logits[row * vocab + start..row * vocab + start + n].copy_from_slice(&p[..n]);
            }
        }
        Ok(logits)
    }

    /// Runs one row per token of `tokens`, row `i` at position `rows[i].pos` of its own sequence
    /// in the paged KV cache ([`Backend::make_kv_pool`]), and returns the logits (`[sample.len(),
    /// vocab]`) of the rows `sample` lists. Rows of one sequence may share a step (a prompt
    /// chunk) in position order: each attends up to its own position.
    pub fn forward_paged(
        &mut self,
        tokens: &[u32],
        rows: &[PagedRow],
        sample: &[usize],
    ) -> Result<Vec<f32>> {
        let local = match self.paged_local(tokens, rows, sample, Want::Logits)? {
            Sampled::Logits(l) => l,
            Sampled::Best(_) => {
                return Err(ModelError::Invalid(
                    "a batched step returned greedy ids for logits".into(),
                ))
            }
        };
        self.check_finite(&local)?;
        self.gather_logits(&local)
    }

    /// [`Engine::forward_paged`], returning the greedy token of each sampled row instead of its
    /// logits (each rank's best of its own slice of the vocabulary is all that moves).
    pub fn forward_paged_greedy(
        &mut self,
        tokens: &[u32],
        rows: &[PagedRow],
        sample: &[usize],
    ) -> Result<Vec<u32>> {
        let best = match self.paged_local(tokens, rows, sample, Want::Best)? {
            Sampled::Best(b) => b,
            Sampled::Logits(local) => {
                let width = self.backend.vocab_rows().len().max(1);
                local
                    .chunks_exact(width)
                    .map(|r| self.row_best(r))
                    .collect()
            }
        };
        self.pick_best(&best)
    }

    /// This rank's part of a paged step's sampled rows: whole on the device where the backend
    /// runs such steps, else through the segments (then always logits).
    fn paged_local(
        &mut self,
        tokens: &[u32],
        rows: &[PagedRow],
        sample: &[usize],
        want: Want,
    ) -> Result<Sampled> {
        let vocab = self.backend.spec().vocab;
        if tokens.is_empty() || tokens.len() != rows.len() {
            return Err(ModelError::Invalid(format!(
                "a paged step of {} tokens and {} rows",
                tokens.len(),
                rows.len()
            )));
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::TokenOutOfRange { id, vocab });
        }
        if let Some(r) = rows
            .iter()
            .find(|r| r.pos >= r.blocks.len() * crate::kv_pool::BLOCK_POSITIONS)
        {
            return Err(ModelError::Invalid(format!(
                "position {} is beyond its sequence's {} blocks",
                r.pos,
                r.blocks.len()
            )));
        }
        if let Some(&i) = sample.iter().find(|&&i| i >= rows.len()) {
            return Err(ModelError::Invalid(format!(
                "row {i} to sample of a step of {} rows",
                rows.len()
            )));
        }
        if self.steps_on_device() {
            if let Some(out) = self.backend.step_paged(tokens, rows, sample, want)? {
                return Ok(out);
            }
        }
        let h = self.backend.spec().hidden;
        let x = self.run_layers_as(tokens, Some(rows))?;
        let picked: Vec<f32> = sample
            .iter()
            .flat_map(|&i| x[i * h..(i + 1) * h].iter().copied())
            .collect();
        let mut logits = vec![0.0f32; sample.len() * self.backend.vocab_rows().len()];
        if !sample.is_empty() {
            self.backend.logits(&picked, &mut logits)?;
        }
        Ok(Sampled::Logits(logits))
    }

    /// Embeds `tokens` and runs every layer; returns the final hidden states (before the norm).
    fn run_layers(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.run_layers_as(tokens, None)
    }

    /// [`Engine::run_layers`], the attention over the contiguous cache at the next positions, or
    /// over the paged cache at `paged`'s positions.
    fn run_layers_as(&mut self, tokens: &[u32], paged: Option<&[PagedRow]>) -> Result<Vec<f32>> {
        let (h, n_layers) = (self.backend.spec().hidden, self.backend.spec().n_layers);
        let mut x = vec![0.0f32; tokens.len() * h];
        let mut part = vec![0.0f32; x.len()];
        self.backend.embed(tokens, &mut x)?;
        let host_sum = !self.backend.sums_across_ranks();
        for layer in 0..n_layers {
            match paged {
                Some(rows) => self.backend.attention_paged(layer, &x, rows, &mut part)?,
                None => self.backend.attention(layer, &x, &mut part)?,
            }
            if host_sum {
                self.reduce.all_reduce_sum(&mut part, self.sum_dtype)?;
            }
            add_assign(&mut x, &part);
            let made = if tokens.len() == 1 || !host_sum {
                self.backend.ffn(layer, &x, &mut part)?;
                FfnPart::Sum
            } else {
                // Several rows may be dispatched to the experts' ranks (crate::backend::cpu::dispatch).
                self.backend
                    .ffn_routed(layer, &x, &mut part, &mut self.reduce)?
            };
            match made {
                FfnPart::Sum if host_sum => {
                    self.reduce.all_reduce_sum(&mut part, self.sum_dtype)?
                }
                FfnPart::Sum => {}
                FfnPart::OwnRows => gather_own_rows(&mut part, h, &mut self.reduce)?,
            }
            add_assign(&mut x, &part);
        }
        Ok(x)
    }
}
