//! The one place that maps a [`ModelSpec`] to tensor names and shapes and builds the layers from a
//! [`TensorSource`]. A tensor-parallel plan will slice here, as a pure function of (name, shape,
//! plan, rank), and nowhere else.

use crate::config::{Arch, FfnKind, ModelSpec};
use crate::error::Result;
use crate::layer::{AttentionWeights, FfnWeights, Layer, Mlp, MoeWeights};
use crate::weights::{stack_rows, TensorSource, Weight};

/// Every weight of a model.
#[derive(Debug)]
pub struct ModelWeights {
    /// `[vocab, hidden]`.
    pub embed: Weight,
    pub layers: Vec<Layer>,
    pub final_norm: Vec<f32>,
    /// `[vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<Weight>,
}

impl ModelWeights {
    /// The output projection (the embedding when tied).
    pub fn lm_head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

/// Loads the whole model.
pub fn load_model(spec: &ModelSpec, src: &dyn TensorSource) -> Result<ModelWeights> {
    let (v, h) = (spec.vocab, spec.hidden);
    let embed = src.get("model.embed_tokens.weight", &[v, h])?;
    let layers = (0..spec.n_layers)
        .map(|i| load_layer(spec, src, i))
        .collect::<Result<Vec<_>>>()?;
    let final_norm = src.get("model.norm.weight", &[h])?.to_f32_vec();
    // A tied model may still ship an lm_head copy; it is identical, so the embedding serves.
    let lm_head = if spec.tie_embeddings {
        None
    } else {
        Some(src.get("lm_head.weight", &[v, h])?)
    };
    Ok(ModelWeights {
        embed,
        layers,
        final_norm,
        lm_head,
    })
}

/// Loads layer `i`.
pub fn load_layer(spec: &ModelSpec, src: &dyn TensorSource, i: usize) -> Result<Layer> {
    let p = format!("model.layers.{i}");
    let h = spec.hidden;
    let (qw, kw) = (spec.q_width(), spec.kv_width());
    let vec = |name: &str, len: usize| -> Result<Vec<f32>> {
        Ok(src.get(&format!("{p}.{name}"), &[len])?.to_f32_vec())
    };
    let attn = AttentionWeights {
        input_norm: vec("input_layernorm.weight", h)?,
        q: src.get(&format!("{p}.self_attn.q_proj.weight"), &[qw, h])?,
        k: src.get(&format!("{p}.self_attn.k_proj.weight"), &[kw, h])?,
        v: src.get(&format!("{p}.self_attn.v_proj.weight"), &[kw, h])?,
        o: src.get(&format!("{p}.self_attn.o_proj.weight"), &[h, qw])?,
        qkv_bias: if spec.qkv_bias {
            Some([
                vec("self_attn.q_proj.bias", qw)?,
                vec("self_attn.k_proj.bias", kw)?,
                vec("self_attn.v_proj.bias", kw)?,
            ])
        } else {
            None
        },
        o_bias: if spec.o_bias {
            Some(vec("self_attn.o_proj.bias", h)?)
        } else {
            None
        },
        qk_norm: if spec.qk_norm {
            Some([
                vec("self_attn.q_norm.weight", spec.head_dim)?,
                vec("self_attn.k_norm.weight", spec.head_dim)?,
            ])
        } else {
            None
        },
        n_heads: spec.n_heads,
        n_kv_heads: spec.n_kv_heads,
        head_dim: spec.head_dim,
    };
    let ffn = match spec.ffn(i) {
        FfnKind::Dense { intermediate } => FfnWeights::Dense(load_mlp(
            src,
            &format!("{p}.mlp"),
            MLP_NAMES,
            h,
            intermediate,
        )?),
        FfnKind::Moe(m) => {
            let (moe_prefix, names) = match spec.arch {
                Arch::Mixtral => (format!("{p}.block_sparse_moe"), MIXTRAL_NAMES),
                _ => (format!("{p}.mlp"), MLP_NAMES),
            };
            let experts = (0..m.n_experts)
                .map(|e| {
                    let prefix = format!("{moe_prefix}.experts.{e}");
                    load_mlp(src, &prefix, names, h, m.intermediate)
                })
                .collect::<Result<Vec<_>>>()?;
            let shared = match m.shared_intermediate {
                Some(si) => Some((
                    load_mlp(src, &format!("{p}.mlp.shared_expert"), MLP_NAMES, h, si)?,
                    src.get(&format!("{p}.mlp.shared_expert_gate.weight"), &[1, h])?,
                )),
                None => None,
            };
            FfnWeights::Moe(MoeWeights {
                router: src.get(&format!("{moe_prefix}.gate.weight"), &[m.n_experts, h])?,
                experts,
                top_k: m.top_k,
                renormalize: m.renormalize,
                shared,
            })
        }
    };
    Ok(Layer {
        attn,
        post_norm: vec("post_attention_layernorm.weight", h)?,
        ffn,
        rms_eps: spec.rms_eps,
    })
}

/// Names of the gate, up and down projections under an MLP's prefix.
type MlpNames = [&'static str; 3];
const MLP_NAMES: MlpNames = ["gate_proj", "up_proj", "down_proj"];
const MIXTRAL_NAMES: MlpNames = ["w1", "w3", "w2"];

fn load_mlp(
    src: &dyn TensorSource,
    prefix: &str,
    [gate_name, up_name, down]: MlpNames,
    hidden: usize,
    intermediate: usize,
) -> Result<Mlp> {
    let gate = src.get(
        &format!("{prefix}.{gate_name}.weight"),
        &[intermediate, hidden],
    )?;
    let up = src.get(
        &format!("{prefix}.{up_name}.weight"),
        &[intermediate, hidden],
    )?;
    Ok(Mlp {
        gate_up: stack_rows(&format!("{prefix}.{{{gate_name}, {up_name}}}"), &gate, &up)?,
        down: src.get(&format!("{prefix}.{down}.weight"), &[hidden, intermediate])?,
        intermediate,
    })
}
