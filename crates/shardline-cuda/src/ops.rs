//! Typed launches of the kernels in `kernels.cu`. Buffers are passed as raw device addresses
//! (`u64`, 0 for "none"), so a launch costs one driver call and can be captured into a graph.

use std::ffi::c_void;
use std::ptr::null_mut;

use cudarc::driver::{sys, CudaFunction, LaunchConfig};
use shardline_tensor::DType;

use crate::error::DriverContext;
use crate::{CudaDevice, CudaError};

/// Warps per matvec block (at most `MATVEC_MAX_WARPS` in kernels.cu). Small blocks balance the
/// SMs' share of a matrix best at its end, and let the next kernel's blocks start sooner: on an
/// H200, 2 warps beat 4 and 8 on every preset (docs/architecture.md, "GPU kernel design
/// notes", Matvec).
const MATVEC_WARPS: u32 = 2;
/// Rows of at most this many columns are computed four to a warp (the `_r4` kernels): one group
/// of loads then covers four rows (3 packs of 8 per lane each), not one, so a warp keeps as many
/// bytes in flight as on a long row.
const SHORT_ROW_MAX_K: usize = 3 * 8 * 32;
/// Rows of this many columns take the `_g8` kernels: 8 packs of 8 per lane in flight, the whole
/// row in one group of loads, where kernels.cu's default `UNROLL` of 6 would take two round trips
/// (the second of at most 2 packs). Shorter rows fit one group either way and longer ones keep
/// `UNROLL` (fewer registers, more warps resident): on an H200, the `_g8` kernels for rows of up
/// to 4096 columns made Mixtral-8x7B 2.3 us slower (docs/architecture.md, "GPU kernel design
/// notes", Matvec).
const ONE_GROUP_K: std::ops::RangeInclusive<usize> = (6 * 8 * 32 + 1)..=(8 * 8 * 32);
/// Output rows per warp of the `_r4` kernels.
const SHORT_ROWS_PER_WARP: u32 = 4;
/// Warps per attention block; matches `ATTN_WARPS`.
const ATTN_WARPS: u32 = 16;
/// Largest head dimension the attention kernels take (32 lanes x 8 elements; heads of at most
/// 128 take the kernel of 4 per lane, with half the registers).
pub const MAX_HEAD_DIM: usize = 256;
const SMALL_HEAD_DIM: usize = 128;

/// Weights of one or more same-shaped `[n, k]` matrices laid out back to back.
#[derive(Clone, Copy, Debug)]
pub struct Weights {
    /// Device address of the first matrix, row-major.
    pub ptr: u64,
    /// Element type of the weights; picks the kernel.
    pub dtype: DType,
    /// Bytes from one matrix (expert) to the next.
    pub matrix_stride_bytes: u64,
}

/// How the outputs of several matrix slots are produced (see `matvec_impl` in kernels.cu).
#[derive(Clone, Copy, Debug)]
pub enum Slots {
    /// One matrix, one output: `y = W x (+ residual)`.
    Single,
    /// `y[s] = W[ids[s]] x[s] (+ residual)` for `count` slots; `ids` on the device. With
    /// `ids_early`, the kernel reads the ids (and the first of the chosen rows) before its PDL
    /// wait: only right after a kernel that took the same ids (the matvec lets its successor
    /// start only once it has read its ids).
    Each {
        /// Device address of `count` `i32` matrix indices; a negative one (an expert another
        /// rank holds) gives zeros. 0: slot `s` uses matrix `s`.
        ids: u64,
        /// Whether the ids are read before the PDL wait; safe only under the condition above.
        ids_early: bool,
        /// Number of slots (the launch's grid height).
        count: u32,
        /// f32 elements from one slot's input to the next.
        x_stride: u64,
        /// f32 elements from one slot's output to the next.
        y_stride: u64,
    },
    /// Each matrix is `[gate (n rows); up (n rows)]`:
    /// `y[s] = silu(gate[ids[s]] x) * (up[ids[s]] x)` for `count` slots sharing one `x`.
    SwiGlu {
        /// Device address of `count` `i32` matrix indices, as in [`Slots::Each`].
        ids: u64,
        /// Number of slots.
        count: u32,
        /// f32 elements from one slot's output (`n` values) to the next.
        y_stride: u64,
    },
}

/// Kernel arguments as the driver takes them: a pointer to each value, in the kernel's order.
macro_rules! kernel_args {
    ($($a:expr),* $(,)?) => {
        [$(std::ptr::from_ref(&$a).cast_mut().cast::<std::ffi::c_void>()),*]
    };
}

pub(crate) use kernel_args;

/// Queues `f` on the device's stream. With programmatic dependent launch on (see
/// [`CudaDevice::pdl`]), the kernel may start while the one before it finishes: every kernel in
/// `kernels.cu` waits (`griddepcontrol.wait`) before it touches what earlier kernels wrote.
pub(crate) fn launch(
    dev: &CudaDevice,
    f: &CudaFunction,
    cfg: LaunchConfig,
    args: &mut [*mut c_void],
    what: &str,
) -> Result<(), CudaError> {
    launch_ex(dev, f, cfg, args, what, dev.pdl())
}

/// Queues `f` to start only once the kernel before it has finished (kernels that do not wait for
/// their predecessor themselves, such as prefill.cu's).
pub(crate) fn launch_plain(
    dev: &CudaDevice,
    f: &CudaFunction,
    cfg: LaunchConfig,
    args: &mut [*mut c_void],
    what: &str,
) -> Result<(), CudaError> {
    launch_ex(dev, f, cfg, args, what, false)
}

fn launch_ex(
    dev: &CudaDevice,
    f: &CudaFunction,
    cfg: LaunchConfig,
    args: &mut [*mut c_void],
    what: &str,
    pdl: bool,
) -> Result<(), CudaError> {
    // SAFETY: a zeroed union is a valid value; only the field the id names is read.
    let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
    value.programmaticStreamSerializationAllowed = 1;
    let mut attr = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value,
    };
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: dev.stream().cu_stream(),
        attrs: &mut attr,
        numAttrs: u32::from(pdl),
    };
    dev.context()
        .bind_to_thread()
        .during(format!("binding the context to launch {what}"))?;
    // SAFETY: every caller passes its kernel's arguments in the order and types of its signature
    // (pointers to values that outlive this call), and addresses of live buffers large enough
    // for the given sizes.
    unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), args.as_mut_ptr(), null_mut()) }
        .result()
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
    let (ids, ids_early, x_stride, swiglu, y_stride, grid_y) = match slots {
        Slots::Single => (0u64, false, 0i64, false, 0i64, 1u32),
        Slots::Each {
            ids,
            ids_early,
            count,
            x_stride,
            y_stride,
        } => (
            ids,
            ids_early,
            x_stride as i64,
            false,
            y_stride as i64,
            count,
        ),
        Slots::SwiGlu {
            ids,
            count,
            y_stride,
        } => (ids, false, 0, true, y_stride as i64, count),
    };
    let kern = dev.kernels().matvec(w.dtype);
    let one_group = ONE_GROUP_K.contains(&k);
    let (f, rows_per_warp) = if swiglu {
        (if one_group { &kern.glu_g8 } else { &kern.glu }, 1)
    } else if k <= SHORT_ROW_MAX_K {
        (&kern.r4, SHORT_ROWS_PER_WARP)
    } else {
        (
            if one_group {
                &kern.plain_g8
            } else {
                &kern.plain
            },
            1,
        )
    };
    let cfg = LaunchConfig {
        grid_dim: ((n as u32).div_ceil(MATVEC_WARPS * rows_per_warp), grid_y, 1),
        block_dim: (MATVEC_WARPS * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    let es = w.matrix_stride_bytes as i64;
    let (n, k, ids_early) = (n as i32, k as i32, i32::from(ids_early));
    launch(
        dev,
        f,
        cfg,
        &mut kernel_args![w.ptr, es, ids, ids_early, x, x_stride, residual, y, y_stride, n, k],
        "matvec",
    )
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

/// Threads of the block that normalises a row of `d` (a few elements each).
fn rms_norm_threads(d: usize) -> u32 {
    1024.min(d.next_multiple_of(32)) as u32
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
        block_dim: (rms_norm_threads(d), 1, 1),
        shared_mem_bytes: 0,
    };
    let d = d as i32;
    launch(
        dev,
        &dev.kernels().rms_norm,
        cfg,
        &mut kernel_args![x, g, y, d, eps],
        "rms_norm",
    )
}

/// Widest row [`router_norm`] takes: each block holds the normalised row in shared memory, within
/// the 48 KB a kernel gets without opting in.
const ROUTER_NORM_MAX_K: usize = 8192;

/// Whether [`router_norm`] takes rows of `k` columns.
pub fn router_norm_takes(k: usize) -> bool {
    k <= ROUTER_NORM_MAX_K && k.is_multiple_of(4)
}

/// The FFN's rms_norm and its router in one launch: `normed = rms_norm(x) * g` and
/// `logits = W normed` for the `n` experts' rows of `k` columns.
#[allow(clippy::too_many_arguments)]
pub fn router_norm(
    dev: &CudaDevice,
    w: Weights,
    x: u64,
    g: u64,
    eps: f32,
    normed: u64,
    logits: u64,
    n: usize,
    k: usize,
) -> Result<(), CudaError> {
    if !router_norm_takes(k) {
        return Err(CudaError::Shape(format!(
            "the fused router takes rows of a multiple of 4 up to {ROUTER_NORM_MAX_K} columns, \
             not {k}"
        )));
    }
    let kern = dev.kernels();
    let f = match w.dtype {
        DType::BF16 => &kern.router_norm_bf16,
        DType::F16 => &kern.router_norm_f16,
        DType::F32 => &kern.router_norm_f32,
        DType::Quant(_) => {
            unreachable!("quantized weights are dequantized before they reach the device")
        }
    };
    const WARPS: u32 = 8;
    let cfg = LaunchConfig {
        grid_dim: ((n as u32).div_ceil(WARPS), 1, 1),
        block_dim: (WARPS * 32, 1, 1),
        shared_mem_bytes: (k * 4) as u32,
    };
    let (n, k) = (n as i32, k as i32);
    launch(
        dev,
        f,
        cfg,
        &mut kernel_args![w.ptr, x, g, eps, normed, logits, n, k],
        "router_norm",
    )
}

/// Geometry of the attention part of a layer.
#[derive(Clone, Copy, Debug)]
pub struct AttentionDims {
    /// Query heads this rank computes.
    pub n_heads: usize,
    /// KV heads this rank holds; each serves `n_heads / n_kv_heads` query heads.
    pub n_kv_heads: usize,
    /// Elements per head, at most [`MAX_HEAD_DIM`].
    pub head_dim: usize,
    /// Positions the KV cache holds.
    pub capacity: usize,
}

impl AttentionDims {
    /// (heads, KV heads, head_dim, capacity) as the kernels take them.
    pub(crate) fn as_i32(&self) -> (i32, i32, i32, i32) {
        (
            self.n_heads as i32,
            self.n_kv_heads as i32,
            self.head_dim as i32,
            self.capacity as i32,
        )
    }
}

/// Where the rows of a step sit in a KV cache: at consecutive positions of one sequence (a prompt)
/// or, with `positions`, each at its own position of its own sequence (a batch); with `tables`,
/// in a paged cache whose blocks each sequence's block table lists.
#[derive(Clone, Copy, Debug)]
pub struct KvRows {
    /// Device address of the key cache, `[n_kv_heads, capacity, head_dim]`.
    pub k_cache: u64,
    /// Device address of the value cache, laid out as the key cache.
    pub v_cache: u64,
    /// Whether the caches hold bf16 (else f32).
    pub bf16: bool,
    /// The position of the first row, when `positions` is 0.
    pub first: usize,
    /// Device address of each row's position (`[rows]` i32); 0: `first + row`.
    pub positions: u64,
    /// Device address of each row's block table (`[rows, table_stride]` i32 block ids); 0: the
    /// cache is contiguous and a position is its own cache row.
    pub tables: u64,
    /// Entries of one row's block table.
    pub table_stride: usize,
    /// Positions one block holds.
    pub block: usize,
}

impl KvRows {
    /// Consecutive positions from `first` in the contiguous f32 caches `k_cache`, `v_cache`.
    pub fn contiguous(k_cache: u64, v_cache: u64, first: usize) -> KvRows {
        KvRows {
            k_cache,
            v_cache,
            bf16: false,
            first,
            positions: 0,
            tables: 0,
            table_stride: 0,
            block: 1,
        }
    }

    /// The kernels' placement arguments: (first, positions, tables, stride, block, kv16).
    pub(crate) fn placement(&self) -> (i32, u64, u64, i32, i32, i32) {
        (
            self.first as i32,
            self.positions,
            self.tables,
            self.table_stride as i32,
            self.block as i32,
            self.bf16 as i32,
        )
    }
}

/// What q and k heads get before attention: the per-head RMSNorm (Qwen3; where `q_norm`/`k_norm`
/// are non-zero, with `eps`) and rope with the `head_dim / 2` frequencies at `inv_freq`.
#[derive(Clone, Copy, Debug)]
pub struct HeadRope {
    /// Device address of the `head_dim` f32 weights of the query heads' RMSNorm; 0: none.
    pub q_norm: u64,
    /// Device address of the `head_dim` f32 weights of the key heads' RMSNorm; 0: none.
    pub k_norm: u64,
    /// The q/k RMSNorm's epsilon.
    pub eps: f32,
    /// Device address of the `head_dim / 2` f32 rope inverse frequencies.
    pub inv_freq: u64,
}

/// For `rows` rows of `qkv`: the qkv `bias` (when non-zero), `rope`, and the KV append where
/// `kv` places each row.
pub fn rope_kv_append(
    dev: &CudaDevice,
    dims: AttentionDims,
    rows: usize,
    qkv: u64,
    bias: u64,
    kv: KvRows,
    rope: HeadRope,
) -> Result<(), CudaError> {
    let blocks = dims.n_heads + 2 * dims.n_kv_heads;
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, rows as u32, 1),
        block_dim: (dims.head_dim.next_multiple_of(32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (h, kvh, d, cap) = dims.as_i32();
    let (pos0, positions, tables, stride, block, kv16) = kv.placement();
    let (kc, vc) = (kv.k_cache, kv.v_cache);
    launch(
        dev,
        &dev.kernels().rope_kv_append,
        cfg,
        &mut kernel_args![
            qkv,
            bias,
            pos0,
            positions,
            tables,
            stride,
            block,
            kv16,
            kc,
            vc,
            rope.q_norm,
            rope.k_norm,
            rope.eps,
            h,
            kvh,
            d,
            cap,
            rope.inv_freq
        ],
        "rope_kv_append",
    )
}

/// Decode attention of one token (row 0 of `qkv`, its bias added) at the position `kv.positions`
/// points to: `rope` on its q and k heads, its k and v appended to the caches at that position,
/// and its query heads over positions `0..=pos`, into `out`. The caches are contiguous or paged
/// (`kv.tables`: the sequence's one block table), of f32 or bf16; `kv.first` and
/// `kv.table_stride` are not used. One kernel, so nothing waits between rope and attention.
pub fn attention_decode(
    dev: &CudaDevice,
    dims: AttentionDims,
    qkv: u64,
    rope: HeadRope,
    kv: KvRows,
    out: u64,
    scale: f32,
) -> Result<(), CudaError> {
    let cfg = LaunchConfig {
        grid_dim: (dims.n_heads as u32, 1, 1),
        block_dim: (ATTN_WARPS * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (h, kvh, d, cap) = dims.as_i32();
    let kern = dev.kernels();
    let f = match (dims.head_dim <= SMALL_HEAD_DIM, kv.bf16) {
        (true, false) => &kern.attention_decode_d128,
        (false, false) => &kern.attention_decode,
        (true, true) => &kern.attention_decode_d128_kv16,
        (false, true) => &kern.attention_decode_kv16,
    };
    let block = kv.block as i32;
    launch(
        dev,
        f,
        cfg,
        &mut kernel_args![
            qkv,
            rope.q_norm,
            rope.k_norm,
            rope.eps,
            rope.inv_freq,
            kv.k_cache,
            kv.v_cache,
            kv.positions,
            kv.tables,
            block,
            out,
            h,
            kvh,
            d,
            cap,
            scale
        ],
        "attention_decode",
    )
}

/// For each of `rows` rows of `n_experts` router logits: softmax, top `k`, optional
/// renormalisation, into `ids`/`weights` (`[rows, k]`).
#[allow(clippy::too_many_arguments)]
pub fn router_top_k(
    dev: &CudaDevice,
    rows: usize,
    logits: u64,
    n_experts: usize,
    k: usize,
    renormalize: bool,
    expert_map: u64,
    ids: u64,
    weights: u64,
) -> Result<(), CudaError> {
    if n_experts == 0 || n_experts > 1024 || k == 0 || k > 32 || k > n_experts {
        return Err(CudaError::Shape(format!(
            "the router takes 1 to 1024 experts and a top-k of 1 to 32 (at most the experts), not \
             {n_experts} experts and top-{k}"
        )));
    }
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        // One thread per expert.
        block_dim: (n_experts.next_multiple_of(32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (e, k, r) = (n_experts as i32, k as i32, renormalize as i32);
    launch(
        dev,
        &dev.kernels().router_top_k,
        cfg,
        &mut kernel_args![logits, e, k, r, expert_map, ids, weights],
        "router_top_k",
    )
}

/// A sigmoid-gated shared expert's output and its gate logit (both on the device).
#[derive(Clone, Copy, Debug)]
pub struct SharedExpert {
    /// Device address of the shared expert's `n` f32 outputs.
    pub out: u64,
    /// Device address of the one f32 logit whose sigmoid scales `out`.
    pub logit: u64,
}

/// The next layer's rms_norm, done by the kernel that combines the experts: its gain and where
/// the normalised row goes.
#[derive(Clone, Copy, Debug)]
pub struct NextNorm {
    /// Device address of the next layer's `n` f32 rms_norm gains.
    pub g: u64,
    /// Device address of the `n` f32 values that receive the normalised row.
    pub normed: u64,
    /// The rms_norm's epsilon.
    pub eps: f32,
}

/// `y = residual + sum_s weights[s] * partial[s] (+ sigmoid(logit) * shared.out)` over `count`
/// rows of `n`; `residual` may be 0 (none). With `next`, the same launch also writes
/// `next.normed = rms_norm(y) * next.g` (one block then does all of it).
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
    next: Option<NextNorm>,
) -> Result<(), CudaError> {
    let (count, n32) = (count as i32, n as i32);
    let (shared_out, shared_logit) = shared.map_or((0, 0), |s| (s.out, s.logit));
    let (g, normed, eps) = next.map_or((0, 0, 0.0f32), |nn| (nn.g, nn.normed, nn.eps));
    // combine_slots_norm takes the three trailing arguments; combine_slots stops before them.
    let mut args = kernel_args![
        partial,
        weights,
        count,
        residual,
        shared_out,
        shared_logit,
        y,
        n32,
        g,
        normed,
        eps
    ];
    let kern = dev.kernels();
    let (f, grid, block, n_args, what) = match next {
        None => (
            &kern.combine_slots,
            (n as u32).div_ceil(256),
            256,
            8,
            "combine_slots",
        ),
        Some(_) => {
            let threads = rms_norm_threads(n);
            (
                &kern.combine_slots_norm,
                1,
                threads,
                args.len(),
                "combine_slots_norm",
            )
        }
    };
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    };
    launch(dev, f, cfg, &mut args[..n_args], what)
}

/// The code of a weight dtype in the kernels' `dtype` arguments.
fn dtype_code(dtype: DType) -> i32 {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::Quant(_) => {
            unreachable!("quantized weights are dequantized before they reach the device")
        }
    }
}

/// `x[r] = table[tokens[r]]` as f32 for `rows` rows of a `[vocab, d]` embedding table of `dtype`,
/// the tokens read from device memory (`tokens`, `i32`s already checked against the vocabulary).
pub fn embed_row(
    dev: &CudaDevice,
    table: u64,
    dtype: DType,
    tokens: u64,
    x: u64,
    rows: usize,
    d: usize,
) -> Result<(), CudaError> {
    let cfg = LaunchConfig {
        grid_dim: (1, rows as u32, 1),
        block_dim: (rms_norm_threads(d), 1, 1),
        shared_mem_bytes: 0,
    };
    let (code, d) = (dtype_code(dtype), d as i32);
    launch(
        dev,
        &dev.kernels().embed_row,
        cfg,
        &mut kernel_args![table, code, tokens, x, d],
        "embed_row",
    )
}

/// `best[r] = [max(x[r]), argmax(x[r])]` over each of `rows` rows of `n` f32 values (the lowest
/// index among equal maxima; the index as an f32).
pub fn argmax(dev: &CudaDevice, x: u64, rows: usize, n: usize, best: u64) -> Result<(), CudaError> {
    let cfg = LaunchConfig {
        grid_dim: (1, rows as u32, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    let n = n as i32;
    launch(
        dev,
        &dev.kernels().argmax,
        cfg,
        &mut kernel_args![x, n, best],
        "argmax",
    )
}

/// A grid-stride launch over `n` elements.
fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `y16[i] = round(x[i])` for `n` values, in bf16 or else f16: a partial sum as a 16-bit
/// all-reduce takes it.
pub fn to16(dev: &CudaDevice, x: u64, y16: u64, n: usize, bf16: bool) -> Result<(), CudaError> {
    let (len, bf16) = (n as i64, bf16 as i32);
    launch(
        dev,
        &dev.kernels().to16,
        grid_stride(n),
        &mut kernel_args![x, y16, len, bf16],
        "to16",
    )
}

/// `out[i] = residual[i] + s16[i]` for `n` values (`residual` 0: none; `s16` bf16 or else f16):
/// a 16-bit all-reduce's sum back in the f32 residual stream.
pub fn add16(
    dev: &CudaDevice,
    residual: u64,
    s16: u64,
    out: u64,
    n: usize,
    bf16: bool,
) -> Result<(), CudaError> {
    let (len, bf16) = (n as i64, bf16 as i32);
    launch(
        dev,
        &dev.kernels().add16,
        grid_stride(n),
        &mut kernel_args![residual, s16, out, len, bf16],
        "add16",
    )
}
