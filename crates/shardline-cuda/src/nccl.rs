//! GPU collectives through NCCL: a [`DeviceComm`] sums a device buffer across the ranks of a job,
//! queued on the device's stream (so it can sit between two segments, or inside a captured graph).
//!
//! Forming a communicator takes two steps. One rank makes an [`NcclId`]; its 128 bytes travel to
//! every other rank by whatever channel the caller has (Shardline's comm bootstrap); then every
//! rank calls [`DeviceComm::init`] with (id, world, rank) on its own GPU. Ranks that share one GPU
//! cannot form a communicator (NCCL refuses duplicate devices): the caller checks the GPUs'
//! [`gpu_uuid`]s first.
//!
//! The types come from cudarc's NCCL bindings (`cudarc::nccl::sys`); the library is opened here
//! rather than through cudarc's loader, because that loader looks for `libnccl.so` and
//! `libnccl.so.<CUDA major>` but not `libnccl.so.2` (the name NCCL's runtime packages, and
//! PyTorch's wheels, install), and it panics where the library or a symbol is missing. Here a
//! missing library is an error naming what was tried; `SHARDLINE_NCCL_LIB` names a file to use.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, DevicePtr, DeviceRepr};
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use half::{bf16, f16};
use shardline_tensor::DType;

use crate::error::DriverContext;
use crate::{CudaDevice, CudaError};

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

/// The NCCL entry points Shardline calls, resolved once per process. Results are read as plain
/// integers: a code this build does not know must not be transmuted into an enum.
struct Lib {
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> c_int,
    comm_destroy: unsafe extern "C" fn(ncclComm_t) -> c_int,
    comm_abort: unsafe extern "C" fn(ncclComm_t) -> c_int,
    comm_get_async_error: unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclRedOp_t,
        ncclComm_t,
        *mut c_void,
    ) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    get_last_error: unsafe extern "C" fn(ncclComm_t) -> *const c_char,
    /// Keeps the library mapped for the process's lifetime.
    _lib: libloading::Library,
}

/// The file names tried, in order.
fn candidates() -> Vec<String> {
    let mut names: Vec<String> = std::env::var("SHARDLINE_NCCL_LIB").into_iter().collect();
    names.extend(["libnccl.so.2".to_string(), "libnccl.so".to_string()]);
    names
}

fn open_lib() -> Result<Lib, String> {
    let names = candidates();
    let mut failures = Vec::new();
    for name in &names {
        // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => return resolve(lib).map_err(|e| format!("{name}: {e}")),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    Err(format!(
        "NCCL (libnccl) could not be loaded; put its directory on LD_LIBRARY_PATH or name the \
         file in SHARDLINE_NCCL_LIB (tried {})",
        failures.join("; ")
    ))
}

fn resolve(lib: libloading::Library) -> Result<Lib, String> {
    /// Looks up `name` as a value of the field's function-pointer type.
    unsafe fn sym<F: Copy>(lib: &libloading::Library, name: &str) -> Result<F, String> {
        lib.get::<F>(name.as_bytes())
            .map(|s| *s)
            .map_err(|e| format!("missing symbol {name}: {e}"))
    }
    // SAFETY: the signatures are those of nccl.h (2.x), which cudarc's bindings were made from.
    unsafe {
        Ok(Lib {
            get_version: sym(&lib, "ncclGetVersion")?,
            get_unique_id: sym(&lib, "ncclGetUniqueId")?,
            comm_init_rank: sym(&lib, "ncclCommInitRank")?,
            comm_destroy: sym(&lib, "ncclCommDestroy")?,
            comm_abort: sym(&lib, "ncclCommAbort")?,
            comm_get_async_error: sym(&lib, "ncclCommGetAsyncError")?,
            all_reduce: sym(&lib, "ncclAllReduce")?,
            get_error_string: sym(&lib, "ncclGetErrorString")?,
            get_last_error: sym(&lib, "ncclGetLastError")?,
            _lib: lib,
        })
    }
}

fn lib() -> Result<&'static Lib, CudaError> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(open_lib)
        .as_ref()
        .map_err(|e| CudaError::Unavailable(e.clone()))
}

/// NCCL's version as (major, minor, patch), or why the library cannot be used.
pub fn version() -> Result<(u32, u32, u32), CudaError> {
    let lib = lib()?;
    let mut v: c_int = 0;
    // SAFETY: `v` is a valid out-pointer.
    check(
        lib,
        unsafe { (lib.get_version)(&mut v) },
        None,
        "reading NCCL's version",
    )?;
    // Since 2.9 the code is major * 10000 + minor * 100 + patch.
    let v = v as u32;
    Ok((v / 10000, v / 100 % 100, v % 100))
}

/// Turns an NCCL result code into an error saying what was being done and what NCCL said.
fn check(lib: &Lib, code: c_int, comm: Option<ncclComm_t>, what: &str) -> Result<(), CudaError> {
    if code == 0 {
        return Ok(());
    }
    let text = |p: *const c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: NCCL returns NUL-terminated static or per-thread strings.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    // SAFETY: both take any code / a valid or null communicator.
    let kind = text(unsafe { (lib.get_error_string)(code) });
    let last = text(unsafe { (lib.get_last_error)(comm.unwrap_or(std::ptr::null_mut())) });
    let detail = if last.is_empty() {
        String::new()
    } else {
        format!(": {last}")
    };
    Err(CudaError::Nccl(format!(
        "{what}: code {code} ({kind}){detail}"
    )))
}

/// The id every rank of one communicator is made from; rank 0 makes it, the others receive it.
#[derive(Clone, Copy)]
pub struct NcclId(ncclUniqueId);

impl NcclId {
    /// A fresh id (loads NCCL; needs no GPU).
    pub fn new() -> Result<NcclId, CudaError> {
        let lib = lib()?;
        let mut id = ncclUniqueId {
            internal: [0; ID_BYTES],
        };
        // SAFETY: `id` is a valid out-pointer.
        let code = unsafe { (lib.get_unique_id)(&mut id) };
        check(lib, code, None, "making an NCCL unique id")?;
        Ok(NcclId(id))
    }

    /// The id as it travels between ranks.
    pub fn to_bytes(&self) -> [u8; ID_BYTES] {
        self.0.internal.map(|c| c as u8)
    }

    /// The id another rank made, from its bytes.
    pub fn from_bytes(bytes: &[u8; ID_BYTES]) -> NcclId {
        NcclId(ncclUniqueId {
            internal: bytes.map(|b| b as c_char),
        })
    }
}

/// An element type NCCL sums natively.
pub trait NcclElem: DeviceRepr {
    /// The element type NCCL is told the buffer holds.
    const DTYPE: DType;
}

impl NcclElem for f32 {
    const DTYPE: DType = DType::F32;
}

impl NcclElem for f16 {
    const DTYPE: DType = DType::F16;
}

impl NcclElem for bf16 {
    const DTYPE: DType = DType::BF16;
}

fn nccl_type(dtype: DType) -> ncclDataType_t {
    match dtype {
        DType::F32 => ncclDataType_t::ncclFloat32,
        DType::F16 => ncclDataType_t::ncclFloat16,
        DType::BF16 => ncclDataType_t::ncclBfloat16,
        DType::Quant(_) => unreachable!("NCCL sums float activations only"),
    }
}

/// One rank's NCCL communicator, bound to one device's stream.
pub struct DeviceComm {
    comm: ncclComm_t,
    lib: &'static Lib,
    rank: usize,
    world: usize,
    /// How long [`DeviceComm::wait`] waits for the stream before it gives up on the other ranks.
    timeout: Duration,
    /// Set once the communicator has been aborted (it is then freed, not destroyed).
    aborted: Cell<bool>,
    /// Says why once another rank is known to be lost (see [`DeviceComm::watch_peers`]).
    watch: Option<PeerWatch>,
    /// Keeps the device's context alive until the communicator is destroyed.
    _ctx: Arc<CudaContext>,
}

/// Tells whether the job's other ranks are alive, as the host's group of the job sees them (its
/// heartbeats): `None` while they are, and why once one is lost. It is asked only while a wait is
/// past its first spin, so it may take a lock, though not block.
pub type PeerWatch = Box<dyn Fn() -> Option<String> + Send>;

/// NCCL's "still in progress" result (`ncclInProgress`), which is not an error.
const NCCL_IN_PROGRESS: c_int = 7;
/// How long [`DeviceComm::wait`] polls without sleeping: a decode segment's all-reduce ends in
/// microseconds, and a sleep would add its own granularity to every segment.
const SPIN: Duration = Duration::from_millis(2);

/// A communicator made on the joining thread, handed to the caller's.
struct InitComm(ncclComm_t);

// SAFETY: the communicator is used by one thread at a time: made by the joining thread, then only
// by the receiver of this value.
unsafe impl Send for InitComm {}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; `&mut`-free
// methods take `&self`, but `DeviceComm` is not `Sync`, so calls never overlap.
unsafe impl Send for DeviceComm {}

impl DeviceComm {
    /// Joins the communicator of `world` ranks made from `id`, as `rank`, on `dev`. Waits until
    /// every rank has called it (NCCL's own bootstrap, over the network the id names), for at most
    /// `timeout`, which also bounds each later [`DeviceComm::wait`].
    pub fn init(
        dev: &CudaDevice,
        id: &NcclId,
        world: usize,
        rank: usize,
        timeout: Duration,
    ) -> Result<DeviceComm, CudaError> {
        if world == 0 || rank >= world || world > c_int::MAX as usize {
            return Err(CudaError::Nccl(format!(
                "forming a communicator: rank {rank} of {world} ranks is not a valid rank"
            )));
        }
        let lib = lib()?;
        // ncclCommInitRank blocks until every rank has joined and takes no deadline; a rank that
        // died after the id exchange would hold the others there forever. It runs on a thread of
        // its own, waited for with the deadline; at the deadline that thread is left behind (the
        // caller is about to fail) and a communicator it may still make is never used.
        let what = format!(
            "joining the NCCL communicator as rank {rank} of {world} on {}",
            dev.name()
        );
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let ctx = dev.context().clone();
        let id = id.0;
        let join_what = what.clone();
        std::thread::Builder::new()
            .name("nccl-init".into())
            .spawn(move || {
                // NCCL picks the device from the calling thread's current context.
                let joined = ctx
                    .bind_to_thread()
                    .during("making the device current for NCCL")
                    .and_then(|()| {
                        let mut comm: ncclComm_t = std::ptr::null_mut();
                        // SAFETY: `comm` is a valid out-pointer; world and rank were checked.
                        let code = unsafe {
                            (lib.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int)
                        };
                        check(lib, code, None, &join_what).map(|()| InitComm(comm))
                    });
                // The receiver is gone only after the deadline, when nobody needs the answer.
                let _ = done_tx.send(joined);
            })
            .map_err(|e| CudaError::Nccl(format!("{what}: starting a thread: {e}")))?;
        let comm = match done_rx.recv_timeout(timeout) {
            Ok(joined) => joined?.0,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(CudaError::Nccl(format!(
                    "{what}: not every rank joined within {:.0} s; another rank is gone or stuck",
                    timeout.as_secs_f64()
                )))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(CudaError::Nccl(format!("{what}: the joining thread died")))
            }
        };
        Ok(DeviceComm {
            comm,
            lib,
            rank,
            world,
            timeout,
            aborted: Cell::new(false),
            watch: None,
            _ctx: dev.context().clone(),
        })
    }

    /// Has [`DeviceComm::wait`] ask `watch` whether another rank is lost, so that a rank that was
    /// killed or stopped mid-collective fails this one within the host's liveness budget rather
    /// than at the communicator's deadline: NCCL itself never notices a stopped peer.
    pub fn watch_peers(&mut self, watch: PeerWatch) {
        self.watch = Some(watch);
    }

    /// Waits until `dev`'s stream has run everything queued on it, NCCL's collectives included,
    /// for at most the communicator's timeout. A collective whose peer is gone never finishes:
    /// rather than block forever in a stream synchronisation, this polls the stream and NCCL's
    /// asynchronous error, and on an error or at the deadline aborts the communicator (which
    /// frees the stuck kernels) and says so. Every host wait that follows a collective on this
    /// communicator goes through here.
    pub fn wait(&self, dev: &CudaDevice) -> Result<(), CudaError> {
        dev.context()
            .bind_to_thread()
            .during("making the device current")?;
        let start = Instant::now();
        let stream = dev.stream().cu_stream();
        loop {
            // SAFETY: the stream is the device's, alive as long as `dev`.
            match unsafe { cudarc::driver::sys::cuStreamQuery(stream) } {
                cudarc::driver::sys::CUresult::CUDA_SUCCESS => return Ok(()),
                cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => {}
                other => {
                    return Err(CudaError::Nccl(format!(
                        "waiting for the stream: {other:?}"
                    )))
                }
            }
            if self.aborted.get() {
                return Err(CudaError::Nccl("the NCCL communicator was aborted".into()));
            }
            let mut state: c_int = 0;
            // SAFETY: `comm` is live (not aborted) and `state` is a valid out-pointer.
            let code = unsafe { (self.lib.comm_get_async_error)(self.comm, &mut state) };
            let failed = if code != 0 {
                Some(code)
            } else if state != 0 && state != NCCL_IN_PROGRESS {
                Some(state)
            } else {
                None
            };
            if let Some(code) = failed {
                let err = check(self.lib, code, Some(self.comm), "an NCCL collective failed");
                self.abort();
                return err;
            }
            let waited = start.elapsed();
            if waited > self.timeout {
                self.abort();
                return Err(CudaError::Nccl(format!(
                    "an NCCL collective of rank {} of {} did not finish within {:.0} s: another \
                     rank is gone or stuck; the communicator was aborted",
                    self.rank,
                    self.world,
                    self.timeout.as_secs_f64()
                )));
            }
            if waited < SPIN {
                std::hint::spin_loop();
            } else {
                if let Some(why) = self.watch.as_ref().and_then(|w| w()) {
                    self.abort();
                    return Err(CudaError::PeerLost(why));
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn abort(&self) {
        if !self.aborted.replace(true) {
            // SAFETY: `comm` came from ncclCommInitRank and has not been aborted or destroyed.
            // A failure to abort cannot be reported better than the error being returned.
            let _ = unsafe { (self.lib.comm_abort)(self.comm) };
        }
    }

    /// This rank in the communicator, `0..world()`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks in the communicator.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Sums `buf` across the ranks, in place; queued on the device's stream.
    pub fn all_reduce_sum<T: NcclElem>(
        &self,
        dev: &CudaDevice,
        buf: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        let (ptr, _sync) = buf.device_ptr(dev.stream());
        // SAFETY: `ptr` is `buf`'s allocation of `buf.len()` elements of `T`, on this device.
        unsafe { self.all_reduce_sum_raw(dev, ptr, buf.len(), T::DTYPE) }
    }

    /// Sums `count` elements of `dtype` at device address `ptr` across the ranks, in place.
    ///
    /// # Safety
    /// `ptr` must be a live allocation of at least `count` elements of `dtype` on `dev`, and stay
    /// live until the stream has run the all-reduce.
    pub unsafe fn all_reduce_sum_raw(
        &self,
        dev: &CudaDevice,
        ptr: u64,
        count: usize,
        dtype: DType,
    ) -> Result<(), CudaError> {
        if self.aborted.get() {
            return Err(CudaError::Nccl(
                "the NCCL communicator was aborted after an earlier failure".into(),
            ));
        }
        let p = ptr as *mut c_void;
        let stream = dev.stream().cu_stream() as *mut c_void;
        let code = (self.lib.all_reduce)(
            p,
            p,
            count,
            nccl_type(dtype),
            ncclRedOp_t::ncclSum,
            self.comm,
            stream,
        );
        check(
            self.lib,
            code,
            Some(self.comm),
            &format!("all-reducing {count} {dtype} values with NCCL"),
        )
    }
}

impl Drop for DeviceComm {
    fn drop(&mut self) {
        if self.aborted.get() {
            return; // ncclCommAbort has freed it
        }
        // SAFETY: `comm` came from ncclCommInitRank and is destroyed once. A failure here cannot
        // be reported; the process is letting the communicator go anyway.
        let _ = unsafe { (self.lib.comm_destroy)(self.comm) };
    }
}

/// The GPU's UUID: ranks whose UUIDs are equal share one GPU and cannot form a communicator.
pub fn gpu_uuid(dev: &CudaDevice) -> Result<[u8; 16], CudaError> {
    let uuid = dev.context().uuid().during("reading the GPU's UUID")?;
    Ok(uuid.bytes.map(|c| c as u8))
}
