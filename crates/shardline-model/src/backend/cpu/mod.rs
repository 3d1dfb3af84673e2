//! [`CpuBackend`]: the segments run on the host with `shardline-tensor`'s kernels.

mod attention;
pub mod dispatch;
mod ffn;
mod paged;

use shardline_tensor::kernels::{embedding, rms_norm, KvCache, Rope};
use shardline_tensor::DType;

use crate::backend::{Backend, FfnPart, PagedRow, Reduce};
use crate::config::ModelSpec;
use crate::error::Result;
use crate::layer::{linear, Exec};
use crate::load::ModelWeights;

/// One rank's weights and KV caches in host memory.
pub struct CpuBackend {
    spec: ModelSpec,
    weights: ModelWeights,
    caches: Vec<KvCache>,
    /// The paged KV cache of every layer (batched serving), once made.
    paged: Vec<paged::PagedLayer>,
    rope: Rope,
    exec: Exec,
}

impl CpuBackend {
    /// A backend over `weights` with an empty KV cache of `capacity` positions.
    pub fn new(spec: ModelSpec, weights: ModelWeights, capacity: usize) -> CpuBackend {
        let mut b = CpuBackend {
            rope: rope_table(&spec, 0),
            caches: Vec::new(),
            paged: Vec::new(),
            spec,
            weights,
            exec: Exec::default(),
        };
        b.make_room(capacity);
        b
    }

    /// Submits decode matvecs per segment (the default) or one at a time.
    pub fn set_exec(&mut self, exec: Exec) {
        self.exec = exec;
    }

    fn make_room(&mut self, capacity: usize) {
        let s = &self.spec;
        if self.rope.max_positions() < capacity {
            self.rope = rope_table(s, capacity);
        }
        if self.caches.first().is_none_or(|c| c.capacity() < capacity) {
            self.caches = self
                .weights
                .layers
                .iter()
                .map(|l| KvCache::new(l.attn.n_kv_heads, s.head_dim, capacity))
                .collect();
        }
        self.caches.iter_mut().for_each(KvCache::clear);
    }
}

/// Rope tables for `positions` positions.
fn rope_table(spec: &ModelSpec, positions: usize) -> Rope {
    Rope::from_inv_freq(&crate::rope::inv_freq(spec), positions)
}

impl Backend for CpuBackend {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn weight_dtype(&self) -> DType {
        let w = &self.weights;
        let mut dtypes = vec![w.embed.dtype(), w.lm_head().dtype()];
        for l in &w.layers {
            dtypes.extend([l.attn.q.dtype(), l.attn.o.dtype()]);
        }
        dtypes
            .into_iter()
            .max_by_key(|d| match d {
                DType::F32 => 0,
                DType::F16 => 1,
                DType::BF16 => 2,
                DType::Quant(_) => 3,
            })
            .unwrap_or(DType::F32)
    }

    fn position(&self) -> usize {
        self.caches.first().map_or(0, KvCache::len)
    }

    fn capacity(&self) -> usize {
        // A model without layers has no cache to fill: any length fits.
        self.caches.first().map_or(usize::MAX, KvCache::capacity)
    }

    fn reset(&mut self, capacity: usize) -> Result<()> {
        self.make_room(capacity);
        Ok(())
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        let position = self.position();
        if len > position {
            return Err(crate::ModelError::Invalid(format!(
                "cannot truncate the KV cache to {len} positions: it holds {position}"
            )));
        }
        self.caches.iter_mut().for_each(|c| c.truncate(len));
        Ok(())
    }

    fn embed(&self, tokens: &[u32], out: &mut [f32]) -> Result<()> {
        let h = self.spec.hidden;
        for (t, row) in tokens.iter().zip(out.chunks_exact_mut(h)) {
            embedding(&self.weights.embed.view(), *t as usize, row);
        }
        Ok(())
    }

    fn attention(&mut self, layer: usize, x: &[f32], out: &mut [f32]) -> Result<()> {
        let cache = &mut self.caches[layer];
        self.weights.layers[layer].attention_forward(x, cache, &self.rope, self.exec, out);
        Ok(())
    }

    fn make_kv_pool(&mut self, blocks: usize, dtype: DType) -> Result<()> {
        let refused = || {
            crate::ModelError::Unsupported(format!(
                "a {dtype} KV cache on the CPU (it holds f32, bf16 or f16)"
            ))
        };
        if self.spec.head_dim > paged::MAX_HEAD_DIM {
            return Err(crate::ModelError::Unsupported(format!(
                "a paged KV cache for heads of {} values on the CPU (at most {})",
                self.spec.head_dim,
                paged::MAX_HEAD_DIM
            )));
        }
        let positions = (blocks * crate::kv_pool::BLOCK_POSITIONS).min(self.spec.max_positions);
        if self.rope.max_positions() < positions {
            self.rope = rope_table(&self.spec, positions);
        }
        self.paged = self
            .weights
            .layers
            .iter()
            .map(|l| {
                paged::PagedLayer::new(blocks, l.attn.n_kv_heads, self.spec.head_dim, dtype)
                    .ok_or_else(refused)
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    fn attention_paged(
        &mut self,
        layer: usize,
        x: &[f32],
        rows: &[PagedRow],
        out: &mut [f32],
    ) -> Result<()> {
        let reach = self.rope.max_positions();
        if let Some(row) = rows.iter().find(|r| r.pos >= reach) {
            return Err(crate::ModelError::TooLong {
                needed: row.pos + 1,
                max: reach,
            });
        }
        let cache = self
            .paged
            .get_mut(layer)
            .ok_or_else(|| crate::ModelError::Invalid("the paged KV cache was not made".into()))?;
        let l = &self.weights.layers[layer];
        l.attn
            .forward_paged(x, rows, l.rms_eps, cache, &self.rope, self.exec, out);
        Ok(())
    }

    fn ffn(&mut self, layer: usize, x: &[f32], out: &mut [f32]) -> Result<()> {
        self.weights.layers[layer].ffn_forward(x, self.exec, out);
        Ok(())
    }

    /// With the experts split into groups over several ranks, the rows are dispatched to the
    /// ranks that hold their experts (see [`dispatch`]).
    fn ffn_routed(
        &mut self,
        layer: usize,
        x: &[f32],
        out: &mut [f32],
        ranks: &mut dyn Reduce,
    ) -> Result<FfnPart> {
        let plan = &self.weights.plan;
        if plan.ep() > 1 && ranks.world() > 1 {
            return self.weights.layers[layer].ffn_forward_dispatched(x, out, plan, ranks);
        }
        self.ffn(layer, x, out)?;
        Ok(FfnPart::Sum)
    }

    fn vocab_rows(&self) -> std::ops::Range<usize> {
        self.weights.vocab_rows.clone()
    }

    fn logits(&mut self, x: &[f32], out: &mut [f32]) -> Result<()> {
        let mut xn = vec![0.0f32; x.len()];
        rms_norm(x, &self.weights.final_norm, self.spec.rms_eps, &mut xn);
        let rows = x.len() / self.spec.hidden;
        linear(&self.weights.lm_head().view(), &xn, rows, out);
        Ok(())
    }
}
