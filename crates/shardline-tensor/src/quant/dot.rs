//! [`dot`]: the dot product of one quantized weight row with one quantized activation row, on the
//! scalar reference path or a SIMD path chosen by [`Isa`].
//!
//! Q4_0 and Q8_0 weights pair with Q8_0 activations, Q4_K, Q5_K and Q6_K weights with Q8_K
//! activations. Every path computes the same exact integer sums per block; the scalar reference
//! scales and adds them in one fixed order (see `accumulate`), the SIMD paths in f32 vectors
//! across blocks (see `group`), so their results differ by f32 rounding only. [`Isa::Avx512`]
//! uses the AVX-512 VNNI kernels where the CPU has VNNI and the AVX2 kernels otherwise.

use super::{dot_scalar, BlockQ8K, QuantError, QuantFormat};
use crate::Isa;

/// A quantized activation row: the right-hand operand of [`dot`].
#[derive(Clone, Copy, Debug)]
pub enum Activations<'a> {
    /// Q8_0 blocks in ggml's byte layout (as [`super::quantize_row_q8_0`] writes them), for Q4_0
    /// and Q8_0 weights.
    Q8_0(&'a [u8]),
    /// Q8_K blocks (from [`super::quantize_row_q8_k`]), for Q4_K, Q5_K and Q6_K weights.
    Q8K(&'a [BlockQ8K]),
}

impl Activations<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Activations::Q8_0(_) => "Q8_0",
            Activations::Q8K(_) => "Q8_K",
        }
    }

    pub(super) fn elements(&self) -> Result<usize, QuantError> {
        match self {
            Activations::Q8_0(bytes) => QuantFormat::Q8_0.elements_in(bytes.len()),
            Activations::Q8K(blocks) => Ok(blocks.len() * 256),
        }
    }
}

/// The dot product of the `format` weight row `weight` (whole blocks in ggml's layout) with the
/// activation row `act`, which must hold as many elements and be of the kind the format pairs
/// with. `isa` picks the code path ([`Isa::active`] for the fastest allowed one); an unsupported
/// one is an error.
pub fn dot(
    isa: Isa,
    format: QuantFormat,
    weight: &[u8],
    act: Activations<'_>,
) -> Result<f32, QuantError> {
    let path = Path::for_isa(isa)?;
    let elements = format.elements_in(weight.len())?;
    let act_elements = act.elements()?;
    if act_elements != elements {
        return Err(QuantError::Length {
            what: "activation elements (the weight row's count)",
            expected: elements,
            actual: act_elements,
        });
    }
    let mut out = [0f32];
    path.rows(format, act, weight, weight.len(), &mut out)?;
    Ok(out[0])
}

/// The kernels one call runs: checked to be supported by this CPU when made.
#[derive(Clone, Copy)]
pub(super) enum Path {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

/// Generates `Path`'s methods: each runs its kernel on the chosen path over `out.len()` weight
/// rows of `row_bytes` bytes. The rows are whole blocks of as many elements as the activation
/// row (checked by the callers), which is all the kernels need.
macro_rules! path_kernels {
    ($($name:ident($act:ty)),* $(,)?) => {
        impl Path {
            $(
                fn $name(self, w: &[u8], row_bytes: usize, a: $act, out: &mut [f32]) {
                    match self {
                        Path::Scalar => {
                            for (r, y) in out.iter_mut().enumerate() {
                                *y = dot_scalar::$name(&w[r * row_bytes..(r + 1) * row_bytes], a);
                            }
                        }
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: `for_isa` made this path only where the CPU has AVX2, FMA and
                        // F16C; the rows are whole blocks of the activation row's length.
                        Path::Avx2 => unsafe { super::dot_avx2::$name(w, a, out) },
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: as above, for AVX-512F/BW/VL and VNNI (and AVX2).
                        Path::Avx512Vnni => unsafe { super::dot_avx512::$name(w, a, out) },
                    }
                }
            )*
        }
    };
}

path_kernels!(
    q8_0(&[u8]),
    q4_0(&[u8]),
    q4_k(&[BlockQ8K]),
    q5_k(&[BlockQ8K]),
    q6_k(&[BlockQ8K])
);

impl Path {
    /// `out[r]` = the dot product of `format` weight row `r` of `w` (`out.len()` rows of
    /// `row_bytes` bytes, each as many elements as `act`, which the caller checked) with `act`
    /// on this path; an error if `act` is not of the kind `format` pairs with.
    pub(super) fn rows(
        self,
        format: QuantFormat,
        act: Activations<'_>,
        w: &[u8],
        row_bytes: usize,
        out: &mut [f32],
    ) -> Result<(), QuantError> {
        debug_assert_eq!(w.len(), row_bytes * out.len());
        let wrong = |expected| QuantError::ActivationKind {
            format,
            expected,
            actual: act.kind(),
        };
        match (act, format) {
            (Activations::Q8_0(a), QuantFormat::Q8_0) => self.q8_0(w, row_bytes, a, out),
            (Activations::Q8_0(a), QuantFormat::Q4_0) => self.q4_0(w, row_bytes, a, out),
            (Activations::Q8_0(_), _) => return Err(wrong("Q8_K")),
            (Activations::Q8K(a), QuantFormat::Q4K) => self.q4_k(w, row_bytes, a, out),
            (Activations::Q8K(a), QuantFormat::Q5K) => self.q5_k(w, row_bytes, a, out),
            (Activations::Q8K(a), QuantFormat::Q6K) => self.q6_k(w, row_bytes, a, out),
            (Activations::Q8K(_), _) => return Err(wrong("Q8_0")),
        }
        Ok(())
    }

    pub(super) fn for_isa(isa: Isa) -> Result<Path, QuantError> {
        if !isa.is_supported() {
            return Err(QuantError::UnsupportedIsa(isa));
        }
        match isa {
            Isa::Scalar => Ok(Path::Scalar),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Ok(Path::Avx2),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if is_x86_feature_detected!("avx512vnni") => Ok(Path::Avx512Vnni),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Ok(Path::Avx2),
            #[cfg(not(target_arch = "x86_64"))]
            _ => Err(QuantError::UnsupportedIsa(isa)),
        }
    }
}
