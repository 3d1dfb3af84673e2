//! Shardline's model engine: one decoder for Mixtral, Qwen2-MoE, Qwen3-MoE and Llama, driven by a
//! [`ModelSpec`] read from `config.json`, with weights used in place from memory-mapped
//! safetensors. A layer runs as two segments (attention, FFN), each followed by a reduce hook, so
//! the same code runs split over ranks (docs/architecture.md, "The model").

#![warn(missing_docs)]

pub mod backend;
pub mod config;
pub mod engine;
pub mod error;
pub mod files;
pub mod fp8;
pub mod generate;
pub mod gguf;
pub mod kv_pool;
pub mod layer;
pub mod load;
pub mod model;
pub mod plan;
pub mod presets;
pub mod progress;
pub mod quantize;
pub mod random;
pub mod reference;
pub mod rope;
pub mod safetensors_dir;
pub mod sampler;
pub mod scheduler;
pub mod tokenizer;
pub mod weights;

pub use backend::cpu::CpuBackend;
pub use backend::{
    Backend, Decoded, FfnPart, PagedRow, Pending, Reduce, SingleRank, SumDType, Want,
};
pub use config::{Arch, FfnKind, ModelSpec, MoeSpec};
pub use engine::{Engine, Logits};
pub use error::{ModelError, Result};
pub use layer::Exec;
pub use model::{
    builtin, builtin_parts, builtin_parts_for, builtin_spec, load_dir, load_dir_with, load_parts,
    load_parts_for, load_parts_quantized_for, load_tokenizer, verify_dir, CpuEngine,
    GenerateOptions, Generation, Model,
};
pub use plan::Plan;
pub use reference::{verify, Reference, VerifyReport};
