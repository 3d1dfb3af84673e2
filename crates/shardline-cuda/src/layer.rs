//! A batch-1 decode layer of an MoE (or dense, with one always-chosen expert) transformer on the
//! GPU, and a stack of such layers whose two segments per layer are captured once as CUDA graphs.
//!
//! Segment "attention": rms_norm -> qkv -> (q/k norm) rope + KV append -> attention -> o_proj + residual.
//! Segment "ffn": rms_norm -> router -> top-k on the device -> chosen experts' gate/up with SwiGLU
//! fused -> weighted down projections + residual. The chosen experts never go back to the host.

use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph, CudaSlice, DevicePtr};
use shardline_tensor::DType;

use crate::device::dptr;
use crate::error::DriverContext;
use crate::ops::{self, AttentionDims, Slots, Weights};
use crate::{CudaDevice, CudaError};

/// The geometry of one decoder layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerShape {
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub n_experts: usize,
    pub top_k: usize,
    /// Intermediate size of one expert.
    pub intermediate: usize,
    /// Per-head RMSNorm of q and k before rope (Qwen3).
    pub qk_norm: bool,
    /// Renormalise the top-k router weights to sum to one (Mixtral, Qwen3).
    pub renormalize: bool,
    pub rope_theta: f32,
    pub eps: f32,
    /// Positions the KV cache holds.
    pub capacity: usize,
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

    /// Weight bytes one decode step reads: attention, router and the `top_k` chosen experts.
    pub fn weight_bytes_read(&self, dtype: DType) -> u64 {
        let h = self.hidden;
        let elems = self.qkv_rows() * h
            + h * self.q_dim()
            + self.n_experts * h
            + self.top_k * 3 * self.intermediate * h;
        (elems * dtype.size_in_bytes()) as u64
    }

    /// Checks what the kernels require, naming the offending setting.
    pub fn validate(&self) -> Result<(), CudaError> {
        let bad = |m: String| Err(CudaError::Shape(m));
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return bad(format!(
                "{} heads are not a multiple of {} KV heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 || self.head_dim > ops::MAX_HEAD_DIM {
            return bad(format!(
                "head_dim {} must be even and at most {}",
                self.head_dim,
                ops::MAX_HEAD_DIM
            ));
        }
        if self.top_k == 0 || self.top_k > self.n_experts || self.n_experts > 1024 {
            return bad(format!(
                "top_k {} of {} experts (at most 1024 experts)",
                self.top_k, self.n_experts
            ));
        }
        if self.capacity == 0 || self.hidden == 0 || self.intermediate == 0 {
            return bad("hidden, intermediate and KV capacity must be non-zero".into());
        }
        Ok(())
    }
}

/// One layer's weights in the kernels' layout, on the host (little-endian bytes of `dtype`; norms
/// in f32). Used to upload real or test weights.
pub struct HostLayerWeights<'a> {
    pub attn_norm: &'a [f32],
    /// `[q_dim + 2 * kv_dim, hidden]`, rows of q, then k, then v.
    pub qkv: &'a [u8],
    /// `[hidden, q_dim]`
    pub o: &'a [u8],
    /// `[head_dim]` each, when the shape has `qk_norm`.
    pub q_norm: Option<&'a [f32]>,
    pub k_norm: Option<&'a [f32]>,
    pub ffn_norm: &'a [f32],
    /// `[n_experts, hidden]`
    pub router: &'a [u8],
    /// `[n_experts, 2 * intermediate, hidden]`: each expert's gate rows, then its up rows.
    pub gate_up: &'a [u8],
    /// `[n_experts, hidden, intermediate]`
    pub down: &'a [u8],
}

/// One layer's weights and KV cache on the device.
pub struct DeviceLayer {
    dtype: DType,
    attn_norm: CudaSlice<f32>,
    qkv: CudaSlice<u8>,
    o: CudaSlice<u8>,
    q_norm: Option<CudaSlice<f32>>,
    k_norm: Option<CudaSlice<f32>>,
    ffn_norm: CudaSlice<f32>,
    router: CudaSlice<u8>,
    gate_up: CudaSlice<u8>,
    down: CudaSlice<u8>,
    k_cache: CudaSlice<f32>,
    v_cache: CudaSlice<f32>,
}

/// Byte sizes of each weight of a layer, in the order of [`HostLayerWeights`].
struct WeightSizes {
    qkv: usize,
    o: usize,
    router: usize,
    gate_up: usize,
    down: usize,
}

impl WeightSizes {
    fn of(shape: &LayerShape, dtype: DType) -> WeightSizes {
        let (h, es) = (shape.hidden, dtype.size_in_bytes());
        WeightSizes {
            qkv: shape.qkv_rows() * h * es,
            o: h * shape.q_dim() * es,
            router: shape.n_experts * h * es,
            gate_up: shape.n_experts * 2 * shape.intermediate * h * es,
            down: shape.n_experts * h * shape.intermediate * es,
        }
    }
}

impl DeviceLayer {
    /// A layer with deterministic pseudo-random weights (scaled like a trained model's, so
    /// activations stay finite) and norms of one; the KV cache is filled with random keys and
    /// values so any position can be attended over. Everything is generated on the device.
    pub fn random(
        dev: &CudaDevice,
        shape: &LayerShape,
        dtype: DType,
        seed: u32,
    ) -> Result<DeviceLayer, CudaError> {
        shape.validate()?;
        let sz = WeightSizes::of(shape, dtype);
        let es = dtype.size_in_bytes();
        let rand_bytes = |bytes: usize, k: usize, salt: u32| -> Result<CudaSlice<u8>, CudaError> {
            let buf = dev.zeros::<u8>(bytes)?;
            let scale = 1.0 / (k as f32).sqrt();
            ops::fill_uniform(dev, dptr(dev, &buf), bytes / es, dtype, seed ^ salt, scale)?;
            Ok(buf)
        };
        let ones = |n: usize| dev.upload(&vec![1.0f32; n]);
        let cache_len = shape.kv_dim() * shape.capacity;
        let k_cache = dev.zeros::<f32>(cache_len)?;
        let v_cache = dev.zeros::<f32>(cache_len)?;
        ops::fill_uniform(
            dev,
            dptr(dev, &k_cache),
            cache_len,
            DType::F32,
            seed ^ 0x51,
            1.0,
        )?;
        ops::fill_uniform(
            dev,
            dptr(dev, &v_cache),
            cache_len,
            DType::F32,
            seed ^ 0x52,
            1.0,
        )?;
        let layer = DeviceLayer {
            dtype,
            attn_norm: ones(shape.hidden)?,
            qkv: rand_bytes(sz.qkv, shape.hidden, 0x11)?,
            o: rand_bytes(sz.o, shape.q_dim(), 0x12)?,
            q_norm: shape.qk_norm.then(|| ones(shape.head_dim)).transpose()?,
            k_norm: shape.qk_norm.then(|| ones(shape.head_dim)).transpose()?,
            ffn_norm: ones(shape.hidden)?,
            router: rand_bytes(sz.router, shape.hidden, 0x13)?,
            gate_up: rand_bytes(sz.gate_up, shape.hidden, 0x14)?,
            down: rand_bytes(sz.down, shape.intermediate, 0x15)?,
            k_cache,
            v_cache,
        };
        dev.synchronize()?;
        Ok(layer)
    }

    /// A layer holding copies of `w`, with an empty KV cache.
    pub fn upload(
        dev: &CudaDevice,
        shape: &LayerShape,
        dtype: DType,
        w: &HostLayerWeights,
    ) -> Result<DeviceLayer, CudaError> {
        shape.validate()?;
        let sz = WeightSizes::of(shape, dtype);
        let check = |name: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(CudaError::Shape(format!(
                    "{name}: {got} bytes given, the shape needs {want}"
                )))
            }
        };
        check("qkv", w.qkv.len(), sz.qkv)?;
        check("o_proj", w.o.len(), sz.o)?;
        check("router", w.router.len(), sz.router)?;
        check("gate_up", w.gate_up.len(), sz.gate_up)?;
        check("down", w.down.len(), sz.down)?;
        check("attn_norm", w.attn_norm.len() * 4, shape.hidden * 4)?;
        check("ffn_norm", w.ffn_norm.len() * 4, shape.hidden * 4)?;
        let head_norm =
            |n: Option<&[f32]>, name: &str| -> Result<Option<CudaSlice<f32>>, CudaError> {
                match (shape.qk_norm, n) {
                    (true, Some(n)) => {
                        check(name, n.len() * 4, shape.head_dim * 4)?;
                        dev.upload(n).map(Some)
                    }
                    (false, None) => Ok(None),
                    _ => Err(CudaError::Shape(format!(
                        "{name} must be given exactly when the shape has qk_norm"
                    ))),
                }
            };
        let cache_len = shape.kv_dim() * shape.capacity;
        Ok(DeviceLayer {
            dtype,
            attn_norm: dev.upload(w.attn_norm)?,
            qkv: dev.upload(w.qkv)?,
            o: dev.upload(w.o)?,
            q_norm: head_norm(w.q_norm, "q_norm")?,
            k_norm: head_norm(w.k_norm, "k_norm")?,
            ffn_norm: dev.upload(w.ffn_norm)?,
            router: dev.upload(w.router)?,
            gate_up: dev.upload(w.gate_up)?,
            down: dev.upload(w.down)?,
            k_cache: dev.zeros(cache_len)?,
            v_cache: dev.zeros(cache_len)?,
        })
    }

    fn weights(&self, dev: &CudaDevice, buf: &CudaSlice<u8>, stride: usize) -> Weights {
        Weights {
            ptr: dptr(dev, buf),
            dtype: self.dtype,
            matrix_stride_bytes: stride as u64,
        }
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
    /// `silu(gate) * up` of each chosen expert, `[top_k, intermediate]`.
    act: CudaSlice<f32>,
    /// Each chosen expert's down projection, `[top_k, hidden]`.
    expert_out: CudaSlice<f32>,
    pos: CudaSlice<i32>,
}

/// What happens after each op is queued.
enum AfterOp<'a> {
    /// Nothing: the ops of a segment are queued back to back (and captured as a graph).
    Queue,
    /// The op is waited for (the per-op mode).
    Sync,
    /// An event is recorded, to time each op.
    Time(&'a mut Vec<(&'static str, CudaEvent)>),
}

impl AfterOp<'_> {
    fn done(&mut self, dev: &CudaDevice, op: &'static str) -> Result<(), CudaError> {
        match self {
            AfterOp::Queue => Ok(()),
            AfterOp::Sync => dev.synchronize(),
            AfterOp::Time(events) => {
                let ev = dev
                    .stream()
                    .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .during("recording an event")?;
                events.push((op, ev));
                Ok(())
            }
        }
    }
}

/// How a step is submitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecMode {
    /// Each segment replays its captured graph: two submissions per layer.
    Split,
    /// Each op is launched on its own and waited for.
    PerOp,
}

impl ExecMode {
    pub fn name(self) -> &'static str {
        match self {
            ExecMode::Split => "split",
            ExecMode::PerOp => "per-op",
        }
    }
}

/// Layers that run one decode token through the residual stream, in order.
pub struct LayerStack {
    shape: LayerShape,
    scratch: Scratch,
    layers: Vec<DeviceLayer>,
    /// `[attention, ffn]` graphs per layer, captured on first use of [`ExecMode::Split`].
    graphs: Vec<[CudaGraph; 2]>,
}

impl LayerStack {
    /// A stack over `layers`, all of `shape`.
    pub fn new(
        dev: &CudaDevice,
        shape: LayerShape,
        layers: Vec<DeviceLayer>,
    ) -> Result<LayerStack, CudaError> {
        shape.validate()?;
        let k = shape.top_k;
        let scratch = Scratch {
            x: dev.zeros(shape.hidden)?,
            x_mid: dev.zeros(shape.hidden)?,
            normed: dev.zeros(shape.hidden)?,
            qkv: dev.zeros(shape.qkv_rows())?,
            attn: dev.zeros(shape.q_dim())?,
            logits: dev.zeros(shape.n_experts)?,
            expert_ids: dev.zeros(k)?,
            expert_weights: dev.zeros(k)?,
            act: dev.zeros(k * shape.intermediate)?,
            expert_out: dev.zeros(k * shape.hidden)?,
            pos: dev.zeros(1)?,
        };
        Ok(LayerStack {
            shape,
            scratch,
            layers,
            graphs: Vec::new(),
        })
    }

    pub fn shape(&self) -> &LayerShape {
        &self.shape
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Sets the residual stream entering the first layer.
    pub fn set_hidden(&mut self, dev: &CudaDevice, hidden: &[f32]) -> Result<(), CudaError> {
        if hidden.len() != self.shape.hidden {
            return Err(CudaError::Shape(format!(
                "hidden state of {} values, the layer has {}",
                hidden.len(),
                self.shape.hidden
            )));
        }
        dev.stream()
            .memcpy_htod(hidden, &mut self.scratch.x)
            .during("copying the hidden state")
    }

    /// Copies the hidden state from another device buffer (stays on the device).
    pub fn copy_hidden_from(
        &mut self,
        dev: &CudaDevice,
        src: &impl DevicePtr<f32>,
    ) -> Result<(), CudaError> {
        dev.stream()
            .memcpy_dtod(src, &mut self.scratch.x)
            .during("copying the hidden state")
    }

    /// The residual stream after the last layer.
    pub fn hidden(&self, dev: &CudaDevice) -> Result<Vec<f32>, CudaError> {
        dev.download(&self.scratch.x)
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
            .memcpy_htod(&[pos as i32], &mut self.scratch.pos)
            .during("setting the position")
    }

    /// Runs every layer once for the current token (queued; see [`CudaDevice::synchronize`]).
    pub fn step(&mut self, dev: &CudaDevice, mode: ExecMode) -> Result<(), CudaError> {
        match mode {
            ExecMode::PerOp => {
                for l in 0..self.layers.len() {
                    self.enqueue_attention(dev, l, &mut AfterOp::Sync)?;
                    self.enqueue_ffn(dev, l, &mut AfterOp::Sync)?;
                }
            }
            ExecMode::Split => {
                if self.graphs.len() != self.layers.len() {
                    self.capture(dev)?;
                }
                for g in &self.graphs {
                    g[0].launch().during("replaying the attention graph")?;
                    g[1].launch().during("replaying the ffn graph")?;
                }
            }
        }
        Ok(())
    }

    /// Captures both segments of every layer as graphs.
    fn capture(&mut self, dev: &CudaDevice) -> Result<(), CudaError> {
        dev.synchronize()?;
        let mut graphs = Vec::with_capacity(self.layers.len());
        for l in 0..self.layers.len() {
            let attn =
                self.capture_one(dev, |s| s.enqueue_attention(dev, l, &mut AfterOp::Queue))?;
            let ffn = self.capture_one(dev, |s| s.enqueue_ffn(dev, l, &mut AfterOp::Queue))?;
            graphs.push([attn, ffn]);
        }
        self.graphs = graphs;
        Ok(())
    }

    fn capture_one(
        &self,
        dev: &CudaDevice,
        enqueue: impl FnOnce(&Self) -> Result<(), CudaError>,
    ) -> Result<CudaGraph, CudaError> {
        let stream = dev.stream();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .during("starting a graph capture")?;
        let queued = enqueue(self);
        let graph = stream
            .end_capture(CUgraphInstantiate_flags(0))
            .during("ending a graph capture")?;
        queued?;
        let graph = graph.ok_or_else(|| CudaError::Shape("captured an empty graph".into()))?;
        graph.upload().during("uploading a graph")?;
        Ok(graph)
    }

    /// Runs one step op by op and returns each op's device time in microseconds, summed over
    /// the layers, in the order the ops run.
    pub fn profile_step(
        &mut self,
        dev: &CudaDevice,
    ) -> Result<Vec<(&'static str, f64)>, CudaError> {
        let mut events = Vec::new();
        let start = dev
            .stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .during("recording an event")?;
        for l in 0..self.layers.len() {
            self.enqueue_attention(dev, l, &mut AfterOp::Time(&mut events))?;
            self.enqueue_ffn(dev, l, &mut AfterOp::Time(&mut events))?;
        }
        dev.synchronize()?;
        let mut totals: Vec<(&'static str, f64)> = Vec::new();
        let mut prev = &start;
        for (op, ev) in &events {
            let us = prev.elapsed_ms(ev).during("reading an event")? as f64 * 1000.0;
            match totals.iter_mut().find(|(name, _)| name == op) {
                Some(t) => t.1 += us,
                None => totals.push((op, us)),
            }
            prev = ev;
        }
        Ok(totals)
    }

    fn enqueue_attention(
        &self,
        dev: &CudaDevice,
        l: usize,
        after: &mut AfterOp,
    ) -> Result<(), CudaError> {
        let (sh, s, w) = (&self.shape, &self.scratch, &self.layers[l]);
        let p = |b: &CudaSlice<f32>| dptr(dev, b);
        let pos = dptr(dev, &s.pos);
        ops::rms_norm(
            dev,
            p(&s.x),
            p(&w.attn_norm),
            p(&s.normed),
            1,
            sh.hidden,
            sh.eps,
        )?;
        after.done(dev, "attn.rms_norm")?;
        let qkv = w.weights(dev, &w.qkv, 0);
        ops::matvec(
            dev,
            qkv,
            Slots::Single,
            p(&s.normed),
            0,
            p(&s.qkv),
            sh.qkv_rows(),
            sh.hidden,
        )?;
        after.done(dev, "attn.qkv")?;
        let norm_ptr = |n: &Option<CudaSlice<f32>>| n.as_ref().map_or(0, |b| dptr(dev, b));
        ops::rope_kv_append(
            dev,
            sh.attention_dims(),
            p(&s.qkv),
            pos,
            p(&w.k_cache),
            p(&w.v_cache),
            norm_ptr(&w.q_norm),
            norm_ptr(&w.k_norm),
            sh.eps,
            sh.rope_theta,
        )?;
        after.done(dev, "attn.rope_kv_append")?;
        let scale = 1.0 / (sh.head_dim as f32).sqrt();
        ops::attention_decode(
            dev,
            sh.attention_dims(),
            p(&s.qkv),
            p(&w.k_cache),
            p(&w.v_cache),
            pos,
            p(&s.attn),
            scale,
        )?;
        after.done(dev, "attn.attention")?;
        let o = w.weights(dev, &w.o, 0);
        ops::matvec(
            dev,
            o,
            Slots::Single,
            p(&s.attn),
            p(&s.x),
            p(&s.x_mid),
            sh.hidden,
            sh.q_dim(),
        )?;
        after.done(dev, "attn.o_proj")
    }

    fn enqueue_ffn(
        &self,
        dev: &CudaDevice,
        l: usize,
        after: &mut AfterOp,
    ) -> Result<(), CudaError> {
        let (sh, s, w) = (&self.shape, &self.scratch, &self.layers[l]);
        let p = |b: &CudaSlice<f32>| dptr(dev, b);
        let (h, i, k) = (sh.hidden, sh.intermediate, sh.top_k);
        let es = self.layers[l].dtype.size_in_bytes();
        let ids = dptr(dev, &s.expert_ids);
        ops::rms_norm(dev, p(&s.x_mid), p(&w.ffn_norm), p(&s.normed), 1, h, sh.eps)?;
        after.done(dev, "ffn.rms_norm")?;
        let router = w.weights(dev, &w.router, 0);
        ops::matvec(
            dev,
            router,
            Slots::Single,
            p(&s.normed),
            0,
            p(&s.logits),
            sh.n_experts,
            h,
        )?;
        after.done(dev, "ffn.router")?;
        ops::router_top_k(
            dev,
            p(&s.logits),
            sh.n_experts,
            k,
            sh.renormalize,
            ids,
            p(&s.expert_weights),
        )?;
        after.done(dev, "ffn.router_top_k")?;
        let gate_up = w.weights(dev, &w.gate_up, 2 * i * h * es);
        let each = Slots::SwiGlu {
            ids,
            count: k as u32,
            y_stride: i as u64,
        };
        ops::matvec(dev, gate_up, each, p(&s.normed), 0, p(&s.act), i, h)?;
        after.done(dev, "ffn.gate_up_swiglu")?;
        let down = w.weights(dev, &w.down, h * i * es);
        let each = Slots::Each {
            ids,
            count: k as u32,
            x_stride: i as u64,
            y_stride: h as u64,
        };
        ops::matvec(dev, down, each, p(&s.act), 0, p(&s.expert_out), h, i)?;
        after.done(dev, "ffn.down")?;
        ops::combine_slots(
            dev,
            p(&s.expert_out),
            p(&s.expert_weights),
            k,
            p(&s.x_mid),
            p(&s.x),
            h,
        )?;
        after.done(dev, "ffn.combine")
    }
}
