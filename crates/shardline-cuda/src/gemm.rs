//! [`Gemm`]: the matrix products of prefill in cuBLAS, `y = x W^T` for `[rows, k]` f32
//! activations `x`, `[n, k]` weights `W` (the decode kernels' row-major layout) and `[rows, n]` f32
//! outputs, queued on the device's stream.
//!
//! f32 weights run an f32 GEMM in cuBLAS's default math mode (no TF32), so results match an f32
//! reference to rounding. bf16/f16 weights run on the tensor cores with f32 accumulation: `x` is
//! converted to the weight dtype as two tensors, `hi = round(x)` and `lo = round(x - hi)`, and
//! `y = hi W^T + lo W^T` (two GEMMs, the second accumulating). One rounding alone would keep 8
//! bits of each bf16 activation, which moves logits by more than the 1e-3 a bf16 model must agree
//! with an f32 reference to; the pair keeps about 16.

use std::ffi::c_void;

use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaSlice;
use shardline_tensor::DType;

use crate::device::dptr;
use crate::ops::Weights;
use crate::prefill_ops::PrefillKernels;
use crate::{CudaDevice, CudaError};

/// A cuBLAS handle on the device's stream, and the 16-bit copies of the activations it converts.
pub struct Gemm {
    blas: CudaBlas,
    hi: CudaSlice<u16>,
    lo: CudaSlice<u16>,
}

impl Gemm {
    /// A cuBLAS handle bound to `dev`'s stream (libcublas is loaded here, at first use).
    pub fn new(dev: &CudaDevice) -> Result<Gemm, CudaError> {
        // SAFETY: only tries to load the shared library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(CudaError::Unavailable(
                "cuBLAS (libcublas.so) was not found: put the CUDA toolkit's lib64 directory on \
                 LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let blas = CudaBlas::new(dev.stream().clone()).map_err(|source| CudaError::Blas {
            context: "creating a handle".into(),
            source,
        })?;
        Ok(Gemm {
            blas,
            hi: dev.zeros(1)?,
            lo: dev.zeros(1)?,
        })
    }

    /// `y = x W^T` for `rows` rows: `x` is `[rows, k]` f32, `w` the `[n, k]` matrix at `w.ptr`,
    /// `y` is `[rows, n]` f32 (all row-major, contiguous).
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &mut self,
        dev: &CudaDevice,
        kernels: &PrefillKernels,
        w: Weights,
        x: u64,
        y: u64,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let dims = Dims { rows, n, k };
        match w.dtype {
            DType::F32 => self.gemm(w.ptr, cudaDataType::CUDA_R_32F, x, y, dims, 0.0),
            DType::BF16 | DType::F16 => {
                let len = rows * k;
                if self.hi.len() < len {
                    self.hi = dev.zeros(len)?;
                    self.lo = dev.zeros(len)?;
                }
                let (hi, lo) = (dptr(dev, &self.hi), dptr(dev, &self.lo));
                let bf16 = w.dtype == DType::BF16;
                kernels.split16(dev, x, hi, lo, len, bf16)?;
                let t = if bf16 {
                    cudaDataType::CUDA_R_16BF
                } else {
                    cudaDataType::CUDA_R_16F
                };
                self.gemm(w.ptr, t, hi, y, dims, 0.0)?;
                self.gemm(w.ptr, t, lo, y, dims, 1.0)
            }
            DType::Quant(_) => {
                unreachable!("quantized weights are dequantized before they reach the device")
            }
        }
    }

    /// `y = x W^T + beta y` with `x` and `W` of type `t`, f32 `y` and f32 accumulation. In
    /// cuBLAS's column-major terms: `y^T [n, rows] = W [k, n]^T x^T [k, rows]`.
    fn gemm(
        &self,
        w: u64,
        t: cudaDataType,
        x: u64,
        y: u64,
        d: Dims,
        beta: f32,
    ) -> Result<(), CudaError> {
        let alpha = 1.0f32;
        let (m, n, k) = (d.n as i32, d.rows as i32, d.k as i32);
        // SAFETY: the callers pass live device buffers of at least `n * k` weights of type `t`,
        // `rows * k` inputs of type `t` and `rows * n` f32 outputs; alpha and beta are host f32
        // values, as the compute type CUBLAS_COMPUTE_32F takes them in the default pointer mode.
        unsafe {
            gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                (&alpha as *const f32).cast::<c_void>(),
                w as *const c_void,
                t,
                k,
                x as *const c_void,
                t,
                k,
                (&beta as *const f32).cast::<c_void>(),
                y as *mut c_void,
                cudaDataType::CUDA_R_32F,
                m,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|source| CudaError::Blas {
            context: format!("multiplying [{}, {}] by [{}, {}]^T", d.rows, d.k, d.n, d.k),
            source,
        })
    }
}

/// The sizes of one product: `[rows, k]` by `[n, k]^T`.
#[derive(Clone, Copy)]
struct Dims {
    rows: usize,
    n: usize,
    k: usize,
}
