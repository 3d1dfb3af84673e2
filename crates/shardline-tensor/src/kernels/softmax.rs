//! Numerically stable softmax.

use crate::simd::exp::exp;
use crate::simd::lanes::Simd;
use crate::simd::reduce::sum_lanes;
use crate::simd::{run, Isa, WithSimd};

/// In-place softmax over the whole slice (max-subtracted, sum in f32). A slice that is all
/// `-inf` is left as it is.
pub fn softmax(x: &mut [f32]) {
    run(Isa::active(), Softmax(x))
}

struct Softmax<'a>(&'a mut [f32]);

impl WithSimd for Softmax<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        softmax_lanes::<S>(self.0)
    }
}

/// [`softmax`] inside a body already running on `S`.
#[inline(always)]
pub(crate) fn softmax_lanes<S: Simd>(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return;
    }
    // Separate passes: the exponentials vectorise, the sum uses several accumulators.
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    let inv = 1.0 / sum_lanes::<S>(x);
    for v in x.iter_mut() {
        *v *= inv;
    }
}
