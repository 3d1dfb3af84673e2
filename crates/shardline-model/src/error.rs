//! The model engine's error type: every variant names the file, tensor or setting at fault.

use std::path::PathBuf;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file that could not be opened, mapped or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A `config.json` (or GGUF metadata) that is malformed or describes a model Shardline
    /// cannot run.
    #[error("{path}: {reason}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A config whose `architectures` names no decoder Shardline has.
    #[error("{path}: unknown architecture `{arch}` (supported: MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, LlamaForCausalLM)")]
    UnknownArchitecture {
        /// The config file.
        path: PathBuf,
        /// The architecture named.
        arch: String,
    },
    /// A safetensors file whose header cannot be parsed.
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// A weight the model needs that no weight file holds.
    #[error("tensor `{name}` is missing (looked in {origin})")]
    MissingTensor {
        /// The tensor's Hugging Face name.
        name: String,
        /// Where it was looked for.
        origin: String,
    },
    /// A weight whose shape is not the one the config implies.
    #[error("{origin}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// The file holding it (and the GGUF tensor, where its name differs).
        origin: String,
        /// The tensor's name.
        name: String,
        /// The shape the config implies, outermost first.
        expected: Vec<usize>,
        /// The shape stored.
        actual: Vec<usize>,
    },
    /// A safetensors weight of a dtype other than F32, F16, BF16 and block-scaled F8_E4M3.
    #[error("{origin}: tensor `{name}` has dtype {dtype}, expected F32, F16, BF16 or F8_E4M3 (with block scales)")]
    TensorDType {
        /// The file holding it.
        origin: String,
        /// The tensor's name.
        name: String,
        /// The dtype stored, as safetensors names it.
        dtype: String,
    },
    /// A quantized weight that cannot be dequantized: its scales are missing, mis-shaped or not
    /// finite, or its data holds NaN codes.
    #[error("{origin}: tensor `{name}`: {reason}")]
    Quantized {
        /// The file holding it.
        origin: String,
        /// The weight's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A tokenizer (`tokenizer.json` or a GGUF's vocabulary) that cannot be built.
    #[error("{path}: cannot load the tokenizer: {reason}")]
    Tokenizer {
        /// The file it was read from.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A sequence longer than the model's `max_position_embeddings`.
    #[error("the prompt and generation need {needed} positions, more than the model's max_position_embeddings ({max})")]
    TooLong {
        /// Positions the prompt and generation need.
        needed: usize,
        /// The model's most positions.
        max: usize,
    },
    /// A token id at or beyond the vocabulary size.
    #[error("token id {id} is outside the vocabulary (vocab_size {vocab})")]
    TokenOutOfRange {
        /// The token id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A collective across the ranks failed; the source is the transport's own error (a lost
    /// peer, a timeout), kept for callers that tell them apart.
    #[error("{op} across the ranks failed on rank {rank}")]
    Collective {
        /// The collective (`all-reduce`, `all-gather`, ...).
        op: &'static str,
        /// The rank that saw it fail.
        rank: usize,
        /// The transport's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A KV cache (a sequence's, or the shared page pool) with too few positions left.
    #[error("the KV cache holds {capacity} positions and {needed} are needed")]
    KvFull {
        /// Positions needed.
        needed: usize,
        /// Positions the cache holds.
        capacity: usize,
    },
    /// A device (GPU) call failed.
    #[cfg(feature = "cuda")]
    #[error("GPU: {0}")]
    Device(#[from] shardline_cuda::CudaError),
    /// Logits holding a NaN or an infinity, which would otherwise decode as garbage text.
    #[error("the model produced non-finite logits (NaN or infinity) at position {position}: check the weights and the config's numbers")]
    NonFinite {
        /// The position whose logits are not finite.
        position: usize,
    },
    /// A model, file or request this build does not handle (a tokenizer type, a feature of the
    /// config, an operation a backend lacks).
    #[error("not supported yet: {0}")]
    Unsupported(String),
    /// `--device cuda` asked of a build without the `cuda` feature.
    #[error("--device cuda needs a shardline built with `--features cuda`")]
    NoCuda,
    /// An argument the caller got wrong (sampler settings, an empty token list, a sequence over
    /// the sliding window), with the message saying which.
    #[error("{0}")]
    Invalid(String),
    /// A GGUF file or split set that cannot be used; the error names the file and the field, key
    /// or tensor at fault.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
}

/// A result whose error is a [`ModelError`] by default.
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
