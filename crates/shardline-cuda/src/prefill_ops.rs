//! The prefill kernels of `prefill.cu` (a module of their own, compiled with NVRTC on first use and
//! cached on disk like the decode kernels) and their typed launches. Buffers are raw device
//! addresses (`u64`, 0 for "none"), as in [`crate::ops`].

use cudarc::driver::{CudaFunction, LaunchConfig};
use shardline_tensor::DType;

use crate::error::DriverContext;
use crate::ops::{kernel_args, launch, launch_plain, AttentionDims, KvRows, Weights};
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
    /// Grouped products per weight dtype (f32, f16, bf16): plain, and SwiGLU.
    grouped: [CudaFunction; 3],
    grouped_glu: [CudaFunction; 3],
    /// Grouped products of 16-bit weights on the tensor cores, per tile count ([`MMA_TILES`])
    /// and dtype (f16, bf16): plain, and SwiGLU.
    grouped_mma: [[CudaFunction; 2]; 2],
    grouped_mma_glu: [[CudaFunction; 2]; 2],
    /// Whether the device has the tensor-core instructions `grouped_mma_*` use (sm_80 on).
    tensor_cores: bool,
    group_by_expert: CudaFunction,
}

/// Warps per block of the grouped products; matches `GROUPED_WARPS` in prefill.cu.
const GROUPED_WARPS: usize = 8;
/// Warps per block of the tensor-core grouped products; matches `MMA_WARPS` in prefill.cu.
const MMA_WARPS: usize = 4;
/// The tile counts (of 8 assignments) the tensor-core grouped products are compiled for.
const MMA_TILES: [usize; 2] = [4, 8];
/// Steps of fewer rows keep their products on the CUDA cores: with few rows a product is bound
/// by the weights' bytes, which the CUDA-core kernel streams faster; with many, by arithmetic,
/// which the tensor cores do faster (docs/performance.md, batched decode on the GPU).
const MMA_MIN_ROWS: usize = 32;

/// A grouped product for a batch of rows (see `grouped_matvec_impl` in prefill.cu): assignments
/// (a row of `x` and a matrix) grouped by matrix, each weight row read once for its whole group.
#[derive(Clone, Copy, Debug)]
pub struct Grouped {
    /// The matrices (`groups` of them, `matrix_stride_bytes` apart), `[n, k]` each, or
    /// `[2n, k]` (gate; up) with `swiglu`.
    pub w: Weights,
    /// Groups (the grid's y dimension): matrices with assignments, or with `active` the length
    /// of that list.
    pub groups: usize,
    /// Device address of `groups` `i32` matrix indices, the groups with assignments (-1: none;
    /// written by [`PrefillKernels::group_by_expert`]); 0: group `g` uses matrix `g`.
    pub active: u64,
    /// Device address of `groups + 1` `i32` offsets of each group's assignments; 0: one group of
    /// `count` assignments.
    pub offsets: u64,
    /// Assignments when `offsets` is 0.
    pub count: usize,
    /// The most assignments a group can have (the step's rows): sizes the tensor-core tiles.
    pub most: usize,
    /// Device address of each assignment's `i32` row of `x`; 0: assignment `a` reads row `a`.
    pub src: u64,
    /// Device address of the f32 input rows of `k` values.
    pub x: u64,
    /// Device address of f32 rows added to the outputs (laid out as `y`); 0: none.
    pub residual: u64,
    /// Device address of the f32 output rows, `y_stride` values apart.
    pub y: u64,
    /// Output values per row.
    pub n: usize,
    /// Input values per row.
    pub k: usize,
    /// f32 values from one output row to the next.
    pub y_stride: usize,
    /// `y = silu(gate x) * (up x)`.
    pub swiglu: bool,
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
        // `{prefix}_{f16|bf16}_t{tiles}` for each tile count.
        let mma = |prefix: &str| -> Result<[[CudaFunction; 2]; 2], CudaError> {
            let [a, b] = MMA_TILES.map(|t| {
                Ok::<_, CudaError>([
                    f(&format!("{prefix}_f16_t{t}"))?,
                    f(&format!("{prefix}_bf16_t{t}"))?,
                ])
            });
            Ok([a?, b?])
        };
        Ok(PrefillKernels {
            split16: f("split16")?,
            gather_rows: f("gather_rows")?,
            attention_rows: f("attention_rows")?,
            swiglu_rows: f("swiglu_rows")?,
            combine_rows: f("combine_rows")?,
            grouped: [f("grouped_f32")?, f("grouped_f16")?, f("grouped_bf16")?],
            grouped_glu: [
                f("grouped_glu_f32")?,
                f("grouped_glu_f16")?,
                f("grouped_glu_bf16")?,
            ],
            grouped_mma: mma("grouped_mma")?,
            grouped_mma_glu: mma("grouped_mma_glu")?,
            // SHARDLINE_GROUPED_MMA=0 keeps the CUDA-core products, for comparing the two.
            tensor_cores: major >= 8
                && std::env::var("SHARDLINE_GROUPED_MMA").map_or(true, |v| v != "0"),
            group_by_expert: f("group_by_expert")?,
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
        launch(
            dev,
            &self.gather_rows,
            cfg,
            &mut kernel_args![src, rows, dst, d],
            "gather_rows",
        )
    }

    /// Causal attention of `rows` rows (queries in the rotated `qkv` rows), each over its
    /// sequence's positions up to its own, where `kv` places them, into `out`
    /// (`[rows, n_heads * head_dim]`).
    pub fn attention_rows(
        &self,
        dev: &CudaDevice,
        dims: AttentionDims,
        rows: usize,
        qkv: u64,
        kv: KvRows,
        out: u64,
    ) -> Result<(), CudaError> {
        let cfg = LaunchConfig {
            grid_dim: (dims.n_heads as u32, rows as u32, 1),
            block_dim: (ATTN_WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (h, kvh, d, cap) = dims.as_i32();
        let (pos0, positions, tables, stride, block, kv16) = kv.placement();
        let (kc, vc) = (kv.k_cache, kv.v_cache);
        let scale = 1.0 / (dims.head_dim as f32).sqrt();
        launch(
            dev,
            &self.attention_rows,
            cfg,
            &mut kernel_args![
                qkv, kc, vc, pos0, positions, tables, stride, block, kv16, out, h, kvh, d, cap,
                scale
            ],
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
        residual: u64,
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
        launch(
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
                residual,
                y,
                n
            ],
            "combine_rows",
        )
    }

    /// Runs the grouped product `g`.
    pub fn grouped(&self, dev: &CudaDevice, g: &Grouped) -> Result<(), CudaError> {
        let which = match g.w.dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
            other => {
                return Err(CudaError::Shape(format!(
                    "grouped products of {other} weights (f32, f16 and bf16 only)"
                )))
            }
        };
        if g.groups == 0 || g.n == 0 || g.k == 0 {
            return Ok(());
        }
        // Steps of many rows with 16-bit weights in rows of whole 16-byte packs go to the tensor
        // cores: a warp holds 16 weight rows (8 gate and 8 up rows with SwiGLU). The rest takes
        // the CUDA-core kernel, whose warps hold two rows (a gate and an up row).
        let mma = self.tensor_cores && which > 0 && g.k.is_multiple_of(8) && g.most >= MMA_MIN_ROWS;
        // Enough tiles for a group's assignments in one pass (larger groups take several).
        let tiles = MMA_TILES
            .iter()
            .position(|&t| 8 * t >= g.most)
            .unwrap_or(MMA_TILES.len() - 1);
        let (f, units, warps) = match (mma, g.swiglu) {
            (true, false) => (
                &self.grouped_mma[tiles][which - 1],
                g.n.div_ceil(16),
                MMA_WARPS,
            ),
            (true, true) => (
                &self.grouped_mma_glu[tiles][which - 1],
                g.n.div_ceil(8),
                MMA_WARPS,
            ),
            (false, false) => (&self.grouped[which], g.n.div_ceil(2), GROUPED_WARPS),
            (false, true) => (&self.grouped_glu[which], g.n, GROUPED_WARPS),
        };
        let cfg = LaunchConfig {
            grid_dim: (units.div_ceil(warps) as u32, g.groups.min(65_535) as u32, 1),
            block_dim: (warps as u32 * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let stride = g.w.matrix_stride_bytes as i64;
        let (count, n, k, y_stride) = (g.count as i32, g.n as i32, g.k as i32, g.y_stride as i32);
        launch(
            dev,
            f,
            cfg,
            &mut kernel_args![
                g.w.ptr, stride, g.active, g.offsets, count, g.src, g.x, g.residual, g.y, n, k,
                y_stride
            ],
            "grouped",
        )
    }

    /// Groups the `slots` chosen local experts `ids` (`[rows, k]`, -1: another rank's) of a batch
    /// by expert: `offsets` (`experts + 1`), each assignment's row `src`, each slot's assignment
    /// `slot_row`, and the experts with assignments, `active` (the first
    /// [`active_groups`]`(slots, experts)` entries; see `group_by_expert` in prefill.cu).
    #[allow(clippy::too_many_arguments)]
    pub fn group_by_expert(
        &self,
        dev: &CudaDevice,
        ids: u64,
        slots: usize,
        k: usize,
        experts: usize,
        offsets: u64,
        src: u64,
        slot_row: u64,
        active: u64,
    ) -> Result<(), CudaError> {
        let shared = (experts + 1 + slots) * 4;
        if shared > 48 * 1024 {
            return Err(CudaError::Shape(format!(
                "{slots} expert slots of {experts} experts: more than one block can group"
            )));
        }
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let active_len = active_groups(slots, experts) as i32;
        let (slots, k, experts) = (slots as i32, k as i32, experts as i32);
        launch(
            dev,
            &self.group_by_expert,
            cfg,
            &mut kernel_args![ids, slots, k, experts, offsets, src, slot_row, active, active_len],
            "group_by_expert",
        )
    }
}

/// How many experts of `experts` can have assignments among `slots` chosen ones: the length of
/// [`PrefillKernels::group_by_expert`]'s `active` list, and the grid of the grouped products that
/// read it.
pub fn active_groups(slots: usize, experts: usize) -> usize {
    slots.min(experts)
}
