//! Putting a model together: a Hugging Face directory (config, safetensors, tokenizer) or the
//! built-in demo model with deterministic random weights, as a single-rank CPU [`Engine`]; and
//! [`Model`], the engine with its tokenizer, which turns prompts into text.

use std::path::Path;

use shardline_tensor::quant::QuantFormat;
use shardline_tensor::DType;

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, Reduce, SingleRank};
use crate::config::{eos_ids, Arch, ModelSpec, MoeSpec};
use crate::engine::Engine;
use crate::error::{ModelError, Result};
use crate::files::read_json;
use crate::generate::{generate, Timings};
use crate::load::{load_model_for, ModelWeights};
use crate::plan::Plan;
use crate::quantize::Quantizing;
use crate::random::RandomWeights;
use crate::rope::RopeScaling;
use crate::safetensors_dir::SafetensorsDir;
use crate::sampler::Sampler;
use crate::tokenizer::TextCodec;
use crate::weights::TensorSource;

/// A single-rank engine on the CPU.
pub type CpuEngine = Engine<CpuBackend, SingleRank>;

/// Loads `dir/config.json` and the directory's safetensors weights.
pub fn load_dir(dir: &Path) -> Result<CpuEngine> {
    load_dir_with(dir, |_| {})
}

/// [`load_dir`], with `adjust` applied to the spec read from `config.json` before loading.
pub fn load_dir_with(dir: &Path, adjust: impl FnOnce(&mut ModelSpec)) -> Result<CpuEngine> {
    let (spec, weights) = load_parts(dir, adjust)?;
    Ok(Engine::new(CpuBackend::new(spec, weights, 0), SingleRank))
}

/// The spec (from `config.json` and `generation_config.json`, then `adjust`ed) and the weights of
/// the model in `dir`.
pub fn load_parts(
    dir: &Path,
    adjust: impl FnOnce(&mut ModelSpec),
) -> Result<(ModelSpec, ModelWeights)> {
    load_parts_for(dir, adjust, &Plan::single())
}

/// [`load_parts`] for one rank of `plan`: only its slices of the weights are read.
pub fn load_parts_for(
    dir: &Path,
    adjust: impl FnOnce(&mut ModelSpec),
    plan: &Plan,
) -> Result<(ModelSpec, ModelWeights)> {
    load_parts_quantized_for(dir, adjust, plan, None)
}

/// [`load_parts_for`], with the float matrices quantized to `quantize` as they load
/// ([`crate::quantize`]).
pub fn load_parts_quantized_for(
    dir: &Path,
    adjust: impl FnOnce(&mut ModelSpec),
    plan: &Plan,
    quantize: Option<QuantFormat>,
) -> Result<(ModelSpec, ModelWeights)> {
    let mut spec = ModelSpec::from_file(&dir.join("config.json"))?;
    // Chat models often list more end tokens in generation_config.json than in config.json.
    let generation = dir.join("generation_config.json");
    if generation.is_file() {
        let v = read_json(&generation, 1 << 20)?;
        for id in eos_ids(&v, &generation)? {
            if !spec.eos_ids.contains(&id) {
                spec.eos_ids.push(id);
            }
        }
    }
    let files = SafetensorsDir::open(dir)?;
    // The config's layer count must be the weights' (a smaller one would run part of the model
    // without a word); `adjust` may still ask for fewer.
    let extra = format!("model.layers.{}.input_layernorm.weight", spec.n_layers);
    if files.contains(&extra) {
        return Err(ModelError::config(
            dir.join("config.json"),
            format!(
                "num_hidden_layers is {}, but the weights hold more layers (`{extra}` is there)",
                spec.n_layers
            ),
        ));
    }
    adjust(&mut spec);
    let weights = match quantize {
        Some(format) => load_model_for(&spec, &Quantizing::new(files, format), plan)?,
        None => load_model_for(&spec, &files, plan)?,
    };
    Ok((spec, weights))
}

/// Loads `dir/tokenizer.json`.
pub fn load_tokenizer(dir: &Path) -> Result<TextCodec> {
    TextCodec::from_file(&dir.join("tokenizer.json"))
}

/// The seed of the built-in model's weights (fixed, so its output is the same everywhere).
pub const BUILTIN_SEED: u64 = 0x5348_4152_444c_494e;

/// The built-in demo model: Mixtral-shaped (8 experts, top-2, grouped-query attention), small
/// enough to start instantly, byte-level vocabulary, no EOS.
pub fn builtin_spec() -> ModelSpec {
    ModelSpec {
        arch: Arch::Mixtral,
        hidden: 256,
        n_layers: 4,
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 32,
        vocab: 256,
        max_positions: 4096,
        sliding_window: None,
        rms_eps: 1e-5,
        rope_theta: 1e6,
        rope_scaling: RopeScaling::None,
        qkv_bias: false,
        o_bias: false,
        qk_norm: false,
        tie_embeddings: false,
        dense_intermediate: 512,
        moe: Some(MoeSpec {
            n_experts: 8,
            top_k: 2,
            intermediate: 512,
            renormalize: true,
            shared_intermediate: None,
            sparse_step: 1,
            dense_layers: Vec::new(),
        }),
        dtype: Some(DType::F32),
        rope_freq_dtype: DType::F32,
        eos_ids: Vec::new(),
    }
}

/// The built-in model with its deterministic random weights.
pub fn builtin() -> Result<CpuEngine> {
    let (spec, weights) = builtin_parts()?;
    Ok(Engine::new(CpuBackend::new(spec, weights, 0), SingleRank))
}

/// The built-in model's spec and deterministic random weights.
pub fn builtin_parts() -> Result<(ModelSpec, ModelWeights)> {
    builtin_parts_for(&Plan::single())
}

/// [`builtin_parts`] for one rank of `plan`.
pub fn builtin_parts_for(plan: &Plan) -> Result<(ModelSpec, ModelWeights)> {
    let spec = builtin_spec();
    let weights = load_model_for(&spec, &RandomWeights::new(BUILTIN_SEED, DType::F32), plan)?;
    Ok((spec, weights))
}

/// Verifies the model in `dir` on the CPU against `reference` (default `dir/reference.json`).
/// With `rope_in_model_dtype`, rope's inverse frequencies are rounded to the config's dtype, as in
/// a reference computed from a model cast with `model.to(dtype)` (see
/// [`ModelSpec::rope_freq_dtype`]).
pub fn verify_dir(
    dir: &Path,
    reference: Option<&Path>,
    rope_in_model_dtype: bool,
) -> Result<crate::VerifyReport> {
    let (spec, weights) = load_parts(dir, |spec| {
        if rope_in_model_dtype {
            spec.rope_freq_dtype = spec.dtype.unwrap_or(DType::F32);
        }
    })?;
    let path = reference
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.join("reference.json"));
    let reference = crate::Reference::from_file(&path, spec.vocab)?;
    let mut engine = Engine::new(CpuBackend::new(spec, weights, 0), SingleRank);
    crate::verify(&mut engine, &reference)
}

/// A model ready to write text: its engine (weights on a device, KV cache) and its tokenizer.
/// The library's front door, running the same engine and generation loop as `shardline run`.
///
/// ```
/// use shardline_model::{GenerateOptions, Model};
///
/// let mut model = Model::builtin()?; // or Model::open(Path::new("path/to/hf-model-dir"))?
/// let out = model.generate("Hello", &GenerateOptions { max_tokens: 8, ..Default::default() })?;
/// assert_eq!(out.tokens.len(), 8); // the built-in model has no end-of-sequence token
/// # Ok::<(), shardline_model::ModelError>(())
/// ```
pub struct Model<B: Backend = CpuBackend, R: Reduce = SingleRank> {
    engine: Engine<B, R>,
    codec: TextCodec,
}

/// How [`Model::generate`] writes: how many tokens at most and how each is chosen.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// New tokens at most (fewer when the model ends the text).
    pub max_tokens: usize,
    /// 0 is greedy (the most likely token every time); higher samples more freely.
    pub temperature: f32,
    /// Sample from the smallest set of tokens whose probability reaches this (1.0: all).
    pub top_p: f32,
    /// Keep at most this many of the most likely tokens (0: no limit).
    pub top_k: usize,
    /// The sampler's seed (the same seed, prompt and settings give the same text).
    pub seed: u64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// What [`Model::generate`] wrote.
#[derive(Clone, Debug)]
pub struct Generation {
    /// The new text (the prompt not included).
    pub text: String,
    /// The new tokens' ids.
    pub tokens: Vec<u32>,
    /// How long the prompt and each new token took.
    pub timings: Timings,
}

impl Model {
    /// The Hugging Face model directory `dir` (config.json, safetensors, tokenizer.json), on the
    /// CPU.
    pub fn open(dir: &Path) -> Result<Model> {
        let (spec, weights) = load_parts(dir, |_| {})?;
        let engine = Engine::new(CpuBackend::new(spec, weights, 0), SingleRank);
        Ok(Model::new(engine, load_tokenizer(dir)?))
    }

    /// The built-in demo model (random weights, byte-level tokenizer: its text is gibberish).
    pub fn builtin() -> Result<Model> {
        Ok(Model::new(builtin()?, TextCodec::Bytes))
    }
}

impl<B: Backend, R: Reduce> Model<B, R> {
    /// A model over an engine built by hand (another device, or one rank of a group).
    pub fn new(engine: Engine<B, R>, codec: TextCodec) -> Model<B, R> {
        Model { engine, codec }
    }

    /// What the model is: shapes, vocabulary, end-of-sequence ids.
    pub fn spec(&self) -> &ModelSpec {
        self.engine.backend.spec()
    }

    /// Text after `prompt`, as `opts` say.
    pub fn generate(&mut self, prompt: &str, opts: &GenerateOptions) -> Result<Generation> {
        self.generate_streaming(prompt, opts, |_| {})
    }

    /// [`Model::generate`], calling `emit` with each new piece of text as it is written.
    pub fn generate_streaming(
        &mut self,
        prompt: &str,
        opts: &GenerateOptions,
        emit: impl FnMut(&str),
    ) -> Result<Generation> {
        let mut sampler =
            Sampler::checked(opts.temperature, opts.top_p, opts.seed)?.with_top_k(opts.top_k);
        let ids = self.codec.encode(prompt)?;
        let eos = self.spec().eos_ids.clone();
        let (tokens, timings) = generate(
            &mut self.engine,
            &self.codec,
            &ids,
            opts.max_tokens,
            &mut sampler,
            &eos,
            emit,
        )?;
        let text = self.codec.decode(&tokens)?;
        Ok(Generation {
            text,
            tokens,
            timings,
        })
    }
}
