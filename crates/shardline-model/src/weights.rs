//! A weight tensor used where it lies ([`Weight`]) and the [`TensorSource`] trait that every
//! weight provider (safetensors files, deterministic random weights) implements.

use std::ops::Range;
use std::sync::Arc;

use memmap2::Mmap;
use shardline_tensor::{DType, Shape, Tensor, TensorView};

use crate::error::{ModelError, Result};

/// One weight tensor: either a byte range of a memory-mapped file (no copy) or owned storage
/// (merged matrices, generated weights).
#[derive(Debug)]
pub enum Weight {
    /// `shape` elements of `dtype` at bytes `range` of a mapped file.
    Mapped {
        /// The element type.
        dtype: DType,
        /// The shape, outermost first.
        shape: Shape,
        /// The mapped file, shared by every weight read from it.
        map: Arc<Mmap>,
        /// Where the weight's bytes lie in `map`.
        range: Range<usize>,
    },
    /// A tensor in memory of its own.
    Owned(Tensor),
}

impl Weight {
    /// The weight as a tensor view over its bytes.
    pub fn view(&self) -> TensorView<'_> {
        match self {
            Weight::Mapped {
                dtype,
                shape,
                map,
                range,
            } => TensorView::new(*dtype, shape, &map[range.clone()])
                .expect("mapped range checked against the shape at load time"),
            Weight::Owned(t) => t.view(),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.view().dtype()
    }

    /// Size of the weight's data in bytes.
    pub fn byte_len(&self) -> usize {
        self.view().bytes().len()
    }

    /// Rows `rows` of a 2-D weight (or elements of a 1-D one). A mapped weight stays mapped: the
    /// rows are a narrower byte range of the same file, so only their pages are ever read.
    pub fn rows(&self, rows: Range<usize>) -> Weight {
        let v = self.view();
        let dims = v.shape().dims();
        let row_bytes = v.bytes().len() / dims[0].max(1);
        let mut shape = dims.to_vec();
        shape[0] = rows.len();
        let (a, b) = (rows.start * row_bytes, rows.end * row_bytes);
        match self {
            Weight::Mapped {
                dtype, map, range, ..
            } => Weight::Mapped {
                dtype: *dtype,
                shape: Shape::new(shape),
                map: map.clone(),
                range: range.start + a..range.start + b,
            },
            Weight::Owned(t) => Weight::Owned(
                Tensor::from_bytes(t.dtype(), Shape::new(shape), &t.bytes()[a..b])
                    .expect("a row range of a checked tensor"),
            ),
        }
    }

    /// Columns `cols` of a 2-D weight, copied (a column slice is not contiguous). A block
    /// format is cut only between blocks; `name` names the weight in the error otherwise.
    pub fn cols(&self, name: &str, cols: Range<usize>) -> Result<Weight> {
        let v = self.view();
        let (dtype, dims) = (v.dtype(), v.shape().dims());
        let block = dtype.block_size();
        let (Some(a), Some(b), Some(row_bytes)) = (
            dtype.row_bytes(cols.start),
            dtype.row_bytes(cols.end),
            dtype.row_bytes(dims[1]),
        ) else {
            return Err(ModelError::Invalid(format!(
                "`{name}`: this split takes its columns {cols:?}, which cuts its {dtype} blocks of \
                 {block} columns; choose fewer ranks, or a model in another format"
            )));
        };
        let mut bytes = Vec::with_capacity(dims[0] * (b - a));
        for row in v.bytes().chunks_exact(row_bytes) {
            bytes.extend_from_slice(&row[a..b]);
        }
        Tensor::from_bytes(dtype, [dims[0], cols.len()], &bytes)
            .map(Weight::Owned)
            .map_err(|e| ModelError::Invalid(format!("`{name}`: {e}")))
    }

    /// The elements widened to f32 (norm weights and biases are kept this way).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.view().to_f32_vec()
    }
}

/// Somewhere named weight tensors come from. Loading code asks for every tensor with the shape it
/// expects; the source checks presence, dtype and shape, with errors naming the file and tensor.
pub trait TensorSource {
    /// The tensor `name`, which must have shape `expected`.
    fn get(&self, name: &str, expected: &[usize]) -> Result<Weight>;

    /// Whether `name` exists (for optional tensors such as an untied `lm_head`).
    fn contains(&self, name: &str) -> bool;
}

/// The shape check every source applies.
pub fn check_shape(origin: &str, name: &str, expected: &[usize], actual: &[usize]) -> Result<()> {
    if expected != actual {
        return Err(ModelError::TensorShape {
            origin: origin.to_string(),
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        });
    }
    Ok(())
}

/// Rows `[a; b]` stacked into one owned `[rows_a + rows_b, cols]` matrix of `a`'s dtype (gate and
/// up projections become one matrix so an expert reads both in one pass); `what` names them in
/// errors.
pub fn stack_rows(what: &str, a: &Weight, b: &Weight) -> Result<Weight> {
    let (va, vb) = (a.view(), b.view());
    let (da, db) = (va.shape().dims(), vb.shape().dims());
    if da.len() != 2 || db.len() != 2 || da[1] != db[1] || va.dtype() != vb.dtype() {
        return Err(ModelError::Invalid(format!(
            "{what}: cannot merge matrices of shapes {da:?} ({}) and {db:?} ({}): the dtypes must match",
            va.dtype(),
            vb.dtype()
        )));
    }
    let mut bytes = Vec::with_capacity(va.bytes().len() + vb.bytes().len());
    bytes.extend_from_slice(va.bytes());
    bytes.extend_from_slice(vb.bytes());
    let t = Tensor::from_bytes(va.dtype(), [da[0] + db[0], da[1]], &bytes)
        .map_err(|e| ModelError::Invalid(e.to_string()))?;
    Ok(Weight::Owned(t))
}
