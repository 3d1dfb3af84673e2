//! Matrix product `Y = X W^T` for a number of rows M: a prompt's tokens (prefill), or one token
//! of each of several sequences (batched decode).
//!
//! Up to a few dozen rows ([`decode_rows`]), the product streams the weights once in their own
//! dtype with matvec's loops ([`matvec_rows_on`]); [`matmul_many`] runs several such products
//! (a batched step's experts) in one parallel region. Above, each weight row is read from memory
//! once for all M rows: a block of W rows (widened to f32 once, when stored as f16/bf16) stays in
//! the L2 cache while register tiles of 4 weight rows by 4 (AVX-512) or 2 (AVX2, scalar)
//! activation rows run over it, one panel of columns at a time so that the activation rows of a
//! tile stay in L1. At M = 128 this runs near the FMA units' peak; it is a dot-product
//! formulation, not a packed GEMM, which would need a transposed copy of the weights.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::kernels::matvec::{matvec_rows_many_on, matvec_rows_on};
use crate::pool;
use crate::simd::lanes::Simd;
use crate::simd::tile::dot_tile;
use crate::simd::weight::{widen_lanes, with_weight, Weight, F32};
use crate::simd::{run, Isa, WithSimd};
use crate::{DType, TensorView};

/// Weight rows per register tile.
const RN: usize = 4;
/// Bytes of widened weight rows one block keeps in the L2 cache.
const BLOCK_BYTES: usize = 256 * 1024;
/// Columns per panel: a 4-row activation tile of this many f32 (16 KiB) stays in L1.
const KC: usize = 1024;
/// Most weight rows per block (more gives the workers too few blocks to share).
const MAX_BLOCK_ROWS: usize = 32;

thread_local! {
    /// Each worker's buffer for widened weight rows, reused across calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `y[m, n] = sum_k x[m, k] * W[n, k]`; `x` is `[m, K]`, `y` is `[m, N]`, W is `[N, K]`, on the
/// instruction set [`Isa::active`] picks.
///
/// # Panics
/// When the shapes disagree.
pub fn matmul(w: &TensorView, x: &[f32], m: usize, y: &mut [f32]) {
    matmul_on(Isa::active(), w, x, m, y)
}

/// [`matmul`] on a given instruction set.
///
/// # Panics
/// When the shapes disagree or the CPU does not support `isa`.
pub fn matmul_on(isa: Isa, w: &TensorView, x: &[f32], m: usize, y: &mut [f32]) {
    let dims = w.shape().dims();
    assert_eq!(dims.len(), 2, "matmul: weight must be 2-D");
    let (n, k) = (dims[0], dims[1]);
    assert_eq!(x.len(), m * k, "matmul: x length");
    assert_eq!(y.len(), m * n, "matmul: y length");
    if m == 0 {
        return;
    }
    if m <= decode_rows(isa, w.dtype()) {
        return matvec_rows_on(isa, w, x, m, y);
    }
    blocked_on(isa, w, x, m, y);
}

/// One product of [`matmul_many`]: `y = x w^T` for the `m` rows of `x` (`[m, K]`; `y` is
/// `[m, N]`, `w` is `[N, K]`).
pub struct MatmulJob<'a> {
    /// The weight, `[N, K]`.
    pub w: TensorView<'a>,
    /// The activation rows, `[m, K]`.
    pub x: &'a [f32],
    /// Rows of `x` and `y`.
    pub m: usize,
    /// The output rows, `[m, N]`.
    pub y: &'a mut [f32],
}

/// Several independent products of a few rows each (for example the experts of a MoE layer in
/// batched decode, each over the rows routed to it) in one parallel region: the workers are woken
/// once and share out the weight rows of all of them, each weight streamed once for its rows.
/// Every output element is computed as [`matmul`] computes it. Jobs with more rows than
/// [`matmul`] streams run one after another on the blocked product.
///
/// # Panics
/// When a job's shapes disagree (the message names the job).
pub fn matmul_many(jobs: &mut [MatmulJob]) {
    matmul_many_on(Isa::active(), jobs)
}

/// [`matmul_many`] on a given instruction set.
///
/// # Panics
/// When a job's shapes disagree or the CPU does not support `isa`.
pub fn matmul_many_on(isa: Isa, jobs: &mut [MatmulJob]) {
    for (j, job) in jobs.iter().enumerate() {
        let dims = job.w.shape().dims();
        assert_eq!(dims.len(), 2, "matmul job {j}: weight must be 2-D");
        assert_eq!(job.x.len(), job.m * dims[1], "matmul job {j}: x length");
        assert_eq!(job.y.len(), job.m * dims[0], "matmul job {j}: y length");
    }
    let streamed = |job: &MatmulJob| job.m <= decode_rows(isa, job.w.dtype());
    matvec_rows_many_on(
        isa,
        jobs.iter_mut()
            .filter(|job| job.m > 0 && streamed(job))
            .map(|job| (job.w, job.x, job.m, &mut *job.y)),
    );
    for job in jobs.iter_mut().filter(|job| !streamed(job)) {
        blocked_on(isa, &job.w, job.x, job.m, job.y);
    }
}

/// The blocked product for more rows than [`matvec_rows_on`] takes; shapes checked.
fn blocked_on(isa: Isa, w: &TensorView, x: &[f32], m: usize, y: &mut [f32]) {
    let (n, k) = (w.shape().dims()[0], w.shape().dims()[1]);
    let block = (BLOCK_BYTES / (4 * k).max(1))
        .clamp(RN, MAX_BLOCK_ROWS)
        .next_multiple_of(RN);
    let out = OutPtr(y.as_mut_ptr());
    let row_bytes = k * w.dtype().size_in_bytes(); // a float dtype: quantized ones are streamed
    let bytes = w.bytes();
    pool::install(|| {
        (0..n.div_ceil(block)).into_par_iter().for_each(|b| {
            let n0 = b * block;
            let rows = block.min(n - n0);
            run(
                isa,
                Block {
                    dtype: w.dtype(),
                    w: &bytes[n0 * row_bytes..(n0 + rows) * row_bytes],
                    x,
                    m,
                    k,
                    y: out,
                    n,
                    n0,
                },
            )
        })
    });
}

/// Most rows of x for which [`matvec_rows_on`] beats the blocked product, as measured on a
/// 2-core Zen 4 with 4096x4096 and 4096x14336 weights. It widens f16/bf16 weights again for every
/// register tile of x rows, which costs vector code little, and reads every row of x from L2 for
/// each four weight rows: f16 and bf16 still gained at 32 rows (or broke even, AVX2 at K =
/// 14336), f32 weights (no widening to save) broke even at four register tiles of x rows (16 on
/// AVX-512, 8 on AVX2) and lost beyond. Scalar code gained only while one tile (two rows)
/// covers x.
fn decode_rows(isa: Isa, dtype: DType) -> usize {
    match (isa, dtype) {
        // Quantized weights have only the streamed product.
        (_, DType::Quant(_)) => usize::MAX,
        (Isa::Scalar, _) => 2,
        (Isa::Avx2, DType::F32) => 8,
        (Isa::Avx512, DType::F32) => 16,
        _ => 32,
    }
}

/// The output matrix, shared by the workers; each block writes only its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: blocks write disjoint columns n0..n0+rows of y, so no element is written twice, and
// matmul_on holds the &mut borrow of y until every block is done.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Weight rows `n0..n0 + w.len() / (k * size)` against all `m` rows of x.
struct Block<'a> {
    dtype: DType,
    w: &'a [u8],
    x: &'a [f32],
    m: usize,
    k: usize,
    y: OutPtr,
    n: usize,
    n0: usize,
}

impl WithSimd for Block<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        with_weight!(self.dtype, W => block_body::<S, W>(&self))
    }
}

#[inline(always)]
fn block_body<S: Simd, W: Weight>(b: &Block) {
    let rows = b.w.len() / (b.k * W::BYTES).max(1);
    if W::BYTES == 4 {
        // f32 weights are used where they lie.
        return tiles::<S>(b, rows, b.w.as_ptr());
    }
    // Taken out of the thread-local rather than used in a `with` closure: a closure would not
    // inherit the target features, and the vector code inside it would not be inlined.
    let mut scratch = SCRATCH.take();
    scratch.resize(rows * b.k, 0.0);
    widen_lanes::<S, W>(b.w, &mut scratch);
    tiles::<S>(b, rows, scratch.as_ptr().cast());
    SCRATCH.set(scratch);
}

/// All register tiles of a block whose `rows` f32 weight rows start at `w`, one panel of
/// [`KC`] columns at a time so that a tile's activation rows stay in L1 while every weight row
/// group of the block (in L2) passes over them.
#[inline(always)]
fn tiles<S: Simd>(b: &Block, rows: usize, w: *const u8) {
    for k0 in (0..b.k.max(1)).step_by(KC) {
        let kc = KC.min(b.k - k0);
        let mut mi = 0;
        if S::MANY_REGS {
            while mi + 4 <= b.m {
                tile_rows::<S, 4>(b, rows, w, mi, k0, kc);
                mi += 4;
            }
        }
        while mi + 2 <= b.m {
            tile_rows::<S, 2>(b, rows, w, mi, k0, kc);
            mi += 2;
        }
        if mi < b.m {
            tile_rows::<S, 1>(b, rows, w, mi, k0, kc);
        }
    }
}

/// Activation rows `mi..mi + RM`, columns `k0..k0 + kc`, against every weight row of the block:
/// stores into y for the first panel, adds to it for the others.
#[inline(always)]
fn tile_rows<S: Simd, const RM: usize>(
    b: &Block,
    rows: usize,
    w: *const u8,
    mi: usize,
    k0: usize,
    kc: usize,
) {
    let k = b.k;
    let stride = k * 4;
    let w = w.wrapping_add(k0 * 4);
    let x = b.x[mi * k + k0..].as_ptr();
    // SAFETY: y[(mi + j) * n + n0 + r] is in y (mi + j < m, n0 + r < n) and this block's own.
    let put = |r: usize, j: usize, v: f32| unsafe {
        let p = b.y.0.add((mi + j) * b.n + b.n0 + r);
        *p = if k0 == 0 { v } else { *p + v };
    };
    let mut r = 0;
    // SAFETY: the block's weights hold `rows` rows of k f32 at w, of which columns k0..k0+kc are
    // read; x holds rows mi..mi+RM of k values, of which the same columns are read.
    unsafe {
        while r + RN <= rows {
            let out = dot_tile::<S, F32, RN, RM, false>(w.add(r * stride), stride, x, k, kc);
            for (i, o) in out.iter().enumerate() {
                for (j, v) in o.iter().enumerate() {
                    put(r + i, j, *v);
                }
            }
            r += RN;
        }
        while r < rows {
            let out = dot_tile::<S, F32, 1, RM, false>(w.add(r * stride), stride, x, k, kc);
            for (j, v) in out[0].iter().enumerate() {
                put(r, j, *v);
            }
            r += 1;
        }
    }
}
