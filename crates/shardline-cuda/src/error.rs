//! Errors of the CUDA backend.

use cudarc::driver::DriverError;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no usable CUDA device: {0}")]
    Unavailable(String),
    #[error("CUDA driver call failed while {context}: {source}")]
    Driver {
        context: String,
        #[source]
        source: DriverError,
    },
    #[error("cuBLAS call failed while {context}: {source}")]
    Blas {
        context: String,
        #[source]
        source: cudarc::cublas::result::CublasError,
    },
    #[error("NVRTC could not compile Shardline's kernels: {0}")]
    Compile(String),
    #[error("NCCL failed while {0}")]
    Nccl(String),
    #[error("invalid layer shape: {0}")]
    Shape(String),
}

/// Adds what was being done to a driver error.
pub trait DriverContext<T> {
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
