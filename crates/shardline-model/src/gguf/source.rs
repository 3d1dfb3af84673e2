//! [`GgufTensors`]: a [`TensorSource`] over the tensors of a GGUF (one file or a split set),
//! answering the loader's Hugging Face names ([`super::names`]) with the GGUF's tensors, used in
//! place from the memory map.
//!
//! - ggml lists dimensions innermost first; the shape handed out is outermost first (`[rows,
//!   cols]`), the same bytes.
//! - A routed expert's projection is its slice of the stacked `[n_experts, rows, cols]` tensor:
//!   a narrower byte range of the map, no copy.
//! - For the `llama` architecture the converter reordered the rows of q and k (and their biases)
//!   within each head, pairing the two halves of the rotary dimensions as llama.cpp's rope wants
//!   them (row `2i + j` of a head holds the Hugging Face row `j * head_dim / 2 + i`); those two
//!   are put back in Hugging Face order, which Shardline's rope expects (owned copies).
//! - F32, F16, BF16, Q4_0, Q8_0, Q4_K, Q5_K and Q6_K tensors are served; one of another type is
//!   refused naming tensor and type.

use shardline_tensor::quant::QuantFormat;
use shardline_tensor::{DType, Shape, Tensor};

use super::container::{GgmlType, GgufErrorKind, GgufFile, GgufFiles, TensorInfo};
use super::names::{gguf_name, GgufName, RopeRows};
use super::spec::GgufArch;
use crate::config::ModelSpec;
use crate::error::{ModelError, Result};
use crate::weights::{check_shape, TensorSource, Weight};

/// The tensors of a GGUF model, served under the names the loader asks for.
#[derive(Debug)]
pub struct GgufTensors {
    files: GgufFiles,
    /// Query and key-value head counts, when q and k rows must be put back in Hugging Face order.
    rope_heads: Option<(usize, usize)>,
}

impl GgufTensors {
    /// The tensors of `files`, whose spec is `spec`.
    pub fn new(files: GgufFiles, spec: &ModelSpec) -> Result<GgufTensors> {
        let permuted = GgufArch::of(files.first())?.permutes_qk();
        Ok(GgufTensors {
            files,
            rope_heads: permuted.then_some((spec.n_heads, spec.n_kv_heads)),
        })
    }

    /// The files the tensors are read from.
    pub fn files(&self) -> &GgufFiles {
        &self.files
    }

    /// The GGUF tensor holding `name`, or where it was looked for.
    fn find(&self, g: &GgufName) -> Option<(&GgufFile, &TensorInfo, Option<usize>)> {
        if let Some((f, t)) = self.files.tensor(&g.tensor) {
            return Some((f, t, g.expert));
        }
        let (f, t) = self.files.tensor(g.legacy.as_deref()?)?;
        Some((f, t, None))
    }
}

/// The dtype a tensor of ggml type `t` is read as, where Shardline reads that type.
fn dtype_of(t: GgmlType) -> Option<DType> {
    match t {
        GgmlType::F32 => Some(DType::F32),
        GgmlType::F16 => Some(DType::F16),
        GgmlType::BF16 => Some(DType::BF16),
        GgmlType::Q4_0 => Some(DType::Quant(QuantFormat::Q4_0)),
        GgmlType::Q8_0 => Some(DType::Quant(QuantFormat::Q8_0)),
        GgmlType::Q4_K => Some(DType::Quant(QuantFormat::Q4K)),
        GgmlType::Q5_K => Some(DType::Quant(QuantFormat::Q5K)),
        GgmlType::Q6_K => Some(DType::Quant(QuantFormat::Q6K)),
        _ => None,
    }
}

impl TensorSource for GgufTensors {
    fn get(&self, name: &str, expected: &[usize]) -> Result<Weight> {
        let first = self.files.first().path().display();
        let g = gguf_name(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            origin: format!("{first}: no GGUF tensor corresponds to it"),
        })?;
        let Some((file, info, expert)) = self.find(&g) else {
            return Err(ModelError::MissingTensor {
                name: name.to_string(),
                origin: format!("GGUF tensor `{}` of {first} and its shards", g.tensor),
            });
        };
        let origin = format!("{} (GGUF tensor `{}`)", file.path().display(), info.name);
        let dtype = dtype_of(info.ggml_type).ok_or_else(|| {
            file.error(GgufErrorKind::UnsupportedType {
                tensor: info.name.clone(),
                ggml_type: info.ggml_type,
            })
        })?;
        let mut shape = info.shape();
        let mut range = file.range(info);
        if let Some(e) = expert {
            // [n_experts, rows, cols] -> expert e's [rows, cols].
            match shape.split_first() {
                Some((&n, rest)) if shape.len() == 3 && e < n => {
                    let per = range.len() / n;
                    range = range.start + e * per..range.start + (e + 1) * per;
                    shape = rest.to_vec();
                }
                _ => {
                    return Err(ModelError::TensorShape {
                        origin,
                        name: format!("{name} (expert {e} of a stacked expert tensor)"),
                        expected: [&[e + 1], expected].concat(),
                        actual: shape,
                    })
                }
            }
        }
        // A `[1, n]` matrix (Qwen2-MoE's shared expert gate) may be stored as a vector.
        if expected.len() == 2 && expected[0] == 1 && shape == expected[1..] {
            shape.insert(0, 1);
        }
        check_shape(&origin, name, expected, &shape)?;
        let weight = Weight::Mapped {
            dtype,
            shape: Shape::new(shape),
            map: file.map().clone(),
            range,
        };
        match (g.rope_rows, self.rope_heads) {
            (Some(rows), Some((q_heads, kv_heads))) => {
                let heads = match rows {
                    RopeRows::Query => q_heads,
                    RopeRows::Key => kv_heads,
                };
                unpermute_rows(&weight, heads).map_err(|reason| {
                    ModelError::Invalid(format!("{origin}: tensor `{name}`: {reason}"))
                })
            }
            _ => Ok(weight),
        }
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.find(&g).is_some())
    }
}

/// Puts the rows of a q or k projection (or bias) of `heads` heads back in Hugging Face order:
/// within each head, GGUF row `2i + j` is Hugging Face row `j * head_dim / 2 + i`.
fn unpermute_rows(w: &Weight, heads: usize) -> std::result::Result<Weight, String> {
    let v = w.view();
    let dims = v.shape().dims();
    let rows = dims.first().copied().unwrap_or(0);
    if heads == 0 || rows == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(format!(
            "{rows} rows are not {heads} heads of an even dimension"
        ));
    }
    let (head_dim, bytes) = (rows / heads, v.bytes());
    let (half, row_bytes) = (head_dim / 2, bytes.len() / rows);
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let hf = h * head_dim + j * half + i;
                let gguf = h * head_dim + 2 * i + j;
                out[hf * row_bytes..(hf + 1) * row_bytes]
                    .copy_from_slice(&bytes[gguf * row_bytes..(gguf + 1) * row_bytes]);
            }
        }
    }
    Tensor::from_bytes(v.dtype(), Shape::new(dims.to_vec()), &out)
        .map(Weight::Owned)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The converter's permutation (`LlamaModel.permute`), for one head count.
    fn permute(rows: &[f32], heads: usize) -> Vec<f32> {
        let hd = rows.len() / heads;
        let mut out = vec![0.0; rows.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    out[h * hd + 2 * i + j] = rows[h * hd + j * hd / 2 + i];
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_undoes_the_converter() {
        let hf: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let gguf = permute(&hf, 3);
        // Head 0 of 8 rows: the two halves (0..4, 4..8) interleaved.
        assert_eq!(&gguf[..8], &[0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]);
        let t = Tensor::from_f32(DType::F32, [24], &gguf).unwrap();
        let back = unpermute_rows(&Weight::Owned(t), 3).unwrap();
        assert_eq!(back.to_f32_vec(), hf);
        // A matrix's rows move whole, in bf16 as in f32.
        let rows: Vec<f32> = gguf.iter().flat_map(|&r| [r, r + 100.0]).collect();
        let t = Tensor::from_f32(DType::BF16, [24, 2], &rows).unwrap();
        let back = unpermute_rows(&Weight::Owned(t), 3).unwrap();
        let expect: Vec<f32> = hf.iter().flat_map(|&r| [r, r + 100.0]).collect();
        assert_eq!(back.to_f32_vec(), expect);
        let t = Tensor::from_f32(DType::F32, [24], &gguf).unwrap();
        assert!(unpermute_rows(&Weight::Owned(t), 5).is_err());
    }
}
