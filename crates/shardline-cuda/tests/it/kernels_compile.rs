//! The kernel sources compile with NVRTC (no GPU needed: only libnvrtc, which CI installs).

use shardline_cuda::CudaError;

#[test]
#[ignore = "needs libnvrtc (scripts/test.sh runs it where NVRTC is installed)"]
fn kernels_compile_with_nvrtc() {
    for check in [
        shardline_cuda::device::check_kernels_compile,
        shardline_cuda::prefill_ops::check_prefill_kernels_compile,
    ] {
        match check() {
            Ok(()) => {}
            Err(e @ CudaError::Unavailable(_)) => panic!("NVRTC is not available: {e}"),
            Err(e) => panic!("{e}"),
        }
    }
}
