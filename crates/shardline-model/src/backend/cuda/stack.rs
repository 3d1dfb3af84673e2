//! Batch-1 decode layers of an MoE or dense transformer on the GPU, run as two segments each,
//! between a token's embedding and its logits.
//!
//! Segment "attention": rms_norm -> qkv (+bias) -> attention with (q/k norm) rope and the KV
//! append fused in -> o_proj. Segment "ffn": rms_norm -> router -> top-k on the device -> chosen
//! experts' gate/up with SwiGLU fused -> their down projections -> weighted sum (+ a
//! sigmoid-gated shared expert). A dense FFN is the same path with one always-chosen expert. The
//! chosen experts never go back to the host, so the segments are captured once as CUDA graphs
//! and replayed.
//!
//! A [`LayerStack`] runs layers two ways: a whole decode step on the device
//! ([`LayerStack::decode`]: the token's embedding, every layer with the residual adds fused, the
//! final norm, the logits and their argmax, replayed as one CUDA graph), or one segment at a time
//! returning its partial sum to the host ([`LayerStack::attention`], [`LayerStack::ffn`]), where
//! the engine adds residuals and all-reduces across ranks through the host. With a [`DeviceComm`]
//! ([`LayerStack::set_comm`]) each segment's partial sum is all-reduced on the device by NCCL: in
//! `decode`, inside the step's graph where the capture takes it (else between the segments' graph
//! launches); in `attention`/`ffn`, before the copy to the host.

use shardline_cuda::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use shardline_cuda::cudarc::driver::{CudaGraph, CudaSlice};
use shardline_tensor::DType;

use shardline_cuda::device::dptr;
use shardline_cuda::error::DriverContext;
use shardline_cuda::nccl::DeviceComm;
use shardline_cuda::ops::{self, AttentionDims, KvRows, SharedExpert, Slots, Weights};
use shardline_cuda::{CudaDevice, CudaError};

use crate::kv_pool::BLOCK_POSITIONS;
use crate::layer::Exec;

mod batch;
mod paged;
mod prefill;
pub use batch::BatchStep;
pub use paged::PagedKv;
pub use prefill::{KvPlace, Prefill};

/// Captures what `enqueue` queues on the device's stream as a graph, ready to launch.
fn capture_graph(
    dev: &CudaDevice,
    enqueue: impl FnOnce() -> Result<(), CudaError>,
) -> Result<CudaGraph, CudaError> {
    let stream = dev.stream();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .during("starting a graph capture")?;
    let queued = enqueue();
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .during("ending a graph capture")?;
    queued?;
    let graph = graph.ok_or_else(|| CudaError::Shape("captured an empty graph".into()))?;
    graph.upload().during("uploading a graph")?;
    Ok(graph)
}

/// The attention geometry, shared by every layer of a stack.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerShape {
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Per-head RMSNorm of q and k before rope (Qwen3).
    pub qk_norm: bool,
    /// Biases on q, k and v (Qwen2).
    pub qkv_bias: bool,
    pub eps: f32,
    /// Positions the KV cache holds.
    pub capacity: usize,
}

/// The FFN of one layer.
#[derive(Clone, Debug, PartialEq)]
pub enum FfnShape {
    Moe {
        n_experts: usize,
        top_k: usize,
        /// Intermediate size of one expert.
        intermediate: usize,
        /// Renormalise the top-k router weights to sum to one (Mixtral, Qwen3).
        renormalize: bool,
        /// Intermediate size of a sigmoid-gated shared expert (Qwen2-MoE).
        shared_intermediate: Option<usize>,
    },
    Dense {
        intermediate: usize,
    },
}

impl FfnShape {
    /// Experts chosen per token (1 for a dense FFN).
    fn slots(&self) -> usize {
        match self {
            FfnShape::Moe { top_k, .. } => *top_k,
            FfnShape::Dense { .. } => 1,
        }
    }

    fn intermediate(&self) -> usize {
        match self {
            FfnShape::Moe { intermediate, .. } | FfnShape::Dense { intermediate } => *intermediate,
        }
    }

    fn experts(&self) -> usize {
        match self {
            FfnShape::Moe { n_experts, .. } => *n_experts,
            FfnShape::Dense { .. } => 1,
        }
    }
}

impl LayerShape {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Rows of the merged `[q; k; v]` projection.
    pub fn qkv_rows(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }

    fn attention_dims(&self) -> AttentionDims {
        AttentionDims {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            capacity: self.capacity,
        }
    }

    /// Checks what the kernels require, naming the offending setting.
    pub fn validate(&self, ffn: &FfnShape) -> Result<(), CudaError> {
        let bad = |m: String| Err(CudaError::Shape(m));
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} heads are not a multiple of {} KV heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0
            || !self.head_dim.is_multiple_of(2)
            || self.head_dim > ops::MAX_HEAD_DIM
        {
            return bad(format!(
                "head_dim {} must be even and at most {}",
                self.head_dim,
                ops::MAX_HEAD_DIM
            ));
        }
        if let FfnShape::Moe {
            n_experts, top_k, ..
        } = ffn
        {
            if *top_k == 0 || top_k > n_experts || *n_experts > 1024 {
                return bad(format!(
                    "top_k {top_k} of {n_experts} experts (at most 1024 experts)"
                ));
            }
        }
        if self.capacity == 0 || self.hidden == 0 || ffn.intermediate() == 0 {
            return bad("hidden, intermediate and KV capacity must be non-zero".into());
        }
        Ok(())
    }
}

/// A SwiGLU MLP's weights on the host: `[2 * intermediate, hidden]` gate rows then up rows, and
/// `[hidden, intermediate]`; for routed experts, `n_experts` of each back to back.
pub struct HostMlp<'a> {
    pub gate_up: &'a [u8],
    pub down: &'a [u8],
}

/// One layer's FFN weights on the host.
pub enum HostFfn<'a> {
    Moe {
        /// `[n_experts, hidden]`
        router: &'a [u8],
        /// The experts this rank holds, back to back.
        experts: HostMlp<'a>,
        /// Which experts those are (expert parallelism); `None`: all of them, in order.
        held: Option<&'a [usize]>,
        /// The shared expert and its `[1, hidden]` gate.
        shared: Option<(HostMlp<'a>, &'a [u8])>,
    },
    Dense(HostMlp<'a>),
}

/// One layer's weights in the kernels' layout, on the host (little-endian bytes of the weight
/// dtype; norms and biases in f32). Used to upload real or test weights.
pub struct HostLayerWeights<'a> {
    pub attn_norm: &'a [f32],
    /// `[q_dim + 2 * kv_dim, hidden]`, rows of q, then k, then v.
    pub qkv: &'a [u8],
    /// `[q_dim + 2 * kv_dim]`, when the shape has `qkv_bias`.
    pub qkv_bias: Option<&'a [f32]>,
    /// `[hidden, q_dim]`
    pub o: &'a [u8],
    /// `[head_dim]` each, when the shape has `qk_norm`.
    pub q_norm: Option<&'a [f32]>,
    pub k_norm: Option<&'a [f32]>,
    pub ffn_norm: &'a [f32],
    pub ffn: HostFfn<'a>,
}

/// A SwiGLU MLP (or a set of routed experts) on the device.
struct DeviceMlp {
    gate_up: CudaSlice<u8>,
    down: CudaSlice<u8>,
}

enum DeviceFfn {
    Moe {
        router: CudaSlice<u8>,
        experts: DeviceMlp,
        /// Expert number -> index among the held experts, or -1 (expert parallelism).
        expert_map: Option<CudaSlice<i32>>,
        shared: Option<Box<(DeviceMlp, CudaSlice<u8>)>>,
    },
    Dense(DeviceMlp),
}

/// One layer's weights and KV cache on the device.
pub struct DeviceLayer {
    dtype: DType,
    ffn_shape: FfnShape,
    attn_norm: CudaSlice<f32>,
    qkv: CudaSlice<u8>,
    qkv_bias: Option<CudaSlice<f32>>,
    o: CudaSlice<u8>,
    q_norm: Option<CudaSlice<f32>>,
    k_norm: Option<CudaSlice<f32>>,
    ffn_norm: CudaSlice<f32>,
    ffn: DeviceFfn,
    k_cache: CudaSlice<f32>,
    v_cache: CudaSlice<f32>,
}

/// Expert number -> index among `held`, or -1, on the device.
fn expert_map(
    dev: &CudaDevice,
    held: &[usize],
    n_experts: usize,
) -> Result<CudaSlice<i32>, CudaError> {
    let mut map = vec![-1i32; n_experts];
    for (local, &e) in held.iter().enumerate() {
        let slot = map
            .get_mut(e)
            .ok_or_else(|| CudaError::Shape(format!("held expert {e} of {n_experts}")))?;
        *slot = local as i32;
    }
    dev.upload(&map)
}

/// Checks that `got` bytes are what `name` needs.
fn check_len(name: &str, got: usize, want: usize) -> Result<(), CudaError> {
    if got == want {
        Ok(())
    } else {
        Err(CudaError::Shape(format!(
            "{name}: {got} bytes given, the shape needs {want}"
        )))
    }
}

impl DeviceLayer {
    /// A layer holding copies of `w`, with an empty KV cache.
    pub fn upload(
        dev: &CudaDevice,
        shape: &LayerShape,
        ffn: &FfnShape,
        dtype: DType,
        w: &HostLayerWeights,
    ) -> Result<DeviceLayer, CudaError> {
        shape.validate(ffn)?;
        let (h, es) = (shape.hidden, dtype.size_in_bytes());
        check_len("qkv", w.qkv.len(), shape.qkv_rows() * h * es)?;
        check_len("o_proj", w.o.len(), h * shape.q_dim() * es)?;
        check_len("attn_norm", w.attn_norm.len() * 4, h * 4)?;
        check_len("ffn_norm", w.ffn_norm.len() * 4, h * 4)?;
        let optional = |v: Option<&[f32]>, wanted: bool, len: usize, name: &str| match (wanted, v) {
            (true, Some(v)) => {
                check_len(name, v.len() * 4, len * 4)?;
                dev.upload(v).map(Some)
            }
            (false, None) => Ok(None),
            _ => Err(CudaError::Shape(format!(
                "{name} must be given exactly when the shape has it"
            ))),
        };
        let mlp =
            |m: &HostMlp, count: usize, i: usize, name: &str| -> Result<DeviceMlp, CudaError> {
                check_len(
                    &format!("{name} gate_up"),
                    m.gate_up.len(),
                    count * 2 * i * h * es,
                )?;
                check_len(&format!("{name} down"), m.down.len(), count * h * i * es)?;
                Ok(DeviceMlp {
                    gate_up: dev.upload(m.gate_up)?,
                    down: dev.upload(m.down)?,
                })
            };
        let device_ffn = match (ffn, &w.ffn) {
            (
                FfnShape::Moe {
                    n_experts,
                    intermediate,
                    shared_intermediate,
                    ..
                },
                HostFfn::Moe {
                    router,
                    experts,
                    held,
                    shared,
                },
            ) => {
                check_len("router", router.len(), n_experts * h * es)?;
                let (count, expert_map) = match held {
                    None => (*n_experts, None),
                    Some(held) => (held.len(), Some(expert_map(dev, held, *n_experts)?)),
                };
                let shared = match (shared_intermediate, shared) {
                    (Some(si), Some((m, gate))) => {
                        check_len("shared expert gate", gate.len(), h * es)?;
                        Some(Box::new((
                            mlp(m, 1, *si, "shared expert")?,
                            dev.upload(gate)?,
                        )))
                    }
                    (None, None) => None,
                    _ => {
                        return Err(CudaError::Shape(
                            "a shared expert must be given exactly when the shape has one".into(),
                        ))
                    }
                };
                DeviceFfn::Moe {
                    router: dev.upload(router)?,
                    experts: mlp(experts, count, *intermediate, "experts")?,
                    expert_map,
                    shared,
                }
            }
            (FfnShape::Dense { intermediate }, HostFfn::Dense(m)) => {
                DeviceFfn::Dense(mlp(m, 1, *intermediate, "mlp")?)
            }
            _ => {
                return Err(CudaError::Shape(
                    "the FFN weights do not match the FFN shape (MoE vs dense)".into(),
                ))
            }
        };
        let cache_len = shape.kv_dim() * shape.capacity;
        Ok(DeviceLayer {
            dtype,
            ffn_shape: ffn.clone(),
            attn_norm: dev.upload(w.attn_norm)?,
            qkv: dev.upload(w.qkv)?,
            qkv_bias: optional(w.qkv_bias, shape.qkv_bias, shape.qkv_rows(), "qkv_bias")?,
            o: dev.upload(w.o)?,
            q_norm: optional(w.q_norm, shape.qk_norm, shape.head_dim, "q_norm")?,
            k_norm: optional(w.k_norm, shape.qk_norm, shape.head_dim, "k_norm")?,
            ffn_norm: dev.upload(w.ffn_norm)?,
            ffn: device_ffn,
            k_cache: dev.zeros(cache_len)?,
            v_cache: dev.zeros(cache_len)?,
        })
    }

    pub fn ffn_shape(&self) -> &FfnShape {
        &self.ffn_shape
    }

    fn weights(&self, dev: &CudaDevice, buf: &CudaSlice<u8>, stride: usize) -> Weights {
        Weights {
            ptr: dptr(dev, buf),
            dtype: self.dtype,
            matrix_stride_bytes: stride as u64,
        }
    }
}

/// The final norm and the lm_head, for logits on the device.
pub struct DeviceHead {
    dtype: DType,
    norm: CudaSlice<f32>,
    /// `[vocab, hidden]`
    lm_head: CudaSlice<u8>,
    vocab: usize,
}

impl DeviceHead {
    pub fn upload(
        dev: &CudaDevice,
        hidden: usize,
        norm: &[f32],
        lm_head: &[u8],
        dtype: DType,
    ) -> Result<DeviceHead, CudaError> {
        check_len("final norm", norm.len() * 4, hidden * 4)?;
        let row = hidden * dtype.size_in_bytes();
        if lm_head.is_empty() || !lm_head.len().is_multiple_of(row) {
            return Err(CudaError::Shape(format!(
                "lm_head of {} bytes is not whole rows of {hidden} {dtype} values",
                lm_head.len()
            )));
        }
        Ok(DeviceHead {
            dtype,
            norm: dev.upload(norm)?,
            lm_head: dev.upload(lm_head)?,
            vocab: lm_head.len() / row,
        })
    }
}

/// The embedding table, for a token's row on the device.
pub struct DeviceEmbedding {
    dtype: DType,
    /// `[vocab, hidden]`
    table: CudaSlice<u8>,
    vocab: usize,
}

impl DeviceEmbedding {
    pub fn upload(
        dev: &CudaDevice,
        hidden: usize,
        table: &[u8],
        dtype: DType,
    ) -> Result<DeviceEmbedding, CudaError> {
        let row = hidden * dtype.size_in_bytes();
        if table.is_empty() || !table.len().is_multiple_of(row) {
            return Err(CudaError::Shape(format!(
                "embedding table of {} bytes is not whole rows of {hidden} {dtype} values",
                table.len()
            )));
        }
        Ok(DeviceEmbedding {
            dtype,
            table: dev.upload(table)?,
            vocab: table.len() / row,
        })
    }
}

/// Activations shared by all layers of a stack (one decode token at a time).
struct Scratch {
    /// The residual stream entering a layer, and where its output lands.
    x: CudaSlice<f32>,
    /// The residual stream between the two segments.
    x_mid: CudaSlice<f32>,
    normed: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    expert_ids: CudaSlice<i32>,
    expert_weights: CudaSlice<f32>,
    /// `silu(gate) * up` of each chosen expert, `[slots, intermediate]`.
    act: CudaSlice<f32>,
    /// Each chosen expert's down projection, `[slots, hidden]`.
    expert_out: CudaSlice<f32>,
    shared_act: CudaSlice<f32>,
    shared_out: CudaSlice<f32>,
    shared_logit: CudaSlice<f32>,
    /// The weight of a dense FFN's one "expert": 1.
    one: CudaSlice<f32>,
    inv_freq: CudaSlice<f32>,
    /// The step's position (its KV slot) and token, read by the kernels so that a captured graph
    /// replays unchanged.
    step_in: CudaSlice<i32>,
    vocab_logits: CudaSlice<f32>,
    /// The logits' largest value and its index (as f32).
    best: CudaSlice<f32>,
}

/// What happens after each op is queued.
enum AfterOp {
    /// Nothing: the ops of a segment are queued back to back (and captured as a graph).
    Queue,
    /// The op is waited for (the per-op mode).
    Sync,
}

impl AfterOp {
    fn done(&mut self, dev: &CudaDevice) -> Result<(), CudaError> {
        match self {
            AfterOp::Queue => Ok(()),
            AfterOp::Sync => dev.synchronize(),
        }
    }
}

/// Whether a segment adds the residual itself (chained layers) or leaves a partial sum.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Residual {
    Fused,
    Partial,
}

/// The two segments of a layer; each output (`x_mid`, then `x`) is what ranks all-reduce.
#[derive(Clone, Copy)]
enum Segment {
    Attention,
    Ffn,
}

/// Where a step's attention keeps keys and values: each layer's own contiguous cache, or a
/// paged pool, through one sequence's block table.
#[derive(Clone, Copy)]
enum Kv<'a> {
    Own,
    Paged {
        pool: &'a PagedKv,
        /// Device address of the sequence's block table (i32 block ids).
        table: u64,
    },
}

/// Which pool and table a captured paged step reads: the device addresses of the pool's first
/// layer and of the table, which stay put while both live.
type PagedKey = (u64, u64);

/// Layers that run one decode token at a time.
pub struct LayerStack {
    shape: LayerShape,
    scratch: Scratch,
    layers: Vec<DeviceLayer>,
    embedding: DeviceEmbedding,
    head: DeviceHead,
    /// What [`LayerStack::decode`] replays, captured on first use.
    graphs: Option<StepGraphs>,
    /// What [`LayerStack::decode_paged`] replays, and the pool and table it was captured over.
    paged_graphs: Option<(PagedKey, StepGraphs)>,
    /// Sums each segment's output across the ranks on the device.
    comm: Option<DeviceComm>,
    /// Sums in a 16-bit type (`--reduce-dtype model` on a bf16 or f16 model), with room for a
    /// step's partial sums in it; `None`: f32.
    sums16: Option<Sums16>,
}

/// The 16-bit type the ranks sum in, and room for one row of partial sums in it.
struct Sums16 {
    bf16: bool,
    buf: CudaSlice<u16>,
}

/// The captured graphs of a step.
enum StepGraphs {
    /// Every layer's segments, and the all-reduces if there is a communicator, in one graph.
    Whole(CudaGraph),
    /// `[attention, ffn]` per layer, for a communicator whose all-reduce a capture does not take
    /// (`step` launches it between the graphs).
    Segments(Vec<[CudaGraph; 2]>),
}

impl LayerStack {
    /// A stack over `layers`, all with the attention geometry `shape`, rope's `head_dim / 2`
    /// inverse frequencies `inv_freq` (as the model computes them), between `embedding` and `head`.
    pub fn new(
        dev: &CudaDevice,
        shape: LayerShape,
        inv_freq: &[f32],
        layers: Vec<DeviceLayer>,
        embedding: DeviceEmbedding,
        head: DeviceHead,
    ) -> Result<LayerStack, CudaError> {
        check_len("inv_freq", inv_freq.len() * 4, shape.head_dim / 2 * 4)?;
        if embedding.vocab != head.vocab && head.vocab > embedding.vocab {
            return Err(CudaError::Shape(format!(
                "the lm_head has {} rows, more than the embedding's vocabulary of {}",
                head.vocab, embedding.vocab
            )));
        }
        for l in &layers {
            shape.validate(l.ffn_shape())?;
        }
        let max = |f: &dyn Fn(&FfnShape) -> usize| {
            layers
                .iter()
                .map(|l| f(l.ffn_shape()))
                .max()
                .unwrap_or(1)
                .max(1)
        };
        let slots = max(&|f| f.slots());
        let act = max(&|f| f.slots() * f.intermediate());
        let experts = max(&|f| f.experts());
        let shared = max(&|f| match f {
            FfnShape::Moe {
                shared_intermediate: Some(si),
                ..
            } => *si,
            _ => 1,
        });
        let scratch = Scratch {
            x: dev.zeros(shape.hidden)?,
            x_mid: dev.zeros(shape.hidden)?,
            normed: dev.zeros(shape.hidden)?,
            qkv: dev.zeros(shape.qkv_rows())?,
            attn: dev.zeros(shape.q_dim())?,
            logits: dev.zeros(experts)?,
            expert_ids: dev.zeros(slots)?,
            expert_weights: dev.zeros(slots)?,
            act: dev.zeros(act)?,
            expert_out: dev.zeros(slots * shape.hidden)?,
            shared_act: dev.zeros(shared)?,
            shared_out: dev.zeros(shape.hidden)?,
            shared_logit: dev.zeros(1)?,
            one: dev.upload(&[1.0f32])?,
            inv_freq: dev.upload(inv_freq)?,
            step_in: dev.zeros(2)?,
            vocab_logits: dev.zeros(head.vocab)?,
            best: dev.zeros(2)?,
        };
        Ok(LayerStack {
            shape,
            scratch,
            layers,
            embedding,
            head,
            graphs: None,
            paged_graphs: None,
            comm: None,
            sums16: None,
        })
    }

    /// Sums every segment's output across the ranks of `comm` from now on (runs one all-reduce
    /// now, so that NCCL sets up its connections before any graph capture).
    pub fn set_comm(&mut self, dev: &CudaDevice, comm: DeviceComm) -> Result<(), CudaError> {
        self.comm = Some(comm);
        self.graphs = None;
        self.paged_graphs = None;
        self.enqueue_all_reduce(dev, Segment::Attention, false, &mut AfterOp::Sync)
    }

    /// The type the segments' outputs are summed in across the ranks: f32, or the model's bf16 or
    /// f16 (half the bytes; each rank's partial sum rounded once, the residual stream kept in
    /// f32). Without a communicator there is nothing to sum.
    pub fn set_sum_dtype(&mut self, dev: &CudaDevice, dtype: DType) -> Result<(), CudaError> {
        if self.comm.is_none() {
            return Ok(());
        }
        self.sums16 = match dtype {
            DType::F32 => None,
            DType::BF16 | DType::F16 => Some(Sums16 {
                bf16: dtype == DType::BF16,
                buf: dev.zeros(self.shape.hidden)?,
            }),
            other => {
                return Err(CudaError::Shape(format!(
                    "sums across ranks in {other} (f32, bf16 or f16)"
                )))
            }
        };
        self.graphs = None;
        self.paged_graphs = None;
        Ok(())
    }

    /// Whether this rank's segments add the residual themselves: without other ranks, or on rank
    /// 0 when the sums are f32 (the all-reduce then counts it once). With 16-bit sums no rank
    /// does: the residual is added in f32 after the sum ([`LayerStack::sum_across_ranks`]).
    pub(crate) fn fuses_residual(&self) -> bool {
        match &self.comm {
            None => true,
            Some(c) => c.rank() == 0 && self.sums16.is_none(),
        }
    }

    /// Queues the sum of the `n` f32 values at `buf` across the ranks, in place (nothing without
    /// a communicator). With 16-bit sums, each rank's values are rounded once into `buf16` (room
    /// for `n` 16-bit values), summed there, and widened back into `buf` with `residual` (0:
    /// none) added; with f32 sums `residual` is not read (rank 0's segment added it).
    ///
    /// # Safety
    /// `buf`, `buf16` and a nonzero `residual` are live device allocations of at least `n`
    /// elements that stay live until the stream has run the sum.
    pub(crate) unsafe fn sum_across_ranks(
        &self,
        dev: &CudaDevice,
        buf: u64,
        n: usize,
        residual: u64,
        buf16: u64,
    ) -> Result<(), CudaError> {
        let Some(comm) = &self.comm else {
            return Ok(());
        };
        match &self.sums16 {
            None => comm.all_reduce_sum_raw(dev, buf, n, DType::F32),
            Some(s) => {
                let dtype = if s.bf16 { DType::BF16 } else { DType::F16 };
                ops::to16(dev, buf, buf16, n, s.bf16)?;
                comm.all_reduce_sum_raw(dev, buf16, n, dtype)?;
                ops::add16(dev, residual, buf16, buf, n, s.bf16)
            }
        }
    }

    /// Room for a row of 16-bit partial sums (0 with f32 sums).
    fn row16(&self, dev: &CudaDevice) -> u64 {
        self.sums16.as_ref().map_or(0, |s| dptr(dev, &s.buf))
    }

    /// Key (or value) values per position of this rank's KV heads.
    pub fn kv_dim(&self) -> usize {
        self.shape.kv_dim()
    }

    pub fn comm(&self) -> Option<&DeviceComm> {
        self.comm.as_ref()
    }

    /// Whether [`LayerStack::decode`]'s graphs hold the all-reduces (`None`: no communicator, or
    /// not captured yet).
    pub fn comm_in_graph(&self) -> Option<bool> {
        self.comm.as_ref()?;
        self.graphs
            .as_ref()
            .map(|g| matches!(g, StepGraphs::Whole(_)))
    }

    /// The residual of chained layers (see [`LayerStack::fuses_residual`]).
    fn chained_residual(&self) -> Residual {
        if self.fuses_residual() {
            Residual::Fused
        } else {
            Residual::Partial
        }
    }

    /// Queues the all-reduce of `segment`'s output, when there is a communicator; `chained`: the
    /// segment is one of a step's chained layers, whose residual a 16-bit sum adds after it (the
    /// host adds it for the segments it drives itself).
    fn enqueue_all_reduce(
        &self,
        dev: &CudaDevice,
        segment: Segment,
        chained: bool,
        after: &mut AfterOp,
    ) -> Result<(), CudaError> {
        let Some(comm) = &self.comm else {
            return Ok(());
        };
        let (buf, residual) = match segment {
            Segment::Attention => (&self.scratch.x_mid, &self.scratch.x),
            Segment::Ffn => (&self.scratch.x, &self.scratch.x_mid),
        };
        let residual = if chained { dptr(dev, residual) } else { 0 };
        // SAFETY: the buffers are this stack's, of `hidden` values each, and live as long as it.
        unsafe {
            self.sum_across_ranks(
                dev,
                dptr(dev, buf),
                self.shape.hidden,
                residual,
                self.row16(dev),
            )?
        };
        if matches!(after, AfterOp::Sync) {
            comm.wait(dev)?;
        }
        after.done(dev)
    }

    /// Waits, with the communicator's deadline, for the stream's collectives (see
    /// [`DeviceComm::wait`]); without a communicator there is nothing that could hang.
    pub fn wait_comm(&self, dev: &CudaDevice) -> Result<(), CudaError> {
        self.comm.as_ref().map_or(Ok(()), |c| c.wait(dev))
    }

    /// Sets the residual stream entering the first layer.
    pub fn set_hidden(&mut self, dev: &CudaDevice, hidden: &[f32]) -> Result<(), CudaError> {
        self.check_hidden(hidden.len())?;
        dev.stream()
            .memcpy_htod(hidden, &mut self.scratch.x)
            .during("copying the hidden state")
    }

    fn check_hidden(&self, len: usize) -> Result<(), CudaError> {
        if len == self.shape.hidden {
            Ok(())
        } else {
            Err(CudaError::Shape(format!(
                "hidden state of {len} values, the layer has {}",
                self.shape.hidden
            )))
        }
    }

    /// Sets the position of the next token (its KV slot; it attends over `0..=pos`).
    pub fn set_position(&mut self, dev: &CudaDevice, pos: usize) -> Result<(), CudaError> {
        if pos >= self.shape.capacity {
            return Err(CudaError::Shape(format!(
                "position {pos} is beyond the KV cache's {} positions",
                self.shape.capacity
            )));
        }
        dev.stream()
            .memcpy_htod(&[pos as i32], &mut self.scratch.step_in)
            .during("setting the position")
    }

    /// Queues one decode step of `token` at position `pos`: its embedding, every layer (residual
    /// adds fused), the final norm, this rank's logits and their argmax; read them with
    /// [`LayerStack::best`] or [`LayerStack::vocab_logits`].
    pub fn decode(
        &mut self,
        dev: &CudaDevice,
        token: u32,
        pos: usize,
        mode: Exec,
    ) -> Result<(), CudaError> {
        if pos >= self.shape.capacity {
            return Err(CudaError::Shape(format!(
                "position {pos} is beyond the KV cache's {} positions",
                self.shape.capacity
            )));
        }
        self.set_step_inputs(dev, token, pos)?;
        match mode {
            Exec::PerOp => self.enqueue_step(dev, &mut AfterOp::Sync, Kv::Own),
            Exec::Split => {
                let graphs = match self.graphs.take() {
                    Some(graphs) => graphs,
                    None => self.capture(dev, Kv::Own)?,
                };
                let replayed = self.replay(dev, &graphs);
                self.graphs = Some(graphs);
                replayed
            }
        }
    }

    /// Checks `token` and copies it and `pos` where the step's kernels read them.
    fn set_step_inputs(
        &mut self,
        dev: &CudaDevice,
        token: u32,
        pos: usize,
    ) -> Result<(), CudaError> {
        if token as usize >= self.embedding.vocab {
            return Err(CudaError::Shape(format!(
                "token {token} is outside the embedding's {} rows",
                self.embedding.vocab
            )));
        }
        dev.stream()
            .memcpy_htod(&[pos as i32, token as i32], &mut self.scratch.step_in)
            .during("setting the step's position and token")
    }

    /// [`LayerStack::decode`] (replayed as a graph) for a sequence whose keys and values live in
    /// `pool`: `table` is the device address of its block table, whose blocks hold its positions
    /// up to `pos` (checked by the caller) and which stays at that address. A served sequence
    /// alone in a step runs this, the single-token step, not the batched one.
    pub fn decode_paged(
        &mut self,
        dev: &CudaDevice,
        token: u32,
        pos: usize,
        pool: &PagedKv,
        table: u64,
    ) -> Result<(), CudaError> {
        self.set_step_inputs(dev, token, pos)?;
        let key = (pool.layer(dev, 0)?.0, table);
        let graphs = match self.paged_graphs.take() {
            Some((k, graphs)) if k == key => graphs,
            _ => self.capture(dev, Kv::Paged { pool, table })?,
        };
        let replayed = self.replay(dev, &graphs);
        self.paged_graphs = Some((key, graphs));
        replayed
    }

    fn replay(&self, dev: &CudaDevice, graphs: &StepGraphs) -> Result<(), CudaError> {
        match graphs {
            StepGraphs::Whole(g) => g.launch().during("replaying the step's graph"),
            StepGraphs::Segments(graphs) => {
                for g in graphs {
                    g[0].launch().during("replaying the attention graph")?;
                    self.enqueue_all_reduce(dev, Segment::Attention, true, &mut AfterOp::Queue)?;
                    g[1].launch().during("replaying the ffn graph")?;
                    self.enqueue_all_reduce(dev, Segment::Ffn, true, &mut AfterOp::Queue)?;
                }
                Ok(())
            }
        }
    }

    /// The step's largest logit on this rank and its vocabulary row (waits for the step).
    pub fn best(&self, dev: &CudaDevice) -> Result<(f32, u32), CudaError> {
        self.wait_comm(dev)?;
        let best = dev.download(&self.scratch.best)?;
        Ok((best[0], best[1] as u32))
    }

    /// The step's logits of this rank's vocabulary rows (waits for the step).
    pub fn vocab_logits(&self, dev: &CudaDevice) -> Result<Vec<f32>, CudaError> {
        self.wait_comm(dev)?;
        dev.download(&self.scratch.vocab_logits)
    }

    /// Queues a whole step: the embedding, every layer's segments and all-reduces (residual adds
    /// fused), the final norm, the logits and their argmax.
    fn enqueue_step(&self, dev: &CudaDevice, after: &mut AfterOp, kv: Kv) -> Result<(), CudaError> {
        let (s, h) = (&self.scratch, self.shape.hidden);
        let p = |b: &CudaSlice<f32>| dptr(dev, b);
        let e = &self.embedding;
        let token = dptr(dev, &s.step_in) + 4;
        ops::embed_row(dev, dptr(dev, &e.table), e.dtype, token, p(&s.x), 1, h)?;
        after.done(dev)?;
        let res = self.chained_residual();
        // With no all-reduce between a layer's FFN and the next layer (or the head), the kernel
        // that combines the experts also does the next one's first rms_norm.
        let fuse_norms = self.comm.is_none();
        for l in 0..self.layers.len() {
            let normed = fuse_norms && l > 0;
            self.enqueue_attention(dev, l, res, normed, after, kv)?;
            self.enqueue_all_reduce(dev, Segment::Attention, true, after)?;
            let g = self
                .layers
                .get(l + 1)
                .map_or(&self.head.norm, |n| &n.attn_norm);
            let next = fuse_norms.then(|| ops::NextNorm {
                g: p(g),
                normed: p(&s.normed),
                eps: self.shape.eps,
            });
            self.enqueue_ffn(dev, l, res, next, after)?;
            self.enqueue_all_reduce(dev, Segment::Ffn, true, after)?;
        }
        if !fuse_norms || self.layers.is_empty() {
            ops::rms_norm(
                dev,
                p(&s.x),
                p(&self.head.norm),
                p(&s.normed),
                1,
                h,
                self.shape.eps,
            )?;
            after.done(dev)?;
        }
        let head = &self.head;
        let w = Weights {
            ptr: dptr(dev, &head.lm_head),
            dtype: head.dtype,
            matrix_stride_bytes: 0,
        };
        ops::linear(dev, w, p(&s.normed), p(&s.vocab_logits), head.vocab, h)?;
        after.done(dev)?;
        ops::argmax(dev, p(&s.vocab_logits), 1, head.vocab, p(&s.best))?;
        after.done(dev)
    }

    /// The attention segment of layer `l` for the token `x` at the position set last: appends to
    /// the KV cache and writes the partial residual update (o_proj's output) to `out`.
    pub fn attention(
        &mut self,
        dev: &CudaDevice,
        l: usize,
        x: &[f32],
        out: &mut [f32],
    ) -> Result<(), CudaError> {
        self.set_hidden(dev, x)?;
        self.enqueue_attention(
            dev,
            l,
            Residual::Partial,
            false,
            &mut AfterOp::Queue,
            Kv::Own,
        )?;
        self.enqueue_all_reduce(dev, Segment::Attention, false, &mut AfterOp::Queue)?;
        self.wait_comm(dev)?;
        self.check_hidden(out.len())?;
        dev.stream()
            .memcpy_dtoh(&self.scratch.x_mid, out)
            .during("copying the attention output")
    }

    /// The FFN segment of layer `l` for the token `x`: writes the partial residual update to `out`.
    pub fn ffn(
        &mut self,
        dev: &CudaDevice,
        l: usize,
        x: &[f32],
        out: &mut [f32],
    ) -> Result<(), CudaError> {
        self.check_hidden(x.len())?;
        dev.stream()
            .memcpy_htod(x, &mut self.scratch.x_mid)
            .during("copying the hidden state")?;
        self.enqueue_ffn(dev, l, Residual::Partial, None, &mut AfterOp::Queue)?;
        self.enqueue_all_reduce(dev, Segment::Ffn, false, &mut AfterOp::Queue)?;
        self.wait_comm(dev)?;
        self.check_hidden(out.len())?;
        dev.stream()
            .memcpy_dtoh(&self.scratch.x, out)
            .during("copying the ffn output")
    }

    /// Final norm and lm_head of `x`: the vocabulary's logits.
    pub fn logits(&mut self, dev: &CudaDevice, x: &[f32]) -> Result<Vec<f32>, CudaError> {
        let head = &self.head;
        self.check_hidden(x.len())?;
        let s = &mut self.scratch;
        dev.stream()
            .memcpy_htod(x, &mut s.x)
            .during("copying the hidden state")?;
        let h = self.shape.hidden;
        let p = |b: &CudaSlice<f32>| dptr(dev, b);
        ops::rms_norm(
            dev,
            p(&s.x),
            p(&head.norm),
            p(&s.normed),
            1,
            h,
            self.shape.eps,
        )?;
        let w = Weights {
            ptr: dptr(dev, &head.lm_head),
            dtype: head.dtype,
            matrix_stride_bytes: 0,
        };
        ops::linear(dev, w, p(&s.normed), p(&s.vocab_logits), head.vocab, h)?;
        dev.download(&s.vocab_logits)
    }

    /// Captures the whole step as one graph; if the capture does not take the all-reduce,
    /// captures each segment of every layer alone (and `step` all-reduces between the launches).
    fn capture(&self, dev: &CudaDevice, kv: Kv) -> Result<StepGraphs, CudaError> {
        dev.synchronize()?;
        match self.capture_one(dev, |s| s.enqueue_step(dev, &mut AfterOp::Queue, kv)) {
            Ok(graph) => return Ok(StepGraphs::Whole(graph)),
            Err(e) if self.comm.is_some() => tracing::warn!(
                "the NCCL all-reduce could not be captured in a graph ({e}); it runs \
                 between the segments' graph launches"
            ),
            Err(e) => return Err(e),
        }
        let res = self.chained_residual();
        let mut graphs = Vec::with_capacity(self.layers.len());
        for l in 0..self.layers.len() {
            let attn = self.capture_one(dev, |s| {
                s.enqueue_attention(dev, l, res, false, &mut AfterOp::Queue, kv)
            })?;
            let ffn = self.capture_one(dev, |s| {
                s.enqueue_ffn(dev, l, res, None, &mut AfterOp::Queue)
            })?;
            graphs.push([attn, ffn]);
        }
        Ok(StepGraphs::Segments(graphs))
    }

    fn capture_one(
        &self,
        dev: &CudaDevice,
        enqueue: impl FnOnce(&Self) -> Result<(), CudaError>,
    ) -> Result<CudaGraph, CudaError> {
        capture_graph(dev, || enqueue(self))
    }

    /// x -> x_mid: with `Fused`, x_mid = x + attention(x); with `Partial`, x_mid = attention(x).
    /// `normed`: the previous layer's combine already wrote this layer's rms_norm of x.
    fn enqueue_attention(
        &self,
        dev: &CudaDevice,
        l: usize,
        residual: Residual,
        normed: bool,
        after: &mut AfterOp,
        kv: Kv,
    ) -> Result<(), CudaError> {
        let (sh, s, w) = (&self.shape, &self.scratch, &self.layers[l]);
        let p = |b: &CudaSlice<f32>| dptr(dev, b);
        let opt = |b: &Option<CudaSlice<f32>>| b.as_ref().map_or(0, |b| dptr(dev, b));
        if !normed {
            ops::rms_norm(
                dev,
                p(&s.x),
                p(&w.attn_norm),
                p(&s.normed),
                1,
                sh.hidden,
                sh.eps,
            )?;
            after.done(dev)?;
        }
        let qkv = w.weights(dev, &w.qkv, 0);
        let (rows, h, q) = (sh.qkv_rows(), sh.hidden, sh.q_dim());
        let bias = opt(&w.qkv_bias);
        ops::matvec(
            dev,
            qkv,
            Slots::Single,
            p(&s.normed),
            bias,
            p(&s.qkv),
            rows,
            h,
        )?;
        after.done(dev)?;
        // The qkv bias was added by the matvec; rope and the KV append run inside attention.
        let scale = 1.0 / (sh.head_dim as f32).sqrt();
        let mut dims = sh.attention_dims();
        let mut cache = KvRows::contiguous(p(&w.k_cache), p(&w.v_cache), 0);
        if let Kv::Paged { pool, table } = kv {
            let (k_cache, v_cache) = pool.layer(dev, l)?;
            dims.capacity = pool.positions();
            cache = KvRows {
                k_cache,
                v_cache,
                bf16: pool.is_bf16(),
                tables: table,
                block: BLOCK_POSITIONS,
                ..cache
            };
        }
        // The kernel reads the position from the step's inputs.
        cache.positions = dptr(dev, &s.step_in);
        ops::attention_decode(
            dev,
            dims,
            p(&s.qkv),
            self.head_rope(dev, w),
            cache,
            p(&s.attn),
            scale,
        )?;
        after.done(dev)?;
        let o = w.weights(dev, &w.o, 0);
        let res = if residual == Residual::Fused {
            p(&s.x)
        } else {
            0
        };
        ops::matvec(dev, o, Slots::Single, p(&s.attn), res, p(&s.x_mid), h, q)?;
        after.done(dev)
    }

    /// Layer `w`'s q/k norms and the rope frequencies.
    fn head_rope(&self, dev: &CudaDevice, w: &DeviceLayer) -> ops::HeadRope {
        let opt = |b: &Option<CudaSlice<f32>>| b.as_ref().map_or(0, |b| dptr(dev, b));
        ops::HeadRope {
            q_norm: opt(&w.q_norm),
            k_norm: opt(&w.k_norm),
            eps: self.shape.eps,
            inv_freq: dptr(dev, &self.scratch.inv_freq),
        }
    }

    /// x_mid -> x: with `Fused`, x = x_mid + ffn(x_mid); with `Partial`, x = ffn(x_mid).
    /// `next`: the next layer's first rms_norm, done by the combine.
    fn enqueue_ffn(
        &self,
        dev: &CudaDevice,
        l: usize,
        residual: Residual,
        next: Option<ops::NextNorm>,
        after: &mut AfterOp,
    ) -> Result<(), CudaError> {
        let (sh, s, w) = (&self.shape, &self.scratch, &self.layers[l]);
        let p = |b: &CudaSlice<f32>| dptr(dev, b);
        let h = sh.hidden;
        let (k, i) = (w.ffn_shape.slots(), w.ffn_shape.intermediate());
        let es = w.dtype.size_in_bytes();
        let norm = |after: &mut AfterOp| {
            ops::rms_norm(dev, p(&s.x_mid), p(&w.ffn_norm), p(&s.normed), 1, h, sh.eps)?;
            after.done(dev)
        };
        let (experts, ids, weights, shared) = match (&w.ffn, &w.ffn_shape) {
            (
                DeviceFfn::Moe {
                    router,
                    experts,
                    expert_map,
                    shared,
                },
                FfnShape::Moe {
                    n_experts,
                    renormalize,
                    shared_intermediate,
                    ..
                },
            ) => {
                let r = w.weights(dev, router, 0);
                let (normed, logits) = (p(&s.normed), p(&s.logits));
                if ops::router_norm_takes(h) {
                    let (x, g) = (p(&s.x_mid), p(&w.ffn_norm));
                    ops::router_norm(dev, r, x, g, sh.eps, normed, logits, *n_experts, h)?;
                    after.done(dev)?;
                } else {
                    norm(after)?;
                    ops::linear(dev, r, normed, logits, *n_experts, h)?;
                    after.done(dev)?;
                }
                let (ids, wts) = (dptr(dev, &s.expert_ids), p(&s.expert_weights));
                let map = expert_map.as_ref().map_or(0, |m| dptr(dev, m));
                ops::router_top_k(dev, 1, logits, *n_experts, k, *renormalize, map, ids, wts)?;
                after.done(dev)?;
                let shared = match (shared, shared_intermediate) {
                    (Some(shared), Some(si)) => {
                        let (mlp, gate) = &**shared;
                        Some(self.enqueue_shared(dev, w, mlp, gate, *si, after)?)
                    }
                    _ => None,
                };
                (experts, ids, wts, shared)
            }
            (DeviceFfn::Dense(mlp), _) => {
                norm(after)?;
                (mlp, 0, p(&s.one), None)
            }
            _ => return Err(CudaError::Shape("FFN weights and shape disagree".into())),
        };
        let gate_up = w.weights(dev, &experts.gate_up, 2 * i * h * es);
        let swiglu = Slots::SwiGlu {
            ids,
            count: k as u32,
            y_stride: i as u64,
        };
        ops::matvec(dev, gate_up, swiglu, p(&s.normed), 0, p(&s.act), i, h)?;
        after.done(dev)?;
        let down = w.weights(dev, &experts.down, h * i * es);
        let each = Slots::Each {
            ids,
            // gate/up took the same ids: its successor may read them before its wait
            ids_early: ids != 0,
            count: k as u32,
            x_stride: i as u64,
            y_stride: h as u64,
        };
        ops::matvec(dev, down, each, p(&s.act), 0, p(&s.expert_out), h, i)?;
        after.done(dev)?;
        let res = if residual == Residual::Fused {
            p(&s.x_mid)
        } else {
            0
        };
        let out = p(&s.expert_out);
        ops::combine_slots(dev, out, weights, k, res, shared, p(&s.x), h, next)?;
        after.done(dev)
    }

    /// Queues the shared expert of a Qwen2-MoE layer: its output and its gate's logit.
    fn enqueue_shared(
        &self,
        dev: &CudaDevice,
        w: &DeviceLayer,
        mlp: &DeviceMlp,
        gate: &CudaSlice<u8>,
        si: usize,
        after: &mut AfterOp,
    ) -> Result<SharedExpert, CudaError> {
        let s = &self.scratch;
        let p = |b: &CudaSlice<f32>| dptr(dev, b);
        let h = self.shape.hidden;
        let single_swiglu = Slots::SwiGlu {
            ids: 0,
            count: 1,
            y_stride: 0,
        };
        let gu = w.weights(dev, &mlp.gate_up, 0);
        ops::matvec(
            dev,
            gu,
            single_swiglu,
            p(&s.normed),
            0,
            p(&s.shared_act),
            si,
            h,
        )?;
        let down = w.weights(dev, &mlp.down, 0);
        ops::linear(dev, down, p(&s.shared_act), p(&s.shared_out), h, si)?;
        let g = w.weights(dev, gate, 0);
        ops::linear(dev, g, p(&s.normed), p(&s.shared_logit), 1, h)?;
        after.done(dev)?;
        Ok(SharedExpert {
            out: p(&s.shared_out),
            logit: p(&s.shared_logit),
        })
    }
}
