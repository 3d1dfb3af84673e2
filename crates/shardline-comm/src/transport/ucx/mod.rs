//! UCX transport (cargo feature `ucx`): one UCP worker per group and one endpoint per peer, over
//! UCP's tagged messages, so that UCX picks the fabric (RDMA where there is one, else its own
//! shared memory or TCP) and the protocol: eager below its rendezvous threshold, zero-copy
//! rendezvous above it.
//!
//! The byte stream a [`Pair`] offers is cut into messages tagged with the sender's group rank and
//! a sequence number, so the receiver asks for exactly the next one. Small pieces of a frame
//! (header, a small payload, padding) are gathered into one message; a large payload goes as
//! messages of at most [`MSG_MAX`] bytes straight from the caller's memory, and counts as written
//! only once UCX no longer reads it. A receive is posted only for a message that has arrived
//! (probed), after its length has been checked against [`MSG_MAX`], into a buffer of the pair's
//! pool; the pools' large buffers are registered once with `ucp_mem_map` through the group's
//! registration cache ([`super::regcache`]) and unregistered when a pool frees them. Heartbeats
//! are empty messages under a tag of their own, so they never wait behind data.
//!
//! A failed UCP call is retried once, after a short pause spent progressing the worker, when its
//! status says "try again" (no resource, busy, no progress); such retries are counted and
//! logged. Any other failure fails the group at once, naming the peer's rank and address. A
//! peer's death shows through UCX's error handler and, for peers on this host, through a pidfd
//! (UCX's keepalive alone takes far longer than the heartbeat budget).

mod ffi;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::liveness::PidWatch;
use super::regcache::{RegCache, Registrar, Registration};
use super::{Endpoint, Pair, Registry, Setup, Transport};
use crate::error::{CommError, Result};

/// Largest message a pair sends; a longer one announced by a peer is refused before anything is
/// allocated for it.
pub const MSG_MAX: usize = 1 << 20;
/// Pieces up to this size are gathered (copied) into one message: a frame's header, a small
/// payload and the padding go out together, eagerly.
const GATHER_MAX: usize = 16 << 10;
/// Bytes a pair may have posted and not yet seen complete.
const SEND_BUDGET: usize = 8 << 20;
/// Messages a pair receives at once (each into a buffer of at most [`MSG_MAX`] bytes).
const RECV_DEPTH: usize = 4;
/// Spare buffers a pair keeps for reuse, per size.
const SPARE_SMALL: usize = 8;
const SPARE_BIG: usize = 4;
/// Bounds of a group's registration cache.
const CACHE_ENTRIES: usize = 1024;
const CACHE_BYTES: usize = 1 << 30;
/// How long a call that failed for want of resources waits (progressing the worker, which frees
/// them) before its one retry.
const RETRY_PAUSE: Duration = Duration::from_micros(100);
/// How long closing a pair waits for its transfers to finish or be cancelled.
const DRAIN: Duration = Duration::from_secs(1);
/// Progress calls per poll at most (each call handles a batch of events).
const PROGRESS_ROUNDS: usize = 16;

/// Tags: bit 62 marks a heartbeat, bits 40..62 the sender's group rank, bits 0..40 the
/// sender's message sequence number.
const BEAT_BIT: u64 = 1 << 62;
const SEQ_BITS: u32 = 40;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
const RANK_LIMIT: usize = 1 << 22;
const FULL_MASK: u64 = u64::MAX;

fn data_tag(from: usize, seq: u64) -> u64 {
    ((from as u64) << SEQ_BITS) | (seq & SEQ_MASK)
}

fn beat_tag(from: usize) -> u64 {
    BEAT_BIT | ((from as u64) << SEQ_BITS)
}

fn fail(what: &str, s: ffi::ucs_status_t) -> CommError {
    CommError::Config(format!("ucx: {what} failed: {}", ffi::status_text(s)))
}

/// What a failed status means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Try again: resources are short for now.
    Transient,
    /// The peer or the link to it is gone.
    PeerGone,
    /// Anything else: retrying would fail the same way.
    Permanent,
}

fn classify(s: ffi::ucs_status_t) -> Class {
    match s {
        ffi::UCS_INPROGRESS
        | ffi::UCS_ERR_NO_RESOURCE
        | ffi::UCS_ERR_BUSY
        | ffi::UCS_ERR_NO_PROGRESS => Class::Transient,
        ffi::UCS_ERR_UNREACHABLE
        | ffi::UCS_ERR_CANCELED
        | ffi::UCS_ERR_NOT_CONNECTED
        | ffi::UCS_ERR_CONNECTION_RESET => Class::PeerGone,
        // UCX's link and endpoint failure ranges (timeouts among them).
        s if (ffi::UCS_ERR_LAST_ENDPOINT_FAILURE..=ffi::UCS_ERR_FIRST_LINK_FAILURE)
            .contains(&s) =>
        {
            Class::PeerGone
        }
        _ => Class::Permanent,
    }
}

/// The UCP calls a pair makes whose failures are classified (and, in tests, injected).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Send,
    Recv,
    Register,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::Send => "ucp_tag_send_nbx",
            Call::Recv => "ucp_tag_msg_recv_nbx",
            Call::Register => "ucp_mem_map",
        }
    }
}

/// A UCP context (released once the worker and every registration are gone).
struct Context(ffi::ucp_context_h);

// SAFETY: a UCP context is thread safe for what is done with it here (memory registration,
// serialised by the group's engine mutex and the cache's mutex).
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: created by ucp_init in `UcxTransport::new`, released once.
        unsafe { ffi::ucp_cleanup(self.0) };
    }
}

/// A `ucp_mem_map` handle.
pub(crate) struct MemH(ffi::ucp_mem_h);

// SAFETY: a handle is an opaque pointer that UCP accepts from any thread.
unsafe impl Send for MemH {}
unsafe impl Sync for MemH {}

/// Registers memory with `ucp_mem_map`.
pub(crate) struct UcpMem(Arc<Context>);

impl Registrar for UcpMem {
    type Handle = MemH;
    type Error = ffi::ucs_status_t;

    fn register(&self, addr: usize, len: usize) -> std::result::Result<MemH, ffi::ucs_status_t> {
        // SAFETY: zeroed parameters with address and length named in field_mask; the caller keeps
        // the memory alive while it is registered (see `regcache`).
        unsafe {
            let mut p: ffi::ucp_mem_map_params_t = std::mem::zeroed();
            p.field_mask =
                ffi::UCP_MEM_MAP_PARAM_FIELD_ADDRESS | ffi::UCP_MEM_MAP_PARAM_FIELD_LENGTH;
            p.address = addr as *mut c_void;
            p.length = len;
            let mut memh = std::ptr::null_mut();
            match ffi::ucp_mem_map(self.0 .0, &p, &mut memh) {
                ffi::UCS_OK => Ok(MemH(memh)),
                s => Err(s),
            }
        }
    }

    fn unregister(&self, handle: &MemH) {
        // SAFETY: a handle from ucp_mem_map on this context, unmapped once (regcache's contract).
        let s = unsafe { ffi::ucp_mem_unmap(self.0 .0, handle.0) };
        if s != ffi::UCS_OK {
            tracing::warn!("ucx: ucp_mem_unmap failed: {}", ffi::status_text(s));
        }
    }
}

type Reg = Arc<Registration<UcpMem>>;

/// What the pairs of one group share: the worker, the registration cache, the retry count.
struct Shared {
    worker: ffi::ucp_worker_h,
    cache: Mutex<RegCache<UcpMem>>,
    retries: AtomicU64,
    /// Failures tests inject into the next matching call, instead of calling UCX.
    #[cfg(test)]
    faults: Mutex<Vec<(Call, ffi::ucs_status_t)>>,
}

// SAFETY: the worker runs in UCS_THREAD_MODE_SERIALIZED and every use goes through the group's
// engine mutex, so it is never used by two threads at once.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Ok(cache) = self.cache.get_mut() {
            tracing::debug!(
                "ucx: registration cache {:?}, {} retried calls",
                cache.stats(),
                self.retries.load(Ordering::Relaxed)
            );
        }
        // SAFETY: created in `UcxTransport::new`; every endpoint was closed before (pairs hold an
        // Arc to this, so it drops last). The cache's registrations go after, while their
        // context still lives (each holds it).
        unsafe { ffi::ucp_worker_destroy(self.worker) };
    }
}

impl Shared {
    fn progress(&self) {
        for _ in 0..PROGRESS_ROUNDS {
            // SAFETY: the worker lives as long as `self`; serialised (see above).
            if unsafe { ffi::ucp_worker_progress(self.worker) } == 0 {
                break;
            }
        }
    }

    /// Makes `f`'s UCP call, unless a test injected a failure for `call`.
    fn attempt(
        &self,
        call: Call,
        f: &mut dyn FnMut() -> ffi::ucs_status_ptr_t,
    ) -> ffi::ucs_status_ptr_t {
        #[cfg(test)]
        {
            let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = faults.iter().position(|(c, _)| *c == call) {
                return ffi::status_ptr(faults.remove(i).1);
            }
        }
        let _ = call;
        f()
    }
}

/// UCX's rendezvous threshold where Shardline picks it: without an RDMA device, messages up to
/// 256 KiB go eagerly. There UCX's rendezvous runs over TCP (or shared memory) by exchanging
/// active messages, and its `auto` threshold switches at 8 KiB: an all-reduce of 8 KiB then took
/// about 39 us over UCX's tcp against 7 us eagerly, and 64 KiB 51 against 26 us (2 ranks on
/// loopback, docs/performance.md, "Collectives over UCX"). With an RDMA device (or with
/// `UCX_RNDV_THRESH` set), UCX's own choice stands: there the rendezvous reads the sender's
/// registered memory directly.
fn default_rndv_thresh() -> Option<&'static std::ffi::CStr> {
    let rdma = std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some());
    (std::env::var_os("UCX_RNDV_THRESH").is_none() && !rdma).then_some(c"262144")
}

/// The group's kept memory, registered in the worker's registration cache; sends from it find
/// the registration there (`Link::write`).
struct UcxRegistry(Arc<Shared>);

impl Registry for UcxRegistry {
    fn register(&self, mem: &[u8]) {
        let mut cache = self.0.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(s) = cache.get(mem.as_ptr() as usize, mem.len()) {
            tracing::debug!(
                "ucx: registering {} bytes of the group's scratch failed ({}); sends from it \
                 register as they go",
                mem.len(),
                ffi::status_text(s)
            );
        }
    }

    fn release(&self, mem: &[u8]) {
        let mut cache = self.0.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.invalidate(mem.as_ptr() as usize, mem.len());
    }
}

/// This rank's UCP worker before it is connected.
pub struct UcxTransport {
    shared: Arc<Shared>,
    address: String,
}

impl UcxTransport {
    /// Creates a UCP context (tag matching) and worker, reading UCX's own settings (`UCX_*`)
    /// from the environment; a failing UCP call is a [`CommError::Config`] naming it.
    pub fn new() -> Result<UcxTransport> {
        // SAFETY: plain UCP set-up calls with zero-initialised, correctly sized parameter structs.
        unsafe {
            let mut config = std::ptr::null_mut();
            let s = ffi::ucp_config_read(std::ptr::null(), std::ptr::null(), &mut config);
            if s != ffi::UCS_OK {
                return Err(fail("ucp_config_read", s));
            }
            if let Some(thresh) = default_rndv_thresh() {
                let s = ffi::ucp_config_modify(config, c"RNDV_THRESH".as_ptr(), thresh.as_ptr());
                if s != ffi::UCS_OK {
                    ffi::ucp_config_release(config);
                    return Err(fail("ucp_config_modify(RNDV_THRESH)", s));
                }
            }
            let mut params: ffi::ucp_params_t = std::mem::zeroed();
            params.field_mask = ffi::UCP_PARAM_FIELD_FEATURES;
            params.features = ffi::UCP_FEATURE_TAG;
            let mut context = std::ptr::null_mut();
            let s = ffi::ucp_init_version(
                ffi::UCP_API_MAJOR,
                ffi::UCP_API_MINOR,
                &params,
                config,
                &mut context,
            );
            ffi::ucp_config_release(config);
            if s != ffi::UCS_OK {
                return Err(fail("ucp_init", s));
            }
            let context = Arc::new(Context(context));
            let mut wp: ffi::ucp_worker_params_t = std::mem::zeroed();
            wp.field_mask = ffi::UCP_WORKER_PARAM_FIELD_THREAD_MODE;
            wp.thread_mode = ffi::UCS_THREAD_MODE_SERIALIZED;
            let mut worker = std::ptr::null_mut();
            let s = ffi::ucp_worker_create(context.0, &wp, &mut worker);
            if s != ffi::UCS_OK {
                return Err(fail("ucp_worker_create", s));
            }
            let shared = Arc::new(Shared {
                worker,
                cache: Mutex::new(RegCache::new(
                    Arc::new(UcpMem(context)),
                    CACHE_ENTRIES,
                    CACHE_BYTES,
                )),
                retries: AtomicU64::new(0),
                #[cfg(test)]
                faults: Mutex::new(Vec::new()),
            });
            let (mut addr, mut len) = (std::ptr::null_mut(), 0usize);
            let s = ffi::ucp_worker_get_address(worker, &mut addr, &mut len);
            if s != ffi::UCS_OK {
                return Err(fail("ucp_worker_get_address", s));
            }
            let bytes = std::slice::from_raw_parts(addr as *const u8, len);
            let address = bytes.iter().map(|b| format!("{b:02x}")).collect();
            ffi::ucp_worker_release_address(worker, addr);
            Ok(UcxTransport { shared, address })
        }
    }

    /// The worker address published in the table (hex).
    pub fn address(&self) -> String {
        self.address.clone()
    }

    /// How many UCP calls of this group failed for want of resources and were retried.
    pub fn retries(&self) -> u64 {
        self.shared.retries.load(Ordering::Relaxed)
    }
}

impl Transport for UcxTransport {
    fn name(&self) -> &'static str {
        "ucx"
    }

    fn registry(&self) -> Option<Arc<dyn Registry>> {
        Some(Arc::new(UcxRegistry(self.shared.clone())))
    }

    fn reaches(&self, _me: &Endpoint, peer: &Endpoint) -> bool {
        !peer.ucx.is_empty()
    }

    /// Creates an endpoint to every peer in `peers`.
    fn connect(&mut self, setup: &Setup, peers: &[usize]) -> Result<Vec<(usize, Box<dyn Pair>)>> {
        let (me, table) = (&setup.table[setup.me], setup.table);
        if table.len() > RANK_LIMIT {
            return Err(CommError::Config(format!(
                "ucx: a group of {} ranks does not fit the message tags (at most {RANK_LIMIT})",
                table.len()
            )));
        }
        let mut out: Vec<(usize, Box<dyn Pair>)> = Vec::new();
        for &p in peers {
            let ep = &table[p];
            let bad = |why: &str| {
                CommError::Bootstrap(format!("ucx address of rank {}: {why}", ep.world_rank))
            };
            if !ep.ucx.len().is_multiple_of(2) || ep.ucx.is_empty() {
                return Err(bad("not hex"));
            }
            let addr = (0..ep.ucx.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&ep.ucx[i..i + 2], 16))
                .collect::<std::result::Result<Vec<u8>, _>>()
                .map_err(|_| bad("not hex"))?;
            let failed = Box::new(AtomicBool::new(false));
            let same_host = ep.host == me.host;
            let handle = create_ep(&self.shared, &addr, &failed, same_host)
                .map_err(|s| fail(&format!("connecting to rank {}", ep.world_rank), s))?;
            let pid = same_host.then(|| PidWatch::new(ep.pid));
            let address = if ep.tcp.is_empty() {
                format!("{} (pid {})", ep.host, ep.pid)
            } else {
                format!("{} (pid {}, host {})", ep.tcp, ep.pid, ep.host)
            };
            out.push((
                p,
                Box::new(UcxPair {
                    shared: self.shared.clone(),
                    ep: handle,
                    me: setup.me,
                    from: p,
                    peer: ep.world_rank,
                    address,
                    failed,
                    pid,
                    sends: VecDeque::new(),
                    posted: 0,
                    ahead: 0,
                    send_seq: 0,
                    sent: 0,
                    beats_out: Vec::new(),
                    recvs: VecDeque::new(),
                    used: 0,
                    recv_seq: 0,
                    received: 0,
                    heard: 0,
                    beats_in: Vec::new(),
                    carry: [0; 8],
                    carry_len: 0,
                    small: Vec::new(),
                    big: Vec::new(),
                    _addr: addr,
                }),
            ));
        }
        Ok(out)
    }
}

unsafe extern "C" fn on_error(arg: *mut c_void, _ep: ffi::ucp_ep_h, _status: ffi::ucs_status_t) {
    // SAFETY: `arg` is the pair's boxed flag, alive until the endpoint is closed.
    (*(arg as *const AtomicBool)).store(true, Ordering::Release);
}

fn create_ep(
    shared: &Shared,
    addr: &[u8],
    failed: &AtomicBool,
    same_host: bool,
) -> std::result::Result<ffi::ucp_ep_h, ffi::ucs_status_t> {
    // A peer on this host is watched through its pidfd, so its endpoint asks for no peer error
    // handling: UCX's shared-memory transports lack it, and asking would push UCX onto TCP. A
    // remote peer asks for it where the fabric supports it.
    let modes: &[i32] = if same_host {
        &[ffi::UCP_ERR_HANDLING_MODE_NONE]
    } else {
        &[
            ffi::UCP_ERR_HANDLING_MODE_PEER,
            ffi::UCP_ERR_HANDLING_MODE_NONE,
        ]
    };
    let mut last = ffi::UCS_OK;
    for &mode in modes {
        // SAFETY: zeroed params with the fields named in field_mask set; `addr` outlives the call.
        unsafe {
            let mut ep_params: ffi::ucp_ep_params_t = std::mem::zeroed();
            ep_params.field_mask = ffi::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
                | ffi::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                | ffi::UCP_EP_PARAM_FIELD_ERR_HANDLER;
            ep_params.address = addr.as_ptr() as *const c_void;
            ep_params.err_mode = mode;
            ep_params.err_handler_cb = Some(on_error);
            ep_params.err_handler_arg = failed as *const AtomicBool as *mut c_void;
            let mut ep = std::ptr::null_mut();
            last = ffi::ucp_ep_create(shared.worker, &ep_params, &mut ep);
            if last == ffi::UCS_OK {
                return Ok(ep);
            }
        }
    }
    Err(last)
}

/// A posted send: from the caller's memory (`copy` none: reported once complete) or from a
/// buffer of the pair's pool (reported at once).
struct Outbound {
    /// The request, null once complete.
    req: *mut c_void,
    len: usize,
    copy: Option<Box<[u8]>>,
    /// Keeps the registration of `copy` while UCX may use it.
    reg: Option<Reg>,
    reported: bool,
}

/// A posted receive of a probed message into a buffer of the pair's pool.
struct Recv {
    /// The request, null once complete.
    req: *mut c_void,
    len: usize,
    buf: Box<[u8]>,
    reg: Option<Reg>,
}

/// One peer over UCX.
pub struct UcxPair {
    shared: Arc<Shared>,
    /// Null once closed.
    ep: ffi::ucp_ep_h,
    /// This rank's and the peer's group ranks (the tags of what each sends).
    me: usize,
    from: usize,
    /// The peer's world rank and where it is, for errors.
    peer: usize,
    address: String,
    failed: Box<AtomicBool>,
    pid: Option<PidWatch>,
    /// Posted sends in stream order, until complete and reported.
    sends: VecDeque<Outbound>,
    /// Bytes of `sends`.
    posted: usize,
    /// Bytes posted but not yet reported to the caller: the front of what it passes next.
    ahead: usize,
    send_seq: u64,
    /// Bytes and heartbeats posted so far.
    sent: u64,
    beats_out: Vec<*mut c_void>,
    /// Posted receives in stream order; the front is being consumed (`used` bytes so far).
    recvs: VecDeque<Recv>,
    used: usize,
    recv_seq: u64,
    /// Messages taken from the peer so far, and how many of them `heard` has seen.
    received: u64,
    heard: u64,
    beats_in: Vec<*mut c_void>,
    /// Bytes of an element split across two messages.
    carry: [u8; 8],
    carry_len: usize,
    /// Spare buffers: `GATHER_MAX` bytes (never registered) and `MSG_MAX` bytes (registered
    /// while cached).
    small: Vec<Box<[u8]>>,
    big: Vec<Box<[u8]>>,
    _addr: Vec<u8>,
}

// SAFETY: see `Shared`; the raw pointers belong to this pair's endpoint and requests and are used
// under the engine mutex only.
unsafe impl Send for UcxPair {}

/// Frees a request once UCX is done with it; its status, or `UCS_INPROGRESS` (kept).
fn settle(req: &mut *mut c_void) -> ffi::ucs_status_t {
    if req.is_null() {
        return ffi::UCS_OK;
    }
    // SAFETY: a live request returned by a UCP `_nbx` call, freed exactly once (then nulled).
    unsafe {
        let s = ffi::ucp_request_check_status(*req);
        if s != ffi::UCS_INPROGRESS {
            ffi::ucp_request_free(*req);
            *req = std::ptr::null_mut();
        }
        s
    }
}

impl UcxPair {
    fn broken(&self, what: &str, s: ffi::ucs_status_t) -> CommError {
        let detail = format!("ucx {what} failed: {}", ffi::status_text(s));
        if classify(s) == Class::PeerGone || self.failed.load(Ordering::Acquire) {
            CommError::PeerLost {
                rank: self.peer,
                detail: format!("{detail} (rank {} at {})", self.peer, self.address),
            }
        } else {
            CommError::Transport {
                rank: self.peer,
                address: self.address.clone(),
                detail,
            }
        }
    }

    fn usable(&self) -> Result<()> {
        if self.ep.is_null() {
            return Err(CommError::Poisoned(format!(
                "the ucx endpoint to rank {} was closed after an error",
                self.peer
            )));
        }
        Ok(())
    }

    /// Makes a UCP call through `f`: a transient failure is counted, logged and retried once
    /// after a short pause; any other failure, or a second one, fails naming the peer.
    fn post(
        &self,
        call: Call,
        mut f: impl FnMut() -> ffi::ucs_status_ptr_t,
    ) -> Result<*mut c_void> {
        let first = self.shared.attempt(call, &mut f);
        if !ffi::is_err(first) {
            return Ok(first);
        }
        let s = ffi::ptr_status(first);
        if classify(s) != Class::Transient {
            return Err(self.broken(call.name(), s));
        }
        let n = self.shared.retries.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(
            "ucx: {} for rank {} at {}: {}; retrying once ({n} retries in this group)",
            call.name(),
            self.peer,
            self.address,
            ffi::status_text(s)
        );
        let until = Instant::now() + RETRY_PAUSE;
        while Instant::now() < until {
            self.shared.progress();
        }
        let again = self.shared.attempt(call, &mut f);
        if ffi::is_err(again) {
            return Err(self.broken(call.name(), ffi::ptr_status(again)));
        }
        Ok(again)
    }

    /// The cached registration of a pool buffer (registered now if it is not cached).
    fn register(&self, buf: &[u8]) -> Result<Reg> {
        let (addr, len) = (buf.as_ptr() as usize, buf.len());
        let mut reg = None;
        self.post(Call::Register, || {
            let mut cache = self.shared.cache.lock().unwrap_or_else(|e| e.into_inner());
            match cache.get(addr, len) {
                Ok(r) => {
                    reg = Some(r);
                    std::ptr::null_mut()
                }
                Err(s) => ffi::status_ptr(s),
            }
        })?;
        reg.ok_or_else(|| self.broken(Call::Register.name(), ffi::UCS_ERR_NO_RESOURCE))
    }

    /// A pool buffer for `len` bytes (at most `MSG_MAX`) and, for a large one, its registration.
    fn buffer(&mut self, len: usize) -> Result<(Box<[u8]>, Option<Reg>)> {
        if len <= GATHER_MAX {
            let buf = self
                .small
                .pop()
                .unwrap_or_else(|| vec![0u8; GATHER_MAX].into_boxed_slice());
            return Ok((buf, None));
        }
        let buf = self
            .big
            .pop()
            .unwrap_or_else(|| vec![0u8; MSG_MAX].into_boxed_slice());
        match self.register(&buf) {
            Ok(reg) => Ok((buf, Some(reg))),
            Err(e) => {
                self.free_big(buf);
                Err(e)
            }
        }
    }

    fn recycle(&mut self, buf: Box<[u8]>) {
        if buf.len() == GATHER_MAX {
            if self.small.len() < SPARE_SMALL {
                self.small.push(buf);
            }
        } else if self.big.len() < SPARE_BIG {
            self.big.push(buf);
        } else {
            self.free_big(buf);
        }
    }

    /// Frees a large buffer: its registration goes first, so that memory allocated later at the
    /// same address is registered anew.
    fn free_big(&self, buf: Box<[u8]>) {
        let mut cache = self.shared.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.invalidate(buf.as_ptr() as usize, buf.len());
        drop(buf);
    }

    /// Checks the posted sends and drops those complete and reported.
    fn reap_sends(&mut self) -> Result<()> {
        for i in 0..self.sends.len() {
            let s = settle(&mut self.sends[i].req);
            if s == ffi::UCS_INPROGRESS {
                continue;
            }
            self.sends[i].reg = None;
            if s != ffi::UCS_OK {
                return Err(self.broken("send", s));
            }
        }
        while self
            .sends
            .front()
            .is_some_and(|s| s.req.is_null() && s.reported)
        {
            let s = self.sends.pop_front().expect("front exists");
            self.posted -= s.len;
            if let Some(buf) = s.copy {
                self.recycle(buf);
            }
        }
        self.beats_out
            .retain_mut(|r| settle(r) == ffi::UCS_INPROGRESS);
        Ok(())
    }

    /// Posts one message of `len` bytes at `ptr` (from `copy` when it is a pool buffer).
    fn post_send(
        &mut self,
        ptr: *const u8,
        len: usize,
        copy: Option<Box<[u8]>>,
        reg: Option<Reg>,
    ) -> Result<()> {
        let (ep, tag) = (self.ep, data_tag(self.me, self.send_seq));
        let memh = reg.as_ref().map(|r| r.handle().0);
        let req = self.post(Call::Send, || {
            // SAFETY: zeroed parameters (contiguous bytes, no callback) plus the memory handle
            // when there is one; `ptr[..len]` stays valid and unchanged until the request
            // completes: a pool buffer lives in `sends` until then, and the caller's memory is
            // not reported written (so it keeps it) until then.
            unsafe {
                let mut param: ffi::ucp_request_param_t = std::mem::zeroed();
                if let Some(memh) = memh {
                    param.op_attr_mask |= ffi::UCP_OP_ATTR_FIELD_MEMH;
                    param.memh = memh;
                }
                ffi::ucp_tag_send_nbx(ep, ptr as *const c_void, len, tag, &param)
            }
        })?;
        self.send_seq += 1;
        self.posted += len;
        self.sent += len as u64;
        self.sends.push_back(Outbound {
            req,
            len,
            reg: if req.is_null() { None } else { reg },
            copy,
            reported: false,
        });
        Ok(())
    }

    /// `try_write`, copying everything it takes when `copy_all`.
    fn write(&mut self, parts: &[&[u8]], copy_all: bool) -> Result<usize> {
        self.usable()?;
        self.shared.progress();
        self.reap_sends()?;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        // The first `ahead` bytes of `parts` are posted already.
        let mut off = self.ahead;
        while off < total && self.posted < SEND_BUDGET {
            let (mut i, mut at) = (0, off);
            while at >= parts[i].len() {
                at -= parts[i].len();
                i += 1;
            }
            let rest = parts[i].len() - at;
            if !copy_all && rest > GATHER_MAX {
                let n = rest.min(MSG_MAX);
                let ptr = parts[i][at..].as_ptr();
                // Memory the group registered (its scratch) goes with its registration; other
                // memory UCX registers itself, in its own cache, which sees the memory freed.
                let reg = (self.shared.cache.lock().unwrap_or_else(|e| e.into_inner()))
                    .find(ptr as usize, n);
                self.post_send(ptr, n, None, reg)?;
                off += n;
                continue;
            }
            // Gather small pieces (or, with `copy_all`, anything) into a pool buffer, up to a
            // piece that goes zero-copy.
            let limit = if copy_all {
                MSG_MAX.min(SEND_BUDGET - self.posted)
            } else {
                GATHER_MAX
            };
            let mut n = 0;
            let (mut j, mut start) = (i, at);
            while j < parts.len() && n < limit {
                let avail = parts[j].len() - start;
                if !copy_all && avail > GATHER_MAX && n > 0 {
                    break;
                }
                n += avail.min(limit - n);
                j += 1;
                start = 0;
            }
            let (mut buf, reg) = self.buffer(n)?;
            let mut filled = 0;
            let (mut j, mut start) = (i, at);
            while filled < n {
                let take = (parts[j].len() - start).min(n - filled);
                buf[filled..filled + take].copy_from_slice(&parts[j][start..start + take]);
                filled += take;
                j += 1;
                start = 0;
            }
            let ptr = buf.as_ptr();
            self.post_send(ptr, n, Some(buf), reg)?;
            off += n;
        }
        // Report the prefix whose memory UCX no longer reads from `parts`.
        let mut done = 0;
        for s in self.sends.iter_mut().filter(|s| !s.reported) {
            if s.copy.is_none() && !s.req.is_null() {
                break;
            }
            s.reported = true;
            done += s.len;
        }
        self.ahead = off - done;
        self.reap_sends()?;
        Ok(done)
    }

    /// Posts receives for the messages that have arrived, up to `RECV_DEPTH`.
    fn post_recvs(&mut self) -> Result<()> {
        while self.recvs.len() < RECV_DEPTH {
            // SAFETY: zeroed info is filled in by UCX when a message matches.
            let mut info: ffi::ucp_tag_recv_info_t = unsafe { std::mem::zeroed() };
            let tag = data_tag(self.from, self.recv_seq);
            // SAFETY: a live worker; `remove` takes the message off the unexpected queue, so
            // it is received below or the group fails.
            let msg =
                unsafe { ffi::ucp_tag_probe_nb(self.shared.worker, tag, FULL_MASK, 1, &mut info) };
            if msg.is_null() {
                return Ok(());
            }
            self.received += 1;
            let len = info.length;
            if len > MSG_MAX {
                return Err(CommError::Protocol {
                    rank: self.peer,
                    detail: format!(
                        "a ucx message of {len} bytes, more than the {MSG_MAX} a peer sends"
                    ),
                });
            }
            let (mut buf, reg) = self.buffer(len)?;
            let (worker, ptr) = (self.shared.worker, buf.as_mut_ptr());
            let memh = reg.as_ref().map(|r| r.handle().0);
            let req = self.post(Call::Recv, || {
                // SAFETY: `ptr[..len]` lies in `buf` (len <= its size), which stays in `recvs`
                // until the request completes or is cancelled; `msg` is the probed message.
                unsafe {
                    let mut param: ffi::ucp_request_param_t = std::mem::zeroed();
                    if let Some(memh) = memh {
                        param.op_attr_mask |= ffi::UCP_OP_ATTR_FIELD_MEMH;
                        param.memh = memh;
                    }
                    ffi::ucp_tag_msg_recv_nbx(worker, ptr as *mut c_void, len, msg, &param)
                }
            })?;
            self.recv_seq += 1;
            self.recvs.push_back(Recv {
                req,
                len,
                buf,
                reg: if req.is_null() { None } else { reg },
            });
        }
        Ok(())
    }

    /// The received message being consumed and how much of it is used, once it is complete.
    fn current(&mut self) -> Result<Option<(*const u8, usize, usize)>> {
        loop {
            let Some(front) = self.recvs.front_mut() else {
                return Ok(None);
            };
            let s = settle(&mut front.req);
            if s == ffi::UCS_INPROGRESS {
                return Ok(None);
            }
            front.reg = None;
            if s != ffi::UCS_OK {
                return Err(self.broken("receive", s));
            }
            if self.used < front.len {
                return Ok(Some((front.buf.as_ptr(), front.len, self.used)));
            }
            self.pop_recv();
        }
    }

    fn pop_recv(&mut self) {
        if let Some(r) = self.recvs.pop_front() {
            self.recycle(r.buf);
        }
        self.used = 0;
    }

    fn advance(&mut self, n: usize) {
        self.used += n;
        if self.recvs.front().is_some_and(|r| self.used == r.len) {
            self.pop_recv();
        }
    }

    /// Cancels every transfer of the pair, closes the endpoint (forcibly: the peer may be gone),
    /// and waits, bounded, for UCX to let go of every buffer. A buffer UCX
    /// still holds then is leaked rather than freed under it.
    fn close(&mut self) {
        if self.ep.is_null() {
            return;
        }
        let deadline = Instant::now() + DRAIN;
        // SAFETY: live requests of this pair are cancelled (each then completes, cancelled or
        // not, and is freed below); a live endpoint is closed once (then nulled), its close
        // request waited for, bounded, and freed.
        unsafe {
            // Sends first: a forced close alone leaves a rendezvous send in flight.
            for s in self.sends.iter().filter(|s| !s.req.is_null()) {
                ffi::ucp_request_cancel(self.shared.worker, s.req);
            }
            for &r in &self.beats_out {
                ffi::ucp_request_cancel(self.shared.worker, r);
            }
            let mut param: ffi::ucp_request_param_t = std::mem::zeroed();
            param.op_attr_mask = ffi::UCP_OP_ATTR_FIELD_FLAGS;
            param.flags = ffi::UCP_EP_CLOSE_FLAG_FORCE;
            let mut req = ffi::ucp_ep_close_nbx(self.ep, &param);
            self.ep = std::ptr::null_mut();
            if !req.is_null() && !ffi::is_err(req) {
                while settle(&mut req) == ffi::UCS_INPROGRESS && Instant::now() < deadline {
                    self.shared.progress();
                }
            }
            for r in self.recvs.iter().filter(|r| !r.req.is_null()) {
                ffi::ucp_request_cancel(self.shared.worker, r.req);
            }
            for &r in &self.beats_in {
                ffi::ucp_request_cancel(self.shared.worker, r);
            }
        }
        loop {
            self.shared.progress();
            let mut pending = false;
            for s in self.sends.iter_mut() {
                pending |= settle(&mut s.req) == ffi::UCS_INPROGRESS;
            }
            for r in self.recvs.iter_mut() {
                pending |= settle(&mut r.req) == ffi::UCS_INPROGRESS;
            }
            self.beats_out
                .retain_mut(|r| settle(r) == ffi::UCS_INPROGRESS);
            self.beats_in
                .retain_mut(|r| settle(r) == ffi::UCS_INPROGRESS);
            pending |= !self.beats_out.is_empty() || !self.beats_in.is_empty();
            if !pending || Instant::now() >= deadline {
                break;
            }
        }
        let stuck = self
            .sends
            .iter()
            .filter(|s| s.copy.is_none() && !s.req.is_null())
            .count();
        if stuck > 0 {
            // UCX (1.13) cannot cancel a rendezvous send its receiver has not taken; it stays
            // with the worker until the peer takes it or the worker is destroyed.
            tracing::warn!(
                "ucx: {stuck} sends to rank {} could not be cancelled within {DRAIN:?}",
                self.peer
            );
        }
        for s in std::mem::take(&mut self.sends) {
            match s.copy {
                Some(buf) if !s.req.is_null() => std::mem::forget(buf),
                Some(buf) => self.recycle(buf),
                None => {}
            }
        }
        for r in std::mem::take(&mut self.recvs) {
            if r.req.is_null() {
                self.recycle(r.buf);
            } else {
                std::mem::forget(r.buf);
            }
        }
        (self.posted, self.ahead, self.used) = (0, 0, 0);
    }
}

impl Pair for UcxPair {
    fn try_write(&mut self, parts: &[&[u8]]) -> Result<usize> {
        self.write(parts, false)
    }

    fn try_write_copy(&mut self, parts: &[&[u8]]) -> Result<usize> {
        self.write(parts, true)
    }

    fn try_read_with(
        &mut self,
        max: usize,
        align: usize,
        consume: &mut dyn FnMut(&[u8]),
    ) -> Result<usize> {
        self.usable()?;
        self.shared.progress();
        self.post_recvs()?;
        let align = align.min(max).max(1);
        // An element split across messages is completed in `carry` first.
        if self.carry_len > 0 {
            while self.carry_len < align {
                let Some((ptr, len, used)) = self.current()? else {
                    return Ok(0);
                };
                let take = (align - self.carry_len).min(len - used);
                // SAFETY: `ptr[used..used + take]` lies within the received message.
                let src = unsafe { std::slice::from_raw_parts(ptr.add(used), take) };
                self.carry[self.carry_len..self.carry_len + take].copy_from_slice(src);
                self.carry_len += take;
                self.advance(take);
            }
            consume(&self.carry[..align]);
            self.carry_len = 0;
            return Ok(align);
        }
        let Some((ptr, len, used)) = self.current()? else {
            return Ok(0);
        };
        let avail = (len - used).min(max);
        let n = if avail == max {
            avail
        } else {
            avail - avail % align
        };
        if n == 0 {
            // Less than one element left in this message: keep it for the next one.
            // SAFETY: as above.
            let src = unsafe { std::slice::from_raw_parts(ptr.add(used), avail) };
            self.carry[..avail].copy_from_slice(src);
            self.carry_len = avail;
            self.advance(avail);
            return Ok(0);
        }
        // SAFETY: as above.
        consume(unsafe { std::slice::from_raw_parts(ptr.add(used), n) });
        self.advance(n);
        Ok(n)
    }

    fn check_alive(&mut self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(CommError::PeerLost {
                rank: self.peer,
                detail: format!(
                    "ucx: endpoint error (peer unreachable) (rank {} at {})",
                    self.peer, self.address
                ),
            });
        }
        if let Some(w) = &self.pid {
            if !w.alive() {
                return Err(CommError::PeerLost {
                    rank: self.peer,
                    detail: format!("ucx: process {} exited", w.pid()),
                });
            }
        }
        Ok(())
    }

    fn sent(&self) -> u64 {
        self.sent
    }

    /// An empty message under the heartbeat tag; one at a time.
    fn beat(&mut self, _between_frames: bool) -> Result<bool> {
        self.usable()?;
        self.beats_out
            .retain_mut(|r| settle(r) == ffi::UCS_INPROGRESS);
        if !self.beats_out.is_empty() {
            return Ok(true);
        }
        let (ep, tag) = (self.ep, beat_tag(self.me));
        let req = self.post(Call::Send, || {
            // SAFETY: an empty message from no buffer; zeroed parameters.
            unsafe {
                let param: ffi::ucp_request_param_t = std::mem::zeroed();
                ffi::ucp_tag_send_nbx(ep, std::ptr::null(), 0, tag, &param)
            }
        })?;
        if !req.is_null() {
            self.beats_out.push(req);
        }
        self.sent += 1;
        Ok(true)
    }

    /// Heartbeats taken off (they travel apart from the data, so any time is between frames),
    /// messages taken since the last call, or a message waiting to be taken.
    fn heard(&mut self, _between_frames: bool) -> Result<bool> {
        self.usable()?;
        self.shared.progress();
        let mut life = self.received != self.heard;
        self.heard = self.received;
        for r in self.beats_in.iter_mut() {
            match settle(r) {
                ffi::UCS_OK | ffi::UCS_INPROGRESS => {}
                s => return Err(self.broken("heartbeat receive", s)),
            }
        }
        self.beats_in.retain(|r| !r.is_null());
        let worker = self.shared.worker;
        loop {
            // SAFETY: zeroed info, filled in by UCX on a match.
            let mut info: ffi::ucp_tag_recv_info_t = unsafe { std::mem::zeroed() };
            // SAFETY: a live worker; a removed message is received just below.
            let msg = unsafe {
                ffi::ucp_tag_probe_nb(worker, beat_tag(self.from), FULL_MASK, 1, &mut info)
            };
            if msg.is_null() {
                break;
            }
            life = true;
            // A heartbeat is empty: received into no buffer (a longer one completes truncated,
            // which fails the group as the protocol error it is).
            let req = self.post(Call::Recv, || {
                // SAFETY: zero bytes into a dangling, never dereferenced pointer.
                unsafe {
                    let param: ffi::ucp_request_param_t = std::mem::zeroed();
                    ffi::ucp_tag_msg_recv_nbx(
                        worker,
                        std::ptr::NonNull::<u8>::dangling().as_ptr() as *mut c_void,
                        0,
                        msg,
                        &param,
                    )
                }
            })?;
            if !req.is_null() {
                self.beats_in.push(req);
            }
        }
        if !life {
            // SAFETY: zeroed info, filled in by UCX on a match.
            let mut info: ffi::ucp_tag_recv_info_t = unsafe { std::mem::zeroed() };
            // SAFETY: a probe that leaves the message where it is.
            let waiting = unsafe {
                ffi::ucp_tag_probe_nb(
                    worker,
                    data_tag(self.from, self.recv_seq),
                    FULL_MASK,
                    0,
                    &mut info,
                )
            };
            life = !waiting.is_null() || self.recvs.front().is_some_and(|r| r.req.is_null());
        }
        Ok(life)
    }

    fn abort(&mut self) {
        self.close();
    }
}

impl Drop for UcxPair {
    fn drop(&mut self) {
        // Sends still in flight (the last frames of a finished job) finish first, bounded.
        let deadline = Instant::now() + DRAIN;
        while !self.ep.is_null()
            && self.sends.iter().any(|s| !s.req.is_null())
            && Instant::now() < deadline
            && !self.failed.load(Ordering::Acquire)
        {
            self.shared.progress();
            if self.reap_sends().is_err() {
                break;
            }
        }
        self.close();
        for buf in std::mem::take(&mut self.big) {
            self.free_big(buf);
        }
    }
}
