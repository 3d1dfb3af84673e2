//! The prefill kernels of `prefill.cu` (a module of their own, compiled with NVRTC on first use and
//! cached on disk like the decode kernels) and their typed launches. Buffers are raw device
//! addresses (`u64`, 0 for "none"), as in [`crate::ops`].

use cudarc::driver::{CudaFunction, LaunchArgs, LaunchConfig, PushKernelArg};

use crate::error::DriverContext;
use crate::ops::AttentionDims;
use crate::{ptx_cache, CudaDevice, CudaError};

/// The kernel source of prefill.
const PREFILL_SOURCE: &str = include_str!("prefill.cu");

/// Warps per attention block; matches `PREFILL_ATTN_WARPS` in prefill.cu.
const ATTN_WARPS: u32 = 8;

/// Handles of every kernel in `prefill.cu`.
pub struct PrefillKernels {
    split16: CudaFunction,
    gather_rows: CudaFunction,
    rope_kv_append_rows: CudaFunction,
    attention_rows: CudaFunction,
    router_top_k_rows: CudaFunction,
    swiglu_rows: CudaFunction,
    combine_rows: CudaFunction,
}

fn launch(mut args: LaunchArgs<'_>, cfg: LaunchConfig, what: &str) -> Result<(), CudaError> {
    // SAFETY: every kernel's arguments are pushed in the order and types its signature has, and
    // the callers pass addresses of live buffers large enough for the given sizes.
    unsafe { args.launch(cfg) }
        .map(|_| ())
        .during(format!("launching {what}"))
}

/// A grid-stride launch over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n.div_ceil(256)).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// (heads, KV heads, head_dim, capacity) as the kernels take them.
fn dims_i32(d: &AttentionDims) -> (i32, i32, i32, i32) {
    (
        d.n_heads as i32,
        d.n_kv_heads as i32,
        d.head_dim as i32,
        d.capacity as i32,
    )
}

/// Compiles the prefill kernels for Hopper (compute_90) without a GPU: only NVRTC is needed.
pub fn check_prefill_kernels_compile() -> Result<(), CudaError> {
    // SAFETY: only tries to load the shared library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::Unavailable(
            "NVRTC (libnvrtc.so) was not found: put the CUDA toolkit's lib64 directory on \
             LD_LIBRARY_PATH"
                .into(),
        ));
    }
    ptx_cache::compile(PREFILL_SOURCE, "compute_90").map(|_| ())
}

impl PrefillKernels {
    /// Compiles (or loads from the cache) and loads the prefill kernels on `dev`.
    pub fn load(dev: &CudaDevice) -> Result<PrefillKernels, CudaError> {
        let ctx = dev.context();
        let (major, minor) = ctx
            .compute_capability()
            .during("reading the compute capability")?;
        let ptx = ptx_cache::compile_cached(PREFILL_SOURCE, major, minor)?;
        let module = ctx
            .load_module(ptx)
            .during("loading the prefill kernel module")?;
        let f = |name: &str| {
            module
                .load_function(name)
                .during(format!("loading kernel {name}"))
        };
        Ok(PrefillKernels {
            split16: f("split16")?,
            gather_rows: f("gather_rows")?,
            rope_kv_append_rows: f("rope_kv_append_rows")?,
            attention_rows: f("attention_rows")?,
            router_top_k_rows: f("router_top_k_rows")?,
            swiglu_rows: f("swiglu_rows")?,
            combine_rows: f("combine_rows")?,
        })
    }

    /// `hi = round(x)`, `lo = round(x - hi)` for `n` f32 values, in bf16 or else f16.
    pub fn split16(
        &self,
        dev: &CudaDevice,
        x: u64,
        hi: u64,
        lo: u64,
        n: usize,
        bf16: bool,
    ) -> Result<(), CudaError> {
        let (n, bf16) = (n as i64, bf16 as i32);
        let mut a = dev.stream().launch_builder(&self.split16);
        a.arg(&x).arg(&hi).arg(&lo).arg(&n).arg(&bf16);
        launch(a, elementwise(n as usize), "split16")
    }

    /// `dst[a] = src[rows[a]]` for `count` rows of `d` floats.
    pub fn gather_rows(
        &self,
        dev: &CudaDevice,
        src: u64,
        rows: u64,
        dst: u64,
        count: usize,
        d: usize,
    ) -> Result<(), CudaError> {
        let cfg = LaunchConfig {
            grid_dim: (count as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let d = d as i32;
        let mut a = dev.stream().launch_builder(&self.gather_rows);
        a.arg(&src).arg(&rows).arg(&dst).arg(&d);
        launch(a, cfg, "gather_rows")
    }

    /// Bias, per-head q/k norm, rope and KV append for `rows` rows of `[q | k | v]` at positions
    /// `pos0..pos0 + rows`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv_append_rows(
        &self,
        dev: &CudaDevice,
        dims: AttentionDims,
        rows: usize,
        qkv: u64,
        bias: u64,
        pos0: usize,
        kv_cache: (u64, u64),
        qk_norm: (u64, u64),
        eps: f32,
        inv_freq: u64,
    ) -> Result<(), CudaError> {
        let blocks = dims.n_heads + 2 * dims.n_kv_heads;
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, rows as u32, 1),
            block_dim: (dims.head_dim.next_multiple_of(32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (h, kvh, d, cap) = dims_i32(&dims);
        let pos0 = pos0 as i32;
        let mut a = dev.stream().launch_builder(&self.rope_kv_append_rows);
        a.arg(&qkv)
            .arg(&bias)
            .arg(&pos0)
            .arg(&kv_cache.0)
            .arg(&kv_cache.1)
            .arg(&qk_norm.0)
            .arg(&qk_norm.1)
            .arg(&eps)
            .arg(&h)
            .arg(&kvh)
            .arg(&d)
            .arg(&cap)
            .arg(&inv_freq);
        launch(a, cfg, "rope_kv_append_rows")
    }

    /// Causal attention of `rows` rows (queries in the rotated `qkv` rows) at positions
    /// `pos0..pos0 + rows` over the KV cache, into `out` (`[rows, n_heads * head_dim]`).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_rows(
        &self,
        dev: &CudaDevice,
        dims: AttentionDims,
        rows: usize,
        qkv: u64,
        kv_cache: (u64, u64),
        pos0: usize,
        out: u64,
    ) -> Result<(), CudaError> {
        let cfg = LaunchConfig {
            grid_dim: (dims.n_heads as u32, rows as u32, 1),
            block_dim: (ATTN_WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (h, kvh, d, cap) = dims_i32(&dims);
        let pos0 = pos0 as i32;
        let scale = 1.0 / (dims.head_dim as f32).sqrt();
        let mut a = dev.stream().launch_builder(&self.attention_rows);
        a.arg(&qkv)
            .arg(&kv_cache.0)
            .arg(&kv_cache.1)
            .arg(&pos0)
            .arg(&out)
            .arg(&h)
            .arg(&kvh)
            .arg(&d)
            .arg(&cap)
            .arg(&scale);
        launch(a, cfg, "attention_rows")
    }

    /// Per row: softmax over `n_experts` logits, top `k`, optional renormalisation, into
    /// `ids`/`weights` (`[rows, k]`), ids mapped through `expert_map` when it is non-zero.
    #[allow(clippy::too_many_arguments)]
    pub fn router_top_k_rows(
        &self,
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
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (e, k, r) = (n_experts as i32, k as i32, renormalize as i32);
        let mut a = dev.stream().launch_builder(&self.router_top_k_rows);
        a.arg(&logits)
            .arg(&e)
            .arg(&k)
            .arg(&r)
            .arg(&expert_map)
            .arg(&ids)
            .arg(&weights);
        launch(a, cfg, "router_top_k_rows")
    }

    /// `act = silu(gate) * up` for `rows` rows of `[gate (n) | up (n)]`.
    pub fn swiglu_rows(
        &self,
        dev: &CudaDevice,
        gate_up: u64,
        act: u64,
        rows: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        let cfg = elementwise(rows * n);
        let (rows, n) = (rows as i64, n as i32);
        let mut a = dev.stream().launch_builder(&self.swiglu_rows);
        a.arg(&gate_up).arg(&act).arg(&rows).arg(&n);
        launch(a, cfg, "swiglu_rows")
    }

    /// `y[r] = sum_j weights[r, j] * expert_out[slot_row[r, j]] (+ sigmoid(logit[r]) * shared[r])`
    /// for `rows` rows of `n`.
    #[allow(clippy::too_many_arguments)]
    pub fn combine_rows(
        &self,
        dev: &CudaDevice,
        rows: usize,
        k: usize,
        expert_out: u64,
        slot_row: u64,
        weights: u64,
        shared: Option<crate::ops::SharedExpert>,
        y: u64,
        n: usize,
    ) -> Result<(), CudaError> {
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (k, n) = (k as i32, n as i32);
        let (shared_out, shared_logit) = shared.map_or((0, 0), |s| (s.out, s.logit));
        let mut a = dev.stream().launch_builder(&self.combine_rows);
        a.arg(&expert_out)
            .arg(&slot_row)
            .arg(&weights)
            .arg(&k)
            .arg(&shared_out)
            .arg(&shared_logit)
            .arg(&y)
            .arg(&n);
        launch(a, cfg, "combine_rows")
    }
}
