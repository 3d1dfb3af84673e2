//! Host tensors: [`Tensor`] owns aligned storage; [`TensorView`] borrows bytes that live elsewhere
//! (a memory-mapped weight file, another tensor) so that weights are used where they lie.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::quant::{quantize_row_q4_k, quantize_row_q8_0, QuantFormat};
use crate::{AlignedBuf, DType, Shape, TensorError};

/// A borrowed, row-major tensor over little-endian bytes. The bytes need no particular alignment.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    dtype: DType,
    shape: &'a Shape,
    bytes: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// A view of `bytes` as `shape` elements of `dtype`; the byte length must match exactly.
    pub fn new(dtype: DType, shape: &'a Shape, bytes: &'a [u8]) -> Result<Self, TensorError> {
        let expected = byte_len(dtype, shape)?;
        if expected != bytes.len() {
            return Err(TensorError::ByteLength {
                shape: shape.clone(),
                dtype,
                expected,
                actual: bytes.len(),
            });
        }
        Ok(TensorView {
            dtype,
            shape,
            bytes,
        })
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &'a Shape {
        self.shape
    }

    /// The little-endian element bytes (whole blocks for a block format).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape.elem_count()
    }

    /// The element at flat index `i`, widened to f32.
    pub fn get_f32(&self, i: usize) -> f32 {
        read_f32(self.dtype, self.bytes, i)
    }

    /// Every element widened to f32 (for tests, small tensors and load-time conversions).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        if let DType::Quant(q) = self.dtype {
            let mut out = vec![0f32; self.elem_count()];
            let block = q.block_bytes();
            for (b, o) in self
                .bytes
                .chunks_exact(block)
                .zip(out.chunks_exact_mut(q.block_size()))
            {
                crate::quant::dequantize_row(q, b, o).expect("whole blocks, checked when viewed");
            }
            return out;
        }
        (0..self.elem_count()).map(|i| self.get_f32(i)).collect()
    }
}

/// Bytes of a `dtype` tensor of `shape`: its rows (the last dimension) times their bytes. A block
/// format needs rows of whole blocks.
pub fn byte_len(dtype: DType, shape: &Shape) -> Result<usize, TensorError> {
    let dims = shape.dims();
    let cols = dims.last().copied().unwrap_or(1);
    let rows = dims[..dims.len().saturating_sub(1)]
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d));
    if !cols.is_multiple_of(dtype.block_size()) {
        return Err(TensorError::PartialBlock {
            shape: shape.clone(),
            dtype,
            block: dtype.block_size(),
        });
    }
    rows.zip(dtype.row_bytes(cols))
        .and_then(|(r, b)| r.checked_mul(b))
        .ok_or_else(|| TensorError::Overflow {
            shape: shape.clone(),
        })
}

/// Element `i` of little-endian `bytes` holding `dtype` values, widened to f32 (a block format's
/// element is decoded from its block).
#[inline]
pub fn read_f32(dtype: DType, bytes: &[u8], i: usize) -> f32 {
    match dtype {
        DType::Quant(q) => {
            let block = i / q.block_size();
            let mut values = [0f32; 256];
            let out = &mut values[..q.block_size()];
            let b = &bytes[block * q.block_bytes()..(block + 1) * q.block_bytes()];
            crate::quant::dequantize_row(q, b, out).expect("one whole block");
            out[i % q.block_size()]
        }
        DType::F32 => {
            let b = &bytes[i * 4..i * 4 + 4];
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
        DType::F16 => f16::from_le_bytes([bytes[i * 2], bytes[i * 2 + 1]]).to_f32(),
        DType::BF16 => bf16::from_le_bytes([bytes[i * 2], bytes[i * 2 + 1]]).to_f32(),
    }
}

/// An owned, row-major tensor in 64-byte-aligned storage.
#[derive(Clone, Debug)]
pub struct Tensor {
    dtype: DType,
    shape: Shape,
    data: AlignedBuf,
}

impl Tensor {
    /// A zero-filled tensor.
    pub fn zeros(dtype: DType, shape: impl Into<Shape>) -> Result<Tensor, TensorError> {
        let shape = shape.into();
        let len = byte_len(dtype, &shape)?;
        Ok(Tensor {
            dtype,
            shape,
            data: AlignedBuf::zeroed(len),
        })
    }

    /// A tensor of `dtype` holding `values` rounded to that dtype (round-to-nearest-even), or
    /// quantized row by row (Q8_0 and Q4_K; other block formats are read, not made, here).
    pub fn from_f32(
        dtype: DType,
        shape: impl Into<Shape>,
        values: &[f32],
    ) -> Result<Tensor, TensorError> {
        let mut t = Tensor::zeros(dtype, shape)?;
        if values.len() != t.shape.elem_count() {
            return Err(TensorError::ByteLength {
                shape: t.shape.clone(),
                dtype: DType::F32,
                expected: t.shape.elem_count() * 4,
                actual: values.len() * 4,
            });
        }
        let out = t.data.as_mut_slice();
        match dtype {
            DType::Quant(q) => {
                let cols = t.shape.dims().last().copied().unwrap_or(1);
                let row_bytes = q.row_bytes(cols)?;
                crate::pool::install(|| {
                    out.par_chunks_exact_mut(row_bytes)
                        .zip(values.par_chunks_exact(cols))
                        .try_for_each(|(dst, row)| quantize_row(q, row, dst))
                })?;
            }
            DType::F32 => {
                for (dst, v) in out.chunks_exact_mut(4).zip(values) {
                    dst.copy_from_slice(&v.to_le_bytes());
                }
            }
            DType::F16 => {
                for (dst, v) in out.chunks_exact_mut(2).zip(values) {
                    dst.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
                }
            }
            DType::BF16 => {
                for (dst, v) in out.chunks_exact_mut(2).zip(values) {
                    dst.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
                }
            }
        }
        Ok(t)
    }

    /// A tensor holding a copy of `bytes`.
    pub fn from_bytes(
        dtype: DType,
        shape: impl Into<Shape>,
        bytes: &[u8],
    ) -> Result<Tensor, TensorError> {
        let shape = shape.into();
        TensorView::new(dtype, &shape, bytes)?;
        Ok(Tensor {
            dtype,
            shape,
            data: AlignedBuf::from_bytes(bytes),
        })
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The little-endian element bytes (whole blocks for a block format).
    pub fn bytes(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// The element bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.data.as_mut_slice()
    }

    /// A borrowed view of the whole tensor.
    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            dtype: self.dtype,
            shape: &self.shape,
            bytes: self.data.as_slice(),
        }
    }

    /// The elements as `f32` when the dtype is `f32` (the storage is 64-byte aligned).
    pub fn as_f32_slice(&self) -> Option<&[f32]> {
        (self.dtype == DType::F32).then(|| {
            let bytes = self.data.as_slice();
            // SAFETY: storage is 64-byte aligned and holds len/4 f32 values written as LE f32.
            unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), bytes.len() / 4) }
        })
    }

    /// Every element widened (or dequantized) to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.view().to_f32_vec()
    }
}

/// `row` quantized to `format` in `out`: the formats this crate can make (Q8_0, Q4_K).
fn quantize_row(format: QuantFormat, row: &[f32], out: &mut [u8]) -> Result<(), TensorError> {
    match format {
        QuantFormat::Q8_0 => quantize_row_q8_0(row, out)?,
        QuantFormat::Q4K => quantize_row_q4_k(row, out)?,
        other => return Err(TensorError::CannotQuantize(other)),
    }
    Ok(())
}
