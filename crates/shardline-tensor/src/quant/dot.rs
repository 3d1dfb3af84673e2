//! [`dot`]: the dot product of one quantized weight row with one quantized activation row, on the
//! scalar reference path or a SIMD path chosen by [`Isa`].
//!
//! Q4_0 and Q8_0 weights pair with Q8_0 activations, Q4_K, Q5_K and Q6_K weights with Q8_K
//! activations. Every path computes the same exact integer sums and scales them in the same order
//! (see `accumulate`), so their results are bit-identical. [`Isa::Avx512`] uses the AVX-512 VNNI
//! kernels where the CPU has VNNI and the AVX2 kernels otherwise.

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
    let kind_error = |expected| QuantError::ActivationKind {
        format,
        expected,
        actual: act.kind(),
    };
    match act {
        Activations::Q8_0(a) => match format {
            QuantFormat::Q8_0 => Ok(path.q8_0(weight, a)),
            QuantFormat::Q4_0 => Ok(path.q4_0(weight, a)),
            _ => Err(kind_error("Q8_K")),
        },
        Activations::Q8K(a) => match format {
            QuantFormat::Q4K => Ok(path.q4_k(weight, a)),
            QuantFormat::Q5K => Ok(path.q5_k(weight, a)),
            QuantFormat::Q6K => Ok(path.q6_k(weight, a)),
            _ => Err(kind_error("Q8_0")),
        },
    }
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

/// Generates `Path`'s methods: each runs its kernel on the chosen path. The rows are whole
/// blocks of equal element counts (checked by [`dot`]), which is all the kernels need.
macro_rules! path_kernels {
    ($($name:ident($act:ty)),* $(,)?) => {
        impl Path {
            $(
                fn $name(self, w: &[u8], a: $act) -> f32 {
                    match self {
                        Path::Scalar => dot_scalar::$name(w, a),
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: `for_isa` made this path only where the CPU has AVX2, FMA and
                        // F16C; the rows are whole blocks of equal element counts.
                        Path::Avx2 => unsafe { super::dot_avx2::$name(w, a) },
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: as above, for AVX-512F/BW/VL and VNNI (and AVX2).
                        Path::Avx512Vnni => unsafe { super::dot_avx512::$name(w, a) },
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
    /// The dot product of `format` weight rows with `act` on this path, as a function of the
    /// weight row (whose length the caller checked against `act`).
    pub(super) fn kernel<'a>(
        self,
        format: QuantFormat,
        act: Activations<'a>,
    ) -> Result<impl Fn(&[u8]) -> f32 + 'a, QuantError> {
        let wrong = |expected| QuantError::ActivationKind {
            format,
            expected,
            actual: act.kind(),
        };
        // Checked here, so that the returned closure only dispatches.
        match (act, format) {
            (Activations::Q8_0(_), QuantFormat::Q8_0 | QuantFormat::Q4_0) => {}
            (Activations::Q8_0(_), _) => return Err(wrong("Q8_K")),
            (Activations::Q8K(_), QuantFormat::Q4K | QuantFormat::Q5K | QuantFormat::Q6K) => {}
            (Activations::Q8K(_), _) => return Err(wrong("Q8_0")),
        }
        Ok(move |w: &[u8]| match (act, format) {
            (Activations::Q8_0(a), QuantFormat::Q8_0) => self.q8_0(w, a),
            (Activations::Q8_0(a), _) => self.q4_0(w, a),
            (Activations::Q8K(a), QuantFormat::Q4K) => self.q4_k(w, a),
            (Activations::Q8K(a), QuantFormat::Q5K) => self.q5_k(w, a),
            (Activations::Q8K(a), _) => self.q6_k(w, a),
        })
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
