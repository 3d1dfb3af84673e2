//! Errors raised by tensor construction and kernels' argument checks.

use crate::{DType, Shape};

#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("unknown dtype `{0}` (expected f32, f16, bf16, q4_0, q8_0, q4_k, q5_k or q6_k)")]
    UnknownDType(String),
    #[error("shape {shape} of {dtype} needs {expected} bytes, got {actual}")]
    ByteLength {
        shape: Shape,
        dtype: DType,
        expected: usize,
        actual: usize,
    },
    #[error("cannot size the worker pool to {requested} threads{}", running.map(|n| format!(": it is already running with {n}")).unwrap_or_default())]
    PoolSize {
        requested: usize,
        running: Option<usize>,
    },
    #[error("shape {shape} has too many elements to address")]
    Overflow { shape: Shape },
    #[error(
        "shape {shape} does not fit {dtype}: its rows must be whole blocks of {block} elements"
    )]
    PartialBlock {
        shape: Shape,
        dtype: DType,
        block: usize,
    },
    #[error("weights cannot be quantized to {0} here (q8_0 and q4_k can)")]
    CannotQuantize(crate::quant::QuantFormat),
    #[error(transparent)]
    Quant(#[from] crate::quant::QuantError),
}
