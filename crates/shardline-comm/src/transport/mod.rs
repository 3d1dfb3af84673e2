//! Transports: each connects this rank to a set of peers and hands back one [`Pair`] per peer, a
//! non-blocking, ordered byte stream in both directions. The group and the collectives above only
//! ever see `Pair`s and never know which transport carries them (NCCL/gloo style).

pub(crate) mod accept;
pub(crate) mod liveness;
#[cfg(any(test, feature = "ucx"))]
pub(crate) mod regcache;
pub mod shm;
pub mod tcp;
#[cfg(feature = "ucx")]
pub mod ucx;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{CommError, Result};

/// A connection to one peer. Every call returns at once; the progress engine polls.
pub trait Pair: Send {
    /// Writes a prefix of the concatenation of `parts` (the rest of one frame, from its first byte
    /// not yet counted); returns how many bytes went out (0 when the peer's buffer is full).
    /// Counted bytes are no longer read from `parts`; bytes not yet counted may be (UCX sends
    /// large payloads from the caller's memory), so the caller keeps `parts` alive and unchanged
    /// until the frame is done or the pair is aborted.
    fn try_write(&mut self, parts: &[&[u8]]) -> Result<usize>;
    /// Like `try_write`, but reads nothing from `parts` once it returns: the caller may change
    /// them right after (the direct all-reduce reduces into the buffer it sends). Transports that
    /// copy whatever they take need not override it.
    fn try_write_copy(&mut self, parts: &[&[u8]]) -> Result<usize> {
        self.try_write(parts)
    }
    /// Hands `consume` up to `max` readable bytes, a multiple of `align` bytes unless fewer than
    /// `align` remain of `max`; returns how many bytes were consumed (0 when nothing is there).
    fn try_read_with(
        &mut self,
        max: usize,
        align: usize,
        consume: &mut dyn FnMut(&[u8]),
    ) -> Result<usize>;
    /// Fails with [`CommError::PeerLost`] when the peer process is gone.
    fn check_alive(&mut self) -> Result<()>;
    /// Bytes (and heartbeats) sent to the peer so far: while it stands still the link is quiet
    /// and gets a heartbeat. Transports without heartbeats keep 0.
    fn sent(&self) -> u64 {
        0
    }
    /// Tells the peer this rank lives, if the transport can now: shm bumps a counter beside the
    /// ring, tcp writes a heartbeat frame, which it may only do `between_frames` (no frame of
    /// this rank's to the peer is half sent). True when a heartbeat went (or is on its way).
    fn beat(&mut self, between_frames: bool) -> Result<bool> {
        let _ = between_frames;
        Ok(false)
    }
    /// Whether the peer showed life since the last call: anything received, a heartbeat, or
    /// data of its that waits to be read here (then the peer waits for this rank, not the other
    /// way round). `between_frames`: no frame from the peer is half read, so heartbeat frames at
    /// the front of what it sent may be dropped (an idle rank drops them so they do not pile
    /// up). Transports without heartbeats always answer true.
    fn heard(&mut self, between_frames: bool) -> Result<bool> {
        let _ = between_frames;
        Ok(true)
    }
    /// Stops whatever is in flight on this pair after a failed exchange, so that nothing reads
    /// or writes the caller's buffers any more; the pair is unusable afterwards. Transports that
    /// hold no reference to the caller's memory between calls need not override it.
    fn abort(&mut self) {}
}

/// What a transport needs to connect a group: this rank, everyone's endpoints, the job's token
/// and the group's nonce, and the deadline.
pub struct Setup<'a> {
    /// This rank's index into `table` (its rank in the group being connected).
    pub me: usize,
    /// Every rank's endpoint, indexed by group rank.
    pub table: &'a [Endpoint],
    /// The job's shared secret (`SHARDLINE_JOB_TOKEN`); a tcp hello with another one is refused.
    pub token: &'a str,
    /// Names this group: the job's nonce from the rendezvous, or one derived from it for a
    /// subgroup of `split`, so that connections meant for another job or group are refused.
    pub nonce: u64,
    /// When connecting must have finished; past it `connect` fails with a timeout.
    pub deadline: Instant,
    /// The liveness budget (`SHARDLINE_HEARTBEAT`; `None`: off). A peer that has not connected
    /// this long after this rank began to wait for it, or whose listener refuses connections
    /// this long, fails the connection naming it.
    pub silence: Option<Duration>,
}

/// A way to connect pairs (NCCL style: it says whether it can reach a peer, then connects; the
/// group above sees only the [`Pair`]s).
pub trait Transport {
    /// Short name (`shm`, `tcp`, `ucx`) for error messages.
    fn name(&self) -> &'static str;
    /// Whether this transport can connect `me` and `peer`.
    fn reaches(&self, me: &Endpoint, peer: &Endpoint) -> bool;
    /// Does, for `peers`, whatever needs no peer's help (shm makes this rank's segment, tcp
    /// dials the lower ranks' listeners), so that no rank waits in `connect` for a peer that is
    /// itself waiting: every transport offers before any connects.
    fn offer(&mut self, setup: &Setup, peers: &[usize]) -> Result<()> {
        let _ = (setup, peers);
        Ok(())
    }
    /// Connects to `peers` (group ranks into `setup.table`); every peer of the group connects
    /// back at the same time.
    fn connect(&mut self, setup: &Setup, peers: &[usize]) -> Result<Vec<(usize, Box<dyn Pair>)>>;
    /// Called once every pair of the group works (after the group's first barrier).
    fn connected(&mut self) {}
    /// Where the group announces memory it keeps and sends from, when this transport registers
    /// memory with its network (UCX); `None`: it does not.
    fn registry(&self) -> Option<Arc<dyn Registry>> {
        None
    }
}

/// Memory a group keeps for as long as it lives (its collective scratch), announced to a
/// transport that registers memory with its network (UCX: `ucp_mem_map`), so that the memory is
/// registered once and sends from it carry that registration instead of each registering its
/// own. `release` comes before the memory is freed or moved: a registration must never outlive
/// the pages it names (memory allocated later at the same address is other pages).
pub trait Registry: Send + Sync {
    /// Registers `mem` (a failure only means sends from it register as they go).
    fn register(&self, mem: &[u8]);
    /// Forgets any registration of `mem`.
    fn release(&self, mem: &[u8]);
}

/// Which transport a group uses for its peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportChoice {
    /// Shared memory for peers on this host, TCP for the others.
    Auto,
    /// Shared memory only (every peer must be on this host).
    Shm,
    /// TCP for every peer.
    Tcp,
    /// UCX for every peer (cargo feature `ucx`).
    Ucx,
}

impl TransportChoice {
    /// Parses `auto`, `shm`, `tcp` or `ucx` (a `SHARDLINE_TRANSPORT` or `--transport` value);
    /// `ucx` in a build without the `ucx` feature, or any other name, is a [`CommError::Config`].
    pub fn parse(s: &str) -> Result<TransportChoice> {
        match s {
            "auto" => Ok(TransportChoice::Auto),
            "shm" => Ok(TransportChoice::Shm),
            "tcp" => Ok(TransportChoice::Tcp),
            "ucx" if cfg!(feature = "ucx") => Ok(TransportChoice::Ucx),
            "ucx" => Err(CommError::Config(
                "transport 'ucx' is not built into this binary (build with the cargo feature \
                 'ucx'); use shm or tcp"
                    .into(),
            )),
            other => Err(CommError::Config(format!(
                "unknown transport '{other}' (expected auto, shm or tcp)"
            ))),
        }
    }
}

/// What a rank publishes about itself in the rendezvous table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Rank in the world group (used in every error message).
    pub world_rank: usize,
    /// Host identity (hostname and boot id): equal means shared memory can reach.
    pub host: String,
    /// Process id; peers on the same host watch it (pidfd, else `kill(pid, 0)`) to notice when
    /// the process exits.
    pub pid: u32,
    /// Where this rank's TCP listener is.
    pub tcp: String,
    /// Path of this rank's shared-memory segment.
    pub shm: String,
    /// This rank's UCP worker address (hex; empty without the `ucx` feature).
    pub ucx: String,
}

impl Endpoint {
    /// Serialises as length-prefixed fields (bootstrap and `split` records).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.world_rank as u32).to_le_bytes());
        out.extend_from_slice(&self.pid.to_le_bytes());
        for s in [&self.host, &self.tcp, &self.shm, &self.ucx] {
            out.extend_from_slice(&(s.len() as u16).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }

    /// Parses one endpoint from the front of `buf`, advancing it; every length is checked.
    pub fn decode(buf: &mut &[u8]) -> std::result::Result<Endpoint, String> {
        let world_rank = take_u32(buf)? as usize;
        let pid = take_u32(buf)?;
        let mut strings = [String::new(), String::new(), String::new(), String::new()];
        for s in &mut strings {
            let len = take(buf, 2)?;
            let len = u16::from_le_bytes([len[0], len[1]]) as usize;
            *s = String::from_utf8(take(buf, len)?.to_vec())
                .map_err(|_| "endpoint field is not UTF-8".to_string())?;
        }
        let [host, tcp, shm, ucx] = strings;
        Ok(Endpoint {
            world_rank,
            host,
            pid,
            tcp,
            shm,
            ucx,
        })
    }
}

/// Takes `n` bytes off the front of `buf`, or says the record is too short.
pub(crate) fn take<'a>(buf: &mut &'a [u8], n: usize) -> std::result::Result<&'a [u8], String> {
    if buf.len() < n {
        return Err(format!(
            "record too short: needed {n} more bytes, {} left",
            buf.len()
        ));
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

pub(crate) fn take_u32(buf: &mut &[u8]) -> std::result::Result<u32, String> {
    Ok(u32::from_le_bytes(take(buf, 4)?.try_into().unwrap()))
}

pub(crate) fn take_u64(buf: &mut &[u8]) -> std::result::Result<u64, String> {
    Ok(u64::from_le_bytes(take(buf, 8)?.try_into().unwrap()))
}

/// This machine's identity: hostname plus the kernel boot id, so two containers with the same
/// hostname on different machines are not mistaken for one host.
pub fn host_identity() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    format!(
        "{}/{}",
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/kernel/random/boot_id")
    )
}

/// Remaining time until `deadline`, or a timeout error describing `what`.
pub(crate) fn remaining(
    deadline: Instant,
    what: &str,
    total_secs: f64,
) -> Result<std::time::Duration> {
    let now = Instant::now();
    if now >= deadline {
        return Err(CommError::Timeout {
            what: what.to_string(),
            secs: total_secs,
        });
    }
    Ok(deadline - now)
}
