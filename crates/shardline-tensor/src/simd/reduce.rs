//! Vector reductions on f32 slices (dot product, sum) with several accumulators, for the
//! kernels whose inner loop is a reduction (the compiler does not vectorise float reductions by
//! itself: that would reorder the additions).

use super::lanes::Simd;
use super::{run, Isa, WithSimd};

/// Independent accumulators: enough to hide the add/FMA latency.
const ACC: usize = 4;

/// `sum_i a[i] * b[i]` over the shorter of the two slices.
pub(crate) fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    run(isa, Dot(a, b))
}

/// `sum_i x[i]`.
pub(crate) fn sum(isa: Isa, x: &[f32]) -> f32 {
    run(isa, Sum(x))
}

struct Dot<'a>(&'a [f32], &'a [f32]);

impl WithSimd for Dot<'_> {
    type Output = f32;
    #[inline(always)]
    fn run<S: Simd>(self) -> f32 {
        let n = self.0.len().min(self.1.len());
        let (a, b) = (self.0.as_ptr(), self.1.as_ptr());
        // SAFETY: every index read is below n, the length of both slices.
        unsafe {
            let mut acc = [S::zero(); ACC];
            let step = S::LANES * ACC;
            let mut i = 0;
            while i + step <= n {
                for (j, c) in acc.iter_mut().enumerate() {
                    let o = i + j * S::LANES;
                    *c = S::fma(S::load(a.add(o)), S::load(b.add(o)), *c);
                }
                i += step;
            }
            while i + S::LANES <= n {
                acc[0] = S::fma(S::load(a.add(i)), S::load(b.add(i)), acc[0]);
                i += S::LANES;
            }
            let v = S::add(S::add(acc[0], acc[1]), S::add(acc[2], acc[3]));
            let mut s = S::reduce_sum(v);
            for j in i..n {
                s += *a.add(j) * *b.add(j);
            }
            s
        }
    }
}

struct Sum<'a>(&'a [f32]);

impl WithSimd for Sum<'_> {
    type Output = f32;
    #[inline(always)]
    fn run<S: Simd>(self) -> f32 {
        let n = self.0.len();
        let a = self.0.as_ptr();
        // SAFETY: every index read is below n.
        unsafe {
            let mut acc = [S::zero(); ACC];
            let step = S::LANES * ACC;
            let mut i = 0;
            while i + step <= n {
                for (j, c) in acc.iter_mut().enumerate() {
                    *c = S::add(S::load(a.add(i + j * S::LANES)), *c);
                }
                i += step;
            }
            let v = S::add(S::add(acc[0], acc[1]), S::add(acc[2], acc[3]));
            let mut s = S::reduce_sum(v);
            for j in i..n {
                s += *a.add(j);
            }
            s
        }
    }
}
