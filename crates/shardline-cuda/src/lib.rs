//! Shardline's CUDA backend: a device context with one stream, kernels compiled at run time with
//! NVRTC (and cached on disk), typed launches of those kernels, a batch-1 decode layer whose
//! two segments are each captured once as a CUDA graph and replayed every step, and a prefill
//! that runs many rows through the same layers with cuBLAS GEMMs ([`Prefill`]).
//!
//! The crate builds on machines without a CUDA toolkit: the driver and NVRTC libraries are loaded
//! when a [`CudaDevice`] is opened, and their absence is an error, not a build failure. NCCL, for
//! the all-reduce between segments across GPUs ([`nccl::DeviceComm`]), is loaded the same way.

pub mod device;
pub mod error;
pub mod gemm;
pub mod layer;
pub mod nccl;
pub mod ops;
pub mod prefill_ops;
mod ptx_cache;

pub use device::CudaDevice;
pub use error::CudaError;
pub use layer::{
    DeviceHead, DeviceLayer, ExecMode, FfnShape, HostFfn, HostLayerWeights, HostMlp, LayerShape,
    LayerStack, Prefill,
};
