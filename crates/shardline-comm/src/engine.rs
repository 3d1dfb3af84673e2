//! The engine behind a [`crate::Group`]: its pairs, its rank numbering, its scratch buffers, its
//! heartbeats and its collective sequence number. It connects the pairs from a table of endpoints
//! (after the bootstrap, or inside `split`), checks the connections with a barrier, and poisons
//! itself after an error that may have left the streams out of step, or once a peer falls silent
//! while no collective runs.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::elem::DType;
use crate::error::{CommError, Result};
use crate::heartbeat::Heart;
use crate::progress::{exchange, push_once, Incoming, Outgoing, Patience, DEFAULT_SPIN};
use crate::transport::shm::{ShmTransport, DEFAULT_RING_BYTES};
use crate::transport::tcp::TcpTransport;
use crate::transport::Registry;
use crate::transport::{Endpoint, Pair, Setup, Transport, TransportChoice};
use crate::wire::{Header, OpCode};

/// All-reduce algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    /// Every rank sends its whole buffer to every other rank: fewest steps, for small messages.
    Direct,
    /// Reduce-scatter then all-gather around a ring: least traffic per rank, for large messages.
    Ring,
    /// Pairwise exchanges of the whole buffer with rank `me ^ 1`, `me ^ 2`, ...: log2(ranks)
    /// steps, each waiting on one peer, for small messages when ranks share cores (a power of two
    /// of ranks; others take the ring).
    Doubling,
}

impl Algo {
    /// Parses a `SHARDLINE_ALLREDUCE_ALGO` value: `auto` or empty (`None`: chosen by size against
    /// [`DIRECT_MAX_BYTES`]), `direct`, `ring` or `doubling`; anything else is a
    /// [`CommError::Config`].
    pub fn parse(s: &str) -> Result<Option<Algo>> {
        match s {
            "auto" | "" => Ok(None),
            "direct" => Ok(Some(Algo::Direct)),
            "ring" => Ok(Some(Algo::Ring)),
            "doubling" => Ok(Some(Algo::Doubling)),
            other => Err(CommError::Config(format!(
                "SHARDLINE_ALLREDUCE_ALGO='{other}' (expected auto, direct, ring or doubling)"
            ))),
        }
    }
}

/// Buffers above this many bytes use the ring all-reduce unless overridden.
pub const DIRECT_MAX_BYTES: usize = 64 * 1024;

/// The pairs of a group and how to reach them.
pub(crate) struct Links {
    pub pairs: Vec<Option<Box<dyn Pair>>>,
    /// Group rank -> world rank (for error messages).
    pub ranks: Vec<usize>,
    pub timeout: Duration,
    /// How long a wait spins before it yields the CPU.
    pub spin: Duration,
    /// Heartbeats of the pairs.
    pub heart: Heart,
}

impl Links {
    /// One non-blocking pass over `sends`; true when every frame went out whole.
    pub fn push_once(&mut self, sends: &mut [Outgoing]) -> Result<bool> {
        push_once(&mut self.pairs, sends)
    }

    pub fn run(
        &mut self,
        sends: &mut [Outgoing],
        recvs: &mut [Incoming],
        ordered: bool,
        what: OpCode,
    ) -> Result<()> {
        exchange(
            &mut self.pairs,
            &self.ranks,
            &mut self.heart,
            sends,
            recvs,
            ordered,
            Patience {
                timeout: self.timeout,
                spin: self.spin,
            },
            what.name(),
        )
    }
}

/// Reusable buffers, so that the hot path does not allocate.
pub(crate) struct Scratch {
    pub acc: Vec<f32>,
    /// Bytes a collective sends from (the direct all-reduce's snapshot): announced to the
    /// transport's registry, when it has one, whenever they move.
    pub bytes: Vec<u8>,
    registry: Option<Arc<dyn Registry>>,
}

impl Scratch {
    fn new(registry: Option<Arc<dyn Registry>>) -> Scratch {
        Scratch {
            acc: Vec::new(),
            bytes: Vec::new(),
            registry,
        }
    }

    pub fn acc(&mut self, n: usize) -> &mut [f32] {
        if self.acc.len() < n {
            self.acc.resize(n, 0.0);
        }
        &mut self.acc[..n]
    }

    pub fn bytes(&mut self, n: usize) -> &mut [u8] {
        if self.bytes.len() < n {
            // A larger buffer may move: its old registration goes before the old memory does.
            if let Some(r) = &self.registry {
                r.release(&self.bytes);
            }
            self.bytes.resize(n, 0);
            if let Some(r) = &self.registry {
                r.register(&self.bytes);
            }
        }
        &mut self.bytes[..n]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(r) = &self.registry {
            r.release(&self.bytes);
        }
    }
}

/// What a group needs to know to split itself.
pub(crate) struct Identity {
    pub endpoints: Vec<Endpoint>,
    pub token: String,
    pub nonce: u64,
    pub choice: TransportChoice,
    /// Where this rank's peer listeners bind (subgroups bind there too).
    pub listen: IpAddr,
    /// The liveness budget (`SHARDLINE_HEARTBEAT`; `None`: off).
    pub liveness: Option<Duration>,
}

pub(crate) struct Engine {
    pub rank: usize,
    pub size: usize,
    pub links: Links,
    pub scratch: Scratch,
    /// The all-reduce algorithm `SHARDLINE_ALLREDUCE_ALGO` forces (`None`: by size and ranks).
    pub algo: Option<Algo>,
    /// More than two ranks outnumbering this host's CPUs: small all-reduces take recursive
    /// doubling rather than the direct exchange (see [`Engine::all_reduce_algo`]).
    pub crowded: bool,
    pub id: Identity,
    seq: u32,
    /// Why the group is unusable, once it is (shared with the `Group`, which reports it without
    /// taking the engine's lock).
    poisoned: Arc<OnceLock<String>>,
}

/// Freshly bound transports of one rank, before the table is known.
pub(crate) struct Local {
    pub tcp: TcpTransport,
    pub shm: ShmTransport,
    #[cfg(feature = "ucx")]
    pub ucx: Option<crate::transport::ucx::UcxTransport>,
}

static SEGMENTS: AtomicU64 = AtomicU64::new(0);

impl Local {
    /// Binds this rank's transports (a UCP worker only when `choice` is UCX); the tcp listener
    /// on `listen`.
    pub fn bind(slots: usize, choice: TransportChoice, listen: IpAddr) -> Result<Local> {
        #[cfg(not(feature = "ucx"))]
        let _ = choice; // only UCX is created on demand
        let ring = match std::env::var("SHARDLINE_SHM_RING_BYTES") {
            Ok(v) => v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|b| (4096..=1 << 30).contains(b))
                .ok_or_else(|| {
                    CommError::Config(format!(
                        "SHARDLINE_SHM_RING_BYTES='{v}' (expected 4096 ..= 1 GiB)"
                    ))
                })?,
            Err(_) => DEFAULT_RING_BYTES,
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let hint = SEGMENTS.fetch_add(1, Ordering::Relaxed) ^ (now << 8);
        Ok(Local {
            tcp: TcpTransport::bind(listen)?,
            shm: ShmTransport::create(slots, ring, hint)?,
            #[cfg(feature = "ucx")]
            ucx: match choice {
                TransportChoice::Ucx => Some(crate::transport::ucx::UcxTransport::new()?),
                _ => None,
            },
        })
    }

    /// The transports `choice` allows, in order of preference.
    fn transports(&mut self, choice: TransportChoice) -> Vec<&mut dyn Transport> {
        match choice {
            TransportChoice::Auto => vec![&mut self.shm, &mut self.tcp],
            TransportChoice::Shm => vec![&mut self.shm],
            TransportChoice::Tcp => vec![&mut self.tcp],
            #[cfg(feature = "ucx")]
            TransportChoice::Ucx => self
                .ucx
                .iter_mut()
                .map(|u| u as &mut dyn Transport)
                .collect(),
            #[cfg(not(feature = "ucx"))]
            TransportChoice::Ucx => Vec::new(), // not parsed without the feature
        }
    }

    /// This rank's endpoint; `tcp` is the listener's address, or only its port when it listens on
    /// every address (the bootstrap fills in the IP).
    pub fn endpoint(&self, world_rank: usize) -> Endpoint {
        let at = self.tcp.socket_addr();
        // A listener on every address publishes its port only: the bootstrap fills in the IP.
        let tcp = if at.ip().is_unspecified() {
            at.port().to_string()
        } else {
            at.to_string()
        };
        Endpoint {
            world_rank,
            host: crate::transport::host_identity(),
            pid: std::process::id(),
            tcp,
            shm: self.shm.address(),
            #[cfg(feature = "ucx")]
            ucx: self.ucx.as_ref().map(|u| u.address()).unwrap_or_default(),
            #[cfg(not(feature = "ucx"))]
            ucx: String::new(),
        }
    }
}

/// Whether `local_ranks` ranks outnumber the CPUs this process may use: each waiting rank may
/// then hold a core the rank it waits for needs.
fn oversubscribed(local_ranks: usize) -> bool {
    local_ranks > std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// SHARDLINE_SPIN_US: microseconds a waiting rank spins before yielding; by default
/// [`DEFAULT_SPIN`], or none when the host is [`oversubscribed`].
fn spin_from_env(local_ranks: usize) -> Result<Duration> {
    match std::env::var("SHARDLINE_SPIN_US") {
        Err(_) => Ok(if oversubscribed(local_ranks) {
            Duration::ZERO
        } else {
            DEFAULT_SPIN
        }),
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|&us| us <= 10_000_000)
            .map(Duration::from_micros)
            .ok_or_else(|| {
                CommError::Config(format!("SHARDLINE_SPIN_US='{v}' (expected 0 ..= 10000000)"))
            }),
    }
}

impl Engine {
    /// Connects to every endpoint of `id` and checks the connections with a barrier.
    pub fn connect(
        rank: usize,
        mut local: Local,
        id: Identity,
        timeout: Duration,
    ) -> Result<Engine> {
        let size = id.endpoints.len();
        let deadline = Instant::now() + timeout;
        let me = &id.endpoints[rank];
        // Each peer goes to the first transport, in order of preference, that reaches it.
        let mut transports = local.transports(id.choice);
        let mut peers: Vec<Vec<usize>> = vec![Vec::new(); transports.len()];
        for (p, ep) in id.endpoints.iter().enumerate().filter(|(p, _)| *p != rank) {
            let t = transports
                .iter()
                .position(|t| t.reaches(me, ep))
                .ok_or_else(|| {
                    let names: Vec<_> = transports.iter().map(|t| t.name()).collect();
                    CommError::Config(format!(
                        "no transport of {names:?} reaches rank {} (host {}, this rank is on {}); \
                     shm needs the same host",
                        ep.world_rank, ep.host, me.host
                    ))
                })?;
            peers[t].push(p);
        }
        let setup = Setup {
            me: rank,
            table: &id.endpoints,
            token: &id.token,
            nonce: id.nonce,
            deadline,
            silence: id.liveness,
        };
        // Everything that needs no peer first, on every transport, so that no rank waits for a
        // peer that waits in turn (then a peer that never comes is a silent one).
        for (t, peers) in transports.iter_mut().zip(&peers) {
            t.offer(&setup, peers)?;
        }
        let mut pairs: Vec<Option<Box<dyn Pair>>> = (0..size).map(|_| None).collect();
        for (t, peers) in transports.iter_mut().zip(&peers) {
            for (p, pair) in t.connect(&setup, peers)? {
                pairs[p] = Some(pair);
            }
        }
        let heart = Heart::new(
            id.liveness,
            id.endpoints
                .iter()
                .enumerate()
                .map(|(p, e)| (p != rank).then(|| (e.host == me.host).then_some(e.pid)))
                .collect(),
        );
        let local_ranks = id.endpoints.iter().filter(|e| e.host == me.host).count();
        let ranks = id.endpoints.iter().map(|e| e.world_rank).collect();
        let mut scratch = Scratch::new(transports.iter().find_map(|t| t.registry()));
        // Preallocate for the direct all-reduce of half types (the largest accumulator).
        scratch.acc(DIRECT_MAX_BYTES / 2);
        scratch.bytes(DIRECT_MAX_BYTES);
        let algo = Algo::parse(
            std::env::var("SHARDLINE_ALLREDUCE_ALGO")
                .unwrap_or_default()
                .trim(),
        )?;
        let mut engine = Engine {
            rank,
            size,
            links: Links {
                pairs,
                ranks,
                timeout,
                spin: spin_from_env(local_ranks)?,
                heart,
            },
            scratch,
            algo,
            crowded: size > 2 && oversubscribed(local_ranks),
            id,
            seq: 0,
            poisoned: Arc::default(),
        };
        engine.guarded(|e| e.barrier())?;
        for t in transports {
            t.connected();
        }
        Ok(engine)
    }

    /// The next collective's tag (the same on every rank when they call the same collectives).
    pub fn next_tag(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    pub fn header(op: OpCode, dtype: DType, tag: u32, total: usize, len: usize) -> Header {
        Header {
            op,
            dtype,
            tag,
            total: total as u64,
            len: len as u64,
        }
    }

    /// Runs `f` unless an earlier error poisoned the engine; poisons it if `f` fails mid-way.
    pub fn guarded<R>(&mut self, f: impl FnOnce(&mut Engine) -> Result<R>) -> Result<R> {
        if let Some(why) = self.poisoned.get() {
            return Err(CommError::Poisoned(why.clone()));
        }
        let r = f(self);
        if let Err(e) = &r {
            if !e.leaves_group_usable() {
                let _ = self.poisoned.set(e.to_string());
            }
        }
        r
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.get().is_some()
    }

    /// Why the engine is unusable, once it is (filled in by whoever poisons it).
    pub fn poison(&self) -> Arc<OnceLock<String>> {
        self.poisoned.clone()
    }

    /// The heartbeat pulse of a rank between collectives (the group's progress thread runs it):
    /// heartbeats to quiet links, heartbeats at the front of the tcp streams dropped, and a peer
    /// silent for the whole budget poisons the engine, so the next call (or `Group::check`)
    /// fails naming it.
    pub fn idle_pulse(&mut self) {
        let now = Instant::now();
        if self.is_poisoned() || !self.links.heart.on() {
            return;
        }
        let Links {
            pairs,
            ranks,
            heart,
            ..
        } = &mut self.links;
        let r = heart.pulse(pairs, ranks, now, &|_| (false, false), &|| {
            "while this rank was idle, between collectives".to_string()
        });
        if let Err(e) = r {
            tracing::error!("{e}");
            let _ = self.poisoned.set(e.to_string());
        }
    }

    pub fn world_rank(&self) -> usize {
        self.links.ranks[self.rank]
    }
}
