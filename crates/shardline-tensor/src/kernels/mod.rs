//! CPU kernels. Activations are `f32` slices; weight matrices are [`TensorView`](crate::TensorView)s of `f32`, `f16`
//! or `bf16`, row-major `[N, K]` (one row per output feature, as Hugging Face stores them).
//!
//! Every kernel here has a plain counterpart in [`crate::reference`] that the tests compare with.
//! Kernels run on the SIMD path [`crate::Isa::active`] picks; the `*_on` variants take the path
//! explicitly, so that tests and benchmarks can run the AVX2 and scalar code on an AVX-512 CPU.
//! Large kernels spread over the shared worker pool ([`crate::pool`]); small ones stay on the
//! calling thread.

pub mod activation;
pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod matmul;
pub mod matvec;
pub mod norm;
pub mod rope;
pub mod softmax;
pub mod sum;
pub mod topk;

pub use activation::silu_mul;
pub use attention::{attention, attention_on, KvCache};
pub use elementwise::{add_assign, axpy, scale};
pub use embedding::embedding;
pub use matmul::{matmul, matmul_many, matmul_many_on, matmul_on, MatmulJob};
pub use matvec::{matvec, matvec_many, matvec_many_on, matvec_on, MatvecJob};
pub use norm::rms_norm;
pub use rope::Rope;
pub use softmax::softmax;
pub use sum::sum;
pub use topk::top_k;
