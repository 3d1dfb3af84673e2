//! Decode matrix-vector product `y = W x`, W row-major `[N, K]`, and its batched form
//! `y[r, :] = W x[r, :]` for a few activation rows (a server stepping several sequences at once,
//! or the tokens a MoE expert gets in one step).
//!
//! Decode reads every weight once per step, so these kernels are bound by memory bandwidth: they
//! stream four weight rows at once (independent accumulators), prefetch the next four rows into
//! L2, widen f16/bf16 in registers (for one activation row, bf16 a whole vector at a time, even
//! and odd elements apart), and split the rows into a few chunks per worker so that work stealing evens out the threads.
//! With several activation rows, each weight vector loaded is multiplied by up to four of them
//! (two on 16-register ISAs); more rows run over the same four weight rows again, which by then
//! are in the cache, so the weights still come from memory once.
//!
//! Quantized weights (ggml block formats) meet their activation rows quantized per block, as
//! llama.cpp does, through integer dot products: with one activation row, over all of a task's
//! weight rows in one call ([`crate::quant::dot_rows`]); with several, in register tiles of
//! activation rows ([`crate::quant::gemm`]), which unpack each weight block once per tile.

use rayon::prelude::*;

use crate::pool;
use crate::quant::{dot_rows, gemm, QuantFormat, QuantizedRows};
use crate::simd::lanes::Simd;
use crate::simd::tile::{dot_rows_bf16_pairs, dot_tile, pair_order};
use crate::simd::weight::{with_weight, Weight};
use crate::simd::{run, Isa, WithSimd};
use crate::{DType, TensorView};

/// Weight rows computed together by one inner loop.
const ROWS: usize = 4;
/// Below this many weight bytes the product runs on the calling thread: waking workers would
/// cost more than it saves.
const SERIAL_BYTES: usize = 256 * 1024;
/// Chunks per worker, so that a worker slowed by something else is helped by the others.
const CHUNKS_PER_THREAD: usize = 4;

/// `y[n] = sum_k W[n, k] * x[k]` for a 2-D weight `W` of shape `[y.len(), x.len()]`, on the
/// instruction set [`Isa::active`] picks.
///
/// # Panics
/// When the shapes disagree (a programming error: the model checks shapes at load time).
pub fn matvec(w: &TensorView, x: &[f32], y: &mut [f32]) {
    matvec_on(Isa::active(), w, x, y)
}

/// [`matvec`] on a given instruction set (tests and benchmarks compare the paths with it).
///
/// # Panics
/// When the shapes disagree or the CPU does not support `isa`.
pub fn matvec_on(isa: Isa, w: &TensorView, x: &[f32], y: &mut [f32]) {
    matvec_many_on(isa, &mut [MatvecJob { w: *w, x, y }])
}

/// One product of [`matvec_many`]: `y = w x`, `w` of shape `[y.len(), x.len()]`.
pub struct MatvecJob<'a> {
    /// The weight, `[y.len(), x.len()]`.
    pub w: TensorView<'a>,
    /// The input vector.
    pub x: &'a [f32],
    /// The output vector.
    pub y: &'a mut [f32],
}

/// Several independent matvecs (for example the selected experts of a MoE layer) in one
/// parallel region: the workers are woken once and share out the rows of all the weights.
///
/// # Panics
/// When a job's shapes disagree (the message names the job).
pub fn matvec_many(jobs: &mut [MatvecJob]) {
    matvec_many_on(Isa::active(), jobs)
}

/// [`matvec_many`] on a given instruction set.
///
/// # Panics
/// When a job's shapes disagree or the CPU does not support `isa`.
pub fn matvec_many_on(isa: Isa, jobs: &mut [MatvecJob]) {
    for (j, job) in jobs.iter().enumerate() {
        assert_eq!(
            job.w.shape().dims(),
            [job.y.len(), job.x.len()],
            "matvec job {j}: weight shape vs x/y lengths"
        );
    }
    let mut products: Vec<Product> = jobs
        .iter_mut()
        .map(|job| Product {
            w: job.w,
            x: job.x,
            m: 1,
            y: job.y,
        })
        .collect();
    products_on(isa, &mut products);
}

/// `y[r, n] = sum_k x[r, k] * W[n, k]` for the `m` rows of `x` (`[m, K]`, `y` is `[m, N]`),
/// reading each weight from memory once: [`crate::kernels::matmul_on`] for a few rows.
///
/// # Panics
/// When the CPU does not support `isa`; the caller checked the shapes.
pub(crate) fn matvec_rows_on(isa: Isa, w: &TensorView, x: &[f32], m: usize, y: &mut [f32]) {
    products_on(isa, &mut [Product { w: *w, x, m, y }]);
}

/// Several products as [`matvec_rows_on`], `(w, x, m, y)` each, in one parallel region.
///
/// # Panics
/// When the CPU does not support `isa`; the caller checked the shapes.
pub(crate) fn matvec_rows_many_on<'a, 'y>(
    isa: Isa,
    jobs: impl Iterator<Item = (TensorView<'a>, &'a [f32], usize, &'y mut [f32])>,
) {
    let mut products: Vec<Product> = jobs.map(|(w, x, m, y)| Product { w, x, m, y }).collect();
    if !products.is_empty() {
        products_on(isa, &mut products);
    }
}

/// `y[r, :] = w x[r, :]` for `r < m`; `w` is `[N, K]`, `x` is `[m, K]`, `y` is `[m, N]`.
struct Product<'a, 'y> {
    w: TensorView<'a>,
    x: &'a [f32],
    m: usize,
    y: &'y mut [f32],
}

/// Runs the products, on the calling thread when they are small, else cut into chunks of
/// weight rows shared out over the worker pool.
fn products_on(isa: Isa, products: &mut [Product]) {
    let total: usize = products.iter().map(|p| p.w.bytes().len()).sum();
    let threads = pool::num_threads();
    let parallel = total >= SERIAL_BYTES && threads > 1;
    // A chunk's work grows with its rows of x too (past one row the FMAs are the limit), so
    // products of different row counts are cut into chunks of about the same weight bytes times
    // rows of x.
    let total_work: usize = products
        .iter()
        .map(|p| p.w.bytes().len() * p.m.max(1))
        .sum();
    let chunk_work = total_work.div_ceil(threads * CHUNKS_PER_THREAD);
    // A quantized weight meets its activation rows quantized once, up front (rows that cannot
    // be quantized, holding NaN or infinity, give NaN outputs for the model's finite check).
    let quantized: Vec<Option<QuantizedRows>> = products
        .iter()
        .map(|p| match p.w.dtype() {
            DType::Quant(q) => Some(
                QuantizedRows::for_weights(q, p.m, &p.x[..p.m * p.w.shape().dims()[1]])
                    .expect("rows of whole blocks, checked by the view"),
            ),
            _ => None,
        })
        .collect();
    let mut tasks = Vec::new();
    for (p, quantized) in products.iter_mut().zip(&quantized) {
        let (n, k) = (p.w.shape().dims()[0], p.w.shape().dims()[1]);
        let row_bytes =
            p.w.dtype()
                .row_bytes(k)
                .expect("rows of whole blocks, checked by the view");
        // Chunks of about the same work in every weight; one chunk when serial.
        let chunk = if parallel {
            (chunk_work / (row_bytes * p.m.max(1)).max(1))
                .next_multiple_of(ROWS)
                .max(ROWS)
        } else {
            n.max(1)
        };
        let acts = Acts { x: p.x, m: p.m, k };
        let y = Out(p.y.as_mut_ptr());
        for n0 in (0..n).step_by(chunk) {
            let rows = chunk.min(n - n0);
            let w = &p.w.bytes()[n0 * row_bytes..(n0 + rows) * row_bytes];
            // SAFETY: n0 < n, and y holds m rows of n.
            let y = Out(unsafe { y.0.add(n0) });
            tasks.push(match (p.w.dtype(), quantized) {
                (DType::Quant(format), Some(acts)) => Work::Quant(QuantTask {
                    format,
                    w,
                    row_bytes,
                    acts,
                    y,
                    y_stride: n,
                }),
                (dtype, _) => Work::Float(Task {
                    dtype,
                    w,
                    rows,
                    acts,
                    y,
                    y_stride: n,
                }),
            });
        }
    }
    let work = |t: Work| match t {
        Work::Float(t) => run(isa, t),
        Work::Quant(t) => t.run(isa),
    };
    if parallel {
        pool::install(|| tasks.into_par_iter().for_each(work));
    } else {
        tasks.into_iter().for_each(work);
    }
}

/// A task of [`products_on`]: float weights widened in SIMD registers, or quantized weights
/// against quantized activations.
enum Work<'a> {
    Float(Task<'a>),
    Quant(QuantTask<'a>),
}

/// Whole rows of a quantized weight against all the activation rows of its product.
struct QuantTask<'a> {
    format: QuantFormat,
    w: &'a [u8],
    row_bytes: usize,
    /// The activation rows, quantized.
    acts: &'a QuantizedRows,
    y: Out,
    y_stride: usize,
}

impl QuantTask<'_> {
    fn run(self, isa: Isa) {
        let rows = self.w.len() / self.row_bytes.max(1);
        let m = self.acts.rows();
        if m == 1 {
            // One activation row: all the rows in one call, which reads them front to back and
            // computes what they take from the activation row once.
            // SAFETY: the task owns columns [0, rows) of y's first row (products_on made it so).
            let y = unsafe { std::slice::from_raw_parts_mut(self.y.0, rows) };
            match self.acts.row(0) {
                Some(a) => dot_rows(isa, self.format, self.w, a, y)
                    .expect("whole rows of the activations' length, checked by the view"),
                None => y.fill(f32::NAN),
            }
            return;
        }
        // Several: the tiled product of all the task's rows into a buffer, then into y.
        let mut out = vec![0f32; m * rows];
        gemm(isa, self.format, self.w, self.acts, &mut out)
            .expect("whole rows of the activations' length, checked by the view");
        for (r, out) in out.chunks_exact(rows.max(1)).enumerate() {
            // SAFETY: the task owns columns [0, its rows) of each of y's m rows (products_on made
            // it so).
            let y =
                unsafe { std::slice::from_raw_parts_mut(self.y.0.add(r * self.y_stride), rows) };
            y.copy_from_slice(out);
        }
    }
}

/// The activation rows of a product: `m` rows of `k` values.
#[derive(Clone, Copy)]
struct Acts<'a> {
    x: &'a [f32],
    m: usize,
    k: usize,
}

/// Where a task writes: column `j` of its output row `r` is at `self.0 + r * y_stride + j`.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task of a product writes its own columns of y, so no element is written twice,
// and products_on holds the &mut borrow of y until every task is done.
unsafe impl Send for Out {}

/// `rows` weight rows of a product against all its activation rows.
struct Task<'a> {
    dtype: DType,
    w: &'a [u8],
    rows: usize,
    acts: Acts<'a>,
    y: Out,
    y_stride: usize,
}

impl WithSimd for Task<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let a = self.acts;
        assert_eq!(
            Some(self.w.len()),
            self.dtype.row_bytes(a.k).map(|b| b * self.rows)
        );
        assert_eq!(a.x.len(), a.m * a.k);
        // SAFETY: w holds `rows` rows of k elements and x m rows of k values (checked above); y
        // has m rows of y_stride >= rows columns from the task's first (products_on made the
        // tasks so).
        with_weight!(self.dtype, W => unsafe {
            rows_body_m::<S, W>(self.w.as_ptr(), self.rows, a, self.y.0, self.y_stride)
        })
    }
}

/// `y[r * y_stride + j] = x[r] . W[j]` for the `rows` rows of W at `w` and every row `r` of x.
///
/// # Safety
/// `w` points to `rows * a.k` readable elements of type `W`; x holds `a.m` rows of `a.k`; `y`
/// points to `a.m` rows of `rows` writable f32, `y_stride` apart.
#[inline(always)]
unsafe fn rows_body_m<S: Simd, W: Weight>(
    w: *const u8,
    rows: usize,
    a: Acts,
    y: *mut f32,
    y_stride: usize,
) {
    if a.m == 1 {
        // A matvec, bound by memory bandwidth: bf16 is read in pairs. With several rows of x
        // the FMAs become the limit, and the plain widening loads (no reordered copy of every
        // row of x) measured no slower at 2 rows and 5-10% faster at 8 and 16.
        return rows_body::<S, W>(w, a.x, std::slice::from_raw_parts_mut(y, rows));
    }
    let stride = a.k * W::BYTES;
    let mut j = 0;
    while j + ROWS <= rows {
        row_group::<S, W, ROWS>(w.add(j * stride), a, y.add(j), y_stride);
        j += ROWS;
    }
    while j < rows {
        row_group::<S, W, 1>(w.add(j * stride), a, y.add(j), y_stride);
        j += 1;
    }
}

/// `RN` weight rows at `w` against every row of x, in register tiles of up to four rows of x
/// where 32 vector registers hold their accumulators, else up to two. Each tile runs over the
/// whole rows: the first brings the weight rows from memory (prefetched while the rows before
/// were computed), the others find them in L1 or L2. (Running the tiles over L1-sized panels of
/// columns in turn, with their accumulators kept in memory between panels, measured no faster.)
///
/// # Safety
/// As [`rows_body_m`] with `rows = RN`.
#[inline(always)]
unsafe fn row_group<S: Simd, W: Weight, const RN: usize>(
    w: *const u8,
    a: Acts,
    y: *mut f32,
    y_stride: usize,
) {
    let mut i = 0;
    while i < a.m {
        i += match (a.m - i, S::MANY_REGS) {
            (4.., true) => tile::<S, W, RN, 4>(w, a, i, y, y_stride),
            (3, true) => tile::<S, W, RN, 3>(w, a, i, y, y_stride),
            (2.., _) => tile::<S, W, RN, 2>(w, a, i, y, y_stride),
            _ => tile::<S, W, RN, 1>(w, a, i, y, y_stride),
        };
    }
}

/// `RN` weight rows at `w` against rows `i..i + RM` of x; returns `RM`.
///
/// # Safety
/// As [`row_group`], and `i + RM <= a.m`.
#[inline(always)]
unsafe fn tile<S: Simd, W: Weight, const RN: usize, const RM: usize>(
    w: *const u8,
    a: Acts,
    i: usize,
    y: *mut f32,
    y_stride: usize,
) -> usize {
    let x = a.x.as_ptr().add(i * a.k);
    let out = dot_tile::<S, W, RN, RM, true>(w, a.k * W::BYTES, x, a.k, a.k);
    for (r, o) in out.iter().enumerate() {
        for (m, v) in o.iter().enumerate() {
            *y.add((i + m) * y_stride + r) = *v;
        }
    }
    RM
}

/// `y = W x` for `y.len()` rows of `x.len()` elements of W at `w`, inside a body running on `S`.
///
/// # Safety
/// `w` must point to `y.len() * x.len()` readable elements of type `W`.
#[inline(always)]
pub(crate) unsafe fn rows_body<S: Simd, W: Weight>(w: *const u8, x: &[f32], y: &mut [f32]) {
    if W::PAIRED {
        return rows_body_bf16_pairs::<S>(w, x, y);
    }
    let k = x.len();
    let stride = k * W::BYTES;
    let x = x.as_ptr();
    let done = y.len() - y.len() % ROWS;
    let mut blocks = y.chunks_exact_mut(ROWS);
    // SAFETY (both loops): block b covers rows b*ROWS.. of the y.len() rows of `stride` bytes at
    // w; x holds k values. The caller enabled S's features (simd::run).
    for (b, yb) in blocks.by_ref().enumerate() {
        let out = dot_tile::<S, W, ROWS, 1, true>(w.add(b * ROWS * stride), stride, x, 0, k);
        for (o, v) in yb.iter_mut().zip(out) {
            *o = v[0];
        }
    }
    for (j, o) in blocks.into_remainder().iter_mut().enumerate() {
        *o = dot_tile::<S, W, 1, 1, true>(w.add((done + j) * stride), stride, x, 0, k)[0][0];
    }
}

/// [`rows_body`] for bf16 weights, through [`dot_rows_bf16_pairs`].
///
/// # Safety
/// As [`rows_body`] with bf16 elements.
#[inline(always)]
unsafe fn rows_body_bf16_pairs<S: Simd>(w: *const u8, x: &[f32], y: &mut [f32]) {
    let k = x.len();
    let stride = k * 2;
    let xp = pair_order::<S>(x);
    let (xp, x) = (xp.as_ptr(), x.as_ptr());
    let done = y.len() - y.len() % ROWS;
    let mut blocks = y.chunks_exact_mut(ROWS);
    for (b, yb) in blocks.by_ref().enumerate() {
        let out = dot_rows_bf16_pairs::<S, ROWS>(w.add(b * ROWS * stride), stride, xp, x, k);
        yb.copy_from_slice(&out);
    }
    for (j, o) in blocks.into_remainder().iter_mut().enumerate() {
        *o = dot_rows_bf16_pairs::<S, 1>(w.add((done + j) * stride), stride, xp, x, k)[0];
    }
}
