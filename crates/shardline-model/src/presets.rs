//! Specs of real models' layer shapes for benchmarks with random weights (`bench decode --preset`).

use shardline_tensor::DType;

use crate::config::{Arch, ModelSpec, MoeSpec};
use crate::rope::RopeScaling;

/// Names accepted by [`preset`].
pub const PRESETS: [&str; 3] = ["mixtral-8x7b", "qwen3-30b-a3b", "mixtral-mini"];

/// The layer count of the real model preset `name` stands for.
pub fn preset_layers(name: &str) -> Option<usize> {
    match name {
        "mixtral-8x7b" => Some(32),
        "qwen3-30b-a3b" => Some(48),
        "mixtral-mini" => Some(8),
        _ => None,
    }
}

/// The spec of preset `name` with `n_layers` layers and weights of `dtype`.
pub fn preset(name: &str, n_layers: usize, dtype: DType) -> Option<ModelSpec> {
    // (arch, hidden, heads, kv heads, experts, top-k, expert intermediate, vocab)
    let (arch, hidden, n_heads, n_kv_heads, n_experts, top_k, intermediate, vocab) = match name {
        "mixtral-8x7b" => (Arch::Mixtral, 4096, 32, 8, 8, 2, 14336, 32000),
        "qwen3-30b-a3b" => (Arch::Qwen3Moe, 2048, 32, 4, 128, 8, 768, 151936),
        "mixtral-mini" => (Arch::Mixtral, 1024, 8, 2, 8, 2, 3584, 32000),
        _ => return None,
    };
    let qwen = arch == Arch::Qwen3Moe;
    Some(ModelSpec {
        arch,
        hidden,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim: 128,
        vocab,
        max_positions: 32768,
        sliding_window: None,
        rms_eps: if qwen { 1e-6 } else { 1e-5 },
        rope_theta: 1e6,
        rope_scaling: RopeScaling::None,
        qkv_bias: false,
        o_bias: false,
        qk_norm: qwen,
        tie_embeddings: false,
        dense_intermediate: intermediate,
        moe: Some(MoeSpec {
            n_experts,
            top_k,
            intermediate,
            renormalize: true,
            shared_intermediate: None,
            sparse_step: 1,
            dense_layers: Vec::new(),
        }),
        dtype: Some(dtype),
        rope_freq_dtype: DType::F32,
        eos_ids: Vec::new(),
    })
}
