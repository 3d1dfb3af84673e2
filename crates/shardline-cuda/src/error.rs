//! Errors of the CUDA backend.

use cudarc::driver::DriverError;

/// Everything that can go wrong in `shardline-cuda`; each error says what was being done.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A library the call needs (the driver, NVRTC, cuBLAS or NCCL) could not be loaded, or the
    /// device asked for does not exist; the message names what was tried.
    #[error("no usable CUDA device: {0}")]
    Unavailable(String),
    /// A CUDA driver call failed (opening the device, loading kernels, allocating, copying,
    /// launching, waiting for the stream).
    #[error("CUDA driver call failed while {context}: {source}")]
    Driver {
        /// What was being done, as a phrase that follows "while".
        context: String,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
    /// A cuBLAS call (creating the handle or a GEMM) failed.
    #[error("cuBLAS call failed while {context}: {source}")]
    Blas {
        /// What was being done (for a GEMM, with its shapes).
        context: String,
        /// cuBLAS's status.
        #[source]
        source: cudarc::cublas::result::CublasError,
    },
    /// NVRTC rejected the kernel source (for instance a bad `SHARDLINE_NVRTC_OPTIONS`); the
    /// message carries its log.
    #[error("NVRTC could not compile Shardline's kernels: {0}")]
    Compile(String),
    /// Forming an NCCL communicator or an NCCL collective failed, did not finish before the
    /// deadline, or was refused because the communicator was aborted earlier.
    #[error("NCCL failed while {0}")]
    Nccl(String),
    /// Another rank of the job was lost (killed, stopped, or its host silent) while this rank
    /// waited for a collective on the GPUs; the message names it. The communicator is aborted.
    #[error("{0}; the NCCL communicator was aborted")]
    PeerLost(String),
    /// A launch or copy was asked for sizes it does not take; checked before anything is queued.
    #[error("invalid layer shape: {0}")]
    Shape(String),
}

/// Adds what was being done to a driver error.
pub trait DriverContext<T> {
    /// Turns a driver error into [`CudaError::Driver`] with `context`, a phrase that follows
    /// "while" in the message (such as "copying from the device").
    fn during(self, context: impl Into<String>) -> Result<T, CudaError>;
}

impl<T> DriverContext<T> for Result<T, DriverError> {
    fn during(self, context: impl Into<String>) -> Result<T, CudaError> {
        self.map_err(|source| CudaError::Driver {
            context: context.into(),
            source,
        })
    }
}
