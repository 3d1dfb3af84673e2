//! Register-tiled dot products: `RN` weight rows against `RM` activation rows at once, so each
//! weight vector loaded from memory is used `RM` times and `RN * RM` independent accumulators
//! keep the FMA units and the memory system busy. Matvec is the `RM = 1` case; matmul uses
//! wider tiles.

use super::lanes::Simd;
use super::weight::Weight;

/// Largest vector in bytes (16 f32 lanes): the size of the zero-padded tail buffers.
const MAX_VEC_BYTES: usize = 64;

/// `out[r][m] = sum_i W[r][i] * x[m][i]` for `i < k`.
///
/// With `PREFETCH`, each step also asks for the same columns of the next `RN` rows (into L2):
/// when rows are short the hardware prefetchers, which stop at 4 KiB page boundaries, never get
/// going. On the 2-core Zen 4 machine this was written on (busy, so rough figures) it lifted
/// 1024x3584 and 3584x1024 bf16 matvecs from about 10 to about 19 GB/s and did not hurt the long
/// rows.
///
/// # Safety
/// Row `r` of W is `k` elements of `W` at `w + r * w_stride` bytes and row `m` of x is `k` f32 at
/// `x + m * x_stride` elements; all must be readable. Must run where `S`'s features are enabled.
#[inline(always)]
pub(crate) unsafe fn dot_tile<
    S: Simd,
    W: Weight,
    const RN: usize,
    const RM: usize,
    const PREFETCH: bool,
>(
    w: *const u8,
    w_stride: usize,
    x: *const f32,
    x_stride: usize,
    k: usize,
) -> [[f32; RM]; RN] {
    let mut acc = [[S::zero(); RM]; RN];
    let full = k - k % S::LANES;
    let mut i = 0;
    while i < full {
        if PREFETCH {
            for r in 0..RN {
                S::prefetch(w.wrapping_add((r + RN) * w_stride + i * W::BYTES));
            }
        }
        step::<S, W, RN, RM>(
            &mut acc,
            |r| w.add(r * w_stride + i * W::BYTES),
            |m| x.add(m * x_stride + i),
        );
        i += S::LANES;
    }
    if i < k {
        // The last partial vector: copy it into zero-padded buffers (zeros add nothing).
        let n = k - i;
        let mut wt = [[0u8; MAX_VEC_BYTES]; RN];
        let mut xt = [[0f32; MAX_VEC_BYTES / 4]; RM];
        for (r, t) in wt.iter_mut().enumerate() {
            std::ptr::copy_nonoverlapping(
                w.add(r * w_stride + i * W::BYTES),
                t.as_mut_ptr(),
                n * W::BYTES,
            );
        }
        for (m, t) in xt.iter_mut().enumerate() {
            std::ptr::copy_nonoverlapping(x.add(m * x_stride + i), t.as_mut_ptr(), n);
        }
        step::<S, W, RN, RM>(&mut acc, |r| wt[r].as_ptr(), |m| xt[m].as_ptr());
    }
    let mut out = [[0f32; RM]; RN];
    for (o, a) in out.iter_mut().zip(&acc) {
        for (o, a) in o.iter_mut().zip(a) {
            *o = S::reduce_sum(*a);
        }
    }
    out
}

/// One vector step of every accumulator; `w_at(r)` and `x_at(m)` point at the step's elements.
#[inline(always)]
unsafe fn step<S: Simd, W: Weight, const RN: usize, const RM: usize>(
    acc: &mut [[S::V; RM]; RN],
    w_at: impl Fn(usize) -> *const u8,
    x_at: impl Fn(usize) -> *const f32,
) {
    let mut xv = [S::zero(); RM];
    for (m, v) in xv.iter_mut().enumerate() {
        *v = S::load(x_at(m));
    }
    for (r, acc_r) in acc.iter_mut().enumerate() {
        let wv = W::load::<S>(w_at(r));
        for (a, xm) in acc_r.iter_mut().zip(&xv) {
            *a = S::fma(wv, *xm, *a);
        }
    }
}

/// `x` reordered for [`dot_rows_bf16_pairs`]: within each block of `2 * LANES` elements, the
/// even-indexed elements, then the odd-indexed ones; a last partial block is left as it is.
pub(crate) fn pair_order<S: Simd>(x: &[f32]) -> Vec<f32> {
    let step = 2 * S::LANES;
    let mut out = Vec::with_capacity(x.len());
    let mut blocks = x.chunks_exact(step);
    for b in blocks.by_ref() {
        out.extend(b.iter().step_by(2));
        out.extend(b.iter().skip(1).step_by(2));
    }
    out.extend_from_slice(blocks.remainder());
    out
}

/// `out[r] = sum_i W[r][i] * x[i]` for `RN` bf16 rows, reading one whole vector of bf16 per
/// row and step and widening its even and odd elements in place (a shift and a mask, no lane
/// crossing): half the instructions per byte of [`dot_tile`]'s widening loads, which lets more
/// cache misses overlap. `xp` is `x` in [`pair_order`].
///
/// # Safety
/// As [`dot_tile`] with `RM = 1`, and `xp` holds `k` values.
#[inline(always)]
pub(crate) unsafe fn dot_rows_bf16_pairs<S: Simd, const RN: usize>(
    w: *const u8,
    w_stride: usize,
    xp: *const f32,
    x: *const f32,
    k: usize,
) -> [f32; RN] {
    let step = 2 * S::LANES;
    let full = k - k % step;
    let mut acc = [S::zero(); RN];
    let mut i = 0;
    while i < full {
        let (xe, xo) = (S::load(xp.add(i)), S::load(xp.add(i + S::LANES)));
        for (r, a) in acc.iter_mut().enumerate() {
            S::prefetch(w.wrapping_add((r + RN) * w_stride + i * 2));
            let (we, wo) = S::load_bf16_pairs(w.add(r * w_stride + i * 2));
            *a = S::fma(wo, xo, S::fma(we, xe, *a));
        }
        i += step;
    }
    let tail = dot_tile::<S, super::weight::BF16, RN, 1, false>(
        w.add(full * 2),
        w_stride,
        x.add(full),
        0,
        k - full,
    );
    let mut out = [0f32; RN];
    for ((o, a), t) in out.iter_mut().zip(&acc).zip(tail) {
        *o = S::reduce_sum(*a) + t[0];
    }
    out
}
