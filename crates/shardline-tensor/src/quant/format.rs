//! [`QuantFormat`]: the ggml block formats this crate reads, with their GGML type ids, block
//! sizes and row sizes.

use super::layout::{q4_0, q4_k, q5_k, q6_k, q8_0, QK, QK_K};
use super::QuantError;

/// A ggml block format for weights: a row is a sequence of blocks, each holding
/// [`block_size`](Self::block_size) elements in [`block_bytes`](Self::block_bytes) bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 32 elements: an f16 scale and 4-bit quants offset by 8 (4.5 bits per element).
    Q4_0,
    /// 32 elements: an f16 scale and signed 8-bit quants (8.5 bits per element).
    Q8_0,
    /// 256 elements: f16 scale and min, 6-bit scales and mins per 32, 4-bit quants (4.5 bits).
    Q4K,
    /// 256 elements: as Q4_K with a fifth bit per quant (5.5 bits per element).
    Q5K,
    /// 256 elements: an f16 scale, signed 8-bit scales per 16, 6-bit quants (6.5625 bits).
    Q6K,
}

impl QuantFormat {
    /// The name in lower case, as `--dtype` and `--quantize` take it (`q4_0`, `q4_k`, ...).
    pub const fn lower_name(self) -> &'static str {
        match self {
            QuantFormat::Q4_0 => "q4_0",
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4K => "q4_k",
            QuantFormat::Q5K => "q5_k",
            QuantFormat::Q6K => "q6_k",
        }
    }

    /// Every format, in ggml type id order.
    pub const ALL: [QuantFormat; 5] = [
        QuantFormat::Q4_0,
        QuantFormat::Q8_0,
        QuantFormat::Q4K,
        QuantFormat::Q5K,
        QuantFormat::Q6K,
    ];

    /// The format's name in ggml and GGUF (`Q4_0`, `Q8_0`, `Q4_K`, `Q5_K`, `Q6_K`).
    pub const fn name(self) -> &'static str {
        match self {
            QuantFormat::Q4_0 => "Q4_0",
            QuantFormat::Q8_0 => "Q8_0",
            QuantFormat::Q4K => "Q4_K",
            QuantFormat::Q5K => "Q5_K",
            QuantFormat::Q6K => "Q6_K",
        }
    }

    /// The `ggml_type` value GGUF files store for tensors of this format.
    pub const fn ggml_type_id(self) -> u32 {
        match self {
            QuantFormat::Q4_0 => 2,
            QuantFormat::Q8_0 => 8,
            QuantFormat::Q4K => 12,
            QuantFormat::Q5K => 13,
            QuantFormat::Q6K => 14,
        }
    }

    /// The format of a `ggml_type` value, or [`QuantError::UnknownTypeId`].
    pub fn from_ggml_type_id(id: u32) -> Result<QuantFormat, QuantError> {
        QuantFormat::ALL
            .into_iter()
            .find(|f| f.ggml_type_id() == id)
            .ok_or(QuantError::UnknownTypeId(id))
    }

    /// Elements per block.
    pub const fn block_size(self) -> usize {
        match self {
            QuantFormat::Q4_0 | QuantFormat::Q8_0 => QK,
            QuantFormat::Q4K | QuantFormat::Q5K | QuantFormat::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantFormat::Q4_0 => q4_0::BYTES,
            QuantFormat::Q8_0 => q8_0::BYTES,
            QuantFormat::Q4K => q4_k::BYTES,
            QuantFormat::Q5K => q5_k::BYTES,
            QuantFormat::Q6K => q6_k::BYTES,
        }
    }

    /// Bytes of a row of `elements` values; [`QuantError::PartialBlock`] unless `elements` is a
    /// multiple of the block size.
    pub fn row_bytes(self, elements: usize) -> Result<usize, QuantError> {
        if !elements.is_multiple_of(self.block_size()) {
            return Err(QuantError::PartialBlock {
                format: self.name(),
                elements,
                block_size: self.block_size(),
            });
        }
        (elements / self.block_size())
            .checked_mul(self.block_bytes())
            .ok_or(QuantError::Overflow {
                format: self,
                elements,
            })
    }

    /// Elements in `bytes` bytes of whole blocks; [`QuantError::PartialBlockBytes`] otherwise.
    pub(super) fn elements_in(self, bytes: usize) -> Result<usize, QuantError> {
        if !bytes.is_multiple_of(self.block_bytes()) {
            return Err(QuantError::PartialBlockBytes {
                format: self,
                bytes,
                block_bytes: self.block_bytes(),
            });
        }
        // Cannot overflow: no format has twice as many elements as bytes, and a slice holds at
        // most isize::MAX bytes.
        Ok(bytes / self.block_bytes() * self.block_size())
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
