//! The Hugging Face tensor names Shardline's loader asks for ([`crate::load`]) mapped to the
//! names llama.cpp's converter gives them (gguf-py's `TENSOR_NAMES`): `token_embd`, `output`,
//! `output_norm`, and per block `blk.N.attn_{norm,q,k,v,output,q_norm,k_norm}`, `ffn_norm`,
//! `ffn_{gate,up,down}` (dense), `ffn_gate_inp` (router), `ffn_{gate,up,down}_exps` (all experts
//! stacked in one 3-D tensor), `ffn_{gate,up,down}_shexp` and `ffn_gate_inp_shexp` (Qwen2-MoE's
//! shared expert and its gate).

/// Where one Hugging Face tensor lies in a GGUF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufName {
    /// The GGUF tensor.
    pub tensor: String,
    /// For a routed expert's projection: the expert, a slice of the stacked `tensor`.
    pub expert: Option<usize>,
    /// For a routed expert: its own tensor in the older per-expert layout
    /// (`blk.N.ffn_gate.E.weight`), read when the stacked one is absent.
    pub legacy: Option<String>,
    /// The q or k projection (weight or bias), whose rows llama.cpp's converter reorders for the
    /// `llama` architecture.
    pub rope_rows: Option<RopeRows>,
}

/// Which attention projection a rope-permuted tensor is (the permutation is per head).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeRows {
    /// `n_heads` heads of q.
    Query,
    /// `n_kv_heads` heads of k.
    Key,
}

/// The GGUF place of the Hugging Face tensor `hf`, or `None` for a name with no GGUF counterpart.
pub fn gguf_name(hf: &str) -> Option<GgufName> {
    let plain = |tensor: String| GgufName {
        tensor,
        expert: None,
        legacy: None,
        rope_rows: None,
    };
    match hf {
        "model.embed_tokens.weight" => return Some(plain("token_embd.weight".into())),
        "model.norm.weight" => return Some(plain("output_norm.weight".into())),
        "lm_head.weight" => return Some(plain("output.weight".into())),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (block, rest) = rest.split_once('.')?;
    let block = index(block)?;
    let (stem, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let blk = |name: &str| format!("blk.{block}.{name}.{suffix}");
    // Routed experts: `mlp.experts.E.gate_proj` (Qwen), `block_sparse_moe.experts.E.w1` (Mixtral).
    let experts = stem
        .strip_prefix("mlp.experts.")
        .or_else(|| stem.strip_prefix("block_sparse_moe.experts."));
    if let Some(e) = experts {
        let (e, proj) = e.split_once('.')?;
        let e = index(e)?;
        if suffix != "weight" {
            return None;
        }
        let base = match proj {
            "gate_proj" | "w1" => "ffn_gate",
            "up_proj" | "w3" => "ffn_up",
            "down_proj" | "w2" => "ffn_down",
            _ => return None,
        };
        return Some(GgufName {
            tensor: blk(&format!("{base}_exps")),
            expert: Some(e),
            legacy: Some(blk(&format!("{base}.{e}"))),
            rope_rows: None,
        });
    }
    let (name, rope_rows) = match stem {
        "input_layernorm" => ("attn_norm", None),
        "post_attention_layernorm" => ("ffn_norm", None),
        "self_attn.q_proj" => ("attn_q", Some(RopeRows::Query)),
        "self_attn.k_proj" => ("attn_k", Some(RopeRows::Key)),
        "self_attn.v_proj" => ("attn_v", None),
        "self_attn.o_proj" => ("attn_output", None),
        "self_attn.q_norm" => ("attn_q_norm", None),
        "self_attn.k_norm" => ("attn_k_norm", None),
        "mlp.gate_proj" => ("ffn_gate", None),
        "mlp.up_proj" => ("ffn_up", None),
        "mlp.down_proj" => ("ffn_down", None),
        "mlp.gate" | "block_sparse_moe.gate" => ("ffn_gate_inp", None),
        "mlp.shared_expert.gate_proj" => ("ffn_gate_shexp", None),
        "mlp.shared_expert.up_proj" => ("ffn_up_shexp", None),
        "mlp.shared_expert.down_proj" => ("ffn_down_shexp", None),
        "mlp.shared_expert_gate" => ("ffn_gate_inp_shexp", None),
        _ => return None,
    };
    Some(GgufName {
        tensor: blk(name),
        expert: None,
        legacy: None,
        rope_rows,
    })
}

/// A layer or expert number written the one way the loader writes it (`12`, not `012`).
fn index(s: &str) -> Option<usize> {
    s.parse().ok().filter(|n: &usize| n.to_string() == s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(hf: &str) -> (String, Option<usize>, Option<RopeRows>) {
        let g = gguf_name(hf).unwrap_or_else(|| panic!("{hf}"));
        (g.tensor, g.expert, g.rope_rows)
    }

    #[test]
    fn maps_every_loader_name() {
        assert_eq!(name("model.embed_tokens.weight").0, "token_embd.weight");
        assert_eq!(name("lm_head.weight").0, "output.weight");
        assert_eq!(name("model.norm.weight").0, "output_norm.weight");
        assert_eq!(
            name("model.layers.12.self_attn.q_proj.weight"),
            ("blk.12.attn_q.weight".into(), None, Some(RopeRows::Query))
        );
        assert_eq!(
            name("model.layers.0.self_attn.k_proj.bias"),
            ("blk.0.attn_k.bias".into(), None, Some(RopeRows::Key))
        );
        assert_eq!(
            name("model.layers.3.block_sparse_moe.experts.7.w2.weight"),
            ("blk.3.ffn_down_exps.weight".into(), Some(7), None)
        );
        assert_eq!(
            gguf_name("model.layers.3.block_sparse_moe.experts.7.w3.weight")
                .unwrap()
                .legacy,
            Some("blk.3.ffn_up.7.weight".into())
        );
        assert_eq!(
            name("model.layers.1.mlp.experts.0.gate_proj.weight"),
            ("blk.1.ffn_gate_exps.weight".into(), Some(0), None)
        );
        assert_eq!(
            name("model.layers.1.mlp.shared_expert_gate.weight").0,
            "blk.1.ffn_gate_inp_shexp.weight"
        );
        assert_eq!(
            name("model.layers.1.mlp.shared_expert.down_proj.weight").0,
            "blk.1.ffn_down_shexp.weight"
        );
        assert_eq!(
            name("model.layers.1.block_sparse_moe.gate.weight").0,
            "blk.1.ffn_gate_inp.weight"
        );
        assert_eq!(
            name("model.layers.2.self_attn.k_norm.weight").0,
            "blk.2.attn_k_norm.weight"
        );
    }

    #[test]
    fn refuses_other_names() {
        for hf in [
            "model.layers.x.input_layernorm.weight",
            "model.layers.01.input_layernorm.weight",
            "model.layers.1.mlp.experts.01.up_proj.weight",
            "model.layers.1.mlp.experts.1.up_proj.bias",
            "model.layers.1.self_attn.rotary_emb.inv_freq",
            "model.layers.1.unknown.weight",
            "something",
        ] {
            assert_eq!(gguf_name(hf), None, "{hf}");
        }
    }
}
