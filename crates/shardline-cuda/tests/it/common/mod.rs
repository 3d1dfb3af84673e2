//! What the GPU tests share: opening the device.

use shardline_cuda::CudaDevice;

/// Opens the GPU; a test that asked for one fails where there is none, saying why.
pub fn device(test: &str) -> CudaDevice {
    CudaDevice::open(0).unwrap_or_else(|e| panic!("{test}: {e}"))
}
