//! Batched steps on the device: B rows of B sequences (decode rows, and prompt chunks beside
//! them), each at its own position in the paged KV cache, through the embedding, every layer, the
//! final norm and the logits of the rows to sample, with nothing on the host in between. Every
//! matrix product is a grouped product (`grouped` in prefill.cu): each weight row is read once
//! for all the rows of the step, and a MoE layer groups its rows by expert on the device, so that
//! each chosen expert is read once per step. Steps of up to [`GRAPH_ROWS`] rows replay as one CUDA
//! graph per (rows, sampled rows), captured on first use; the rows' tokens, positions and block
//! tables are copied to fixed device buffers before each launch, so a graph replays unchanged.
//!
//! Over several ranks with a communicator, only rank 0 adds the residual in each segment and the
//! segment's output is all-reduced on the device, as in the batch-1 step.
//!
//! A step of one row (a server with one client, or one sequence left) runs the single-token step
//! instead ([`LayerStack::decode_paged`]), whose kernels are made for one row, attending through
//! the row's block table: the batched kernels pay for their grouping even when there is nothing
//! to group.

use std::collections::HashMap;

use shardline_cuda::cudarc::driver::{CudaGraph, CudaSlice};
use shardline_cuda::device::dptr;
use shardline_cuda::error::DriverContext;
use shardline_cuda::ops::{self, KvRows, SharedExpert, Weights};
use shardline_cuda::prefill_ops::{active_groups, Grouped, PrefillKernels};
use shardline_cuda::{CudaDevice, CudaError};

use super::paged::PagedKv;
use super::{capture_graph, DeviceFfn, FfnShape, LayerStack};
use crate::backend::{PagedRow, Sampled, Want};
use crate::kv_pool::{blocks_for, BLOCK_POSITIONS};

/// Steps of at most this many rows replay as graphs; larger ones (long prompt chunks, where the
/// launches cost little beside the work) are launched kernel by kernel.
pub const GRAPH_ROWS: usize = 64;

/// Device buffers of a batched step, each sized for `rows` rows. Their addresses are fixed until
/// they grow, so captured graphs stay valid until then.
struct Buffers {
    rows: usize,
    tokens: CudaSlice<i32>,
    positions: CudaSlice<i32>,
    /// `[rows, stride]` block ids.
    tables: CudaSlice<i32>,
    /// The rows whose logits are wanted.
    sample: CudaSlice<i32>,
    /// The residual stream entering a layer (and leaving it).
    x: CudaSlice<f32>,
    /// The residual stream between the two segments.
    x_mid: CudaSlice<f32>,
    normed: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    router_logits: CudaSlice<f32>,
    expert_ids: CudaSlice<i32>,
    expert_weights: CudaSlice<f32>,
    offsets: CudaSlice<i32>,
    /// The experts with assignments (`group_by_expert`'s `active`).
    active: CudaSlice<i32>,
    src: CudaSlice<i32>,
    slot_row: CudaSlice<i32>,
    /// `silu(gate) * up` of every assignment, `[rows * slots, intermediate]`.
    act: CudaSlice<f32>,
    expert_out: CudaSlice<f32>,
    shared_out: CudaSlice<f32>,
    shared_logit: CudaSlice<f32>,
    /// A segment's output in the 16-bit type the ranks sum in, when they do.
    sum16: CudaSlice<u16>,
    /// The sampled rows' final hidden states.
    picked: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    /// Each sampled row's largest logit and its index (as f32).
    best: CudaSlice<f32>,
}

/// The sizes a stack's layers need per row.
struct PerRow {
    hidden: usize,
    qkv: usize,
    q: usize,
    experts: usize,
    slots: usize,
    act: usize,
    vocab: usize,
}

impl PerRow {
    fn of(stack: &LayerStack) -> PerRow {
        let max = |f: &dyn Fn(&FfnShape) -> usize| {
            stack
                .layers
                .iter()
                .map(|l| f(l.ffn_shape()))
                .max()
                .unwrap_or(1)
                .max(1)
        };
        let shared = max(&|f| match f {
            FfnShape::Moe {
                shared_intermediate: Some(si),
                ..
            } => *si,
            _ => 1,
        });
        PerRow {
            hidden: stack.shape.hidden,
            qkv: stack.shape.qkv_rows(),
            q: stack.shape.q_dim(),
            experts: max(&|f| f.experts()),
            slots: max(&|f| f.slots()),
            act: max(&|f| f.slots() * f.intermediate()).max(shared),
            vocab: stack.head.vocab,
        }
    }
}

impl Buffers {
    fn new(dev: &CudaDevice, per: &PerRow, rows: usize, stride: usize) -> Result<Self, CudaError> {
        let h = per.hidden;
        Ok(Buffers {
            rows,
            tokens: dev.zeros(rows)?,
            positions: dev.zeros(rows)?,
            tables: dev.zeros(rows * stride)?,
            sample: dev.zeros(rows)?,
            x: dev.zeros(rows * h)?,
            x_mid: dev.zeros(rows * h)?,
            normed: dev.zeros(rows * h)?,
            qkv: dev.zeros(rows * per.qkv)?,
            attn: dev.zeros(rows * per.q)?,
            router_logits: dev.zeros(rows * per.experts)?,
            expert_ids: dev.zeros(rows * per.slots)?,
            expert_weights: dev.zeros(rows * per.slots)?,
            offsets: dev.zeros(per.experts + 1)?,
            active: dev.zeros(per.experts)?,
            src: dev.zeros(rows * per.slots)?,
            slot_row: dev.zeros(rows * per.slots)?,
            act: dev.zeros(rows * per.act)?,
            expert_out: dev.zeros(rows * per.slots * h)?,
            shared_out: dev.zeros(rows * h)?,
            shared_logit: dev.zeros(rows)?,
            sum16: dev.zeros(rows * h)?,
            picked: dev.zeros(rows * h)?,
            logits: dev.zeros(rows * per.vocab)?,
            best: dev.zeros(2 * rows)?,
        })
    }
}

/// What batched steps keep between calls: the kernels, the buffers and the captured graphs.
pub struct BatchStep {
    kernels: PrefillKernels,
    per_row: PerRow,
    /// Entries of each row's block table (enough for the model's longest sequence).
    stride: usize,
    buf: Buffers,
    /// The block table of a one-row step, at an address its captured graph keeps.
    one_table: CudaSlice<i32>,
    graphs: HashMap<(usize, usize), CudaGraph>,
}

impl BatchStep {
    /// Batched steps over `stack`, for sequences of at most `max_positions` positions.
    pub fn new(
        dev: &CudaDevice,
        stack: &LayerStack,
        max_positions: usize,
    ) -> Result<BatchStep, CudaError> {
        let per_row = PerRow::of(stack);
        let stride = blocks_for(max_positions).max(1);
        let buf = Buffers::new(dev, &per_row, 1, stride)?;
        Ok(BatchStep {
            kernels: PrefillKernels::load(dev)?,
            per_row,
            stride,
            buf,
            one_table: dev.zeros(stride)?,
            graphs: HashMap::new(),
        })
    }

    /// Runs `tokens` (row `i` at `rows[i]`) through the whole model and returns, for the rows
    /// `sample` lists, their logits (`[sample.len(), vocab]`) or each one's largest logit and its
    /// row of the lm_head, as `want` asks.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        dev: &CudaDevice,
        stack: &mut LayerStack,
        pool: &PagedKv,
        tokens: &[u32],
        rows: &[PagedRow],
        sample: &[usize],
        want: Want,
    ) -> Result<Sampled, CudaError> {
        let n = rows.len();
        if n == 0 || tokens.len() != n || n > 65_535 {
            return Err(CudaError::Shape(format!(
                "a batched step of {} tokens and {n} rows (1 to 65535)",
                tokens.len()
            )));
        }
        if let Some(&bad) = sample.iter().find(|&&i| i >= n) {
            return Err(CudaError::Shape(format!(
                "row {bad} to sample of a step of {n}"
            )));
        }
        if n > self.buf.rows {
            // Larger buffers move: the graphs made over the old ones go with them.
            self.graphs.clear();
            self.buf = Buffers::new(dev, &self.per_row, n.next_power_of_two(), self.stride)?;
        }
        let (positions, tables, _) = pool.placement(rows, self.stride)?;
        if n == 1 {
            return self.run_one(
                dev,
                stack,
                pool,
                tokens[0],
                rows[0].pos,
                &tables,
                sample,
                want,
            );
        }
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let picked: Vec<i32> = sample.iter().map(|&i| i as i32).collect();
        let s = dev.stream();
        let b = &mut self.buf;
        s.memcpy_htod(&ids, &mut b.tokens)
            .during("copying a batch's tokens")?;
        s.memcpy_htod(&positions, &mut b.positions)
            .during("copying a batch's positions")?;
        s.memcpy_htod(&tables, &mut b.tables)
            .during("copying a batch's block tables")?;
        if !picked.is_empty() {
            s.memcpy_htod(&picked, &mut b.sample)
                .during("copying a batch's sampled rows")?;
        }
        let m = sample.len();
        if n <= GRAPH_ROWS && stack.comm.is_none() {
            let key = (n, m);
            if !self.graphs.contains_key(&key) {
                let graph = capture_graph(dev, || self.enqueue(dev, stack, pool, n, m))?;
                self.graphs.insert(key, graph);
            }
            self.graphs[&key]
                .launch()
                .during("replaying a batched step")?;
        } else {
            self.enqueue(dev, stack, pool, n, m)?;
        }
        stack.wait_comm(dev)?;
        let vocab = self.per_row.vocab;
        if m == 0 {
            return Ok(Sampled::none(want));
        }
        Ok(match want {
            Want::Logits => {
                let mut out = vec![0.0f32; m * vocab];
                s.memcpy_dtoh(&self.buf.logits.slice(0..out.len()), &mut out)
                    .during("copying a batch's logits")?;
                Sampled::Logits(out)
            }
            Want::Best => {
                let best = dptr(dev, &self.buf.best);
                ops::argmax(dev, dptr(dev, &self.buf.logits), m, vocab, best)?;
                let mut out = vec![0.0f32; 2 * m];
                s.memcpy_dtoh(&self.buf.best.slice(0..out.len()), &mut out)
                    .during("copying a batch's greedy tokens")?;
                Sampled::Best(out.chunks_exact(2).map(|p| (p[0], p[1] as u32)).collect())
            }
        })
    }

    /// A step of one row: the single-token step over the row's block table (`table`, checked).
    #[allow(clippy::too_many_arguments)]
    fn run_one(
        &mut self,
        dev: &CudaDevice,
        stack: &mut LayerStack,
        pool: &PagedKv,
        token: u32,
        pos: usize,
        table: &[i32],
        sample: &[usize],
        want: Want,
    ) -> Result<Sampled, CudaError> {
        dev.stream()
            .memcpy_htod(table, &mut self.one_table)
            .during("copying a sequence's block table")?;
        stack.decode_paged(dev, token, pos, pool, dptr(dev, &self.one_table))?;
        if sample.is_empty() {
            stack.wait_comm(dev)?;
            return Ok(Sampled::none(want));
        }
        Ok(match want {
            Want::Logits => Sampled::Logits(stack.vocab_logits(dev)?),
            Want::Best => Sampled::Best(vec![stack.best(dev)?]),
        })
    }

    /// Queues a step of `n` rows whose inputs are in the buffers, and the logits of its `m`
    /// sampled rows.
    fn enqueue(
        &self,
        dev: &CudaDevice,
        stack: &LayerStack,
        pool: &PagedKv,
        n: usize,
        m: usize,
    ) -> Result<(), CudaError> {
        let (b, h) = (&self.buf, stack.shape.hidden);
        let p = |x: &CudaSlice<f32>| dptr(dev, x);
        let e = &stack.embedding;
        ops::embed_row(
            dev,
            dptr(dev, &e.table),
            e.dtype,
            dptr(dev, &b.tokens),
            p(&b.x),
            n,
            h,
        )?;
        for l in 0..stack.layers.len() {
            self.enqueue_attention(dev, stack, pool, l, n)?;
            self.all_reduce(dev, stack, &b.x_mid, &b.x, n)?;
            self.enqueue_ffn(dev, stack, l, n)?;
            self.all_reduce(dev, stack, &b.x, &b.x_mid, n)?;
        }
        if m == 0 {
            return Ok(());
        }
        let head = &stack.head;
        self.kernels
            .gather_rows(dev, p(&b.x), dptr(dev, &b.sample), p(&b.picked), m, h)?;
        ops::rms_norm(
            dev,
            p(&b.picked),
            p(&head.norm),
            p(&b.normed),
            m,
            h,
            stack.shape.eps,
        )?;
        let w = Weights {
            ptr: dptr(dev, &head.lm_head),
            dtype: head.dtype,
            matrix_stride_bytes: 0,
        };
        self.kernels.grouped(
            dev,
            &self.dense(w, m, p(&b.normed), 0, p(&b.logits), head.vocab, h),
        )
    }

    /// A product of one matrix over the first `rows` rows of `x`.
    #[allow(clippy::too_many_arguments)]
    fn dense(
        &self,
        w: Weights,
        rows: usize,
        x: u64,
        residual: u64,
        y: u64,
        n: usize,
        k: usize,
    ) -> Grouped {
        Grouped {
            w,
            groups: 1,
            active: 0,
            offsets: 0,
            count: rows,
            most: rows,
            src: 0,
            x,
            residual,
            y,
            n,
            k,
            y_stride: n,
            swiglu: false,
        }
    }

    /// The residual a segment adds: the stream itself, where the rank's segments add it
    /// ([`LayerStack::fuses_residual`]); nothing on the others.
    fn residual(dev: &CudaDevice, stack: &LayerStack, x: &CudaSlice<f32>) -> u64 {
        if stack.fuses_residual() {
            dptr(dev, x)
        } else {
            0
        }
    }

    /// Sums a segment's output `buf` (`n` rows) across the ranks; with 16-bit sums the residual
    /// `res` is added after the sum.
    fn all_reduce(
        &self,
        dev: &CudaDevice,
        stack: &LayerStack,
        buf: &CudaSlice<f32>,
        res: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        let b = &self.buf;
        // SAFETY: `buf`, `res` and `sum16` are this step's buffers, of at least `n * hidden`
        // values, and live in `self` until the step has been waited for.
        unsafe {
            stack.sum_across_ranks(
                dev,
                dptr(dev, buf),
                n * stack.shape.hidden,
                dptr(dev, res),
                dptr(dev, &b.sum16),
            )
        }
    }

    /// x -> x_mid = x + attention(x) for `n` rows.
    fn enqueue_attention(
        &self,
        dev: &CudaDevice,
        stack: &LayerStack,
        pool: &PagedKv,
        l: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        let (b, sh, w) = (&self.buf, &stack.shape, &stack.layers[l]);
        let p = |x: &CudaSlice<f32>| dptr(dev, x);
        let h = sh.hidden;
        ops::rms_norm(dev, p(&b.x), p(&w.attn_norm), p(&b.normed), n, h, sh.eps)?;
        let qkv = w.weights(dev, &w.qkv, 0);
        self.kernels.grouped(
            dev,
            &self.dense(qkv, n, p(&b.normed), 0, p(&b.qkv), sh.qkv_rows(), h),
        )?;
        let (k_cache, v_cache) = pool.layer(dev, l)?;
        let kv = KvRows {
            k_cache,
            v_cache,
            bf16: pool.is_bf16(),
            first: 0,
            positions: dptr(dev, &b.positions),
            tables: dptr(dev, &b.tables),
            table_stride: self.stride,
            block: BLOCK_POSITIONS,
        };
        let mut dims = sh.attention_dims();
        dims.capacity = pool.positions();
        let bias = w.qkv_bias.as_ref().map_or(0, |b| dptr(dev, b));
        ops::rope_kv_append(dev, dims, n, p(&b.qkv), bias, kv, stack.head_rope(dev, w))?;
        self.kernels
            .attention_rows(dev, dims, n, p(&b.qkv), kv, p(&b.attn))?;
        let o = w.weights(dev, &w.o, 0);
        let res = Self::residual(dev, stack, &b.x);
        self.kernels.grouped(
            dev,
            &self.dense(o, n, p(&b.attn), res, p(&b.x_mid), h, sh.q_dim()),
        )
    }

    /// x_mid -> x = x_mid + ffn(x_mid) for `n` rows.
    fn enqueue_ffn(
        &self,
        dev: &CudaDevice,
        stack: &LayerStack,
        l: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        let (b, sh, w) = (&self.buf, &stack.shape, &stack.layers[l]);
        let p = |x: &CudaSlice<f32>| dptr(dev, x);
        let h = sh.hidden;
        let eb = w.dtype.size_in_bytes();
        let res = Self::residual(dev, stack, &b.x_mid);
        ops::rms_norm(dev, p(&b.x_mid), p(&w.ffn_norm), p(&b.normed), n, h, sh.eps)?;
        match (&w.ffn, &w.ffn_shape) {
            (DeviceFfn::Dense(mlp), FfnShape::Dense { intermediate: i }) => {
                let gate_up = w.weights(dev, &mlp.gate_up, 0);
                let mut g = self.dense(gate_up, n, p(&b.normed), 0, p(&b.act), *i, h);
                g.swiglu = true;
                self.kernels.grouped(dev, &g)?;
                let down = w.weights(dev, &mlp.down, 0);
                self.kernels
                    .grouped(dev, &self.dense(down, n, p(&b.act), res, p(&b.x), h, *i))
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
                    intermediate: i,
                    renormalize,
                    ..
                },
            ) => {
                let (e, k, i) = (*n_experts, *top_k, *i);
                let r = w.weights(dev, router, 0);
                self.kernels.grouped(
                    dev,
                    &self.dense(r, n, p(&b.normed), 0, p(&b.router_logits), e, h),
                )?;
                let map = expert_map.as_ref().map_or(0, |m| dptr(dev, m));
                let (ids, weights) = (dptr(dev, &b.expert_ids), p(&b.expert_weights));
                ops::router_top_k(
                    dev,
                    n,
                    p(&b.router_logits),
                    e,
                    k,
                    *renormalize,
                    map,
                    ids,
                    weights,
                )?;
                let held = experts.gate_up.len() / (2 * i * h * eb);
                let (offsets, src, slot_row, active) = (
                    dptr(dev, &b.offsets),
                    dptr(dev, &b.src),
                    dptr(dev, &b.slot_row),
                    dptr(dev, &b.active),
                );
                self.kernels.group_by_expert(
                    dev,
                    ids,
                    n * k,
                    k,
                    held,
                    offsets,
                    src,
                    slot_row,
                    active,
                )?;
                // Blocks only for the experts that can have rows: at most one per slot.
                let groups = active_groups(n * k, held);
                let by_expert =
                    |w: Weights, x: u64, src: u64, y: u64, out: usize, inp: usize| Grouped {
                        w,
                        groups,
                        active,
                        offsets,
                        count: 0,
                        // A row chooses an expert once at most.
                        most: n,
                        src,
                        x,
                        residual: 0,
                        y,
                        n: out,
                        k: inp,
                        y_stride: out,
                        swiglu: false,
                    };
                let gate_up = w.weights(dev, &experts.gate_up, 2 * i * h * eb);
                let mut g = by_expert(gate_up, p(&b.normed), src, p(&b.act), i, h);
                g.swiglu = true;
                self.kernels.grouped(dev, &g)?;
                let down = w.weights(dev, &experts.down, i * h * eb);
                self.kernels
                    .grouped(dev, &by_expert(down, p(&b.act), 0, p(&b.expert_out), h, i))?;
                let shared = match (shared, &w.ffn_shape) {
                    (
                        Some(shared),
                        FfnShape::Moe {
                            shared_intermediate: Some(si),
                            ..
                        },
                    ) => {
                        let (mlp, gate) = &**shared;
                        let gu = w.weights(dev, &mlp.gate_up, 0);
                        let mut g = self.dense(gu, n, p(&b.normed), 0, p(&b.act), *si, h);
                        g.swiglu = true;
                        self.kernels.grouped(dev, &g)?;
                        let down = w.weights(dev, &mlp.down, 0);
                        self.kernels.grouped(
                            dev,
                            &self.dense(down, n, p(&b.act), 0, p(&b.shared_out), h, *si),
                        )?;
                        let gate = w.weights(dev, gate, 0);
                        self.kernels.grouped(
                            dev,
                            &self.dense(gate, n, p(&b.normed), 0, p(&b.shared_logit), 1, h),
                        )?;
                        Some(SharedExpert {
                            out: p(&b.shared_out),
                            logit: p(&b.shared_logit),
                        })
                    }
                    _ => None,
                };
                self.kernels.combine_rows(
                    dev,
                    n,
                    k,
                    p(&b.expert_out),
                    slot_row,
                    weights,
                    shared,
                    res,
                    p(&b.x),
                    h,
                )
            }
            _ => Err(CudaError::Shape("FFN weights and shape disagree".into())),
        }
    }
}
