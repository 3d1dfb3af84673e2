//! The paged KV cache on the device: every layer's keys and values in one pool of blocks of
//! [`BLOCK_POSITIONS`] positions, which sequences of different lengths share through their block
//! tables ([`crate::kv_pool`] says which blocks are whose). A layer's pool is laid out as the
//! contiguous cache of a sequence of `blocks * BLOCK_POSITIONS` positions, so the same kernels
//! read both: a position's cache row is found through the row's block table.

use shardline_cuda::cudarc::driver::CudaSlice;
use shardline_cuda::device::dptr;
use shardline_cuda::{CudaDevice, CudaError};
use shardline_tensor::DType;

use crate::backend::PagedRow;
use crate::kv_pool::BLOCK_POSITIONS;

/// Every layer's paged keys and values (`[kv_heads, blocks * BLOCK_POSITIONS, head_dim]` each,
/// f32 or bf16).
pub struct PagedKv {
    layers: Vec<[CudaSlice<u8>; 2]>,
    blocks: usize,
    dtype: DType,
}

impl PagedKv {
    /// A pool of `blocks` blocks of `dtype` (f32 or bf16) for `layers` layers of `kv_dim` (KV
    /// heads x head_dim) values per position; fails naming the size when the GPU has no room.
    pub fn new(
        dev: &CudaDevice,
        layers: usize,
        kv_dim: usize,
        blocks: usize,
        dtype: DType,
    ) -> Result<PagedKv, CudaError> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(CudaError::Shape(format!(
                "a {dtype} KV cache on the GPU (f32 or bf16)"
            )));
        }
        let per_layer = blocks
            .checked_mul(BLOCK_POSITIONS * kv_dim)
            .filter(|&n| blocks > 0 && n <= i32::MAX as usize)
            .ok_or_else(|| {
                CudaError::Shape(format!(
                    "a paged KV cache of {blocks} blocks of {BLOCK_POSITIONS} positions x \
                     {kv_dim} values per layer: from 1 block up to 2^31 values a layer"
                ))
            })?;
        let bytes = per_layer * dtype.size_in_bytes();
        let total = 2 * layers * bytes;
        let layers = (0..layers)
            .map(|_| Ok([dev.zeros(bytes)?, dev.zeros(bytes)?]))
            .collect::<Result<Vec<_>, CudaError>>()
            .map_err(|e| {
                CudaError::Shape(format!(
                    "a paged KV cache of {blocks} blocks ({:.2} GiB) does not fit on the GPU: {e}",
                    total as f64 / (1u64 << 30) as f64
                ))
            })?;
        Ok(PagedKv {
            layers,
            blocks,
            dtype,
        })
    }

    /// Whether the pool holds bf16 (else f32).
    pub fn is_bf16(&self) -> bool {
        self.dtype == DType::BF16
    }

    /// Positions one layer's pool holds (its capacity as a contiguous cache).
    pub fn positions(&self) -> usize {
        self.blocks * BLOCK_POSITIONS
    }

    /// Device addresses of layer `l`'s keys and values.
    pub fn layer(&self, dev: &CudaDevice, l: usize) -> Result<(u64, u64), CudaError> {
        let [k, v] = self.layers.get(l).ok_or_else(|| {
            CudaError::Shape(format!(
                "layer {l} of a paged KV cache of {} layers",
                self.layers.len()
            ))
        })?;
        Ok((dptr(dev, k), dptr(dev, v)))
    }

    /// Each row's position and its block table padded to `stride` entries (`[rows, stride]`;
    /// 0: the longest table's), as the kernels read them, and the stride (see [`block_tables`]).
    pub fn placement(
        &self,
        rows: &[PagedRow],
        stride: usize,
    ) -> Result<(Vec<i32>, Vec<i32>, usize), CudaError> {
        block_tables(rows, self.blocks, stride)
    }
}

/// Each row's position and its block table padded to `stride` entries (`[rows, stride]`; 0: the
/// longest table's) for a pool of `pool_blocks` blocks, and the stride; fails on a block outside
/// the pool, a position beyond its table or a table longer than `stride`.
fn block_tables(
    rows: &[PagedRow],
    pool_blocks: usize,
    stride: usize,
) -> Result<(Vec<i32>, Vec<i32>, usize), CudaError> {
    let longest = rows
        .iter()
        .map(|r| r.blocks.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let stride = if stride == 0 { longest } else { stride };
    if longest > stride {
        return Err(CudaError::Shape(format!(
            "a block table of {longest} blocks, more than the model's longest sequence needs \
             ({stride})"
        )));
    }
    let mut tables = vec![0i32; rows.len() * stride];
    for (r, row) in rows.iter().enumerate() {
        if row.pos >= row.blocks.len() * BLOCK_POSITIONS {
            return Err(CudaError::Shape(format!(
                "row {r}: position {} is beyond its {} blocks",
                row.pos,
                row.blocks.len()
            )));
        }
        if let Some(&b) = row.blocks.iter().find(|&&b| b as usize >= pool_blocks) {
            return Err(CudaError::Shape(format!(
                "row {r}: block {b} of a pool of {pool_blocks}"
            )));
        }
        for (t, &b) in tables[r * stride..].iter_mut().zip(row.blocks) {
            *t = b as i32;
        }
    }
    let positions = rows.iter().map(|r| r.pos as i32).collect();
    Ok((positions, tables, stride))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_padded_to_the_stride_and_checked() {
        let (a, b) = ([3u32, 1], [0u32]);
        let rows = [
            PagedRow {
                pos: 17,
                blocks: &a,
            },
            PagedRow { pos: 2, blocks: &b },
        ];
        let (positions, tables, stride) = block_tables(&rows, 4, 3).unwrap();
        assert_eq!((positions, stride), (vec![17, 2], 3));
        assert_eq!(tables, vec![3, 1, 0, 0, 0, 0]);
        // The longest table's stride when none is given.
        assert_eq!(block_tables(&rows, 4, 0).unwrap().2, 2);
        // A table longer than the stride, a block outside the pool, a position past the table.
        assert!(block_tables(&rows, 4, 1).is_err());
        assert!(block_tables(&rows, 3, 3).is_err());
        let past = [PagedRow {
            pos: 16,
            blocks: &b,
        }];
        assert!(block_tables(&past, 4, 3).is_err());
    }
}
