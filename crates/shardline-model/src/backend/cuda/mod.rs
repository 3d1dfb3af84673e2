//! [`CudaBackend`]: the model on an NVIDIA GPU through `shardline-cuda`. A decode token runs as
//! one whole step on the device ([`LayerStack::decode`]: embedding, every layer, final norm,
//! logits and argmax, replayed as one CUDA graph); several tokens at once (a prompt) run through
//! [`Prefill`]'s cuBLAS GEMMs segment by segment, on the same KV caches. With an NCCL communicator
//! ([`CudaBackend::set_device_comm`]) the segments' partial sums are summed across the ranks on the
//! GPUs; without one, over several ranks, decode too goes segment by segment through the host's
//! all-reduce.

mod stack;

use shardline_cuda::nccl::DeviceComm;
use shardline_cuda::CudaDevice;

use shardline_tensor::kernels::embedding;
use shardline_tensor::{DType, Tensor};
use stack::{
    BatchStep, DeviceEmbedding, DeviceHead, DeviceLayer, FfnShape, HostFfn, HostLayerWeights,
    HostMlp, KvPlace, LayerShape, LayerStack, PagedKv, Prefill,
};

use crate::backend::{Backend, Decoded, PagedRow, Sampled, SumDType, Want};
use crate::config::ModelSpec;
use crate::error::{ModelError, Result};
use crate::layer::{Exec, FfnWeights, Layer, Mlp};
use crate::load::ModelWeights;
use crate::progress::Step;
use crate::weights::Weight;

/// One rank's weights and KV caches on a GPU.
pub struct CudaBackend {
    spec: ModelSpec,
    dev: CudaDevice,
    stack: LayerStack,
    /// The embedding table stays on the host (one row is read per token).
    embed: Weight,
    weight_dtype: DType,
    vocab_rows: std::ops::Range<usize>,
    position: usize,
    /// Positions the device KV caches hold (fixed when the backend is made).
    capacity: usize,
    /// Prefill's kernels, cuBLAS handle and buffers, made at the first segment of several rows.
    prefill: Option<Prefill>,
    /// The KV cache that batched steps share ([`Backend::make_kv_pool`]).
    paged: Option<PagedKv>,
    /// Whole batched steps' kernels, buffers and graphs, made at the first one.
    batch: Option<BatchStep>,
    exec: Exec,
    /// Ranks the weights are split over.
    world: usize,
}

/// The bytes of `w` as `dtype` (converted when the model mixes dtypes within a layer).
fn bytes_as(w: &Weight, dtype: DType) -> Result<Vec<u8>> {
    let v = w.view();
    if v.dtype() == dtype {
        return Ok(v.bytes().to_vec());
    }
    Tensor::from_f32(dtype, v.shape().clone(), &v.to_f32_vec())
        .map(|t| t.bytes().to_vec())
        .map_err(|e| ModelError::Invalid(e.to_string()))
}

/// The dtype weights of `dtype` are uploaded in: their own, or bf16 for a quantized block
/// format (the GPU kernels read float weights; quantized ones are dequantized on the way).
fn device_dtype(dtype: DType) -> DType {
    if dtype.is_quantized() {
        DType::BF16
    } else {
        dtype
    }
}

/// The dtype a layer is uploaded in: its weights' dtype, or f32 where they differ.
fn layer_dtype(layer: &Layer) -> DType {
    let a = &layer.attn;
    let mut dtypes = vec![a.q.dtype(), a.k.dtype(), a.v.dtype(), a.o.dtype()];
    let mlps: Vec<&Mlp> = match &layer.ffn {
        FfnWeights::Dense(m) => vec![m],
        FfnWeights::Moe(moe) => {
            dtypes.push(moe.router.dtype());
            if let Some((_, g)) = &moe.shared {
                dtypes.push(g.dtype());
            }
            moe.experts
                .iter()
                .flatten()
                .chain(moe.shared.as_ref().map(|(m, _)| m))
                .collect()
        }
    };
    dtypes.extend(
        mlps.iter()
            .flat_map(|m| [m.gate_up.dtype(), m.down.dtype()]),
    );
    if dtypes.iter().all(|d| *d == dtypes[0]) {
        device_dtype(dtypes[0])
    } else if dtypes.iter().all(|d| d.is_quantized() || *d == DType::BF16) {
        DType::BF16
    } else {
        DType::F32
    }
}

/// Copies one layer to the device in the kernels' layout.
fn upload_layer(
    dev: &CudaDevice,
    shape: &LayerShape,
    layer: &Layer,
    index: usize,
) -> Result<DeviceLayer> {
    let dtype = layer_dtype(layer);
    let a = &layer.attn;
    if a.o_bias.is_some() {
        return Err(ModelError::Invalid(format!(
            "layer {index}: an o_proj bias is not supported on the GPU yet"
        )));
    }
    let mut qkv = bytes_as(&a.q, dtype)?;
    qkv.extend(bytes_as(&a.k, dtype)?);
    qkv.extend(bytes_as(&a.v, dtype)?);
    let qkv_bias: Option<Vec<f32>> = a.qkv_bias.as_ref().map(|b| b.concat());
    let o = bytes_as(&a.o, dtype)?;
    let mlp_bytes = |mlps: &[&Mlp]| -> Result<(Vec<u8>, Vec<u8>)> {
        let (mut gu, mut d) = (Vec::new(), Vec::new());
        for m in mlps {
            gu.extend(bytes_as(&m.gate_up, dtype)?);
            d.extend(bytes_as(&m.down, dtype)?);
        }
        Ok((gu, d))
    };
    let (ffn_shape, experts, router, shared) = match &layer.ffn {
        FfnWeights::Dense(m) => (
            FfnShape::Dense {
                intermediate: m.intermediate,
            },
            mlp_bytes(&[m])?,
            None,
            None,
        ),
        FfnWeights::Moe(moe) => {
            // With expert parallelism only this rank's experts are here: say which.
            let held: Vec<usize> = (0..moe.experts.len())
                .filter(|&e| moe.experts[e].is_some())
                .collect();
            let experts: Vec<&Mlp> = moe.experts.iter().flatten().collect();
            let intermediate = experts.first().map_or(0, |m| m.intermediate);
            if experts.iter().any(|m| m.intermediate != intermediate) {
                return Err(ModelError::Invalid(format!(
                    "layer {index}: experts of different sizes are not supported on the GPU"
                )));
            }
            let shared = moe
                .shared
                .as_ref()
                .map(|(m, g)| {
                    Ok::<_, ModelError>((mlp_bytes(&[m])?, bytes_as(g, dtype)?, m.intermediate))
                })
                .transpose()?;
            (
                FfnShape::Moe {
                    n_experts: moe.experts.len(),
                    top_k: moe.top_k,
                    intermediate,
                    renormalize: moe.renormalize,
                    shared_intermediate: shared.as_ref().map(|s| s.2),
                },
                mlp_bytes(&experts)?,
                Some((
                    bytes_as(&moe.router, dtype)?,
                    (held.len() < moe.experts.len()).then_some(held),
                )),
                shared,
            )
        }
    };
    let experts_host = HostMlp {
        gate_up: &experts.0,
        down: &experts.1,
    };
    let ffn = match &router {
        Some((router, held)) => HostFfn::Moe {
            router,
            experts: experts_host,
            held: held.as_deref(),
            shared: shared.as_ref().map(|((gu, d), g, _)| {
                (
                    HostMlp {
                        gate_up: gu,
                        down: d,
                    },
                    g.as_slice(),
                )
            }),
        },
        None => HostFfn::Dense(experts_host),
    };
    let (q_norm, k_norm) = match &a.qk_norm {
        Some([q, k]) => (Some(q.as_slice()), Some(k.as_slice())),
        None => (None, None),
    };
    let host = HostLayerWeights {
        attn_norm: &a.input_norm,
        qkv: &qkv,
        qkv_bias: qkv_bias.as_deref(),
        o: &o,
        q_norm,
        k_norm,
        ffn_norm: &layer.post_norm,
        ffn,
    };
    DeviceLayer::upload(dev, shape, &ffn_shape, dtype, &host)
        .map_err(|e| ModelError::Invalid(format!("layer {index}: GPU: {e}")))
}

/// The GPU attention geometry of `spec`, with KV caches of `capacity` positions.
fn layer_shape(spec: &ModelSpec, capacity: usize) -> LayerShape {
    LayerShape {
        hidden: spec.hidden,
        n_heads: spec.n_heads,
        n_kv_heads: spec.n_kv_heads,
        head_dim: spec.head_dim,
        qk_norm: spec.qk_norm,
        qkv_bias: spec.qkv_bias,
        eps: spec.rms_eps,
        capacity,
    }
}

impl CudaBackend {
    /// Uploads `weights` (the whole model, or one rank's slices of it) to GPU `ordinal`, with KV
    /// caches for `capacity` positions.
    pub fn new(
        spec: ModelSpec,
        weights: ModelWeights,
        ordinal: usize,
        capacity: usize,
    ) -> Result<CudaBackend> {
        let dev = CudaDevice::open(ordinal)?;
        let capacity = capacity.clamp(1, spec.max_positions.max(1));
        // The weights may be one rank's slices (tensor parallelism): its head counts are theirs.
        let mut shape = layer_shape(&spec, capacity);
        if let Some(first) = weights.layers.first() {
            shape.n_heads = first.attn.n_heads;
            shape.n_kv_heads = first.attn.n_kv_heads;
        }
        let step = Step::begin("uploading layers", weights.layers.len() as u64);
        let layers = weights
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let layer = upload_layer(&dev, &shape, l, i);
                step.advance();
                layer
            })
            .collect::<Result<Vec<_>>>()?;
        drop(step);
        let embed_dtype = device_dtype(weights.embed.dtype());
        let embedding = DeviceEmbedding::upload(
            &dev,
            spec.hidden,
            &bytes_as(&weights.embed, embed_dtype)?,
            embed_dtype,
        )?;
        let lm_head = weights.lm_head();
        let head_dtype = device_dtype(lm_head.dtype());
        let head = DeviceHead::upload(
            &dev,
            spec.hidden,
            &weights.final_norm,
            &bytes_as(lm_head, head_dtype)?,
            head_dtype,
        )?;
        let inv_freq = crate::rope::inv_freq(&spec);
        let stack = LayerStack::new(&dev, shape, &inv_freq, layers, embedding, head)?;
        let weight_dtype = weights.layers.first().map_or(DType::F32, layer_dtype);
        Ok(CudaBackend {
            spec,
            dev,
            stack,
            embed: weights.embed,
            weight_dtype,
            vocab_rows: weights.vocab_rows.clone(),
            position: 0,
            capacity,
            prefill: None,
            paged: None,
            batch: None,
            exec: Exec::Split,
            world: weights.plan.world(),
        })
    }

    /// The GPU's name.
    pub fn device_name(&self) -> &str {
        self.dev.name()
    }

    /// The GPU this backend runs on.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// Sums the segments' outputs across the ranks of `comm` on the GPU from now on (a
    /// collective: every rank of `comm` calls it).
    pub fn set_device_comm(&mut self, comm: DeviceComm) -> Result<()> {
        if comm.world() != self.world {
            return Err(ModelError::Invalid(format!(
                "a communicator of {} ranks for weights split over {}",
                comm.world(),
                self.world
            )));
        }
        Ok(self.stack.set_comm(&self.dev, comm)?)
    }

    /// Replays whole decode steps as one graph (the default) or launches and waits op by op.
    pub fn set_exec(&mut self, exec: Exec) {
        self.exec = exec;
    }

    /// Whether the decode step's graph holds the NCCL all-reduces (`None`: no communicator, or
    /// no step yet).
    pub fn comm_in_graph(&self) -> Option<bool> {
        self.stack.comm_in_graph()
    }

    fn rows<'a>(&self, x: &'a [f32]) -> std::slice::ChunksExact<'a, f32> {
        x.chunks_exact(self.spec.hidden)
    }
}

/// Prefill's state in `slot`, made on first use.
fn prefill_state<'a>(slot: &'a mut Option<Prefill>, dev: &CudaDevice) -> Result<&'a mut Prefill> {
    Ok(match slot {
        Some(p) => p,
        empty => empty.insert(Prefill::new(dev)?),
    })
}

impl Backend for CudaBackend {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn weight_dtype(&self) -> DType {
        self.weight_dtype
    }

    fn position(&self) -> usize {
        self.position
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn reset(&mut self, capacity: usize) -> Result<()> {
        if capacity > self.capacity {
            return Err(ModelError::KvFull {
                needed: capacity,
                capacity: self.capacity,
            });
        }
        self.position = 0;
        Ok(())
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.position {
            return Err(ModelError::Invalid(format!(
                "cannot truncate the KV cache to {len} positions: it holds {}",
                self.position
            )));
        }
        self.position = len;
        Ok(())
    }

    fn decodes_whole_steps(&self) -> bool {
        true
    }

    fn decode(&mut self, token: u32, want: Want) -> Result<Decoded> {
        if token as usize >= self.spec.vocab {
            return Err(ModelError::TokenOutOfRange {
                id: token,
                vocab: self.spec.vocab,
            });
        }
        if self.position >= self.capacity {
            return Err(ModelError::KvFull {
                needed: self.position + 1,
                capacity: self.capacity,
            });
        }
        let dev = &self.dev;
        self.stack.decode(dev, token, self.position, self.exec)?;
        let out = match want {
            Want::Best => {
                let (value, row) = self.stack.best(dev)?;
                Decoded::Best {
                    value,
                    id: self.vocab_rows.start as u32 + row,
                }
            }
            Want::Logits => Decoded::Logits(self.stack.vocab_logits(dev)?),
        };
        self.position += 1;
        Ok(out)
    }

    fn step_paged(
        &mut self,
        tokens: &[u32],
        rows: &[PagedRow],
        sample: &[usize],
        want: Want,
    ) -> Result<Option<Sampled>> {
        if self.exec == Exec::PerOp {
            // Op by op: the engine drives the segments (each waited for).
            return Ok(None);
        }
        let pool = self.paged.as_ref().ok_or_else(|| {
            ModelError::Invalid("a paged step before the paged KV cache was made".into())
        })?;
        let batch = match &mut self.batch {
            Some(b) => b,
            empty => empty.insert(BatchStep::new(
                &self.dev,
                &self.stack,
                self.spec.max_positions,
            )?),
        };
        let out = batch.run(&self.dev, &mut self.stack, pool, tokens, rows, sample, want)?;
        Ok(Some(match out {
            Sampled::Best(best) => {
                // The kernels number this rank's slice of the vocabulary from 0.
                let start = self.vocab_rows.start as u32;
                Sampled::Best(best.into_iter().map(|(v, i)| (v, start + i)).collect())
            }
            logits => logits,
        }))
    }

    fn embed(&self, tokens: &[u32], out: &mut [f32]) -> Result<()> {
        for (t, row) in tokens.iter().zip(out.chunks_exact_mut(self.spec.hidden)) {
            embedding(&self.embed.view(), *t as usize, row);
        }
        Ok(())
    }

    fn attention(&mut self, layer: usize, x: &[f32], out: &mut [f32]) -> Result<()> {
        let h = self.spec.hidden;
        if x.len() > h {
            prefill_state(&mut self.prefill, &self.dev)?.attention(
                &self.dev,
                &self.stack,
                layer,
                KvPlace::Next(self.position),
                x,
                out,
            )?;
        } else {
            for (t, (xr, or)) in self.rows(x).zip(out.chunks_exact_mut(h)).enumerate() {
                self.stack.set_position(&self.dev, self.position + t)?;
                self.stack.attention(&self.dev, layer, xr, or)?;
            }
        }
        // The last layer's attention has appended every row: the positions are taken.
        if layer + 1 == self.spec.n_layers {
            self.position += x.len() / h;
        }
        Ok(())
    }

    fn make_kv_pool(&mut self, blocks: usize, dtype: DType) -> Result<()> {
        // The old pool goes first, so that its memory counts for the new one.
        self.paged = None;
        let (layers, kv_dim) = (self.spec.n_layers, self.stack.kv_dim());
        self.paged = Some(PagedKv::new(&self.dev, layers, kv_dim, blocks, dtype)?);
        Ok(())
    }

    fn attention_paged(
        &mut self,
        layer: usize,
        x: &[f32],
        rows: &[PagedRow],
        out: &mut [f32],
    ) -> Result<()> {
        let pool = self.paged.as_ref().ok_or_else(|| {
            ModelError::Invalid("a paged step before the paged KV cache was made".into())
        })?;
        Ok(prefill_state(&mut self.prefill, &self.dev)?.attention(
            &self.dev,
            &self.stack,
            layer,
            KvPlace::Paged(pool, rows),
            x,
            out,
        )?)
    }

    fn ffn(&mut self, layer: usize, x: &[f32], out: &mut [f32]) -> Result<()> {
        let h = self.spec.hidden;
        if x.len() > h {
            return Ok(prefill_state(&mut self.prefill, &self.dev)?.ffn(
                &self.dev,
                &self.stack,
                layer,
                x,
                out,
            )?);
        }
        for (xr, or) in self.rows(x).zip(out.chunks_exact_mut(h)) {
            self.stack.ffn(&self.dev, layer, xr, or)?;
        }
        Ok(())
    }

    /// With a communicator, every path of `attention` and `ffn` returns the sum over the ranks
    /// (the stack all-reduces each segment before its output is copied to the host).
    fn sums_across_ranks(&self) -> bool {
        self.stack.comm().is_some()
    }

    fn set_sum_dtype(&mut self, dtype: SumDType) -> Result<()> {
        let dtype = match dtype {
            SumDType::F32 => DType::F32,
            SumDType::BF16 => DType::BF16,
            SumDType::F16 => DType::F16,
        };
        Ok(self.stack.set_sum_dtype(&self.dev, dtype)?)
    }

    fn vocab_rows(&self) -> std::ops::Range<usize> {
        self.vocab_rows.clone()
    }

    fn logits(&mut self, x: &[f32], out: &mut [f32]) -> Result<()> {
        if x.len() > self.spec.hidden {
            // Several rows (a batch): the lm_head is read once for all of them.
            let prefill = prefill_state(&mut self.prefill, &self.dev)?;
            return Ok(prefill.logits(&self.dev, &self.stack, x, out)?);
        }
        let vocab = self.vocab_rows.len();
        for (xr, or) in x
            .chunks_exact(self.spec.hidden)
            .zip(out.chunks_exact_mut(vocab))
        {
            let logits = self.stack.logits(&self.dev, xr)?;
            or.copy_from_slice(&logits);
        }
        Ok(())
    }
}
