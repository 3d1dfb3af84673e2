//! Typed launches of the kernels in `kernels.cu`. Buffers are passed as raw device addresses
//! (`u64`, 0 for "none"), so a launch costs one driver call and can be captured into a graph.

use cudarc::driver::{LaunchArgs, LaunchConfig, PushKernelArg};
use shardline_tensor::DType;

use crate::error::DriverContext;
use crate::{CudaDevice, CudaError};

/// Warps (one output row each) per matvec block; matches `MATVEC_WARPS` in kernels.cu.
const MATVEC_WARPS: u32 = 8;
/// Warps per attention block; matches `ATTN_WARPS`.
const ATTN_WARPS: u32 = 16;
/// Largest head dimension the attention kernel takes (32 lanes x ATTN_MAX_PER_LANE).
pub const MAX_HEAD_DIM: usize = 256;

/// Weights of one or more same-shaped `[n, k]` matrices laid out back to back.
#[derive(Clone, Copy, Debug)]
pub struct Weights {
    pub ptr: u64,
    pub dtype: DType,
    /// Bytes from one matrix (expert) to the next.
    pub matrix_stride_bytes: u64,
}

/// How the outputs of several matrix slots are produced (see `matvec_impl` in kernels.cu).
#[derive(Clone, Copy, Debug)]
pub enum Slots {
    /// One matrix, one output: `y = W x (+ residual)`.
    Single,
    /// `y[s] = W[ids[s]] x[s] (+ residual)` for `count` slots; `ids` on the device.
    Each {
        ids: u64,
        count: u32,
        x_stride: u64,
        y_stride: u64,
    },
    /// Each matrix is `[gate (n rows); up (n rows)]`:
    /// `y[s] = silu(gate[ids[s]] x) * (up[ids[s]] x)` for `count` slots sharing one `x`.
    SwiGlu { ids: u64, count: u32, y_stride: u64 },
}

fn launch(mut args: LaunchArgs<'_>, cfg: LaunchConfig, what: &str) -> Result<(), CudaError> {
    // SAFETY: every kernel's arguments are pushed in the order and types its signature has, and
    // the callers pass addresses of live buffers large enough for the given sizes.
    unsafe { args.launch(cfg) }
        .map(|_| ())
        .during(format!("launching {what}"))
}

/// `y = W x` over `n` rows of `k` columns, per [`Slots`].
#[allow(clippy::too_many_arguments)]
pub fn matvec(
    dev: &CudaDevice,
    w: Weights,
    slots: Slots,
    x: u64,
    residual: u64,
    y: u64,
    n: usize,
    k: usize,
) -> Result<(), CudaError> {
    let kern = dev.kernels();
    let f = match w.dtype {
        DType::BF16 => &kern.matvec_bf16,
        DType::F16 => &kern.matvec_f16,
        DType::F32 => &kern.matvec_f32,
    };
    let (ids, x_stride, mode, y_stride, grid_y) = match slots {
        Slots::Single => (0u64, 0i64, 0i32, 0i64, 1u32),
        Slots::Each {
            ids,
            count,
            x_stride,
            y_stride,
        } => (ids, x_stride as i64, 0, y_stride as i64, count),
        Slots::SwiGlu {
            ids,
            count,
            y_stride,
        } => (ids, 0, 1, y_stride as i64, count),
    };
    let cfg = LaunchConfig {
        grid_dim: ((n as u32).div_ceil(MATVEC_WARPS), grid_y, 1),
        block_dim: (MATVEC_WARPS * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    let es = w.matrix_stride_bytes as i64;
    let (n, k) = (n as i32, k as i32);
    let mut a = dev.stream().launch_builder(f);
    a.arg(&w.ptr)
        .arg(&es)
        .arg(&ids)
        .arg(&x)
        .arg(&x_stride)
        .arg(&mode)
        .arg(&residual)
        .arg(&y)
        .arg(&y_stride)
        .arg(&n)
        .arg(&k);
    launch(a, cfg, "matvec")
}

/// `y = W x` for one `[n, k]` matrix: [`matvec`] with one slot and no residual.
pub fn linear(
    dev: &CudaDevice,
    w: Weights,
    x: u64,
    y: u64,
    n: usize,
    k: usize,
) -> Result<(), CudaError> {
    matvec(dev, w, Slots::Single, x, 0, y, n, k)
}

/// `y = rms_norm(x) * g` for `rows` rows of `d`.
pub fn rms_norm(
    dev: &CudaDevice,
    x: u64,
    g: u64,
    y: u64,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<(), CudaError> {
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (1024.min(d.next_multiple_of(32)) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let d = d as i32;
    let mut a = dev.stream().launch_builder(&dev.kernels().rms_norm);
    a.arg(&x).arg(&g).arg(&y).arg(&d).arg(&eps);
    launch(a, cfg, "rms_norm")
}

/// Geometry of the attention part of a layer.
#[derive(Clone, Copy, Debug)]
pub struct AttentionDims {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Positions the KV cache holds.
    pub capacity: usize,
}

impl AttentionDims {
    /// (heads, KV heads, head_dim, capacity) as the kernels take them.
    fn as_i32(&self) -> (i32, i32, i32, i32) {
        (
            self.n_heads as i32,
            self.n_kv_heads as i32,
            self.head_dim as i32,
            self.capacity as i32,
        )
    }
}

/// Per-head q/k norm (when `q_norm`/`k_norm` are non-zero), rope at `*pos` with the
/// `head_dim / 2` frequencies at `inv_freq`, and KV append.
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_append(
    dev: &CudaDevice,
    dims: AttentionDims,
    qkv: u64,
    pos: u64,
    k_cache: u64,
    v_cache: u64,
    q_norm: u64,
    k_norm: u64,
    eps: f32,
    inv_freq: u64,
) -> Result<(), CudaError> {
    let blocks = dims.n_heads + 2 * dims.n_kv_heads;
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (dims.head_dim.next_multiple_of(32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (h, kvh, d, cap) = dims.as_i32();
    let mut a = dev.stream().launch_builder(&dev.kernels().rope_kv_append);
    a.arg(&qkv)
        .arg(&pos)
        .arg(&k_cache)
        .arg(&v_cache)
        .arg(&q_norm)
        .arg(&k_norm)
        .arg(&eps)
        .arg(&h)
        .arg(&kvh)
        .arg(&d)
        .arg(&cap)
        .arg(&inv_freq);
    launch(a, cfg, "rope_kv_append")
}

/// Attention of the query heads `q` over cache positions `0..=*pos`, into `out`.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    dev: &CudaDevice,
    dims: AttentionDims,
    q: u64,
    k_cache: u64,
    v_cache: u64,
    pos: u64,
    out: u64,
    scale: f32,
) -> Result<(), CudaError> {
    let cfg = LaunchConfig {
        grid_dim: (dims.n_heads as u32, 1, 1),
        block_dim: (ATTN_WARPS * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (h, kvh, d, cap) = dims.as_i32();
    let mut a = dev.stream().launch_builder(&dev.kernels().attention_decode);
    a.arg(&q)
        .arg(&k_cache)
        .arg(&v_cache)
        .arg(&pos)
        .arg(&out)
        .arg(&h)
        .arg(&kvh)
        .arg(&d)
        .arg(&cap)
        .arg(&scale);
    launch(a, cfg, "attention_decode")
}

/// Softmax over `n_experts` router logits, top `k`, optional renormalisation, into `ids`/`weights`.
#[allow(clippy::too_many_arguments)]
pub fn router_top_k(
    dev: &CudaDevice,
    logits: u64,
    n_experts: usize,
    k: usize,
    renormalize: bool,
    expert_map: u64,
    ids: u64,
    weights: u64,
) -> Result<(), CudaError> {
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (e, k, r) = (n_experts as i32, k as i32, renormalize as i32);
    let mut a = dev.stream().launch_builder(&dev.kernels().router_top_k);
    a.arg(&logits)
        .arg(&e)
        .arg(&k)
        .arg(&r)
        .arg(&expert_map)
        .arg(&ids)
        .arg(&weights);
    launch(a, cfg, "router_top_k")
}

/// A sigmoid-gated shared expert's output and its gate logit (both on the device).
#[derive(Clone, Copy, Debug)]
pub struct SharedExpert {
    pub out: u64,
    pub logit: u64,
}

/// `y = residual + sum_s weights[s] * partial[s] (+ sigmoid(logit) * shared.out)` over `count`
/// rows of `n`; `residual` may be 0 (none).
#[allow(clippy::too_many_arguments)]
pub fn combine_slots(
    dev: &CudaDevice,
    partial: u64,
    weights: u64,
    count: usize,
    residual: u64,
    shared: Option<SharedExpert>,
    y: u64,
    n: usize,
) -> Result<(), CudaError> {
    let cfg = LaunchConfig {
        grid_dim: ((n as u32).div_ceil(256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (count, n) = (count as i32, n as i32);
    let (shared_out, shared_logit) = shared.map_or((0, 0), |s| (s.out, s.logit));
    let mut a = dev.stream().launch_builder(&dev.kernels().combine_slots);
    a.arg(&partial)
        .arg(&weights)
        .arg(&count)
        .arg(&residual)
        .arg(&shared_out)
        .arg(&shared_logit)
        .arg(&y)
        .arg(&n);
    launch(a, cfg, "combine_slots")
}

/// Fills `n` elements of `dtype` at `dst` with deterministic pseudo-random values in
/// `[-scale, scale)`.
pub fn fill_uniform(
    dev: &CudaDevice,
    dst: u64,
    n: usize,
    dtype: DType,
    seed: u32,
    scale: f32,
) -> Result<(), CudaError> {
    let cfg = LaunchConfig {
        grid_dim: (((n as u64).div_ceil(256)).min(65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let code: i32 = match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    };
    let n = n as i64;
    let mut a = dev.stream().launch_builder(&dev.kernels().fill_uniform);
    a.arg(&dst).arg(&n).arg(&code).arg(&seed).arg(&scale);
    launch(a, cfg, "fill_uniform")
}
