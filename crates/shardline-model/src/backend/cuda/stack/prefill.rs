//! Prefill: the two segments of a layer for many rows (prompt tokens) at once, on the weights and
//! KV caches of a [`LayerStack`], so that decode continues from the same caches afterwards.
//!
//! Segment "attention": rms_norm -> qkv GEMM -> bias, q/k norm, rope and KV append for every row
//! -> causal attention of every row over the cache (earlier positions included, so a prompt can
//! come in chunks) -> o_proj GEMM. Segment "ffn": rms_norm -> router GEMM -> softmax/top-k per
//! row on the device -> the chosen experts go to the host (one wait per MoE layer: cuBLAS needs
//! each expert's row count) -> rows gathered per expert -> per expert gate_up GEMM, SwiGLU, down
//! GEMM -> weighted sum per row in slot order (+ the sigmoid-gated shared expert). A dense FFN is
//! one GEMM-SwiGLU-GEMM over all rows. Experts another rank holds (expert parallelism) add nothing.
//! GEMMs run in cuBLAS ([`Gemm`]); the kernels between them are in `prefill.cu`.

use std::ops::Range;

use shardline_cuda::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use shardline_cuda::device::dptr;
use shardline_cuda::error::DriverContext;
use shardline_cuda::gemm::Gemm;
use shardline_cuda::ops::{self, KvRows, SharedExpert, Weights};
use shardline_cuda::prefill_ops::PrefillKernels;
use shardline_cuda::{CudaDevice, CudaError};

use super::paged::PagedKv;
use super::{DeviceFfn, DeviceLayer, DeviceMlp, FfnShape, LayerStack};
use crate::backend::PagedRow;
use crate::kv_pool::BLOCK_POSITIONS;

/// Rows one call takes at most (a CUDA grid's y dimension).
const MAX_ROWS: usize = 65_535;

/// What prefill keeps between calls: its kernels, a cuBLAS handle and activation buffers that grow
/// to the largest call so far.
pub struct Prefill {
    kernels: PrefillKernels,
    gemm: Gemm,
    buf: Buffers,
}

/// Activation buffers (lengths in elements; each at least what the last call needed).
struct Buffers {
    /// The segment's input rows, `[rows, hidden]`.
    x: CudaSlice<f32>,
    normed: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    /// The segment's output rows, `[rows, hidden]`.
    y: CudaSlice<f32>,
    /// The same in the 16-bit type the ranks sum in, when they do.
    y16: CudaSlice<u16>,
    router_logits: CudaSlice<f32>,
    /// `[rows, top_k]` chosen experts (local numbers, -1: another rank's) and their weights.
    expert_ids: CudaSlice<i32>,
    expert_weights: CudaSlice<f32>,
    /// The source row of each (row, expert) assignment, in expert order.
    gather: CudaSlice<i32>,
    /// The assignment of each (row, slot), or -1.
    slot_row: CudaSlice<i32>,
    /// Rows gathered per expert, `[assignments, hidden]`.
    gathered: CudaSlice<f32>,
    gate_up: CudaSlice<f32>,
    act: CudaSlice<f32>,
    expert_out: CudaSlice<f32>,
    shared_out: CudaSlice<f32>,
    shared_logit: CudaSlice<f32>,
    /// Each row's position and block table, in a paged step.
    positions: CudaSlice<i32>,
    tables: CudaSlice<i32>,
}

/// Where the rows of an attention segment sit in the KV cache.
pub enum KvPlace<'a> {
    /// Consecutive positions from this one, in the stack's own caches (a prompt).
    Next(usize),
    /// Each row at its own position of its own sequence, in a paged pool (a batch).
    Paged(&'a PagedKv, &'a [PagedRow<'a>]),
}

/// The address of `buf`, after growing it to at least `len` elements.
fn fit<T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    buf: &mut CudaSlice<T>,
    len: usize,
) -> Result<u64, CudaError> {
    if buf.len() < len {
        *buf = dev.zeros(len)?;
    }
    Ok(dptr(dev, buf))
}

/// Copies `src` to the start of `buf`, grown to fit; returns its address.
fn put<T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    buf: &mut CudaSlice<T>,
    src: &[T],
) -> Result<u64, CudaError> {
    let p = fit(dev, buf, src.len())?;
    dev.stream()
        .memcpy_htod(src, buf)
        .during("copying prefill rows to the device")?;
    Ok(p)
}

/// Copies the first `dst.len()` elements of `buf` to `dst` (waits for the stream).
fn get(dev: &CudaDevice, buf: &CudaSlice<f32>, dst: &mut [f32]) -> Result<(), CudaError> {
    dev.stream()
        .memcpy_dtoh(&buf.slice(0..dst.len()), dst)
        .during("copying prefill rows from the device")
}

/// Copies a segment's output rows to `out`, first summing them across the ranks on the GPU when
/// the stack has a communicator (as the decode path does: the engine then skips its host sum);
/// `y16` is room for them in the 16-bit type the ranks may sum in.
fn finish(
    dev: &CudaDevice,
    stack: &LayerStack,
    y: &CudaSlice<f32>,
    y16: &mut CudaSlice<u16>,
    out: &mut [f32],
) -> Result<(), CudaError> {
    if let Some(comm) = stack.comm() {
        let y16 = fit(dev, y16, out.len())?;
        // SAFETY: `y` holds at least `out.len()` f32 (fitted to the rows) and `y16` as many
        // 16-bit values; both live in `self` until the download below has waited for the stream.
        // The segments left the residual out: the engine adds it on the host.
        unsafe { stack.sum_across_ranks(dev, dptr(dev, y), out.len(), 0, y16)? };
        comm.wait(dev)?;
    }
    get(dev, y, out)
}

/// Each (row, slot) choice of experts, grouped by expert: what to gather and where it lands.
#[derive(Debug, PartialEq)]
struct Grouping {
    /// Source row of each assignment; assignments are in expert order, rows in order within one.
    gather: Vec<i32>,
    /// For each (row, slot), its assignment, or -1 where the expert is another rank's.
    slot_row: Vec<i32>,
    /// Each expert with rows, and its assignments.
    runs: Vec<(usize, Range<usize>)>,
}

/// Groups `[rows, k]` local expert ids (-1: not here) by expert.
fn group_by_expert(ids: &[i32], k: usize) -> Grouping {
    let mut order: Vec<usize> = (0..ids.len()).filter(|&s| ids[s] >= 0).collect();
    order.sort_by_key(|&s| ids[s]);
    let mut slot_row = vec![-1i32; ids.len()];
    let mut gather = Vec::with_capacity(order.len());
    let mut runs: Vec<(usize, Range<usize>)> = Vec::new();
    for (a, &s) in order.iter().enumerate() {
        slot_row[s] = a as i32;
        gather.push((s / k) as i32);
        let e = ids[s] as usize;
        match runs.last_mut() {
            Some((last, range)) if *last == e => range.end = a + 1,
            _ => runs.push((e, a..a + 1)),
        }
    }
    Grouping {
        gather,
        slot_row,
        runs,
    }
}

/// A SwiGLU MLP's products for `rows` rows of `x`: where its weights are and its sizes.
struct MlpRun {
    gate_up: Weights,
    down: Weights,
    intermediate: usize,
}

impl Prefill {
    /// Loads the prefill kernels and cuBLAS on `dev`.
    pub fn new(dev: &CudaDevice) -> Result<Prefill, CudaError> {
        let z = || dev.zeros::<f32>(1);
        Ok(Prefill {
            kernels: PrefillKernels::load(dev)?,
            gemm: Gemm::new(dev)?,
            buf: Buffers {
                x: z()?,
                normed: z()?,
                qkv: z()?,
                attn: z()?,
                y: z()?,
                y16: dev.zeros(1)?,
                router_logits: z()?,
                expert_ids: dev.zeros(1)?,
                expert_weights: z()?,
                gather: dev.zeros(1)?,
                slot_row: dev.zeros(1)?,
                gathered: z()?,
                gate_up: z()?,
                act: z()?,
                expert_out: z()?,
                shared_out: z()?,
                shared_logit: z()?,
                positions: dev.zeros(1)?,
                tables: dev.zeros(1)?,
            },
        })
    }

    /// Rows in `x` (whole rows of `hidden`, as many as `out` has, at most [`MAX_ROWS`]).
    fn rows(stack: &LayerStack, x: &[f32], out: &[f32]) -> Result<usize, CudaError> {
        let h = stack.shape.hidden;
        let rows = x.len() / h;
        if x.is_empty() || rows * h != x.len() || out.len() != x.len() || rows > MAX_ROWS {
            return Err(CudaError::Shape(format!(
                "prefill of {} values into {}: whole rows of {h}, 1 to {MAX_ROWS} of them",
                x.len(),
                out.len()
            )));
        }
        Ok(rows)
    }

    fn layer(stack: &LayerStack, l: usize) -> Result<&DeviceLayer, CudaError> {
        stack.layers.get(l).ok_or_else(|| {
            CudaError::Shape(format!("layer {l} of a stack of {}", stack.layers.len()))
        })
    }

    /// The attention segment of layer `l` for the rows `x` (`[rows, hidden]`) where `place` puts
    /// them: appends their keys and values to the KV cache and writes the partial residual update
    /// (o_proj's output) to `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &mut self,
        dev: &CudaDevice,
        stack: &LayerStack,
        l: usize,
        place: KvPlace,
        x: &[f32],
        out: &mut [f32],
    ) -> Result<(), CudaError> {
        let rows = Self::rows(stack, x, out)?;
        let (sh, w) = (&stack.shape, Self::layer(stack, l)?);
        let mut dims = sh.attention_dims();
        let kv = match place {
            KvPlace::Next(pos0) => {
                if pos0 + rows > sh.capacity {
                    return Err(CudaError::Shape(format!(
                        "positions {pos0}..{} are beyond the KV cache's {} positions",
                        pos0 + rows,
                        sh.capacity
                    )));
                }
                KvRows::contiguous(dptr(dev, &w.k_cache), dptr(dev, &w.v_cache), pos0)
            }
            KvPlace::Paged(pool, placed) => {
                if placed.len() != rows {
                    return Err(CudaError::Shape(format!(
                        "{} placed rows for a segment of {rows}",
                        placed.len()
                    )));
                }
                let (positions, tables, stride) = pool.placement(placed, 0)?;
                let (k_cache, v_cache) = pool.layer(dev, l)?;
                dims.capacity = pool.positions();
                KvRows {
                    k_cache,
                    v_cache,
                    bf16: pool.is_bf16(),
                    first: 0,
                    positions: put(dev, &mut self.buf.positions, &positions)?,
                    tables: put(dev, &mut self.buf.tables, &tables)?,
                    table_stride: stride,
                    block: BLOCK_POSITIONS,
                }
            }
        };
        let (h, q) = (sh.hidden, sh.q_dim());
        let k = &self.kernels;
        let b = &mut self.buf;
        let opt = |b: &Option<CudaSlice<f32>>| b.as_ref().map_or(0, |b| dptr(dev, b));
        let xp = put(dev, &mut b.x, x)?;
        let normed = fit(dev, &mut b.normed, rows * h)?;
        let qkv = fit(dev, &mut b.qkv, rows * sh.qkv_rows())?;
        let attn = fit(dev, &mut b.attn, rows * q)?;
        let y = fit(dev, &mut b.y, rows * h)?;
        ops::rms_norm(dev, xp, dptr(dev, &w.attn_norm), normed, rows, h, sh.eps)?;
        let wq = w.weights(dev, &w.qkv, 0);
        self.gemm
            .linear(dev, k, wq, normed, qkv, rows, sh.qkv_rows(), h)?;
        let bias = opt(&w.qkv_bias);
        ops::rope_kv_append(dev, dims, rows, qkv, bias, kv, stack.head_rope(dev, w))?;
        k.attention_rows(dev, dims, rows, qkv, kv, attn)?;
        let wo = w.weights(dev, &w.o, 0);
        self.gemm.linear(dev, k, wo, attn, y, rows, h, q)?;
        finish(dev, stack, &self.buf.y, &mut self.buf.y16, out)
    }

    /// The FFN segment of layer `l` for the rows `x`: writes the partial residual update to `out`.
    pub fn ffn(
        &mut self,
        dev: &CudaDevice,
        stack: &LayerStack,
        l: usize,
        x: &[f32],
        out: &mut [f32],
    ) -> Result<(), CudaError> {
        let rows = Self::rows(stack, x, out)?;
        let (sh, w) = (&stack.shape, Self::layer(stack, l)?);
        let h = sh.hidden;
        let xp = put(dev, &mut self.buf.x, x)?;
        let normed = fit(dev, &mut self.buf.normed, rows * h)?;
        let y = fit(dev, &mut self.buf.y, rows * h)?;
        ops::rms_norm(dev, xp, dptr(dev, &w.ffn_norm), normed, rows, h, sh.eps)?;
        match (&w.ffn, &w.ffn_shape) {
            (DeviceFfn::Dense(mlp), FfnShape::Dense { intermediate }) => {
                let run = Self::mlp_run(dev, w, mlp, 0, *intermediate, h);
                self.mlp(dev, &run, normed, y, rows, h)?;
            }
            (
                DeviceFfn::Moe {
                    router,
                    experts,
                    expert_map,
                    shared,
                },
                FfnShape::Moe {
                    n_experts,
                    top_k,
                    intermediate,
                    renormalize,
                    shared_intermediate,
                },
            ) => {
                let k = *top_k;
                let b = &mut self.buf;
                let logits = fit(dev, &mut b.router_logits, rows * n_experts)?;
                let ids = fit(dev, &mut b.expert_ids, rows * k)?;
                let weights = fit(dev, &mut b.expert_weights, rows * k)?;
                let r = w.weights(dev, router, 0);
                self.gemm
                    .linear(dev, &self.kernels, r, normed, logits, rows, *n_experts, h)?;
                let map = expert_map.as_ref().map_or(0, |m| dptr(dev, m));
                let (e, renorm) = (*n_experts, *renormalize);
                ops::router_top_k(dev, rows, logits, e, k, renorm, map, ids, weights)?;
                let mut chosen = vec![0i32; rows * k];
                dev.stream()
                    .memcpy_dtoh(&self.buf.expert_ids.slice(0..rows * k), &mut chosen)
                    .during("copying the chosen experts to the host")?;
                let held = experts.gate_up.len() / (2 * intermediate * h * w.dtype.size_in_bytes());
                if let Some(&bad) = chosen.iter().find(|&&e| e >= held as i32) {
                    return Err(CudaError::Shape(format!(
                        "the router chose local expert {bad} of {held}"
                    )));
                }
                let g = group_by_expert(&chosen, k);
                let slot_row = put(dev, &mut self.buf.slot_row, &g.slot_row)?;
                self.experts(dev, w, experts, &g, *intermediate, normed, h)?;
                let shared = match (shared, shared_intermediate) {
                    (Some(shared), Some(si)) => {
                        Some(self.shared_expert(dev, w, shared, *si, normed, rows, h)?)
                    }
                    _ => None,
                };
                let expert_out = dptr(dev, &self.buf.expert_out);
                self.kernels
                    .combine_rows(dev, rows, k, expert_out, slot_row, weights, shared, 0, y, h)?;
            }
            _ => return Err(CudaError::Shape("FFN weights and shape disagree".into())),
        }
        finish(dev, stack, &self.buf.y, &mut self.buf.y16, out)
    }

    /// The final norm and the lm_head for the rows `x`: their logits (`[rows, vocab]`) in `out`,
    /// each weight of the lm_head read once for all of them.
    pub fn logits(
        &mut self,
        dev: &CudaDevice,
        stack: &LayerStack,
        x: &[f32],
        out: &mut [f32],
    ) -> Result<(), CudaError> {
        let (h, head) = (stack.shape.hidden, &stack.head);
        let rows = x.len() / h;
        if x.is_empty() || rows * h != x.len() || out.len() != rows * head.vocab {
            return Err(CudaError::Shape(format!(
                "logits of {} values into {}: whole rows of {h}, {} logits each",
                x.len(),
                out.len(),
                head.vocab
            )));
        }
        let xp = put(dev, &mut self.buf.x, x)?;
        let normed = fit(dev, &mut self.buf.normed, x.len())?;
        let logits = fit(dev, &mut self.buf.y, out.len())?;
        ops::rms_norm(
            dev,
            xp,
            dptr(dev, &head.norm),
            normed,
            rows,
            h,
            stack.shape.eps,
        )?;
        let w = Weights {
            ptr: dptr(dev, &head.lm_head),
            dtype: head.dtype,
            matrix_stride_bytes: 0,
        };
        self.gemm
            .linear(dev, &self.kernels, w, normed, logits, rows, head.vocab, h)?;
        get(dev, &self.buf.y, out)
    }

    /// Where the SwiGLU MLP number `index` of `mlp` (experts back to back) is.
    fn mlp_run(
        dev: &CudaDevice,
        w: &DeviceLayer,
        mlp: &DeviceMlp,
        index: usize,
        intermediate: usize,
        h: usize,
    ) -> MlpRun {
        let matrix = intermediate * h * w.dtype.size_in_bytes();
        let mut gate_up = w.weights(dev, &mlp.gate_up, 0);
        gate_up.ptr += (index * 2 * matrix) as u64;
        let mut down = w.weights(dev, &mlp.down, 0);
        down.ptr += (index * matrix) as u64;
        MlpRun {
            gate_up,
            down,
            intermediate,
        }
    }

    /// `y = down(silu(gate x) * up x)` for `rows` rows of `x` (`[rows, h]`).
    fn mlp(
        &mut self,
        dev: &CudaDevice,
        run: &MlpRun,
        x: u64,
        y: u64,
        rows: usize,
        h: usize,
    ) -> Result<(), CudaError> {
        let i = run.intermediate;
        let gate_up = fit(dev, &mut self.buf.gate_up, rows * 2 * i)?;
        let act = fit(dev, &mut self.buf.act, rows * i)?;
        let k = &self.kernels;
        self.gemm
            .linear(dev, k, run.gate_up, x, gate_up, rows, 2 * i, h)?;
        k.swiglu_rows(dev, gate_up, act, rows, i)?;
        self.gemm.linear(dev, k, run.down, act, y, rows, h, i)
    }

    /// Every held expert's MLP over the rows that chose it, into `expert_out` in assignment order.
    #[allow(clippy::too_many_arguments)]
    fn experts(
        &mut self,
        dev: &CudaDevice,
        w: &DeviceLayer,
        experts: &DeviceMlp,
        g: &Grouping,
        intermediate: usize,
        normed: u64,
        h: usize,
    ) -> Result<(), CudaError> {
        let assignments = g.gather.len();
        let expert_out = fit(dev, &mut self.buf.expert_out, assignments * h)?;
        if assignments == 0 {
            return Ok(());
        }
        let gather = put(dev, &mut self.buf.gather, &g.gather)?;
        let gathered = fit(dev, &mut self.buf.gathered, assignments * h)?;
        self.kernels
            .gather_rows(dev, normed, gather, gathered, assignments, h)?;
        let row_bytes = (h * 4) as u64;
        for (e, range) in &g.runs {
            let run = Self::mlp_run(dev, w, experts, *e, intermediate, h);
            let offset = range.start as u64 * row_bytes;
            let (x, y) = (gathered + offset, expert_out + offset);
            self.mlp(dev, &run, x, y, range.len(), h)?;
        }
        Ok(())
    }

    /// A Qwen2-MoE shared expert over every row, and its gate's logit per row.
    #[allow(clippy::too_many_arguments)]
    fn shared_expert(
        &mut self,
        dev: &CudaDevice,
        w: &DeviceLayer,
        shared: &(DeviceMlp, CudaSlice<u8>),
        si: usize,
        normed: u64,
        rows: usize,
        h: usize,
    ) -> Result<SharedExpert, CudaError> {
        let (mlp, gate) = shared;
        let out = fit(dev, &mut self.buf.shared_out, rows * h)?;
        let logit = fit(dev, &mut self.buf.shared_logit, rows)?;
        let run = Self::mlp_run(dev, w, mlp, 0, si, h);
        self.mlp(dev, &run, normed, out, rows, h)?;
        let g = w.weights(dev, gate, 0);
        self.gemm
            .linear(dev, &self.kernels, g, normed, logit, rows, 1, h)?;
        Ok(SharedExpert { out, logit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_grouped_by_expert_in_row_order() {
        // 3 rows, top-2; expert 1 is another rank's (-1).
        let ids = [2, 0, -1, 2, 0, 1];
        let g = group_by_expert(&ids, 2);
        assert_eq!(
            g,
            Grouping {
                gather: vec![0, 2, 2, 0, 1],
                slot_row: vec![3, 0, -1, 4, 1, 2],
                runs: vec![(0, 0..2), (1, 2..3), (2, 3..5)],
            }
        );
    }

    #[test]
    fn no_held_expert_gives_no_assignment() {
        let g = group_by_expert(&[-1, -1], 1);
        assert!(g.gather.is_empty() && g.runs.is_empty());
        assert_eq!(g.slot_row, vec![-1, -1]);
    }
}
