//! One CUDA device: its context, the stream everything is queued on, and the loaded kernels.

use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    ValidAsZeroBits,
};

use shardline_tensor::DType;

use crate::error::DriverContext;
use crate::{ptx_cache, CudaError};

/// The kernel source, compiled with NVRTC when a device is opened.
const KERNEL_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("kernels.cu"));

/// The share of each SM's L1/shared-memory array every decode kernel asks to have as shared
/// memory, in percent of the most there can be (228 KB on Hopper: about 34 KB, room for every
/// kernel's needs at the presets' sizes). One setting for all: an SM takes blocks of a kernel that
/// needs more shared memory than its current split only once it is empty and reconfigured, so
/// under the driver's own choice (the least each kernel needs) a kernel with shared memory could
/// not start early beside the matvec before it (docs/architecture.md, "GPU kernel design notes",
/// Shared-memory carveout).
const SMEM_CARVEOUT_PERCENT: i32 = 15;

/// The matrix-vector entry points for one weight dtype (`MATVEC_ENTRY` in kernels.cu).
pub struct MatvecKernels {
    /// One row per warp, `UNROLL` packs of 8 weights per lane in flight.
    pub plain: CudaFunction,
    /// One row per warp, 8 packs per lane in flight: a row of up to 2048 columns in one group.
    pub plain_g8: CudaFunction,
    /// The SwiGLU of a gate and an up row per warp, `UNROLL` packs per lane and row.
    pub glu: CudaFunction,
    /// As `glu`, 8 packs per lane and row.
    pub glu_g8: CudaFunction,
    /// Four short rows per warp.
    pub r4: CudaFunction,
}

impl MatvecKernels {
    fn load(
        f: impl Fn(&str) -> Result<CudaFunction, CudaError>,
        dtype: &str,
    ) -> Result<MatvecKernels, CudaError> {
        Ok(MatvecKernels {
            plain: f(&format!("matvec_{dtype}"))?,
            plain_g8: f(&format!("matvec_{dtype}_g8"))?,
            glu: f(&format!("matvec_{dtype}_glu"))?,
            glu_g8: f(&format!("matvec_{dtype}_glu_g8"))?,
            r4: f(&format!("matvec_{dtype}_r4"))?,
        })
    }
}

/// Handles of every decode kernel (`kernels.cu` and the shared `common.cuh`), loaded with the
/// device's shared-memory carveout set.
pub struct Kernels {
    matvec_bf16: MatvecKernels,
    matvec_f16: MatvecKernels,
    matvec_f32: MatvecKernels,
    /// `y = rms_norm(x) * g`, one block per row ([`crate::ops::rms_norm`]).
    pub rms_norm: CudaFunction,
    /// The FFN's rms_norm fused with the router matvec, for bf16 router weights
    /// ([`crate::ops::router_norm`]).
    pub router_norm_bf16: CudaFunction,
    /// As `router_norm_bf16`, for f16 router weights.
    pub router_norm_f16: CudaFunction,
    /// As `router_norm_bf16`, for f32 router weights.
    pub router_norm_f32: CudaFunction,
    /// Bias, q/k norm, rope and KV append for several rows at once, from `common.cuh`
    /// ([`crate::ops::rope_kv_append`]); decode does this inside its attention kernel.
    pub rope_kv_append: CudaFunction,
    /// Decode attention of one token with rope and the KV append fused in, for heads of up to
    /// 256 elements (8 per lane) ([`crate::ops::attention_decode`]).
    pub attention_decode: CudaFunction,
    /// As `attention_decode`, for heads of up to 128 elements (4 per lane, half the registers).
    pub attention_decode_d128: CudaFunction,
    /// As `attention_decode`, over caches of bf16.
    pub attention_decode_kv16: CudaFunction,
    /// As `attention_decode_d128`, over caches of bf16.
    pub attention_decode_d128_kv16: CudaFunction,
    /// Softmax, top-k and optional renormalisation of each row of router logits, from
    /// `common.cuh` ([`crate::ops::router_top_k`]).
    pub router_top_k: CudaFunction,
    /// The weighted sum of the chosen experts' slots in slot order, plus the residual and a gated
    /// shared expert ([`crate::ops::combine_slots`]).
    pub combine_slots: CudaFunction,
    /// `combine_slots` followed by the next layer's rms_norm, in one block.
    pub combine_slots_norm: CudaFunction,
    /// One row of the embedding table widened to f32, the token read from device memory
    /// ([`crate::ops::embed_row`]).
    pub embed_row: CudaFunction,
    /// The largest of a row of f32 values and its lowest index, by one block
    /// ([`crate::ops::argmax`]).
    pub argmax: CudaFunction,
    /// A segment's partial output rounded to bf16 or f16 for a 16-bit all-reduce
    /// ([`crate::ops::to16`]).
    pub to16: CudaFunction,
    /// A 16-bit all-reduce's sum widened back, the residual added ([`crate::ops::add16`]).
    pub add16: CudaFunction,
}

impl Kernels {
    fn load(module: &Arc<CudaModule>) -> Result<Kernels, CudaError> {
        let f = |name: &str| {
            let f = module
                .load_function(name)
                .during(format!("loading kernel {name}"))?;
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                SMEM_CARVEOUT_PERCENT,
            )
            .during(format!("setting kernel {name}'s shared-memory carveout"))?;
            Ok::<_, CudaError>(f)
        };
        Ok(Kernels {
            matvec_bf16: MatvecKernels::load(f, "bf16")?,
            matvec_f16: MatvecKernels::load(f, "f16")?,
            matvec_f32: MatvecKernels::load(f, "f32")?,
            rms_norm: f("rms_norm")?,
            router_norm_bf16: f("router_norm_bf16")?,
            router_norm_f16: f("router_norm_f16")?,
            router_norm_f32: f("router_norm_f32")?,
            rope_kv_append: f("rope_kv_append")?,
            attention_decode: f("attention_decode")?,
            attention_decode_d128: f("attention_decode_d128")?,
            attention_decode_kv16: f("attention_decode_kv16")?,
            attention_decode_d128_kv16: f("attention_decode_d128_kv16")?,
            router_top_k: f("router_top_k")?,
            combine_slots: f("combine_slots")?,
            combine_slots_norm: f("combine_slots_norm")?,
            embed_row: f("embed_row")?,
            argmax: f("argmax")?,
            to16: f("to16")?,
            add16: f("add16")?,
        })
    }

    /// The matvec entry points for weights of `dtype`.
    pub fn matvec(&self, dtype: DType) -> &MatvecKernels {
        match dtype {
            DType::BF16 => &self.matvec_bf16,
            DType::F16 => &self.matvec_f16,
            DType::F32 => &self.matvec_f32,
            DType::Quant(_) => {
                unreachable!("quantized weights are dequantized before they reach the device")
            }
        }
    }
}

/// An opened CUDA device with one stream. Cross-stream event tracking is off: everything runs on
/// the one stream, in order, so the tracking would only add work to every launch.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    name: String,
    pdl: bool,
    module: Arc<CudaModule>,
}

impl CudaDevice {
    /// Opens device `ordinal`, compiling (or loading from the cache) the kernels.
    pub fn open(ordinal: usize) -> Result<CudaDevice, CudaError> {
        let count = device_count()?;
        // SAFETY: this only tries to load the shared library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CudaError::Unavailable(
                "NVRTC (libnvrtc.so) was not found: put the CUDA toolkit's lib64 directory on \
                 LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        if ordinal >= count {
            return Err(CudaError::Unavailable(format!(
                "device {ordinal} asked for, but {count} CUDA device(s) found"
            )));
        }
        let ctx = CudaContext::new(ordinal).during(format!("opening CUDA device {ordinal}"))?;
        // SAFETY: called before any allocation or stream exists.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().during("creating a stream")?;
        let (major, minor) = ctx
            .compute_capability()
            .during("reading the compute capability")?;
        let ptx = ptx_cache::compile_cached(KERNEL_SOURCE, major, minor)?;
        let module = ctx.load_module(ptx).during("loading the kernel module")?;
        let kernels = Kernels::load(&module)?;
        let name = ctx.name().during("reading the device name")?;
        // Programmatic dependent launch needs compute capability 9.0 (Hopper) or later.
        let pdl = major >= 9 && std::env::var("SHARDLINE_PDL").map_or(true, |v| v != "0");
        Ok(CudaDevice {
            ctx,
            stream,
            kernels,
            name,
            pdl,
            module,
        })
    }

    /// The timeline probe's records (kernels compiled with `-DSHARDLINE_TIMELINE` through
    /// `SHARDLINE_NVRTC_OPTIONS`; see common.cuh): per warp, four little-endian u64s (grid id,
    /// source line and SM; start; wait returned; end, in ns), zeros where no warp wrote.
    /// `scripts/gpu-timeline.py` reads them.
    pub fn timeline(&self) -> Result<Vec<u8>, CudaError> {
        self.synchronize()?;
        let records = self
            .module
            .get_global("shardline_timeline", &self.stream)
            .during(
                "finding the timeline probe (kernels compiled without -DSHARDLINE_TIMELINE?)",
            )?;
        let mut bytes = vec![0u8; records.len()];
        self.stream
            .memcpy_dtoh(&records, &mut bytes)
            .during("copying the timeline probe's records")?;
        self.synchronize()?;
        Ok(bytes)
    }

    /// The device's name as the driver reports it (such as "NVIDIA H100 80GB HBM3").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The one stream every launch, copy and NCCL call of this device is queued on, in order;
    /// the model's CUDA backend captures its graphs on it.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Whether kernels are launched with programmatic dependent launch: each may start (and
    /// prefetch its weights) while the one before it finishes. On from Hopper on, unless
    /// `SHARDLINE_PDL=0`.
    pub fn pdl(&self) -> bool {
        self.pdl
    }

    /// The decode kernels, compiled (or loaded from the cache) when the device was opened.
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// The device's driver context, for calls this type does not wrap (binding it to another
    /// thread, reading the GPU's UUID).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// A zero-filled device buffer of `len` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        self.stream
            .alloc_zeros(len.max(1))
            .during(format!("allocating {len} elements"))
    }

    /// A device copy of `data`.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>, CudaError> {
        if data.is_empty() {
            return Err(CudaError::Shape("cannot upload an empty buffer".into()));
        }
        self.stream
            .clone_htod(data)
            .during(format!("copying {} elements to the device", data.len()))
    }

    /// A host copy of `buf` (waits for the stream).
    pub fn download<T: DeviceRepr>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>, CudaError> {
        self.stream
            .clone_dtoh(buf)
            .during("copying from the device")
    }

    /// Waits until everything queued so far has run, and reports any error it raised.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().during("waiting for the stream")
    }
}

/// How many CUDA devices this process sees (an error where the driver library is missing).
pub fn device_count() -> Result<usize, CudaError> {
    // SAFETY: this only tries to load the shared library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::Unavailable(
            "the CUDA driver library (libcuda.so) was not found".into(),
        ));
    }
    let count = CudaContext::device_count().during("counting CUDA devices")?;
    Ok(count.max(0) as usize)
}

/// Device `ordinal`'s memory bandwidth in GB/s, counting the bytes a copy reads and writes: the
/// best of a few device-to-device copies of 512 MiB (what a step's bytes are set against).
pub fn copy_gbps(ordinal: usize) -> Result<f64, CudaError> {
    let ctx = CudaContext::new(ordinal).during(format!("opening CUDA device {ordinal}"))?;
    let stream = ctx.new_stream().during("creating a stream")?;
    let n = (512usize << 20) / 4;
    let src = stream
        .alloc_zeros::<f32>(n)
        .during("allocating a copy's source")?;
    let mut dst = stream
        .alloc_zeros::<f32>(n)
        .during("allocating a copy's destination")?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        stream
            .memcpy_dtod(&src, &mut dst)
            .during("copying on the device")?;
        stream.synchronize().during("waiting for the stream")?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * 4) as f64 / best / 1e9)
}

/// Compiles the kernels for Hopper (compute_90) without a GPU: only NVRTC is needed. Lets a
/// machine without a GPU check that the kernel source compiles.
pub fn check_kernels_compile() -> Result<(), CudaError> {
    // SAFETY: only tries to load the shared library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::Unavailable(
            "NVRTC (libnvrtc.so) was not found: put the CUDA toolkit's lib64 directory on \
             LD_LIBRARY_PATH"
                .into(),
        ));
    }
    ptx_cache::compile(KERNEL_SOURCE, "compute_90").map(|_| ())
}

/// The raw device address of `buf`, for kernel arguments (event tracking is off, so this records
/// nothing).
pub fn dptr<T>(dev: &CudaDevice, buf: &CudaSlice<T>) -> u64 {
    let (p, _sync) = buf.device_ptr(dev.stream());
    p
}
