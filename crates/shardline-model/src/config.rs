//! `config.json` -> [`ModelSpec`]: the one description of a model that drives the decoder.
//!
//! Reads both the newer (`rope_parameters`, `dtype`) and the older (`rope_theta`,
//! `torch_dtype`) Hugging Face keys.

use std::path::{Path, PathBuf};

use serde_json::Value;
use shardline_tensor::DType;

use crate::error::{ModelError, Result};
use crate::files::read_json;
use crate::rope::RopeScaling;

/// The checkpoint families the decoder knows; they differ in tensor names and FFN details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `MixtralForCausalLM`: every layer MoE, top-k probabilities renormalized.
    Mixtral,
    /// `Qwen2MoeForCausalLM`: q/k/v biases and a gated shared expert beside the routed ones.
    Qwen2Moe,
    /// `Qwen3MoeForCausalLM`: per-head RMSNorm of q and k.
    Qwen3Moe,
    /// `LlamaForCausalLM`: dense SwiGLU layers.
    Llama,
}

impl Arch {
    /// The class name in `config.json`'s `architectures`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Arch::Mixtral => "MixtralForCausalLM",
            Arch::Qwen2Moe => "Qwen2MoeForCausalLM",
            Arch::Qwen3Moe => "Qwen3MoeForCausalLM",
            Arch::Llama => "LlamaForCausalLM",
        }
    }
}

/// Mixture-of-experts settings.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeSpec {
    /// Routed experts per sparse layer.
    pub n_experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Intermediate size of one routed expert.
    pub intermediate: usize,
    /// Divide the top-k router probabilities by their sum (Mixtral; Qwen when `norm_topk_prob`).
    pub renormalize: bool,
    /// Intermediate size of the always-on shared expert, scaled by a sigmoid gate (Qwen2-MoE).
    pub shared_intermediate: Option<usize>,
    /// Layer `i` is sparse when `(i + 1) % sparse_step == 0` and `i` is not in `dense_layers`.
    pub sparse_step: usize,
    /// Layers that keep a dense MLP whatever `sparse_step` says (Qwen's `mlp_only_layers`).
    pub dense_layers: Vec<usize>,
}

/// The feed-forward block of one layer.
#[derive(Clone, Debug, PartialEq)]
pub enum FfnKind {
    /// SwiGLU MLP with this intermediate size.
    Dense {
        /// Width of the gate and up projections.
        intermediate: usize,
    },
    /// Routed experts (and a shared one where the spec has it).
    Moe(MoeSpec),
}

/// Everything the decoder needs to know about a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// The checkpoint family.
    pub arch: Arch,
    /// Width of the residual stream (`hidden_size`).
    pub hidden: usize,
    /// Decoder layers.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; each serves `n_heads / n_kv_heads` query heads.
    pub n_kv_heads: usize,
    /// Elements per head (even, for rope).
    pub head_dim: usize,
    /// Vocabulary size: rows of the embedding and of the LM head.
    pub vocab: usize,
    /// Most positions a sequence may use (`max_position_embeddings`).
    pub max_positions: usize,
    /// Attention window when the config enables sliding-window attention. Not implemented:
    /// sequences longer than the window are refused (shorter ones are unaffected by it).
    pub sliding_window: Option<usize>,
    /// Epsilon of every RMSNorm.
    pub rms_eps: f32,
    /// Rope's base.
    pub rope_theta: f64,
    /// The scaling applied to rope's frequencies.
    pub rope_scaling: RopeScaling,
    /// Bias on q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Per-head RMSNorm of q and k before rope (Qwen3).
    pub qk_norm: bool,
    /// The LM head reuses the embedding matrix (`tie_word_embeddings`).
    pub tie_embeddings: bool,
    /// Intermediate size of dense layers.
    pub dense_intermediate: usize,
    /// The MoE settings; `None` for a dense model.
    pub moe: Option<MoeSpec>,
    /// The dtype the config declares (informational; tensors carry their own).
    pub dtype: Option<DType>,
    /// The precision of rope's inverse frequencies: f32 as transformers computes them when it
    /// loads a model; a reference made from a model cast with `model.to(dtype)` (buffers too)
    /// has them rounded to that dtype instead (`verify --rope-freqs model-dtype`).
    pub rope_freq_dtype: DType,
    /// Token ids that end generation (`eos_token_id` of the config and the generation config,
    /// or a GGUF's EOS, EOT and EOM tokens).
    pub eos_ids: Vec<u32>,
}

impl ModelSpec {
    /// Reads `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<ModelSpec> {
        let value = read_json(path, 1 << 20)?;
        ModelSpec::from_json(&value, path)
    }

    /// Builds a spec from a parsed config; `path` is only used in error messages.
    pub fn from_json(v: &Value, path: &Path) -> Result<ModelSpec> {
        let c = Cfg { v, path };
        if !v.is_object() {
            return Err(ModelError::config(path, "expected a JSON object"));
        }
        let arch_name = match v.get("architectures").and_then(|a| a.get(0)) {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(ModelError::config(
                    path,
                    "missing setting `architectures` (a list with the model class name)",
                ))
            }
        };
        let arch = match arch_name.as_str() {
            "MixtralForCausalLM" => Arch::Mixtral,
            "Qwen2MoeForCausalLM" => Arch::Qwen2Moe,
            "Qwen3MoeForCausalLM" => Arch::Qwen3Moe,
            "LlamaForCausalLM" => Arch::Llama,
            _ => {
                return Err(ModelError::UnknownArchitecture {
                    path: path.to_path_buf(),
                    arch: arch_name,
                })
            }
        };
        let hidden = c.usize("hidden_size")?;
        let n_heads = c.usize("num_attention_heads")?;
        let n_kv_heads = c.opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
        if n_heads == 0 || hidden == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(c.err(format!(
                "num_attention_heads ({n_heads}) must be a positive multiple of num_key_value_heads ({n_kv_heads}) and hidden_size ({hidden}) positive"
            )));
        }
        let head_dim =
            match c.opt_usize("head_dim")? {
                Some(d) => d,
                None if hidden % n_heads == 0 => hidden / n_heads,
                None => return Err(c.err(
                    "hidden_size is not a multiple of num_attention_heads and head_dim is not set",
                )),
            };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(c.err(format!("head_dim ({head_dim}) must be even and positive")));
        }
        let rope_params = v
            .get("rope_parameters")
            .or_else(|| v.get("rope_scaling"))
            .filter(|rp| !rp.is_null());
        let rope_scaling = match rope_params {
            Some(rp) => RopeScaling::from_json(rp).map_err(|e| c.err(e))?,
            None => RopeScaling::None,
        };
        let rope_theta = match rope_params.and_then(|rp| rp.get("rope_theta")) {
            Some(t) => t
                .as_f64()
                .ok_or_else(|| c.err("rope_parameters.rope_theta is not a number"))?,
            None => c.opt_f64("rope_theta")?.unwrap_or(10000.0),
        };
        let dtype = match v.get("dtype").or_else(|| v.get("torch_dtype")) {
            Some(Value::String(s)) => {
                Some(DType::parse(s).map_err(|_| c.err(format!("dtype `{s}` is not supported")))?)
            }
            _ => None,
        };
        let eos_ids = eos_ids(v, path)?;
        if c.opt_bool("mlp_bias")?.unwrap_or(false) {
            return Err(c.err("mlp_bias = true is not supported"));
        }
        let attention_bias = c.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            // Qwen2 attention always has q/k/v bias and none on o_proj.
            Arch::Qwen2Moe => (c.opt_bool("qkv_bias")?.unwrap_or(true), false),
            _ => (attention_bias, attention_bias),
        };
        let dense_intermediate = c.usize("intermediate_size")?;
        let moe = match arch {
            Arch::Llama => None,
            Arch::Mixtral => Some(MoeSpec {
                n_experts: c.usize("num_local_experts")?,
                top_k: c.usize("num_experts_per_tok")?,
                intermediate: dense_intermediate,
                renormalize: true,
                shared_intermediate: None,
                sparse_step: 1,
                dense_layers: Vec::new(),
            }),
            Arch::Qwen2Moe | Arch::Qwen3Moe => {
                let n_experts = match c.opt_usize("num_experts")? {
                    Some(n) => n,
                    None => c.usize("num_local_experts")?,
                };
                let shared = match arch {
                    Arch::Qwen2Moe => Some(c.usize("shared_expert_intermediate_size")?),
                    _ => None,
                };
                let dense_layers = match v.get("mlp_only_layers") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|x| x.as_u64().map(|x| x as usize))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| c.err("mlp_only_layers must be a list of layer indices"))?,
                    Some(_) => return Err(c.err("mlp_only_layers must be a list of layer indices")),
                };
                Some(MoeSpec {
                    n_experts,
                    top_k: c.usize("num_experts_per_tok")?,
                    intermediate: c.usize("moe_intermediate_size")?,
                    renormalize: c.opt_bool("norm_topk_prob")?.unwrap_or(false),
                    shared_intermediate: shared.filter(|&s| s > 0),
                    sparse_step: c.opt_usize("decoder_sparse_step")?.unwrap_or(1),
                    dense_layers,
                })
            }
        };
        if let Some(m) = &moe {
            if m.top_k == 0 || m.top_k > m.n_experts || m.sparse_step == 0 {
                return Err(c.err(format!(
                    "num_experts_per_tok ({}) must be between 1 and the number of experts ({}), decoder_sparse_step positive",
                    m.top_k, m.n_experts
                )));
            }
        }
        let spec = ModelSpec {
            arch,
            hidden,
            n_layers: c.usize("num_hidden_layers")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab: c.usize("vocab_size")?,
            max_positions: c.usize("max_position_embeddings")?,
            sliding_window: match c.opt_bool("use_sliding_window")? {
                Some(false) => None,
                _ => c.opt_usize("sliding_window")?.filter(|&w| w > 0),
            },
            rms_eps: c.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            qkv_bias,
            o_bias,
            qk_norm: arch == Arch::Qwen3Moe,
            tie_embeddings: c.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            dense_intermediate,
            moe,
            dtype,
            rope_freq_dtype: DType::F32,
            eos_ids,
        };
        // Numbers that would only show up as NaN or empty text later.
        if !(spec.rms_eps.is_finite() && spec.rms_eps > 0.0) {
            return Err(c.err(format!(
                "rms_norm_eps is {}; it must be a positive number",
                spec.rms_eps
            )));
        }
        if !(spec.rope_theta.is_finite() && spec.rope_theta > 0.0) {
            return Err(c.err(format!(
                "rope_theta is {}; it must be a positive number",
                spec.rope_theta
            )));
        }
        for (key, v) in [
            ("num_hidden_layers", spec.n_layers),
            ("vocab_size", spec.vocab),
            ("max_position_embeddings", spec.max_positions),
        ] {
            if v == 0 {
                return Err(c.err(format!("{key} is 0")));
            }
        }
        Ok(spec)
    }

    /// The feed-forward block of layer `layer`.
    pub fn ffn(&self, layer: usize) -> FfnKind {
        match &self.moe {
            Some(m)
                if (layer + 1).is_multiple_of(m.sparse_step)
                    && !m.dense_layers.contains(&layer) =>
            {
                FfnKind::Moe(m.clone())
            }
            _ => FfnKind::Dense {
                intermediate: self.dense_intermediate,
            },
        }
    }

    /// Width of the query projection output (`n_heads * head_dim`).
    pub fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the key (and value) projection output.
    pub fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// The `eos_token_id` of a config or generation config: absent, one id or a list of ids.
pub fn eos_ids(v: &Value, path: &Path) -> Result<Vec<u32>> {
    let bad = || {
        ModelError::config(
            path,
            "eos_token_id must be an integer or a list of integers",
        )
    };
    let id = |x: &Value| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(bad)
    };
    match v.get("eos_token_id") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(id).collect(),
        Some(x) => Ok(vec![id(x)?]),
    }
}

/// Typed access to config keys with errors naming the file and the key.
struct Cfg<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Cfg<'_> {
    fn err(&self, reason: impl Into<String>) -> ModelError {
        ModelError::config(PathBuf::from(self.path), reason)
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    self.err(format!(
                        "setting `{key}` must be a non-negative integer, got {x}"
                    ))
                }),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("missing setting `{key}`")))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(format!("setting `{key}` must be a number, got {x}"))),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(format!("setting `{key}` must be true or false, got {x}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: Value) -> Result<ModelSpec> {
        ModelSpec::from_json(&v, Path::new("cfg/config.json"))
    }

    fn qwen2(extra: Value) -> Value {
        let mut v = json!({
            "architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 4, "vocab_size": 256, "max_position_embeddings": 128,
            "intermediate_size": 96, "num_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
            "decoder_sparse_step": 2, "mlp_only_layers": [3]
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    }

    #[test]
    fn reads_new_and_legacy_keys() {
        let new = spec(qwen2(json!({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}, "dtype": "bfloat16"}))).unwrap();
        let old = spec(qwen2(json!({"rope_theta": 5e5, "torch_dtype": "bfloat16"}))).unwrap();
        assert_eq!(new, old);
        assert_eq!(new.rope_theta, 5e5);
        assert_eq!(new.dtype, Some(DType::BF16));
        let default = spec(qwen2(json!({}))).unwrap();
        assert_eq!(default.rope_theta, 10000.0);
    }

    #[test]
    fn qwen2_moe_defaults_and_sparse_layers() {
        let s = spec(qwen2(json!({}))).unwrap();
        assert_eq!((s.head_dim, s.n_kv_heads), (16, 4));
        assert!(s.qkv_bias && !s.o_bias && !s.qk_norm);
        let m = s.moe.clone().unwrap();
        assert!(!m.renormalize);
        assert_eq!(m.shared_intermediate, Some(48));
        // decoder_sparse_step 2: layers 1 and 3 would be sparse, but 3 is in mlp_only_layers.
        let kinds: Vec<bool> = (0..4)
            .map(|i| matches!(s.ffn(i), FfnKind::Moe(_)))
            .collect();
        assert_eq!(kinds, [false, true, false, false]);
        assert_eq!(s.ffn(0), FfnKind::Dense { intermediate: 96 });
    }

    #[test]
    fn sliding_window_only_when_enabled() {
        let on = spec(qwen2(json!({"sliding_window": 64}))).unwrap();
        assert_eq!(on.sliding_window, Some(64));
        let off = spec(qwen2(
            json!({"sliding_window": 64, "use_sliding_window": false}),
        ))
        .unwrap();
        assert_eq!(off.sliding_window, None);
        let null = spec(qwen2(json!({"sliding_window": null}))).unwrap();
        assert_eq!(null.sliding_window, None);
    }

    #[test]
    fn refuses_unsupported_rope_and_bad_heads() {
        let e = spec(qwen2(
            json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("cfg/config.json") && e.contains("yarn"), "{e}");
        let e = spec(qwen2(json!({"num_key_value_heads": 3})))
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_key_value_heads (3)"), "{e}");
        let e = spec(qwen2(json!({"num_experts_per_tok": 9})))
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_experts_per_tok (9)"), "{e}");
    }
}
