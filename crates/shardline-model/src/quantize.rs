//! Quantize-on-load: float weights made into ggml block formats as they load (`--quantize
//! q8_0|q4_k` on a safetensors model, `--dtype q8_0|q4_k` on a preset), so that decode reads a
//! half or a quarter of the bytes. Which tensors are quantized follows llama.cpp: the matrices,
//! except the MoE routers, whose few rows decide which experts run and cost little to read.

use shardline_tensor::quant::QuantFormat;
use shardline_tensor::{DType, Tensor};

use crate::error::{ModelError, Result};
use crate::weights::{TensorSource, Weight};

/// Whether the tensor `name` of `shape` is quantized to `format`: a matrix whose rows are whole
/// blocks, and not a router.
pub fn quantizes(name: &str, shape: &[usize], format: QuantFormat) -> bool {
    let router = name.ends_with("mlp.gate.weight") || name.ends_with("shared_expert_gate.weight");
    matches!(shape, [_, cols] if cols % format.block_size() == 0) && !router
}

/// `w` (the tensor `name`) quantized to `format` where [`quantizes`] says so, else as it is.
pub fn quantized(name: &str, w: Weight, format: QuantFormat) -> Result<Weight> {
    let v = w.view();
    if v.dtype().is_quantized() || !quantizes(name, v.shape().dims(), format) {
        return Ok(w);
    }
    Tensor::from_f32(DType::Quant(format), v.shape().clone(), &v.to_f32_vec())
        .map(Weight::Owned)
        .map_err(|e| ModelError::Invalid(format!("cannot quantize `{name}` to {format:?}: {e}")))
}

/// A source whose float matrices are quantized to one format as they are read.
pub struct Quantizing<S> {
    inner: S,
    format: QuantFormat,
}

impl<S: TensorSource> Quantizing<S> {
    /// `inner`'s tensors, quantized to `format` where [`quantizes`] says so.
    pub fn new(inner: S, format: QuantFormat) -> Quantizing<S> {
        Quantizing { inner, format }
    }
}

impl<S: TensorSource> TensorSource for Quantizing<S> {
    fn get(&self, name: &str, expected: &[usize]) -> Result<Weight> {
        quantized(name, self.inner.get(name, expected)?, self.format)
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
}
