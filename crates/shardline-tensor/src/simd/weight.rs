//! Stored weight element types as type parameters, so a kernel body is monomorphised per dtype
//! (no per-element branch on the dtype).

use super::lanes::Simd;

/// An element type weights are stored in, read `S::LANES` elements at a time and widened to f32.
pub(crate) trait Weight {
    /// Bytes per element.
    const BYTES: usize;
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
        }
    };
}
pub(crate) use with_weight;
