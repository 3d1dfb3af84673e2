//! Sum of an f32 buffer over all workers: a pure streaming read, which is also how the kernel
//! benchmark measures the machine's memory read bandwidth.

use rayon::prelude::*;

use crate::pool;
use crate::simd::{reduce, Isa};

/// Elements per parallel task (1 MiB of f32): large enough that scheduling costs nothing.
const TASK_ELEMS: usize = 1 << 18;

/// `sum_i x[i]`, in parallel for large inputs (the order of additions depends on the split).
pub fn sum(x: &[f32]) -> f32 {
    let isa = Isa::active();
    if x.len() <= TASK_ELEMS {
        return reduce::sum(isa, x);
    }
    pool::install(|| x.par_chunks(TASK_ELEMS).map(|c| reduce::sum(isa, c)).sum())
}
