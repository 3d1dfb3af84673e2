//! The model engine's error type: every variant names the file, tensor or setting at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: unknown architecture `{arch}` (supported: MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, LlamaForCausalLM)")]
    UnknownArchitecture { path: PathBuf, arch: String },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("tensor `{name}` is missing (looked in {origin})")]
    MissingTensor { name: String, origin: String },
    #[error("{origin}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        origin: String,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{origin}: tensor `{name}` has dtype {dtype}, expected F32, F16 or BF16")]
    TensorDType {
        origin: String,
        name: String,
        dtype: String,
    },
    #[error("{path}: cannot load the tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("the prompt and generation need {needed} positions, more than the model's max_position_embeddings ({max})")]
    TooLong { needed: usize, max: usize },
    #[error("token id {id} is outside the vocabulary (vocab_size {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    /// A collective across the ranks failed; the source is the transport's own error (a lost
    /// peer, a timeout), kept for callers that tell them apart.
    #[error("{op} across the ranks failed on rank {rank}")]
    Collective {
        op: &'static str,
        rank: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the KV cache holds {capacity} positions and {needed} are needed")]
    KvFull { needed: usize, capacity: usize },
    /// A device (GPU) call failed.
    #[cfg(feature = "cuda")]
    #[error("GPU: {0}")]
    Device(#[from] shardline_cuda::CudaError),
    #[error("the model produced non-finite logits (NaN or infinity) at position {position}: check the weights and the config's numbers")]
    NonFinite { position: usize },
    #[error("not supported yet: {0}")]
    Unsupported(String),
    #[error("--device cuda needs a shardline built with `--features cuda`")]
    NoCuda,
    #[error("{0}")]
    Invalid(String),
    /// A GGUF file or split set that cannot be used; the error names the file and the field, key
    /// or tensor at fault.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> ModelError {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, reason: impl Into<String>) -> ModelError {
        ModelError::Config {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
