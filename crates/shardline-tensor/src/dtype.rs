//! Element types of stored tensors.

use crate::error::TensorError;
use crate::quant::QuantFormat;

/// The element type of a stored tensor. Activations are computed in `f32`; weights may be any of
/// these, including ggml's quantized block formats, whose rows are whole blocks of elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 single precision, 4 bytes per element.
    F32,
    /// IEEE 754 half precision, 2 bytes per element.
    F16,
    /// bfloat16 (the upper half of an `f32`), 2 bytes per element.
    BF16,
    /// A quantized block format (weights only: read by the matrix kernels and the embedding).
    Quant(QuantFormat),
}

impl DType {
    /// Bytes per element of a float dtype; a block format's elements have no size of their own,
    /// so this is its bytes per block over its elements per block, rounded up (only
    /// [`DType::row_bytes`] sizes its data).
    pub const fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Quant(q) => q.block_bytes().div_ceil(q.block_size()),
        }
    }

    /// Elements per block: 1 for float dtypes.
    pub const fn block_size(self) -> usize {
        match self {
            DType::Quant(q) => q.block_size(),
            _ => 1,
        }
    }

    /// Bytes of a row of `cols` elements, `None` when `cols` is not whole blocks or the size
    /// does not fit a `usize`.
    pub const fn row_bytes(self, cols: usize) -> Option<usize> {
        match self {
            DType::Quant(q) => {
                if !cols.is_multiple_of(q.block_size()) {
                    return None;
                }
                (cols / q.block_size()).checked_mul(q.block_bytes())
            }
            _ => cols.checked_mul(self.size_in_bytes()),
        }
    }

    /// Whether this is a quantized block format.
    pub const fn is_quantized(self) -> bool {
        matches!(self, DType::Quant(_))
    }

    /// The lower-case name used in configs and benchmark records (`f32`, `f16`, `bf16`, `q8_0`,
    /// `q4_k`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Quant(q) => q.lower_name(),
        }
    }

    /// Parses the names used by this crate (`q8_0`, `q4_k` and the other block formats
    /// included), safetensors (`F32`, `BF16`) and Hugging Face configs (`float32`, `bfloat16`,
    /// `float16`).
    pub fn parse(name: &str) -> Result<DType, TensorError> {
        match name.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            other => QuantFormat::ALL
                .into_iter()
                .find(|q| q.lower_name() == other)
                .map(DType::Quant)
                .ok_or_else(|| TensorError::UnknownDType(name.to_string())),
        }
    }

    /// The float dtypes, for tests and benchmarks.
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = TensorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DType::parse(s)
    }
}
