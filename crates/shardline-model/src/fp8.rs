//! FP8 checkpoints as they are published (Qwen3-*-FP8, DeepSeek-V3): `config.json` declares
//! `quantization_config` with `quant_method` "fp8", `fmt` "e4m3" and `weight_block_size`, and
//! each quantized matrix `X.weight` is stored as `F8_E4M3` beside `X.weight_scale_inv`, one scale
//! per block (the real weight is the fp8 value times its block's scale: the name says "inverse"
//! because it undoes the division made when quantizing).
//!
//! The weights are dequantized once, as they load, into bf16 (the working dtype of such
//! checkpoints, whose other tensors are bf16 too): the matrix kernels read f32, f16, bf16 and ggml
//! blocks, not fp8, so a model loaded this way takes bf16's memory, twice the file's bytes for its
//! matrices. Reading fp8 in place needs an fp8 matrix-vector kernel.

use std::path::Path;

use half::{bf16, f16};
use rayon::prelude::*;
use serde_json::Value;
use shardline_tensor::{DType, Tensor};

use crate::error::{ModelError, Result};

/// What follows a quantized weight's name to name its block scales.
pub const SCALE_SUFFIX: &str = "_scale_inv";

/// The block size of an fp8 checkpoint's scales: one scale per `rows` x `cols` block of each
/// matrix (the blocks on the right and bottom edges may be partial).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp8Blocks {
    /// Rows (output features) per block.
    pub rows: usize,
    /// Columns (input features) per block.
    pub cols: usize,
}

impl Fp8Blocks {
    /// The fp8 scheme `config` (the parsed `config.json` at `path`) declares in its
    /// `quantization_config`: `None` for a float checkpoint, an error for a scheme this loader
    /// does not read.
    ///
    /// `modules_to_not_convert` / `ignored_layers` are not needed: a tensor's stored dtype says
    /// whether it is quantized. The activations run in f32 whatever `activation_scheme` says.
    pub fn from_config(config: &Value, path: &Path) -> Result<Option<Fp8Blocks>> {
        let q = match config.get("quantization_config") {
            None | Some(Value::Null) => return Ok(None),
            Some(q) => q,
        };
        let err =
            |reason: String| ModelError::config(path, format!("quantization_config: {reason}"));
        match q.get("quant_method").and_then(Value::as_str) {
            Some("fp8") => {}
            Some(other) => {
                return Err(err(format!(
                    "quant_method `{other}` is not supported (fp8 with block scales is; a float \
                     checkpoint can be quantized as it loads with --quantize)"
                )))
            }
            None => return Err(err("missing `quant_method`".into())),
        }
        // DeepSeek-V3 and Qwen3 write "e4m3"; transformers' own configs leave it out.
        match q.get("fmt") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "e4m3" => {}
            Some(other) => {
                return Err(err(format!(
                    "fmt {other} is not supported (only e4m3, the float8_e4m3fn format)"
                )))
            }
        }
        let size = q.get("weight_block_size").ok_or_else(|| {
            err(
                "missing `weight_block_size`: only block-scaled fp8 (`weight_scale_inv` per \
                 block) is supported, not one scale per tensor"
                    .into(),
            )
        })?;
        let dims: Option<Vec<usize>> = size.as_array().and_then(|a| {
            a.iter()
                .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect()
        });
        match dims.as_deref() {
            Some(&[rows, cols]) if rows > 0 && cols > 0 => Ok(Some(Fp8Blocks { rows, cols })),
            _ => Err(err(format!(
                "weight_block_size {size} is not a block size: it must be two positive integers \
                 (rows, columns), such as [128, 128]"
            ))),
        }
    }

    /// The shape of the scales of an `[n, k]` matrix: one per block, partial blocks included.
    pub fn scale_shape(&self, [n, k]: [usize; 2]) -> [usize; 2] {
        [n.div_ceil(self.rows), k.div_ceil(self.cols)]
    }
}

/// The value of an e4m3 ("e4m3fn") byte: 1 sign bit, 4 exponent bits of bias 7, 3 mantissa
/// bits, subnormals, no infinities; `0x7F` and `0xFF` are NaN; the largest value is 448.
pub const fn e4m3_to_f32(b: u8) -> f32 {
    let (e, m) = ((b >> 3) & 0xF, b & 0x7);
    let magnitude = if e == 0xF && m == 0x7 {
        f32::NAN
    } else if e == 0 {
        m as f32 / 512.0
    } else {
        // (1 + m / 8) * 2^(e - 7), with 2^x built from its bits (x is within f32's normals).
        (8 + m) as f32 / 8.0 * f32::from_bits(((e as u32) + 127 - 7) << 23)
    };
    if b & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// Every byte's value, so dequantizing is a lookup and a product.
static E4M3: [f32; 256] = {
    let mut t = [0.0; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_to_f32(i as u8);
        i += 1;
    }
    t
};

/// The `[n, k]` e4m3 matrix `fp8` times its block `scales` (row-major, of
/// [`Fp8Blocks::scale_shape`]) as a tensor of the float `dtype`: each element is the f32
/// product `value * scale`, then rounded once to `dtype` (to nearest even). `origin` and `name`
/// (the file and the tensor) name it in errors: NaN codes, scales that are not finite, or data
/// whose length is not the shape's.
pub fn dequantize(
    origin: &str,
    name: &str,
    fp8: &[u8],
    [n, k]: [usize; 2],
    scales: &[f32],
    blocks: Fp8Blocks,
    dtype: DType,
) -> Result<Tensor> {
    let err = |reason: String| ModelError::Quantized {
        origin: origin.to_string(),
        name: name.to_string(),
        reason,
    };
    let [sn, sk] = blocks.scale_shape([n, k]);
    if n.checked_mul(k) != Some(fp8.len()) || sn * sk != scales.len() {
        return Err(err(format!(
            "{} bytes and {} scales do not make an [{n}, {k}] matrix of {}x{} blocks",
            fp8.len(),
            scales.len(),
            blocks.rows,
            blocks.cols
        )));
    }
    if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
        return Err(err(format!(
            "its scale of block [{}, {}] in `{name}{SCALE_SUFFIX}` is {}; every scale must be a \
             finite number",
            i / sk,
            i % sk,
            scales[i]
        )));
    }
    // A quantizer saturates at 448; a NaN code is a broken file, refused here rather than as
    // NaN logits later.
    if let Some(i) = fp8.iter().position(|&b| b & 0x7F == 0x7F) {
        return Err(err(format!(
            "element [{}, {}] is an e4m3 NaN (0x{:02X})",
            i / k,
            i % k,
            fp8[i]
        )));
    }
    let mut t = Tensor::zeros(dtype, [n, k]).map_err(|e| err(e.to_string()))?;
    let size = match dtype {
        DType::F32 => 4,
        DType::F16 | DType::BF16 => 2,
        DType::Quant(_) => {
            return Err(err(format!(
                "cannot dequantize to {dtype}, only to a float dtype"
            )))
        }
    };
    if n == 0 || k == 0 {
        return Ok(t);
    }
    shardline_tensor::pool::pool().install(|| {
        t.bytes_mut()
            .par_chunks_exact_mut(k * size)
            .zip(fp8.par_chunks_exact(k))
            .enumerate()
            .for_each(|(r, (dst, src))| {
                let row_scales = &scales[(r / blocks.rows) * sk..][..sk];
                let values = src
                    .iter()
                    .enumerate()
                    .map(|(c, &b)| E4M3[usize::from(b)] * row_scales[c / blocks.cols]);
                let dst = dst.chunks_exact_mut(size);
                match dtype {
                    DType::BF16 => dst
                        .zip(values)
                        .for_each(|(d, v)| d.copy_from_slice(&bf16::from_f32(v).to_le_bytes())),
                    DType::F16 => dst
                        .zip(values)
                        .for_each(|(d, v)| d.copy_from_slice(&f16::from_f32(v).to_le_bytes())),
                    _ => dst
                        .zip(values)
                        .for_each(|(d, v)| d.copy_from_slice(&v.to_le_bytes())),
                }
            })
    });
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn e4m3_values() {
        for (b, v) in [
            (0x00, 0.0),
            (0x01, 2f32.powi(-9)),
            (0x07, 7.0 * 2f32.powi(-9)),
            (0x08, 2f32.powi(-6)),
            (0x38, 1.0),
            (0x3C, 1.5),
            (0x7E, 448.0),
            (0xFE, -448.0),
            (0xB8, -1.0),
        ] {
            assert_eq!(e4m3_to_f32(b), v, "0x{b:02X}");
        }
        assert!(e4m3_to_f32(0x80) == 0.0 && e4m3_to_f32(0x80).is_sign_negative());
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
        // The codes of the non-negative values are in the values' order.
        assert!((0..0x7E).all(|b| e4m3_to_f32(b) < e4m3_to_f32(b + 1)));
    }

    /// Blocks of 128 by 128 and of 64 by 32 over a matrix with partial blocks at both edges.
    #[test]
    fn each_element_takes_its_blocks_scale() {
        let (n, k) = (300, 260);
        let fp8: Vec<u8> = (0..n * k).map(|i| (i * 37 % 0x7F) as u8).collect();
        for blocks in [
            Fp8Blocks {
                rows: 128,
                cols: 128,
            },
            Fp8Blocks { rows: 64, cols: 32 },
        ] {
            let [sn, sk] = blocks.scale_shape([n, k]);
            let scales: Vec<f32> = (0..sn * sk).map(|i| 0.5 + i as f32).collect();
            let t = dequantize("f", "w", &fp8, [n, k], &scales, blocks, DType::F32).unwrap();
            let got = t.to_f32_vec();
            for r in 0..n {
                for c in 0..k {
                    let s = scales[(r / blocks.rows) * sk + c / blocks.cols];
                    assert_eq!(
                        got[r * k + c],
                        e4m3_to_f32(fp8[r * k + c]) * s,
                        "[{r}, {c}]"
                    );
                }
            }
            let b = dequantize("f", "w", &fp8, [n, k], &scales, blocks, DType::BF16).unwrap();
            let want: Vec<f32> = got.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            assert_eq!(b.to_f32_vec(), want);
        }
    }

    #[test]
    fn refuses_nan_codes_nan_scales_and_wrong_lengths() {
        let blocks = Fp8Blocks {
            rows: 128,
            cols: 128,
        };
        let e = dequantize("f", "w", &[0, 0x7F], [1, 2], &[1.0], blocks, DType::BF16)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[0, 1]") && e.contains("NaN") && e.contains("`w`"),
            "{e}"
        );
        let e = dequantize("f", "w", &[0, 1], [1, 2], &[f32::NAN], blocks, DType::BF16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("w_scale_inv") && e.contains("NaN"), "{e}");
        let e = dequantize("f", "w", &[0, 1], [2, 2], &[1.0], blocks, DType::BF16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[2, 2]"), "{e}");
    }

    #[test]
    fn reads_the_published_configs_and_refuses_others() {
        let path = Path::new("m/config.json");
        let cfg = |q: Value| Fp8Blocks::from_config(&json!({ "quantization_config": q }), path);
        let qwen = json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                          "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]});
        assert_eq!(
            cfg(qwen).unwrap(),
            Some(Fp8Blocks {
                rows: 128,
                cols: 128
            })
        );
        assert_eq!(Fp8Blocks::from_config(&json!({}), path).unwrap(), None);
        for (q, says) in [
            (
                json!({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}),
                "e5m2",
            ),
            (
                json!({"quant_method": "fp8", "weight_block_size": [128]}),
                "weight_block_size",
            ),
            (
                json!({"quant_method": "fp8", "weight_block_size": [0, 128]}),
                "weight_block_size",
            ),
            (json!({"quant_method": "fp8"}), "weight_block_size"),
            (json!({"quant_method": "gptq", "bits": 4}), "gptq"),
        ] {
            let e = cfg(q).unwrap_err().to_string();
            assert!(e.contains("m/config.json") && e.contains(says), "{e}");
        }
    }
}
