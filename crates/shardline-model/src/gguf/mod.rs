//! llama.cpp's GGUF model files: one `.gguf`, or a split set `NAME-00001-of-0000N.gguf`, read into
//! what a Hugging Face directory gives ([`crate::model::load_parts_for`]): the [`ModelSpec`], the
//! weights as a [`TensorSource`](crate::weights::TensorSource) under the loader's Hugging Face
//! names, and the tokenizer, plus the chat template when the file has one.
//!
//! - [`container`]: the file format, parsed from a memory map, hostile input refused with typed
//!   errors.
//! - [`spec`]: metadata -> [`ModelSpec`] (`llama` with or without experts, `qwen2moe`,
//!   `qwen3moe`, dense `qwen2` and `qwen3`).
//! - [`names`]: loader names -> GGUF tensor names.
//! - [`source`]: the tensors, in place, experts sliced out of their stacked tensors, the q/k row
//!   order of `llama` files undone.
//! - [`tokenizer`]: `tokenizer.ggml.*` -> a `tokenizers::Tokenizer`.

pub mod container;
pub mod names;
pub mod source;
pub mod spec;
pub mod tokenizer;

use std::path::Path;

pub use container::{GgmlType, GgufError, GgufErrorKind, GgufFile, GgufFiles, TensorInfo, Value};
pub use source::GgufTensors;
pub use spec::{model_spec, GgufArch};

use crate::config::ModelSpec;
use crate::error::{ModelError, Result};
use crate::load::{load_model_for, ModelWeights};
use crate::plan::Plan;
use crate::tokenizer::TextCodec;
use crate::weights::TensorSource;

/// Whether `path` names a GGUF file (by its extension), rather than a model directory.
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Reads only the spec of the GGUF model at `path` (the header and metadata; no tokenizer).
pub fn read_spec(path: &Path) -> Result<ModelSpec> {
    model_spec(&GgufFiles::open(path)?)
}

/// A GGUF model, opened.
pub struct GgufModel {
    /// The model, read from the metadata.
    pub spec: ModelSpec,
    /// The weights, under their Hugging Face names.
    pub tensors: GgufTensors,
    /// The tokenizer built from the `tokenizer.ggml.*` keys.
    pub tokenizer: TextCodec,
    /// `tokenizer.chat_template`, when the file has one.
    pub chat_template: Option<String>,
    /// The text of the BOS token, for the chat template.
    pub bos_token: Option<String>,
    /// The text of the EOS token, for the chat template.
    pub eos_token: Option<String>,
}

impl GgufModel {
    /// Opens the GGUF at `path`, or the split set `path` is a shard of.
    pub fn open(path: &Path) -> Result<GgufModel> {
        let files = GgufFiles::open(path)?;
        let spec = model_spec(&files)?;
        let tokenizer = tokenizer::text_codec(&files)?;
        let chat_template = tokenizer::chat_template(&files)?;
        let [bos_token, eos_token] = tokenizer::bos_eos_text(&files)?;
        Ok(GgufModel {
            tensors: GgufTensors::new(files, &spec)?,
            spec,
            tokenizer,
            chat_template,
            bos_token,
            eos_token,
        })
    }

    /// The spec (`adjust`ed, e.g. to fewer layers) and this rank's weights under `plan`, as
    /// [`crate::model::load_parts_for`] gives them for a Hugging Face directory.
    pub fn weights_for(
        &self,
        adjust: impl FnOnce(&mut ModelSpec),
        plan: &Plan,
    ) -> Result<(ModelSpec, ModelWeights)> {
        let mut spec = self.spec.clone();
        // The block count must be the weights' (fewer would run part of the model without a
        // word); `adjust` may still ask for fewer.
        let extra = format!("model.layers.{}.input_layernorm.weight", spec.n_layers);
        if self.tensors.contains(&extra) {
            return Err(ModelError::config(
                self.tensors.files().first().path(),
                format!(
                    "the block count is {}, but the file holds more layers (`blk.{}.attn_norm.weight` is there)",
                    spec.n_layers, spec.n_layers
                ),
            ));
        }
        adjust(&mut spec);
        let weights = load_model_for(&spec, &self.tensors, plan)?;
        Ok((spec, weights))
    }
}
