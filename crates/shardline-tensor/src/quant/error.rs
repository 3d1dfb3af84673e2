//! [`QuantError`]: what the quantized-block functions report instead of panicking on bad input.

use super::QuantFormat;
use crate::Isa;

/// An argument that does not fit the block format (a partial block, a buffer of the wrong length,
/// a value that cannot be quantized) or an operation the CPU or the formats cannot do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    /// A row of `elements` values that does not end on a block boundary.
    #[error("{format} stores whole blocks of {block_size} elements; {elements} is not a multiple of {block_size}")]
    PartialBlock {
        /// The format's name.
        format: &'static str,
        /// Elements in the row.
        elements: usize,
        /// Elements per block of the format.
        block_size: usize,
    },
    /// Quantized data whose length is not a whole number of blocks.
    #[error("{format} data is whole blocks of {block_bytes} bytes; {bytes} bytes is not")]
    PartialBlockBytes {
        /// The block format.
        format: QuantFormat,
        /// Length of the data.
        bytes: usize,
        /// Bytes per block of the format.
        block_bytes: usize,
    },
    /// A row too long for its byte size to be addressed.
    #[error("a {format} row of {elements} elements is too long to address")]
    Overflow {
        /// The block format.
        format: QuantFormat,
        /// Elements in the row.
        elements: usize,
    },
    /// A buffer of the wrong length for the values on the other side.
    #[error("{what}: expected {expected}, got {actual}")]
    Length {
        /// Which buffer, and in what unit its length is counted.
        what: &'static str,
        /// The length the other arguments call for.
        expected: usize,
        /// The length given.
        actual: usize,
    },
    /// An activation row of a kind the weight format does not pair with.
    #[error("{format} weights take {expected} activations, not {actual}")]
    ActivationKind {
        /// The weights' block format.
        format: QuantFormat,
        /// The activation kind the format pairs with.
        expected: &'static str,
        /// The activation kind given.
        actual: &'static str,
    },
    /// A NaN or infinite input to a quantizer.
    #[error("element {index} is {value}: only finite values can be quantized")]
    NonFinite {
        /// Position of the first non-finite element.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// A ggml type id this crate has no block format for.
    #[error("ggml type {0} is not a block format this crate reads (Q4_0, Q8_0, Q4_K, Q5_K, Q6_K)")]
    UnknownTypeId(u32),
    /// A SIMD path this CPU cannot run.
    #[error("the {0} path is not supported by this CPU")]
    UnsupportedIsa(Isa),
}

/// [`QuantError::NonFinite`] for the first NaN or infinity in `x`.
pub(super) fn check_finite(x: &[f32]) -> Result<(), QuantError> {
    // A pass without early exits first (it vectorizes), the search only when it fails.
    let finite = |c: &[f32]| c.iter().fold(true, |ok, v| ok & v.is_finite());
    if x.chunks(256).all(finite) {
        return Ok(());
    }
    match x.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(QuantError::NonFinite {
            index,
            value: x[index],
        }),
        None => Ok(()),
    }
}
