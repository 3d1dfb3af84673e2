//! UCX transport (cargo feature `ucx`): one UCP worker per group and one UCP endpoint per peer,
//! using UCP's ordered stream API, so that UCX picks the fabric (RDMA where there is one, else its
//! own shared memory or TCP). Sends are staged in recycled buffers owned by the pair, because UCX
//! may still read a send buffer after the exchange that posted it has returned; received data is
//! consumed in place from UCX's buffers. A peer's death shows through UCX's error handler and, for
//! peers on this host, through a pidfd (UCX's keepalive alone takes far longer than 2 s).

mod ffi;

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::liveness::PidWatch;
use super::{Endpoint, Pair, Setup, Transport};
use crate::error::{CommError, Result};

/// Bytes a pair may have in flight in staged sends.
const SEND_BUDGET: usize = 4 << 20;
/// Largest single staged send.
const SEND_CHUNK: usize = 1 << 20;

fn fail(what: &str, s: ffi::ucs_status_t) -> CommError {
    CommError::Config(format!("ucx: {what} failed: {}", ffi::status_text(s)))
}

/// A UCP context and worker (shared by the pairs of one group).
struct Worker {
    context: ffi::ucp_context_h,
    worker: ffi::ucp_worker_h,
}

// SAFETY: the worker runs in UCS_THREAD_MODE_SERIALIZED and every use goes through the group's
// engine mutex, so it is never used by two threads at once.
unsafe impl Send for Worker {}
unsafe impl Sync for Worker {}

impl Drop for Worker {
    fn drop(&mut self) {
        // SAFETY: created in `UcxTransport::new`; every endpoint was closed before (pairs hold an
        // Arc to the worker, so it drops last).
        unsafe {
            ffi::ucp_worker_destroy(self.worker);
            ffi::ucp_cleanup(self.context);
        }
    }
}

/// This rank's UCP worker before it is connected.
pub struct UcxTransport {
    worker: Arc<Worker>,
    address: String,
}

impl UcxTransport {
    /// Creates a UCP context and worker with the stream feature, reading UCX's own settings
    /// (`UCX_*`) from the environment; a failing UCP call is a [`CommError::Config`] naming it.
    pub fn new() -> Result<UcxTransport> {
        // SAFETY: plain UCP set-up calls with zero-initialised, correctly sized parameter structs.
        unsafe {
            let mut config = std::ptr::null_mut();
            let s = ffi::ucp_config_read(std::ptr::null(), std::ptr::null(), &mut config);
            if s != ffi::UCS_OK {
                return Err(fail("ucp_config_read", s));
            }
            let mut params: ffi::ucp_params_t = std::mem::zeroed();
            params.field_mask = ffi::UCP_PARAM_FIELD_FEATURES;
            params.features = ffi::UCP_FEATURE_STREAM;
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
            let mut wp: ffi::ucp_worker_params_t = std::mem::zeroed();
            wp.field_mask = ffi::UCP_WORKER_PARAM_FIELD_THREAD_MODE;
            wp.thread_mode = ffi::UCS_THREAD_MODE_SERIALIZED;
            let mut worker = std::ptr::null_mut();
            let s = ffi::ucp_worker_create(context, &wp, &mut worker);
            if s != ffi::UCS_OK {
                ffi::ucp_cleanup(context);
                return Err(fail("ucp_worker_create", s));
            }
            let worker = Arc::new(Worker { context, worker });
            let (mut addr, mut len) = (std::ptr::null_mut(), 0usize);
            let s = ffi::ucp_worker_get_address(worker.worker, &mut addr, &mut len);
            if s != ffi::UCS_OK {
                return Err(fail("ucp_worker_get_address", s));
            }
            let bytes = std::slice::from_raw_parts(addr as *const u8, len);
            let address = bytes.iter().map(|b| format!("{b:02x}")).collect();
            ffi::ucp_worker_release_address(worker.worker, addr);
            Ok(UcxTransport { worker, address })
        }
    }

    /// The worker address published in the table (hex).
    pub fn address(&self) -> String {
        self.address.clone()
    }
}

impl Transport for UcxTransport {
    fn name(&self) -> &'static str {
        "ucx"
    }

    fn reaches(&self, _me: &Endpoint, peer: &Endpoint) -> bool {
        !peer.ucx.is_empty()
    }

    /// Creates an endpoint to every peer in `peers`.
    fn connect(&mut self, setup: &Setup, peers: &[usize]) -> Result<Vec<(usize, Box<dyn Pair>)>> {
        let (me, table) = (&setup.table[setup.me], setup.table);
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
            let handle = create_ep(&self.worker, &addr, &failed, same_host)
                .map_err(|s| fail(&format!("connecting to rank {}", ep.world_rank), s))?;
            let pid = same_host.then(|| PidWatch::new(ep.pid));
            out.push((
                p,
                Box::new(UcxPair {
                    worker: self.worker.clone(),
                    ep: handle,
                    peer: ep.world_rank,
                    failed,
                    pid,
                    inflight: VecDeque::new(),
                    inflight_bytes: 0,
                    spare: Vec::new(),
                    rx: None,
                    carry: [0; 8],
                    carry_len: 0,
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
    worker: &Worker,
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
            last = ffi::ucp_ep_create(worker.worker, &ep_params, &mut ep);
            if last == ffi::UCS_OK {
                return Ok(ep);
            }
        }
    }
    Err(last)
}

/// One peer over UCX.
pub struct UcxPair {
    worker: Arc<Worker>,
    ep: ffi::ucp_ep_h,
    peer: usize,
    failed: Box<AtomicBool>,
    pid: Option<PidWatch>,
    /// Posted sends not known to be complete, with their staging buffers.
    inflight: VecDeque<(*mut c_void, Vec<u8>)>,
    inflight_bytes: usize,
    spare: Vec<Vec<u8>>,
    /// Received data being consumed: (pointer, length, consumed so far).
    rx: Option<(*mut u8, usize, usize)>,
    /// Bytes of an element split across two received chunks.
    carry: [u8; 8],
    carry_len: usize,
    _addr: Vec<u8>,
}

// SAFETY: see `Worker`; the raw pointers belong to this pair's endpoint and are used under the
// engine mutex only.
unsafe impl Send for UcxPair {}

impl UcxPair {
    fn lost(&self, detail: String) -> CommError {
        CommError::PeerLost {
            rank: self.peer,
            detail: format!("ucx: {detail}"),
        }
    }

    /// Frees completed sends (in order) and recycles their buffers.
    fn reap(&mut self) -> Result<()> {
        while let Some(&(req, _)) = self.inflight.front() {
            // SAFETY: `req` is a live request returned by ucp_stream_send_nbx.
            let s = unsafe { ffi::ucp_request_check_status(req) };
            if s == ffi::UCS_INPROGRESS {
                break;
            }
            let (req, buf) = self.inflight.pop_front().expect("front exists");
            // SAFETY: completed requests are freed exactly once.
            unsafe { ffi::ucp_request_free(req) };
            self.inflight_bytes -= buf.len();
            self.spare.push(buf);
            if s != ffi::UCS_OK {
                return Err(self.lost(format!("send failed: {}", ffi::status_text(s))));
            }
        }
        Ok(())
    }

    /// Next received chunk, if UCX has one.
    fn next_chunk(&mut self) -> Result<Option<(*mut u8, usize)>> {
        let mut len = 0usize;
        // SAFETY: a live endpoint; UCX returns NULL, an error code or data of `len` bytes.
        let p = unsafe { ffi::ucp_stream_recv_data_nb(self.ep, &mut len) };
        if p.is_null() {
            return Ok(None);
        }
        if ffi::is_err(p) {
            return Err(self.lost(format!(
                "receive failed: {}",
                ffi::status_text(p as isize as i32)
            )));
        }
        Ok(Some((p as *mut u8, len)))
    }

    fn release(&mut self, data: *mut u8) {
        // SAFETY: `data` came from ucp_stream_recv_data_nb on this endpoint and is released once.
        unsafe { ffi::ucp_stream_data_release(self.ep, data as *mut c_void) };
    }
}

impl Pair for UcxPair {
    fn try_write(&mut self, parts: &[&[u8]]) -> Result<usize> {
        // SAFETY: progress on the worker this pair belongs to.
        unsafe { ffi::ucp_worker_progress(self.worker.worker) };
        self.reap()?;
        let want: usize = parts.iter().map(|p| p.len()).sum();
        let n = want.min(SEND_CHUNK).min(SEND_BUDGET - self.inflight_bytes);
        if n == 0 {
            return Ok(0);
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        for p in parts {
            let take = p.len().min(n - buf.len());
            buf.extend_from_slice(&p[..take]);
        }
        // SAFETY: zeroed params (contiguous bytes, no callback); `buf` stays alive in `inflight`
        // until UCX reports the send complete.
        let req = unsafe {
            let param: ffi::ucp_request_param_t = std::mem::zeroed();
            ffi::ucp_stream_send_nbx(self.ep, buf.as_ptr() as *const c_void, buf.len(), &param)
        };
        if ffi::is_err(req) {
            return Err(self.lost(format!(
                "send failed: {}",
                ffi::status_text(req as isize as i32)
            )));
        }
        if req.is_null() {
            self.spare.push(buf); // completed at once
        } else {
            self.inflight_bytes += buf.len();
            self.inflight.push_back((req, buf));
        }
        Ok(n)
    }

    fn try_read_with(
        &mut self,
        max: usize,
        align: usize,
        consume: &mut dyn FnMut(&[u8]),
    ) -> Result<usize> {
        // SAFETY: progress on the worker this pair belongs to.
        unsafe { ffi::ucp_worker_progress(self.worker.worker) };
        let align = align.min(max).max(1);
        // An element split across chunks is completed in `carry` first.
        if self.carry_len > 0 {
            while self.carry_len < align {
                let Some((ptr, len, used)) = self.current()? else {
                    return Ok(0);
                };
                let take = (align - self.carry_len).min(len - used);
                // SAFETY: `ptr[used..used + take]` lies within the received chunk.
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
            // Less than one element left in this chunk: keep it for the next one.
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
            return Err(self.lost("endpoint error (peer unreachable)".into()));
        }
        if let Some(w) = &self.pid {
            if !w.alive() {
                return Err(self.lost(format!("process {} exited", w.pid())));
            }
        }
        Ok(())
    }
}

impl UcxPair {
    /// The chunk being consumed, fetching a new one when the last is used up.
    fn current(&mut self) -> Result<Option<(*mut u8, usize, usize)>> {
        if self.rx.is_none() {
            self.rx = self.next_chunk()?.map(|(p, l)| (p, l, 0));
        }
        Ok(self.rx)
    }

    fn advance(&mut self, n: usize) {
        if let Some((ptr, len, used)) = self.rx.as_mut() {
            *used += n;
            if *used == *len {
                let p = *ptr;
                self.rx = None;
                self.release(p);
            }
        }
    }
}

impl Drop for UcxPair {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        while !self.inflight.is_empty()
            && Instant::now() < deadline
            && !self.failed.load(Ordering::Acquire)
        {
            // SAFETY: progress on our worker.
            unsafe { ffi::ucp_worker_progress(self.worker.worker) };
            if self.reap().is_err() {
                break;
            }
        }
        if let Some((ptr, _, _)) = self.rx.take() {
            self.release(ptr);
        }
        // SAFETY: close the endpoint (forcibly: the peer may be gone) and wait, bounded, for the
        // close to complete; requests still in flight are left to the worker's destruction.
        unsafe {
            let mut param: ffi::ucp_request_param_t = std::mem::zeroed();
            param.op_attr_mask = ffi::UCP_OP_ATTR_FIELD_FLAGS;
            param.flags = ffi::UCP_EP_CLOSE_FLAG_FORCE;
            let req = ffi::ucp_ep_close_nbx(self.ep, &param);
            if !req.is_null() && !ffi::is_err(req) {
                while ffi::ucp_request_check_status(req) == ffi::UCS_INPROGRESS
                    && Instant::now() < deadline + Duration::from_secs(1)
                {
                    ffi::ucp_worker_progress(self.worker.worker);
                }
                ffi::ucp_request_free(req);
            }
        }
    }
}
