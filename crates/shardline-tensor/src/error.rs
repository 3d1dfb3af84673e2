//! Errors raised by tensor construction and kernels' argument checks.

use crate::{DType, Shape};

#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("unknown dtype `{0}` (expected f32, f16 or bf16)")]
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
}
