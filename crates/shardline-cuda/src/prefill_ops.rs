//! The prefill kernels of `prefill.cu` (a module of their own, compiled with NVRTC on first use and
//! cached on disk like the decode kernels) and their typed launches. Buffers are raw device
//! addresses (`u64`, 0 for "none"), as in [`crate::ops`].

use cudarc::driver::{CudaFunction, LaunchConfig};

use crate::error::DriverContext;
use crate::ops::{kernel_args, launch_plain, AttentionDims};
use crate::{ptx_cache, CudaDevice, CudaError};

/// The kernel source of prefill.
const PREFILL_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("prefill.cu"));

/// Warps per attention block; matches `PREFILL_ATTN_WARPS` in prefill.cu.
const ATTN_WARPS: u32 = 8;

/// Handles of every kernel in `prefill.cu`.
pub struct PrefillKernels {
    split16: CudaFunction,
    gather_rows: CudaFunction,
    attention_rows: CudaFunction,
    swiglu_rows: CudaFunction,
    combine_rows: CudaFunction,
}

/// A grid-stride launch over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n.div_ceil(256)).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
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
            attention_rows: f("attention_rows")?,
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
        launch_plain(
            dev,
            &self.split16,
            elementwise(n as usize),
            &mut kernel_args![x, hi, lo, n, bf16],
            "split16",
        )
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
        launch_plain(
            dev,
            &self.gather_rows,
            cfg,
            &mut kernel_args![src, rows, dst, d],
            "gather_rows",
        )
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
        let (h, kvh, d, cap) = dims.as_i32();
        let pos0 = pos0 as i32;
        let scale = 1.0 / (dims.head_dim as f32).sqrt();
        launch_plain(
            dev,
            &self.attention_rows,
            cfg,
            &mut kernel_args![qkv, kv_cache.0, kv_cache.1, pos0, out, h, kvh, d, cap, scale],
            "attention_rows",
        )
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
        launch_plain(
            dev,
            &self.swiglu_rows,
            cfg,
            &mut kernel_args![gate_up, act, rows, n],
            "swiglu_rows",
        )
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
        launch_plain(
            dev,
            &self.combine_rows,
            cfg,
            &mut kernel_args![
                expert_out,
                slot_row,
                weights,
                k,
                shared_out,
                shared_logit,
                y,
                n
            ],
            "combine_rows",
        )
    }
}
