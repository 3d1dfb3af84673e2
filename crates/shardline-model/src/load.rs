//! The one place that maps a [`ModelSpec`] to tensor names and shapes and builds the layers from a
//! [`TensorSource`], keeping only this rank's slices under a [`Plan`] (a pure function of name,
//! shape, plan and rank): heads of q/k/v (rows) and o_proj (columns), rows of gate/up and columns
//! of down for the FFNs, and only the experts of this rank's expert group.

use crate::config::{Arch, FfnKind, ModelSpec};
use crate::error::Result;
use crate::layer::{AttentionWeights, FfnWeights, Layer, Mlp, MoeWeights};
use crate::plan::Plan;
use crate::progress::Step;
use crate::weights::{stack_rows, TensorSource, Weight};

/// Every weight of a model.
#[derive(Debug)]
pub struct ModelWeights {
    /// `[vocab, hidden]`.
    pub embed: Weight,
    /// The decoder layers, as this rank holds them.
    pub layers: Vec<Layer>,
    /// RMSNorm weights applied before the LM head, `[hidden]`.
    pub final_norm: Vec<f32>,
    /// `[vocab, hidden]`, or this rank's `vocab_rows` of it; `None` when tied to the embedding
    /// on a single rank.
    pub lm_head: Option<Weight>,
    /// The vocabulary rows this rank's lm_head holds (its slice of the logits).
    pub vocab_rows: std::ops::Range<usize>,
    /// The plan these weights were sliced for.
    pub plan: Plan,
}

impl ModelWeights {
    /// The output projection (the embedding when tied).
    pub fn lm_head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

/// Loads the whole model on one rank.
pub fn load_model(spec: &ModelSpec, src: &dyn TensorSource) -> Result<ModelWeights> {
    load_model_for(spec, src, &Plan::single())
}

/// Loads this rank's part of the model under `plan` (checked against `spec` first).
pub fn load_model_for(
    spec: &ModelSpec,
    src: &dyn TensorSource,
    plan: &Plan,
) -> Result<ModelWeights> {
    plan.check(spec)?;
    let (v, h) = (spec.vocab, spec.hidden);
    let embed = src.get("model.embed_tokens.weight", &[v, h])?;
    let step = Step::begin("loading layers", spec.n_layers as u64);
    let layers = (0..spec.n_layers)
        .map(|i| {
            let layer = load_layer_for(spec, src, i, plan);
            step.advance();
            layer
        })
        .collect::<Result<Vec<_>>>()?;
    drop(step);
    let final_norm = src.get("model.norm.weight", &[h])?.to_f32_vec();
    // A tied model may still ship an lm_head copy; it is identical, so the embedding serves.
    let lm_head = if spec.tie_embeddings {
        None
    } else {
        Some(src.get("lm_head.weight", &[v, h])?)
    };
    // Column-parallel lm_head: each rank holds a slice of the vocabulary (its logits).
    let vocab_rows = plan.vocab_rows(v);
    let lm_head = if plan.world() > 1 {
        Some(lm_head.as_ref().unwrap_or(&embed).rows(vocab_rows.clone()))
    } else {
        lm_head
    };
    Ok(ModelWeights {
        embed,
        layers,
        final_norm,
        lm_head,
        vocab_rows,
        plan: *plan,
    })
}

/// Loads layer `i` on one rank.
pub fn load_layer(spec: &ModelSpec, src: &dyn TensorSource, i: usize) -> Result<Layer> {
    load_layer_for(spec, src, i, &Plan::single())
}

/// Loads this rank's part of layer `i` under `plan`.
pub fn load_layer_for(
    spec: &ModelSpec,
    src: &dyn TensorSource,
    i: usize,
    plan: &Plan,
) -> Result<Layer> {
    let p = format!("model.layers.{i}");
    let h = spec.hidden;
    let hd = spec.head_dim;
    let (qw, kw) = (spec.q_width(), spec.kv_width());
    let (heads, kv_heads) = (plan.heads(spec.n_heads), plan.kv_heads(spec.n_kv_heads));
    let (q_rows, kv_rows) = (
        heads.start * hd..heads.end * hd,
        kv_heads.start * hd..kv_heads.end * hd,
    );
    let vec = |name: &str, len: usize| -> Result<Vec<f32>> {
        Ok(src.get(&format!("{p}.{name}"), &[len])?.to_f32_vec())
    };
    let get = |name: &str, shape: &[usize]| src.get(&format!("{p}.{name}"), shape);
    let attn = AttentionWeights {
        input_norm: vec("input_layernorm.weight", h)?,
        q: get("self_attn.q_proj.weight", &[qw, h])?.rows(q_rows.clone()),
        k: get("self_attn.k_proj.weight", &[kw, h])?.rows(kv_rows.clone()),
        v: get("self_attn.v_proj.weight", &[kw, h])?.rows(kv_rows.clone()),
        o: get("self_attn.o_proj.weight", &[h, qw])?
            .cols("self_attn.o_proj.weight", q_rows.clone())?,
        qkv_bias: if spec.qkv_bias {
            Some([
                vec("self_attn.q_proj.bias", qw)?[q_rows.clone()].to_vec(),
                vec("self_attn.k_proj.bias", kw)?[kv_rows.clone()].to_vec(),
                vec("self_attn.v_proj.bias", kw)?[kv_rows].to_vec(),
            ])
        } else {
            None
        },
        // The partial sums of all ranks add up: the bias is added by rank 0 alone.
        o_bias: if spec.o_bias && plan.rank() == 0 {
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
        n_heads: heads.len(),
        n_kv_heads: kv_heads.len(),
        head_dim: spec.head_dim,
    };
    let ffn = match spec.ffn(i) {
        FfnKind::Dense { intermediate } => FfnWeights::Dense(load_mlp(
            src,
            &format!("{p}.mlp"),
            MLP_NAMES,
            [h, intermediate],
            plan.dense_rows(intermediate),
        )?),
        FfnKind::Moe(m) => {
            let (moe_prefix, names) = match spec.arch {
                Arch::Mixtral => (format!("{p}.block_sparse_moe"), MIXTRAL_NAMES),
                _ => (format!("{p}.mlp"), MLP_NAMES),
            };
            // Experts of other expert groups are never read.
            let experts = (0..m.n_experts)
                .map(|e| {
                    if !plan.holds_expert(e, m.n_experts) {
                        return Ok(None);
                    }
                    let prefix = format!("{moe_prefix}.experts.{e}");
                    let rows = plan.expert_rows(m.intermediate);
                    load_mlp(src, &prefix, names, [h, m.intermediate], rows).map(Some)
                })
                .collect::<Result<Vec<_>>>()?;
            let shared = match m.shared_intermediate {
                Some(si) => Some((
                    load_mlp(
                        src,
                        &format!("{p}.mlp.shared_expert"),
                        MLP_NAMES,
                        [h, si],
                        plan.dense_rows(si),
                    )?,
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

/// An MLP's `rows` of its intermediate dimension: those rows of gate and up (stacked), those
/// columns of down.
fn load_mlp(
    src: &dyn TensorSource,
    prefix: &str,
    [gate_name, up_name, down]: MlpNames,
    [hidden, intermediate]: [usize; 2],
    rows: std::ops::Range<usize>,
) -> Result<Mlp> {
    let get = |name: &str, shape: &[usize]| src.get(&format!("{prefix}.{name}.weight"), shape);
    let gate = get(gate_name, &[intermediate, hidden])?.rows(rows.clone());
    let up = get(up_name, &[intermediate, hidden])?.rows(rows.clone());
    let down = get(down, &[hidden, intermediate])?;
    Ok(Mlp {
        gate_up: stack_rows(&format!("{prefix}.{{{gate_name}, {up_name}}}"), &gate, &up)?,
        down: if rows.len() == intermediate {
            down
        } else {
            down.cols("down_proj.weight", rows.clone())?
        },
        intermediate: rows.len(),
    })
}
