#![warn(missing_docs)]

//! Shardline's CUDA device library: a device context with one stream, kernels compiled at run time
//! with NVRTC (and cached on disk), typed launches of those kernels (decode: [`ops`]; prefill:
//! [`prefill_ops`]), cuBLAS GEMMs ([`gemm`]) and NCCL ([`nccl`]). It knows nothing of models: the
//! layers, their graphs and their weights live in `shardline-model`'s CUDA backend.
//!
//! The crate builds on machines without a CUDA toolkit: the driver and NVRTC libraries are loaded
//! when a [`CudaDevice`] is opened, and their absence is an error, not a build failure. NCCL, for
//! the all-reduce between segments across GPUs ([`nccl::DeviceComm`]), is loaded the same way.

pub mod device;
pub mod error;
pub mod gemm;
pub mod nccl;
pub mod ops;
pub mod prefill_ops;
mod ptx_cache;

/// The driver bindings the device types are made of (buffers, graphs), for the crates above.
pub use cudarc;
pub use device::CudaDevice;
pub use error::CudaError;
