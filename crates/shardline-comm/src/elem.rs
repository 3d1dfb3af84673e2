//! Element types the collectives move and reduce (f32, f16, bf16) and the reduction kernels.
//! Half types are reduced in f32 and stored back in their own type; what goes over the wire is
//! always the caller's type. Kernels read the source as bytes because a source slice straight out
//! of a ring or socket buffer need not be aligned for its type.

use half::{bf16, f16};

/// Element type of a buffer, as written in frame headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DType {
    /// Raw bytes (internal: bootstrap records, barrier).
    U8 = 0,
    /// IEEE-754 binary32.
    F32 = 1,
    /// IEEE-754 binary16 (`half::f16`).
    F16 = 2,
    /// bfloat16 (`half::bf16`): f32's exponent with an 8-bit significand.
    Bf16 = 3,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    /// Decodes a header byte.
    pub fn from_code(code: u8) -> Option<DType> {
        match code {
            0 => Some(DType::U8),
            1 => Some(DType::F32),
            2 => Some(DType::F16),
            3 => Some(DType::Bf16),
            _ => None,
        }
    }

    /// Lower-case name as used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            DType::U8 => "u8",
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
}

/// Reduction of an all_reduce or reduce_scatter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum. Every rank gets the same bits: with more than two ranks the terms are
    /// added in rank order.
    Sum,
    /// Element-wise maximum.
    Max,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A type the collectives accept: `f32`, `half::f16` or `half::bf16`.
pub trait Elem: bytemuck::Pod + Send + Sync + PartialEq + std::fmt::Debug + sealed::Sealed {
    /// The tag that frame headers carry for buffers of this type.
    const DTYPE: DType;
    /// Nearest value of this type.
    fn from_f32(v: f32) -> Self;
    /// The value widened to f32 (exact for every implementing type).
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}
impl Elem for f16 {
    const DTYPE: DType = DType::F16;
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}
impl Elem for bf16 {
    const DTYPE: DType = DType::Bf16;
    fn from_f32(v: f32) -> Self {
        bf16_from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// `v` rounded to the nearest bf16, ties to even, as `bf16::from_f32` rounds it (a NaN stays a
/// quiet NaN), but without its branches, so that loops over slices of it vectorise.
#[inline(always)]
fn bf16_from_f32(v: f32) -> bf16 {
    let x = v.to_bits();
    // Adding 0x7fff plus the kept part's lowest bit carries into the kept part exactly when the
    // dropped half is above half an ulp, or at half an ulp with an odd kept part.
    let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16;
    let nan = (x >> 16) as u16 | 0x0040;
    bf16::from_bits(if x & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    })
}

/// `d = f(d, s)` element-wise for a bf16 `d` and bf16 bytes `s`, in f32, rounded once each.
#[inline(always)]
fn combine_bf16(d: &mut [bf16], src: &[u8], f: impl Fn(f32, f32) -> f32) {
    for (x, s) in d.iter_mut().zip(src.chunks_exact(2)) {
        let v = bf16::from_bits(u16::from_ne_bytes([s[0], s[1]])).to_f32();
        *x = bf16_from_f32(f(x.to_f32(), v));
    }
}

fn combine(op: ReduceOp, a: f32, b: f32) -> f32 {
    match op {
        ReduceOp::Sum => a + b,
        ReduceOp::Max => a.max(b),
    }
}

/// Reads element `i` of a byte slice of `dtype` as f32.
#[inline(always)]
fn load(dtype: DType, src: &[u8], i: usize) -> f32 {
    match dtype {
        DType::F32 => {
            f32::from_ne_bytes([src[4 * i], src[4 * i + 1], src[4 * i + 2], src[4 * i + 3]])
        }
        DType::F16 => f16::from_bits(u16::from_ne_bytes([src[2 * i], src[2 * i + 1]])).to_f32(),
        DType::Bf16 => bf16::from_bits(u16::from_ne_bytes([src[2 * i], src[2 * i + 1]])).to_f32(),
        DType::U8 => src[i] as f32,
    }
}

/// `dst = op(dst, src)` element-wise; `dst` is the caller's (aligned) buffer viewed as bytes.
pub(crate) fn reduce_into(dtype: DType, op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    debug_assert_eq!(dst.len(), src.len());
    match dtype {
        DType::F32 => {
            let d: &mut [f32] = bytemuck::cast_slice_mut(dst);
            // Written per operation so that the loop body is branch-free and vectorises.
            match op {
                ReduceOp::Sum => {
                    for (x, s) in d.iter_mut().zip(src.chunks_exact(4)) {
                        *x += f32::from_ne_bytes([s[0], s[1], s[2], s[3]]);
                    }
                }
                ReduceOp::Max => {
                    for (x, s) in d.iter_mut().zip(src.chunks_exact(4)) {
                        *x = x.max(f32::from_ne_bytes([s[0], s[1], s[2], s[3]]));
                    }
                }
            }
        }
        DType::F16 => {
            let d: &mut [f16] = bytemuck::cast_slice_mut(dst);
            for (i, x) in d.iter_mut().enumerate() {
                *x = f16::from_f32(combine(op, x.to_f32(), load(dtype, src, i)));
            }
        }
        DType::Bf16 => {
            let d: &mut [bf16] = bytemuck::cast_slice_mut(dst);
            // One loop per operation, as for f32, so that each vectorises.
            match op {
                ReduceOp::Sum => combine_bf16(d, src, |a, b| a + b),
                ReduceOp::Max => combine_bf16(d, src, f32::max),
            }
        }
        DType::U8 => unreachable!("byte buffers are never reduced"),
    }
}

/// `acc = src` (when `first`) or `acc = op(acc, src)`, accumulating in f32.
pub(crate) fn accumulate(dtype: DType, op: ReduceOp, acc: &mut [f32], src: &[u8], first: bool) {
    debug_assert_eq!(acc.len() * dtype.size(), src.len());
    if first {
        for (i, a) in acc.iter_mut().enumerate() {
            *a = load(dtype, src, i);
        }
    } else {
        for (i, a) in acc.iter_mut().enumerate() {
            *a = combine(op, *a, load(dtype, src, i));
        }
    }
}

/// Stores an f32 accumulator into a buffer of `dtype` (rounding once for half types).
pub(crate) fn store(dtype: DType, acc: &[f32], dst: &mut [u8]) {
    match dtype {
        DType::F32 => dst.copy_from_slice(bytemuck::cast_slice(acc)),
        DType::F16 => {
            let d: &mut [f16] = bytemuck::cast_slice_mut(dst);
            for (x, a) in d.iter_mut().zip(acc) {
                *x = f16::from_f32(*a);
            }
        }
        DType::Bf16 => {
            let d: &mut [bf16] = bytemuck::cast_slice_mut(dst);
            for (x, a) in d.iter_mut().zip(acc) {
                *x = bf16_from_f32(*a);
            }
        }
        DType::U8 => unreachable!("byte buffers are never reduced"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_sums_round_once_and_unaligned_sources_work() {
        let mut dst = [f16::from_f32(1.0), f16::from_f32(2.0), f16::from_f32(-3.0)];
        let src = [f16::from_f32(0.5), f16::from_f32(2.0), f16::from_f32(4.0)];
        // Shift the source by one byte to prove unaligned reads are fine.
        let mut shifted = [0u8; 7];
        shifted[1..].copy_from_slice(bytemuck::cast_slice(&src));
        reduce_into(
            DType::F16,
            ReduceOp::Sum,
            bytemuck::cast_slice_mut(&mut dst),
            &shifted[1..],
        );
        assert_eq!(dst.map(|x| x.to_f32()), [1.5, 4.0, 1.0]);
        let mut acc = [0f32; 3];
        accumulate(
            DType::F16,
            ReduceOp::Max,
            &mut acc,
            bytemuck::cast_slice(&src),
            true,
        );
        accumulate(
            DType::F16,
            ReduceOp::Max,
            &mut acc,
            bytemuck::cast_slice(&dst),
            false,
        );
        assert_eq!(acc, [1.5, 4.0, 4.0]);
        let mut out = [bf16::ZERO; 3];
        store(DType::Bf16, &acc, bytemuck::cast_slice_mut(&mut out));
        assert_eq!(out.map(|x| x.to_f32()), [1.5, 4.0, 4.0]);
    }

    #[test]
    fn bf16_rounding_matches_the_half_crate_bit_for_bit() {
        // Ties, carries into the exponent, the largest finite values, infinities, NaNs (quiet and
        // signalling, either sign), subnormals, and a spread of ordinary values.
        let special = [
            0x3f80_8000u32,
            0x3f81_8000,
            0x3f80_8001,
            0x3fff_8000,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0x7f80_0001,
            0xff80_0001,
            0xffff_ffff,
            0x0000_8000,
            0x0001_8000,
            0x8000_0000,
            0,
        ];
        let spread = (0..1u64 << 32).step_by(65_521).map(|x| x as u32);
        for x in special.into_iter().chain(spread) {
            let v = f32::from_bits(x);
            assert_eq!(
                bf16_from_f32(v).to_bits(),
                bf16::from_f32(v).to_bits(),
                "{x:#010x}"
            );
        }
    }

    #[test]
    fn bf16_sums_add_in_f32_and_round_once() {
        let b = |v: f32| bf16::from_f32(v);
        let (ulp, half_ulp) = (2f32.powi(-7), 2f32.powi(-8));
        // Two ranks: (1 + ulp) + (half_ulp + 2^-15) is just over half an ulp above 1 + ulp, so the
        // f32 sum rounds up; truncating or adding in bf16 would stay at 1 + ulp.
        let mut dst = [b(1.0 + ulp), b(-(1.0 + ulp)), b(3.0)];
        let src = [b(half_ulp + 2f32.powi(-15)), b(-half_ulp), b(0.25)];
        reduce_into(
            DType::Bf16,
            ReduceOp::Sum,
            bytemuck::cast_slice_mut(&mut dst),
            bytemuck::cast_slice(&src),
        );
        // The tie -(1 + ulp + half_ulp) goes to the even significand, -(1 + 2 ulp).
        assert_eq!(
            dst.map(|x| x.to_f32()),
            [1.0 + 2.0 * ulp, -(1.0 + 2.0 * ulp), 3.25]
        );
        // Four ranks in rank order: 1 + 3 half_ulp, accumulated in f32, is a tie between 1 + ulp
        // and 1 + 2 ulp that rounds to the even 1 + 2 ulp; rounding after each addition would
        // have lost every half_ulp (1 + half_ulp rounds back to 1) and given 1.
        let parts = [1.0, half_ulp, half_ulp, half_ulp].map(|v| [b(v)]);
        let mut acc = [0f32];
        for (k, p) in parts.iter().enumerate() {
            accumulate(
                DType::Bf16,
                ReduceOp::Sum,
                &mut acc,
                bytemuck::cast_slice(p),
                k == 0,
            );
        }
        assert_eq!(acc, [1.0 + 3.0 * half_ulp]);
        let mut out = [bf16::ZERO];
        store(DType::Bf16, &acc, bytemuck::cast_slice_mut(&mut out));
        assert_eq!(out[0].to_f32(), 1.0 + 2.0 * ulp);
        assert_eq!(b(b(1.0 + half_ulp).to_f32() + half_ulp).to_f32(), 1.0);
    }
}
