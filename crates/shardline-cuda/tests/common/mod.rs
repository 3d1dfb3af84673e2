//! What the GPU tests share: opening the device (or saying why a test does not run here) and the
//! relative error they compare results with.

use shardline_cuda::{CudaDevice, CudaError};

/// Opens the GPU, or says why `test` does not run here. Only a missing driver or device skips;
/// any other failure (a kernel that does not compile, say) fails the test.
pub fn device(test: &str) -> Option<CudaDevice> {
    match CudaDevice::open(0) {
        Ok(d) => Some(d),
        Err(e @ CudaError::Unavailable(_)) => {
            eprintln!("SKIPPED {test}: {e}");
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

/// The largest absolute difference between `a` and `b`, relative to `b`'s largest magnitude.
#[allow(dead_code)] // each test binary compiles this module; not every one compares floats
pub fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}
