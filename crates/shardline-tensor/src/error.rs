//! Errors raised by tensor construction and kernels' argument checks.

use crate::{DType, Shape};

/// A tensor that cannot be built as asked, a dtype name not recognised, or a pool that cannot be
/// sized.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    /// A dtype name [`DType::parse`] does not know.
    #[error("unknown dtype `{0}` (expected f32, f16, bf16, q4_0, q8_0, q4_k, q5_k or q6_k)")]
    UnknownDType(String),
    #[error("shape {shape} of {dtype} needs {expected} bytes, got {actual}")]
    /// Bytes (or `f32` values, counted as 4 bytes each) whose length does not match the shape.
    ByteLength {
        /// The shape asked for.
        shape: Shape,
        /// The element type the bytes were read as.
        dtype: DType,
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    #[error("cannot size the worker pool to {requested} threads{}", running.map(|n| format!(": it is already running with {n}")).unwrap_or_default())]
    /// [`crate::pool::init`] asked for 0 threads, or for a size other than the running pool's.
    PoolSize {
        /// Threads asked for.
        requested: usize,
        /// The size of the pool already running, `None` when the request was 0.
        running: Option<usize>,
    },
    #[error("shape {shape} has too many elements to address")]
    /// A shape whose byte size overflows `usize`.
    Overflow {
        /// The shape asked for.
        shape: Shape,
    },
    #[error(
        "shape {shape} does not fit {dtype}: its rows must be whole blocks of {block} elements"
    )]
    /// A block-format shape whose rows (last dimension) are not whole blocks.
    PartialBlock {
        /// The shape asked for.
        shape: Shape,
        /// The block format.
        dtype: DType,
        /// Elements per block of `dtype`.
        block: usize,
    },
    #[error("weights cannot be quantized to {0} here (q8_0 and q4_k can)")]
    /// [`crate::Tensor::from_f32`] asked for a block format this crate reads but cannot make.
    CannotQuantize(crate::quant::QuantFormat),
    /// A quantized-block function's error.
    #[error(transparent)]
    Quant(#[from] crate::quant::QuantError),
}
