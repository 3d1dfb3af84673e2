//! How the scalar reference turns the exact integer sums of its dot products into an f32 result,
//! in one fixed order. (The SIMD kernels compute the same integers but add them in f32 vectors
//! across blocks, see `group`, so their results differ from these by f32 rounding only.)
//!
//! Q4_0 and Q8_0 blocks are small (32 elements), so their terms `(dw * da) * sum` go round-robin
//! into 8 partial sums (block `b` into slot `b % 8`) that are added pairwise at the end. K-quant super-blocks (256 elements) are added one after
//! another into one f32.

/// The 8 partial sums of a Q4_0/Q8_0 dot product.
pub(super) struct BlockSums {
    slots: [f32; 8],
}

impl BlockSums {
    /// Partial sums `slots`, in which block `b` went to slot `b % 8`.
    #[inline(always)]
    pub(super) fn from_slots(slots: [f32; 8]) -> BlockSums {
        BlockSums { slots }
    }

    /// Adds block `b`'s term: its weight and activation scales `dw`, `da` and the exact integer
    /// sum of quant products.
    #[inline(always)]
    pub(super) fn add(&mut self, b: usize, dw: f32, da: f32, sum: i32) {
        self.slots[b % 8] += (dw * da) * sum as f32;
    }

    /// `((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7))`.
    #[inline(always)]
    pub(super) fn total(&self) -> f32 {
        let s = &self.slots;
        let q = [s[0] + s[4], s[1] + s[5], s[2] + s[6], s[3] + s[7]];
        (q[0] + q[2]) + (q[1] + q[3])
    }
}

/// A Q4_K/Q5_K super-block's term added to `acc`: `d * da * isum - dmin * da * msum`, where
/// `isum = Σ_j scale_j Σ q·a` and `msum = Σ_j min_j Σ a` over its sub-blocks `j`.
#[inline(always)]
pub(super) fn add_with_mins(acc: f32, d: f32, dmin: f32, da: f32, isum: i32, msum: i32) -> f32 {
    acc + (d * da) * isum as f32 - (dmin * da) * msum as f32
}

/// A Q6_K super-block's term added to `acc`: `d * da * isum`, `isum = Σ_j scale_j Σ (q - 32)·a`.
#[inline(always)]
pub(super) fn add_scaled(acc: f32, d: f32, da: f32, isum: i32) -> f32 {
    acc + (d * da) * isum as f32
}
