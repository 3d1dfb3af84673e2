//! The quantized matrix product for several activation rows (prefill, batched decode):
//! [`QuantizedRows`] quantizes each activation row once, and [`gemm`] multiplies them with many
//! weight rows, each weight block unpacked once per tile of activation rows (see `tile`) rather
//! than once per row as [`super::dot_rows`] does.

use super::dot::Path;
use super::layout::{f16_at, q8_0};
use super::rows::check_weight_rows;
use super::{quantize_row_q8_0, quantize_row_q8_k, Activations, BlockQ8K, QuantError, QuantFormat};
use crate::Isa;

/// Activation rows quantized once for the weights of one format: Q8_0 blocks for Q4_0 and Q8_0
/// weights, Q8_K blocks for the K-quants, as [`super::QuantizedRow`] quantizes one row. A row
/// holding NaN or infinity cannot be quantized; its products come out NaN.
#[derive(Clone, Debug)]
pub struct QuantizedRows {
    /// The weight format the rows were quantized for.
    format: QuantFormat,
    rows: usize,
    elements: usize,
    data: RowsData,
    /// Whether each row was finite (and so quantized).
    finite: Vec<bool>,
    /// The rows rearranged for the packed kernels of `format` (Q8_0, Q4_K and Q5_K weights, x86,
    /// at least [`pack_rows`] rows), one after another; empty where they do not run.
    packed: Vec<u8>,
}

/// Fewest activation rows for which the products of `format` pack their weights (see `packed`),
/// `usize::MAX` for formats without packed kernels. Packing a group of weight rows costs about
/// what the packed kernels save on 4 activation rows for Q8_0 (which then ran 0.9-1.0 times the
/// unpacked kernels, 1.3 at 8 rows, 1.9 at 32) and on 2 to 4 for Q4_K (1.0-1.3 times at 4 rows,
/// 1.3-1.6 at 8), as measured on a 2-core Sapphire Rapids, one thread. Q5_K, which has no
/// unpacked tile kernel, packs from the same row count as Q4_K.
fn pack_rows(format: QuantFormat) -> usize {
    match format {
        QuantFormat::Q4K | QuantFormat::Q5K => 4,
        QuantFormat::Q8_0 => 8,
        _ => usize::MAX,
    }
}

#[derive(Clone, Debug)]
enum RowsData {
    /// The rows' Q8_0 blocks in ggml's byte layout, one row after another, and their scales
    /// widened to f32 (read once per block by the tile kernels).
    Q8_0 { bytes: Vec<u8>, scales: Vec<f32> },
    /// The rows' Q8_K blocks, one row after another.
    Q8K(Vec<BlockQ8K>),
}

impl QuantizedRows {
    /// The `rows` rows of `x` (of `x.len() / rows` elements each, whole blocks of `format`)
    /// quantized for weights of `format`.
    pub fn for_weights(
        format: QuantFormat,
        rows: usize,
        x: &[f32],
    ) -> Result<QuantizedRows, QuantError> {
        if (rows == 0 && !x.is_empty()) || (rows > 0 && !x.len().is_multiple_of(rows)) {
            return Err(QuantError::Length {
                what: "activation values (a multiple of the rows)",
                expected: x.len().next_multiple_of(rows.max(1)),
                actual: x.len(),
            });
        }
        let elements = x.len().checked_div(rows).unwrap_or(0);
        format.row_bytes(elements)?;
        let mut finite = Vec::with_capacity(rows);
        // A row that cannot be quantized is left zero (and its outputs set to NaN).
        let mut quantized = |r: Result<(), QuantError>| {
            finite.push(match r {
                Ok(()) => true,
                Err(QuantError::NonFinite { .. }) => false,
                Err(e) => return Err(e),
            });
            Ok(())
        };
        let data = if pairs_with_q8k(format) {
            let mut blocks = Vec::with_capacity(x.len() / 256);
            let (mut row, zero) = (Vec::new(), vec![0.0; elements]);
            for r in 0..rows {
                let r = quantize_row_q8_k(&x[r * elements..(r + 1) * elements], &mut row);
                if r.is_err() {
                    quantize_row_q8_k(&zero, &mut row)?;
                }
                quantized(r)?;
                blocks.append(&mut row);
            }
            RowsData::Q8K(blocks)
        } else {
            let row_bytes = QuantFormat::Q8_0.row_bytes(elements)?;
            let mut bytes = vec![0u8; row_bytes * rows];
            for r in 0..rows {
                let out = &mut bytes[r * row_bytes..(r + 1) * row_bytes];
                let r = quantize_row_q8_0(&x[r * elements..(r + 1) * elements], out);
                if r.is_err() {
                    out.fill(0);
                }
                quantized(r)?;
            }
            let scales = bytes
                .chunks_exact(q8_0::BYTES)
                .map(|b| f16_at(b, 0))
                .collect();
            RowsData::Q8_0 { bytes, scales }
        };
        let mut packed = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if rows >= pack_rows(format) {
            use super::packed::{pack_acts_q8_0, pack_acts_q8_k};
            match (&data, format) {
                (RowsData::Q8K(blocks), QuantFormat::Q4K | QuantFormat::Q5K) => {
                    for row in blocks.chunks_exact((elements / 256).max(1)) {
                        pack_acts_q8_k(row, &mut packed);
                    }
                }
                (RowsData::Q8_0 { bytes, .. }, QuantFormat::Q8_0) => {
                    for row in bytes.chunks_exact((elements / 32 * q8_0::BYTES).max(1)) {
                        pack_acts_q8_0(row, &mut packed);
                    }
                }
                _ => {}
            }
        }
        Ok(QuantizedRows {
            format,
            rows,
            elements,
            data,
            finite,
            packed,
        })
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Elements per row.
    pub fn elements(&self) -> usize {
        self.elements
    }

    /// Row `r` as the dot products take it; `None` when it held a non-finite value (or `r` is
    /// past the rows).
    pub fn row(&self, r: usize) -> Option<Activations<'_>> {
        if !*self.finite.get(r)? {
            return None;
        }
        Some(match &self.data {
            RowsData::Q8_0 { bytes, .. } => {
                let row_bytes = bytes.len() / self.rows;
                Activations::Q8_0(&bytes[r * row_bytes..(r + 1) * row_bytes])
            }
            RowsData::Q8K(blocks) => {
                let per_row = blocks.len() / self.rows;
                Activations::Q8K(&blocks[r * per_row..(r + 1) * per_row])
            }
        })
    }

    fn kind(&self) -> &'static str {
        match self.data {
            RowsData::Q8_0 { .. } => "Q8_0",
            RowsData::Q8K(_) => "Q8_K",
        }
    }
}

/// Whether `format` pairs with Q8_K activations (else Q8_0).
fn pairs_with_q8k(format: QuantFormat) -> bool {
    matches!(
        format,
        QuantFormat::Q4K | QuantFormat::Q5K | QuantFormat::Q6K
    )
}

/// `out[c * n + r]` = the dot product of `format` weight row `r` of `weights` (`n` consecutive
/// rows of `acts.elements()` elements, `n = out.len() / acts.rows()`) with activation row `c` of
/// `acts`; NaN for a row of `acts` that held a non-finite value. `isa` picks the path: the scalar
/// one gives each product the bits of [`super::dot`]; the SIMD ones give the same integer sums,
/// added in another order (so within f32 rounding of [`super::dot`] on the same path). AVX2 and
/// AVX-512 VNNI tile Q8_0, Q4_K and Q6_K weights, and Q5_K from [`pack_rows`] activation rows;
/// other formats and fewer rows run [`super::dot_rows`] once per activation row.
pub fn gemm(
    isa: Isa,
    format: QuantFormat,
    weights: &[u8],
    acts: &QuantizedRows,
    out: &mut [f32],
) -> Result<(), QuantError> {
    let path = Path::for_isa(isa)?;
    if pairs_with_q8k(format) != matches!(acts.data, RowsData::Q8K(_)) {
        return Err(QuantError::ActivationKind {
            format,
            expected: if pairs_with_q8k(format) {
                "Q8_K"
            } else {
                "Q8_0"
            },
            actual: acts.kind(),
        });
    }
    let row_bytes = format.row_bytes(acts.elements)?;
    let m = acts.rows;
    if (m == 0 && !out.is_empty()) || (m > 0 && !out.len().is_multiple_of(m)) {
        return Err(QuantError::Length {
            what: "outputs (a multiple of the activation rows)",
            expected: out.len().next_multiple_of(m.max(1)),
            actual: out.len(),
        });
    }
    let n = out.len().checked_div(m).unwrap_or(0);
    check_weight_rows(format, weights, row_bytes, n)?;
    if m == 0 {
        return Ok(());
    }
    if !tiled(path, format, weights, acts, out) {
        for (r, out) in out.chunks_exact_mut(n.max(1)).enumerate().take(m) {
            match acts.row(r) {
                Some(a) => path.rows(format, a, weights, row_bytes, out)?,
                None => out.fill(f32::NAN),
            }
        }
    }
    Ok(())
}

/// Runs the register-tiled kernels where `path` and `format` have them (then sets the products of
/// rows that could not be quantized to NaN); false where they have none. Arguments checked.
#[cfg(target_arch = "x86_64")]
fn tiled(
    path: Path,
    format: QuantFormat,
    weights: &[u8],
    acts: &QuantizedRows,
    out: &mut [f32],
) -> bool {
    use super::packed::{KPacked, Q8Packed};
    use super::tile::{gemm_avx2, gemm_vnni, ActRow, TileKernel, Q4K, Q6K, Q8};

    let m = acts.rows;
    let blocks = acts.elements / format.block_size();
    let packed = !acts.packed.is_empty() && acts.format == format;
    let rows: Vec<ActRow> = match &acts.data {
        _ if packed => acts
            .packed
            .chunks_exact(acts.packed.len() / m)
            .map(|row| ActRow {
                blocks: row.as_ptr(),
                scales: std::ptr::null(),
            })
            .collect(),
        RowsData::Q8_0 { bytes, scales } => (0..m)
            .map(|r| ActRow {
                blocks: bytes[r * blocks * q8_0::BYTES..].as_ptr(),
                scales: scales[r * blocks..].as_ptr(),
            })
            .collect(),
        RowsData::Q8K(b) => (0..m)
            .map(|r| ActRow {
                blocks: b[r * blocks..].as_ptr().cast(),
                scales: std::ptr::null(),
            })
            .collect(),
    };
    type Entry = unsafe fn(&[u8], usize, &[ActRow], &mut [f32]);
    fn pick<K: TileKernel>(path: Path) -> Option<Entry> {
        match path {
            Path::Avx2 => Some(gemm_avx2::<K>),
            Path::Avx512Vnni => Some(gemm_vnni::<K>),
            Path::Scalar => None,
        }
    }
    let entry = match format {
        QuantFormat::Q8_0 if packed => pick::<Q8Packed>(path),
        QuantFormat::Q8_0 => pick::<Q8>(path),
        QuantFormat::Q4K if packed => pick::<KPacked<false>>(path),
        QuantFormat::Q4K => pick::<Q4K>(path),
        QuantFormat::Q5K if packed => pick::<KPacked<true>>(path),
        QuantFormat::Q6K => pick::<Q6K>(path),
        QuantFormat::Q4_0 | QuantFormat::Q5K => None,
    };
    let Some(entry) = entry else {
        return false;
    };
    // SAFETY: `Path::for_isa` made the path only where the CPU has its features; the weights
    // are `out.len() / m` rows of `blocks` whole blocks (checked by `gemm`), every activation row
    // holds `blocks` blocks of the kind the format takes (packed for the packed kernels, made
    // for this format: `packed` is only filled for the formats with packed kernels), and
    // quantized activations are never -128 (the Q8_0 kernels' sign trick needs that).
    unsafe { entry(weights, blocks, &rows, out) };
    let n = out.len() / m;
    for (out, finite) in out.chunks_exact_mut(n.max(1)).zip(&acts.finite) {
        if !finite {
            out.fill(f32::NAN);
        }
    }
    true
}

#[cfg(not(target_arch = "x86_64"))]
fn tiled(_: Path, _: QuantFormat, _: &[u8], _: &QuantizedRows, _: &mut [f32]) -> bool {
    false
}
