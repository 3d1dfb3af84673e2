//! Shardline's tensor core: element types, shapes, host tensors (owned and borrowed) and the CPU
//! kernels the model engine runs on. Activations are always `f32`; weights may be `f32`, `f16`,
//! `bf16` or one of ggml's quantized block formats ([`quant`]) and are read in place (for example
//! straight out of a memory-mapped safetensors or GGUF file).

#![warn(missing_docs)]

pub mod dtype;
pub mod error;
pub mod kernels;
pub mod pool;
pub mod quant;
pub mod reference;
pub mod shape;
pub mod simd;
pub mod storage;
pub mod tensor;

pub use dtype::DType;
pub use error::TensorError;
pub use shape::Shape;
pub use simd::Isa;
pub use storage::AlignedBuf;
pub use tensor::{Tensor, TensorView};
