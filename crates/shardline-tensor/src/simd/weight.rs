//! Stored weight element types as type parameters, so a kernel body is monomorphised per dtype
//! (no per-element branch on the dtype).

use super::lanes::{Scalar, Simd};
use super::{run, Isa, WithSimd};
use crate::DType;

/// An element type weights are stored in, read `S::LANES` elements at a time and widened to f32.
pub(crate) trait Weight {
    /// Bytes per element.
    const BYTES: usize;
    /// True for bf16, which matvec reads in pairs ([`super::tile::dot_rows_bf16_pairs`]).
    const PAIRED: bool = false;
    /// `S::LANES` elements starting at `p` (no alignment needed).
    unsafe fn load<S: Simd>(p: *const u8) -> S::V;
}

pub(crate) struct F32;
pub(crate) struct F16;
pub(crate) struct BF16;

impl Weight for F32 {
    const BYTES: usize = 4;
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const u8) -> S::V {
        S::load(p.cast())
    }
}

impl Weight for F16 {
    const BYTES: usize = 2;
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const u8) -> S::V {
        S::load_f16(p)
    }
}

impl Weight for BF16 {
    const BYTES: usize = 2;
    const PAIRED: bool = true;
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const u8) -> S::V {
        S::load_bf16(p)
    }
}

/// Expands to `$body` with the type alias `$w` bound to the weight marker of `$dtype`.
macro_rules! with_weight {
    ($dtype:expr, $w:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $w = $crate::simd::weight::F32;
                $body
            }
            $crate::DType::F16 => {
                type $w = $crate::simd::weight::F16;
                $body
            }
            $crate::DType::BF16 => {
                type $w = $crate::simd::weight::BF16;
                $body
            }
            $crate::DType::Quant(_) => {
                unreachable!("quantized weights take the quantized kernels")
            }
        }
    };
}
pub(crate) use with_weight;

/// Writes the `bytes` of W-typed values into `out` as f32, inside a body running on `S`.
#[inline(always)]
pub(crate) fn widen_lanes<S: Simd, W: Weight>(bytes: &[u8], out: &mut [f32]) {
    assert_eq!(bytes.len(), out.len() * W::BYTES, "widen: lengths");
    let full = out.len() - out.len() % S::LANES;
    // SAFETY: every index is below out.len(), and bytes holds out.len() elements.
    unsafe {
        for i in (0..full).step_by(S::LANES) {
            S::store(
                out.as_mut_ptr().add(i),
                W::load::<S>(bytes.as_ptr().add(i * W::BYTES)),
            );
        }
        for (i, o) in out.iter_mut().enumerate().skip(full) {
            *o = W::load::<Scalar>(bytes.as_ptr().add(i * W::BYTES));
        }
    }
}

/// Widens little-endian `dtype` values in `bytes` into `out` (`bytes.len()` must be
/// `out.len() * dtype.size_in_bytes()`).
///
/// # Panics
/// When the lengths disagree.
pub(crate) fn widen(isa: Isa, dtype: DType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(
        bytes.len(),
        out.len() * dtype.size_in_bytes(),
        "widen: lengths"
    );
    run(isa, Widen { dtype, bytes, out })
}

struct Widen<'a> {
    dtype: DType,
    bytes: &'a [u8],
    out: &'a mut [f32],
}

impl WithSimd for Widen<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        with_weight!(self.dtype, W => widen_lanes::<S, W>(self.bytes, self.out))
    }
}
