//! Decode matrix-vector product `y = W x`, W row-major `[N, K]`.
//!
//! Decode reads every weight once per token, so this kernel is bound by memory bandwidth: it
//! streams four rows at once (independent accumulators), prefetches the next four rows into L2,
//! widens f16/bf16 in registers (bf16 a whole vector at a time, even and odd elements apart),
//! and splits the rows into a few chunks per worker so that work stealing evens out the threads.

use rayon::prelude::*;

use crate::pool;
use crate::simd::lanes::Simd;
use crate::simd::tile::{dot_rows_bf16_pairs, dot_tile, pair_order};
use crate::simd::weight::{with_weight, Weight};
use crate::simd::{run, Isa, WithSimd};
use crate::{DType, TensorView};

/// Rows computed together by one inner loop.
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
    pub w: TensorView<'a>,
    pub x: &'a [f32],
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
    let total: usize = jobs.iter().map(|j| j.w.bytes().len()).sum();
    let threads = pool::num_threads();
    if total < SERIAL_BYTES || threads == 1 {
        for job in jobs.iter_mut() {
            rows(isa, job.w.dtype(), job.w.bytes(), job.x, job.y);
        }
        return;
    }
    // Cut every weight into chunks of about the same number of bytes.
    let chunk_bytes = total.div_ceil(threads * CHUNKS_PER_THREAD);
    let mut tasks = Vec::new();
    for job in jobs.iter_mut() {
        let row_bytes = job.w.bytes().len() / job.y.len().max(1);
        let chunk = (chunk_bytes / row_bytes.max(1))
            .next_multiple_of(ROWS)
            .max(ROWS);
        let (dtype, bytes, x) = (job.w.dtype(), job.w.bytes(), job.x);
        for (c, yc) in job.y.chunks_mut(chunk).enumerate() {
            let start = c * chunk * row_bytes;
            tasks.push((dtype, &bytes[start..start + yc.len() * row_bytes], x, yc));
        }
    }
    pool::install(|| {
        tasks
            .into_par_iter()
            .for_each(|(dtype, bytes, x, y)| rows(isa, dtype, bytes, x, y))
    });
}

/// `y = W' x` for the rows of W in `bytes` (`y.len()` rows of `x.len()` elements).
fn rows(isa: Isa, dtype: DType, bytes: &[u8], x: &[f32], y: &mut [f32]) {
    assert_eq!(bytes.len(), y.len() * x.len() * dtype.size_in_bytes());
    run(isa, Rows { dtype, bytes, x, y })
}

struct Rows<'a> {
    dtype: DType,
    bytes: &'a [u8],
    x: &'a [f32],
    y: &'a mut [f32],
}

impl WithSimd for Rows<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        // SAFETY: `rows` checked that bytes holds y.len() rows of x.len() elements.
        with_weight!(self.dtype, W => unsafe {
            rows_body::<S, W>(self.bytes.as_ptr(), self.x, self.y)
        })
    }
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
