//! [`Engine`]: the decoder loop, written once over any [`Backend`]: embed, then per layer the
//! attention segment, a reduce, the residual add, the FFN segment, a reduce, the residual add;
//! then the logits. Prefill passes the whole prompt at once; decode passes one token.

use shardline_tensor::kernels::add_assign;

use crate::backend::{Backend, Reduce};
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

pub struct Engine<B, R> {
    pub backend: B,
    pub reduce: R,
}

impl<B: Backend, R: Reduce> Engine<B, R> {
    pub fn new(backend: B, reduce: R) -> Self {
        Engine { backend, reduce }
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

    /// Runs `tokens` at the next positions and returns their logits (`[rows, vocab]`).
    pub fn forward(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        let spec = self.backend.spec();
        let (h, vocab) = (spec.hidden, spec.vocab);
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
                ModelError::Invalid(format!(
                    "the KV cache holds {} positions and {needed} are needed; start the sequence with a larger length",
                    self.backend.capacity()
                ))
            });
        }
        if which == Logits::Last && tokens.len() > PREFILL_CHUNK {
            // Only the last row is wanted: run the prompt in chunks to bound activation memory.
            let (head, tail) = tokens.split_at(tokens.len() - PREFILL_CHUNK);
            for chunk in head.chunks(PREFILL_CHUNK) {
                self.run_layers(chunk)?;
            }
            return self.forward(tail, which);
        }
        let x = self.run_layers(tokens)?;
        let rows = match which {
            Logits::All => &x[..],
            Logits::Last => &x[x.len() - h..],
        };
        let mut logits = vec![0.0f32; rows.len() / h * vocab];
        self.backend.logits(rows, &mut logits)?;
        Ok(logits)
    }

    /// Embeds `tokens` and runs every layer; returns the final hidden states (before the norm).
    fn run_layers(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let (h, n_layers) = (self.backend.spec().hidden, self.backend.spec().n_layers);
        let mut x = vec![0.0f32; tokens.len() * h];
        let mut part = vec![0.0f32; x.len()];
        self.backend.embed(tokens, &mut x)?;
        for layer in 0..n_layers {
            self.backend.attention(layer, &x, &mut part)?;
            self.reduce.all_reduce_sum(&mut part)?;
            add_assign(&mut x, &part);
            self.backend.ffn(layer, &x, &mut part)?;
            self.reduce.all_reduce_sum(&mut part)?;
            add_assign(&mut x, &part);
        }
        Ok(x)
    }
}
