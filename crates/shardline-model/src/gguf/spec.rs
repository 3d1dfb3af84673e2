//! GGUF metadata -> [`ModelSpec`], the same spec [`ModelSpec::from_json`] reads from a Hugging
//! Face `config.json`. Keys are llama.cpp's `{arch}.*` (gguf-py's `Keys`), written by its
//! converter from the config: `block_count`, `embedding_length`, `feed_forward_length`,
//! `attention.head_count[_kv]`, `attention.key_length`, `attention.layer_norm_rms_epsilon`,
//! `rope.freq_base`, `rope.scaling.*`, `context_length`, `expert_count`, `expert_used_count`,
//! `expert_feed_forward_length`, `expert_shared_feed_forward_length`.
//!
//! What the metadata does not say comes from the tensors, as llama.cpp decides it too: biases
//! (`attn_q.bias`, `attn_output.bias`), tied embeddings (no `output.weight`), and which layers of
//! a MoE model are dense (no `ffn_gate_inp`).

use shardline_tensor::DType;

use super::container::{GgufErrorKind, GgufFile, GgufFiles};
use crate::config::{Arch, ModelSpec, MoeSpec};
use crate::error::{ModelError, Result};
use crate::rope::RopeScaling;

/// The largest size (width, head count, vocabulary, expert count) taken from metadata.
const MAX_SIZE: usize = 1 << 24;

/// The GGUF architectures Shardline runs (`general.architecture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufArch {
    /// Llama, and Mixtral (`llama` with `llama.expert_count`).
    Llama,
    /// Qwen2-MoE (`qwen2moe`).
    Qwen2Moe,
    /// Qwen3-MoE (`qwen3moe`).
    Qwen3Moe,
    /// Dense Qwen2: Llama's decoder with q/k/v biases.
    Qwen2,
    /// Dense Qwen3: Llama's decoder with q/k norms.
    Qwen3,
}

impl GgufArch {
    /// The architecture of `file`, refusing unknown ones with their name.
    pub fn of(file: &GgufFile) -> Result<GgufArch> {
        let key = "general.architecture";
        let name = file.require(key, file.str(key))?;
        Ok(match name {
            "llama" => GgufArch::Llama,
            "qwen2moe" => GgufArch::Qwen2Moe,
            "qwen3moe" => GgufArch::Qwen3Moe,
            "qwen2" => GgufArch::Qwen2,
            "qwen3" => GgufArch::Qwen3,
            _ => {
                return Err(file
                    .error(GgufErrorKind::UnknownArch {
                        arch: name.to_string(),
                    })
                    .into())
            }
        })
    }

    /// The name keys are prefixed with.
    pub fn name(self) -> &'static str {
        match self {
            GgufArch::Llama => "llama",
            GgufArch::Qwen2Moe => "qwen2moe",
            GgufArch::Qwen3Moe => "qwen3moe",
            GgufArch::Qwen2 => "qwen2",
            GgufArch::Qwen3 => "qwen3",
        }
    }

    /// Whether llama.cpp's converter reordered the q and k rows for its interleaved rope
    /// (`LlamaModel.permute`), which [`super::GgufTensors`] undoes.
    pub fn permutes_qk(self) -> bool {
        self == GgufArch::Llama
    }
}

/// The spec of the model in `files` (the metadata of the first file, and its tensor names).
pub fn model_spec(files: &GgufFiles) -> Result<ModelSpec> {
    let f = files.first();
    let arch = GgufArch::of(f)?;
    let k = |key: &str| format!("{}.{key}", arch.name());
    let bad = |reason: String| ModelError::config(f.path(), reason);
    let req = |key: &str| -> Result<usize> {
        let key = k(key);
        Ok(f.require(&key, f.u64(&key))? as usize)
    };
    let opt = |key: &str| -> Result<Option<usize>> { Ok(f.u64(&k(key))?.map(|x| x as usize)) };
    let has = |tensor: String| files.tensor(&tensor).is_some();

    // Sizes a real model could have, so that products of two never overflow; and no more layers
    // than tensors (every layer has several), so loops over the layers are bounded by the file.
    let sized = |key: &str, v: usize| -> Result<usize> {
        if v > MAX_SIZE {
            return Err(bad(format!("{} is {v}, more than {MAX_SIZE}", k(key))));
        }
        Ok(v)
    };
    let hidden = sized("embedding_length", req("embedding_length")?)?;
    let n_layers = req("block_count")?;
    let n_tensors: usize = files.files().iter().map(|f| f.tensors().len()).sum();
    if n_layers > n_tensors {
        return Err(bad(format!(
            "{} is {n_layers}, but the model has only {n_tensors} tensors",
            k("block_count")
        )));
    }
    let n_heads = sized("attention.head_count", req("attention.head_count")?)?;
    let n_kv_heads = sized(
        "attention.head_count_kv",
        opt("attention.head_count_kv")?.unwrap_or(n_heads),
    )?;
    if n_heads == 0 || hidden == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return Err(bad(format!(
            "{} ({n_heads}) must be a positive multiple of {} ({n_kv_heads}) and {} ({hidden}) positive",
            k("attention.head_count"),
            k("attention.head_count_kv"),
            k("embedding_length")
        )));
    }
    let head_dim = match opt("attention.key_length")? {
        Some(d) => sized("attention.key_length", d)?,
        None if hidden.is_multiple_of(n_heads) => hidden / n_heads,
        None => {
            return Err(bad(format!(
                "{} is not a multiple of the head count and {} is not set",
                k("embedding_length"),
                k("attention.key_length")
            )))
        }
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(bad(format!(
            "head dimension {head_dim} must be even and positive"
        )));
    }
    if let Some(v) = opt("attention.value_length")?.filter(|&v| v != head_dim) {
        return Err(bad(format!(
            "{} ({v}) differs from the key length ({head_dim}); not supported",
            k("attention.value_length")
        )));
    }
    if let Some(r) = opt("rope.dimension_count")?.filter(|&r| r != head_dim) {
        return Err(bad(format!(
            "{} is {r}, but heads have {head_dim} dimensions: partial rotary embeddings are not supported",
            k("rope.dimension_count")
        )));
    }
    let rope_scaling = match f.str(&k("rope.scaling.type"))? {
        None | Some("none") => RopeScaling::None,
        Some("linear") => {
            let key = k("rope.scaling.factor");
            let factor = f.require(&key, f.f64(&key))?;
            if !(factor.is_finite() && factor > 0.0) {
                return Err(bad(format!("{key} is {factor}; it must be positive")));
            }
            RopeScaling::Linear { factor }
        }
        Some(other) => {
            return Err(bad(format!(
                "rope scaling `{other}` ({}) is not supported (none, linear)",
                k("rope.scaling.type")
            )))
        }
    };
    if has("rope_freqs.weight".into()) {
        return Err(ModelError::Unsupported(format!(
            "{}: per-frequency rope factors (`rope_freqs.weight`, llama.cpp's form of Llama 3.1's llama3 rope scaling)",
            f.path().display()
        )));
    }
    let vocab = match opt("vocab_size")? {
        Some(v) => v,
        None => match files.tensor("token_embd.weight") {
            Some((_, t)) if t.dims.len() == 2 => t.dims[1] as usize,
            _ => match f.array("tokenizer.ggml.tokens")? {
                Some(tokens) => tokens.len(),
                None => {
                    return Err(bad(format!(
                        "the vocabulary size is unknown: no {}, `token_embd.weight` or `tokenizer.ggml.tokens`",
                        k("vocab_size")
                    )))
                }
            },
        },
    };
    let vocab = sized("vocab_size", vocab)?;
    let dense_intermediate = sized(
        "feed_forward_length",
        opt("feed_forward_length")?.unwrap_or(0),
    )?;
    let expert_count = sized("expert_count", opt("expert_count")?.unwrap_or(0))?;
    // A MoE layer has a router; the others are dense.
    let dense_layers: Vec<usize> = (0..n_layers)
        .filter(|i| !has(format!("blk.{i}.ffn_gate_inp.weight")))
        .collect();
    let renormalize = |default: bool| -> Result<bool> {
        Ok(f.bool(&k("expert_weights_norm"))?.unwrap_or(default))
    };
    let moe = match arch {
        GgufArch::Llama if expert_count > 0 => Some(MoeSpec {
            n_experts: expert_count,
            top_k: req("expert_used_count")?,
            // Mixtral's experts have the config's `intermediate_size`.
            intermediate: match opt("expert_feed_forward_length")? {
                Some(i) => sized("expert_feed_forward_length", i)?,
                None => dense_intermediate,
            },
            renormalize: renormalize(true)?,
            shared_intermediate: None,
            sparse_step: 1,
            dense_layers,
        }),
        GgufArch::Qwen2Moe | GgufArch::Qwen3Moe => Some(MoeSpec {
            n_experts: sized("expert_count", req("expert_count")?)?,
            top_k: req("expert_used_count")?,
            intermediate: sized(
                "expert_feed_forward_length",
                req("expert_feed_forward_length")?,
            )?,
            // llama.cpp's qwen2moe never renormalises the top-k weights, qwen3moe always does.
            renormalize: renormalize(arch == GgufArch::Qwen3Moe)?,
            shared_intermediate: match arch {
                GgufArch::Qwen2Moe => match opt("expert_shared_feed_forward_length")? {
                    Some(s) => Some(sized("expert_shared_feed_forward_length", s)?),
                    None => None,
                }
                .filter(|&s| s > 0),
                _ => None,
            },
            sparse_step: 1,
            dense_layers,
        }),
        _ if expert_count > 0 => {
            return Err(bad(format!(
                "{} is {expert_count}, but `{}` models have no experts",
                k("expert_count"),
                arch.name()
            )))
        }
        _ => None,
    };
    if let Some(m) = &moe {
        if m.intermediate == 0 {
            return Err(bad(format!(
                "the experts' feed-forward length ({} or {}) is missing or 0",
                k("expert_feed_forward_length"),
                k("feed_forward_length")
            )));
        }
        if m.top_k == 0 || m.top_k > m.n_experts {
            return Err(bad(format!(
                "{} ({}) must be between 1 and the number of experts ({})",
                k("expert_used_count"),
                m.top_k,
                m.n_experts
            )));
        }
    }
    let any_dense = moe.as_ref().is_none_or(|m| !m.dense_layers.is_empty());
    if any_dense && dense_intermediate == 0 {
        return Err(bad(format!(
            "{} is missing or 0, and the model has dense layers",
            k("feed_forward_length")
        )));
    }
    let mut eos_ids = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = f.u64(key)? {
            let id =
                u32::try_from(id).map_err(|_| bad(format!("{key} ({id}) is not a token id")))?;
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
    }
    let spec = ModelSpec {
        arch: match arch {
            GgufArch::Llama if moe.is_some() => Arch::Mixtral,
            GgufArch::Llama | GgufArch::Qwen2 | GgufArch::Qwen3 => Arch::Llama,
            GgufArch::Qwen2Moe => Arch::Qwen2Moe,
            GgufArch::Qwen3Moe => Arch::Qwen3Moe,
        },
        hidden,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab,
        max_positions: req("context_length")?,
        sliding_window: opt("attention.sliding_window")?.filter(|&w| w > 0),
        rms_eps: {
            let key = k("attention.layer_norm_rms_epsilon");
            f.require(&key, f.f64(&key))? as f32
        },
        rope_theta: f.f64(&k("rope.freq_base"))?.unwrap_or(10000.0),
        rope_scaling,
        qkv_bias: has("blk.0.attn_q.bias".into()),
        o_bias: has("blk.0.attn_output.bias".into()),
        qk_norm: matches!(arch, GgufArch::Qwen3 | GgufArch::Qwen3Moe),
        tie_embeddings: !has("output.weight".into()),
        dense_intermediate,
        moe,
        dtype: match f.u64("general.file_type")? {
            Some(0) => Some(DType::F32),
            Some(1) => Some(DType::F16),
            Some(32) => Some(DType::BF16),
            _ => None,
        },
        rope_freq_dtype: DType::F32,
        eos_ids,
    };
    if !(spec.rms_eps.is_finite() && spec.rms_eps > 0.0) {
        return Err(bad(format!(
            "{} is {}; it must be a positive number",
            k("attention.layer_norm_rms_epsilon"),
            spec.rms_eps
        )));
    }
    if !(spec.rope_theta.is_finite() && spec.rope_theta > 0.0) {
        return Err(bad(format!(
            "{} is {}; it must be a positive number",
            k("rope.freq_base"),
            spec.rope_theta
        )));
    }
    for (key, v) in [
        ("block_count", spec.n_layers),
        ("vocab_size", spec.vocab),
        ("context_length", spec.max_positions),
    ] {
        if v == 0 {
            return Err(bad(format!("{} is 0", k(key))));
        }
    }
    Ok(spec)
}
