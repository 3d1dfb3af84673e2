//! SwiGLU activation: `silu(gate) * up`.

use crate::simd::exp::exp;
use crate::simd::lanes::Simd;
use crate::simd::{run, Isa, WithSimd};

/// `out[i] = gate[i] * sigmoid(gate[i]) * up[i]`.
///
/// # Panics
/// When the three lengths differ.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(
        gate.len() == up.len() && up.len() == out.len(),
        "silu_mul: lengths"
    );
    run(Isa::active(), SiluMul { gate, up, out })
}

struct SiluMul<'a> {
    gate: &'a [f32],
    up: &'a [f32],
    out: &'a mut [f32],
}

impl WithSimd for SiluMul<'_> {
    type Output = ();
    /// Plain arithmetic with the branch-free `exp`: it vectorises for `S`'s target features.
    #[inline(always)]
    fn run<S: Simd>(self) {
        for ((o, g), u) in self.out.iter_mut().zip(self.gate).zip(self.up) {
            *o = g / (1.0 + exp(-g)) * u;
        }
    }
}
