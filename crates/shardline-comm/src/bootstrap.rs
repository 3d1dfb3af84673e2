//! The rendezvous: rank 0 listens at the coordinator address; every other rank connects and sends
//! its rank, the job token and its endpoint; rank 0 answers everyone with the full table (and a
//! nonce naming this job). Rank 0 reads the hellos on its own thread, all at once, through an
//! [`Acceptor`]: each connection gets one deadline for its whole hello, only a few KiB are read
//! before the token is checked, and the connections still saying hello are capped, so garbage,
//! short reads, wrong tokens, trickling and silent clients are logged and dropped without
//! holding up the others or growing rank 0. Every message is length-prefixed and the length is
//! checked before anything is allocated. While rank 0 waits for the last ranks, it and the ranks
//! that joined send each other heartbeats (a message of 4 bytes) every quarter of the liveness
//! budget: a rank 0 that falls silent fails the ranks that joined, and a joined rank that does
//! fails rank 0, which tells the others why, all within the budget and naming it.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{CommError, Result};
use crate::transport::accept::{read_exact_by, token_eq, Acceptor, Need};
use crate::transport::{remaining, take_u32, take_u64, tcp::dial, Endpoint};

const HELLO_MAGIC: u32 = 0x4842_4c53; // "SLBH"
const TABLE_MAGIC: u32 = 0x5442_4c53; // "SLBT"
/// In place of the table: rank 0 gave up, and says why (UTF-8 after the magic).
const ABORT_MAGIC: u32 = 0x5842_4c53; // "SLBX"
/// A heartbeat: the whole message, either way.
pub(crate) const BEAT_MAGIC: u32 = 0x4242_4c53; // "SLBB"
const VERSION: u32 = 1;
/// Largest table accepted from rank 0 (a table of thousands of ranks fits).
pub(crate) const MAX_MESSAGE: usize = 4 << 20;
/// Largest hello rank 0 accepts once its token checked out (an endpoint's four fields of at
/// most 64 KiB each fit).
pub(crate) const MAX_HELLO: usize = 512 << 10;
/// Longest job token.
pub(crate) const MAX_TOKEN: usize = 1024;
/// How long one connection may take to deliver its whole hello.
const HELLO_DEADLINE: Duration = Duration::from_secs(5);
/// The fixed head of a hello after its length: magic, version, world, rank, token length.
const HELLO_HEAD: usize = 18;

/// Result of the rendezvous.
pub(crate) struct Table {
    pub endpoints: Vec<Endpoint>,
    pub nonce: u64,
    /// Rank 0's connections to the others, kept open until the group is connected, so that no
    /// heartbeat that arrived after the table turns its closing into a reset the other end might
    /// see before the table.
    pub keep: Vec<TcpStream>,
}

/// Runs the rendezvous for `cfg`; `me.tcp` holds this rank's listener address, or only its port
/// when it listens on every address (then the table has the IP rank 0 saw this rank come from).
pub(crate) fn rendezvous(cfg: &Config, me: Endpoint) -> Result<Table> {
    let deadline = Instant::now() + cfg.timeout;
    if cfg.world_size == 1 {
        let mut me = me;
        if let Ok(port) = me.tcp.parse::<u16>() {
            me.tcp = format!("127.0.0.1:{port}");
        }
        return Ok(Table {
            endpoints: vec![me],
            nonce: fresh_nonce(),
            keep: Vec::new(),
        });
    }
    if cfg.rank == 0 {
        coordinate(cfg, me, deadline)
    } else {
        join(cfg, me, deadline)
    }
}

/// The address this rank's data listener binds: `cfg.listen` when given; for rank 0 the
/// coordinator's address; for the others the address they reach the coordinator from (the
/// address rank 0 will see and tell the peers about), so that a job on one host listens on
/// loopback only. Every address (0.0.0.0) where that cannot be found.
pub(crate) fn listen_ip(cfg: &Config) -> Result<IpAddr> {
    if let Some(ip) = cfg.listen {
        return Ok(ip);
    }
    if cfg.world_size == 1 {
        return Ok(IpAddr::from([127, 0, 0, 1]));
    }
    let at = resolve(&cfg.coordinator)?;
    if cfg.rank == 0 {
        return Ok(at.ip());
    }
    // A connected UDP socket sends nothing; it only asks the kernel for the route's source.
    let unspecified: IpAddr = match at {
        SocketAddr::V4(_) => [0, 0, 0, 0].into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let source = UdpSocket::bind((unspecified, 0))
        .and_then(|s| s.connect(at).map(|_| s))
        .and_then(|s| s.local_addr());
    Ok(match source {
        Ok(a) => a.ip(),
        Err(e) => {
            tracing::debug!("no route to the coordinator {at} yet ({e}); listening everywhere");
            unspecified
        }
    })
}

/// Refuses, before anything listens, a job without a token whose listeners would be reachable
/// from beyond this host (the token is what keeps other users and hosts out).
pub(crate) fn check_exposure(cfg: &Config, listen: IpAddr) -> Result<()> {
    if cfg.world_size == 1 || !cfg.token.is_empty() {
        return Ok(());
    }
    let mut exposed = Vec::new();
    if !listen.is_loopback() {
        exposed.push(format!("its peer listener on {listen}"));
    }
    if cfg.rank == 0 {
        let at = resolve(&cfg.coordinator)?;
        if !at.ip().is_loopback() {
            exposed.push(format!("the rendezvous on {at}"));
        }
    }
    if exposed.is_empty() {
        return Ok(());
    }
    Err(CommError::Config(format!(
        "SHARDLINE_JOB_TOKEN is not set, and rank {} would open {} beyond loopback: a job \
         without a token runs on loopback only. Set SHARDLINE_JOB_TOKEN to the same secret on \
         every rank (`shardline launch` and the local launcher make one)",
        cfg.rank,
        exposed.join(" and ")
    )))
}

fn fresh_nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ ((std::process::id() as u64) << 32) ^ 0x9e37_79b9_7f4a_7c15
}

pub(crate) fn write_message(stream: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(body.len() + 4);
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    stream.write_all(&msg)
}

/// Reads one length-prefixed message (at most [`MAX_MESSAGE`] bytes) by `deadline`.
pub(crate) fn read_message(stream: &mut TcpStream, deadline: Instant) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    read_exact_by(stream, &mut len, deadline)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message length {len} is over the {MAX_MESSAGE}-byte limit"),
        ));
    }
    let mut body = vec![0u8; len];
    read_exact_by(stream, &mut body, deadline)?;
    Ok(body)
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| CommError::Config(format!("coordinator address '{addr}': {e}")))?
        .next()
        .ok_or_else(|| {
            CommError::Config(format!("coordinator address '{addr}' resolves to nothing"))
        })
}

/// How much of a hello (length prefix included) `buf` still lacks; the token is checked as soon
/// as it is in, before the rest (the endpoint) is read.
pub(crate) fn hello_need(buf: &[u8], cfg: &Config) -> std::result::Result<Need, String> {
    let more = |upto, authenticated| {
        Ok(Need::More {
            upto,
            authenticated,
        })
    };
    if buf.len() < 4 {
        return more(4, false);
    }
    let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
    if len > MAX_HELLO {
        return Err(format!(
            "a hello of {len} bytes is over the {MAX_HELLO}-byte limit"
        ));
    }
    if len < HELLO_HEAD {
        return Err(format!("a hello of {len} bytes is too short"));
    }
    if buf.len() < 4 + HELLO_HEAD {
        return more(4 + HELLO_HEAD, false);
    }
    let mut b = &buf[4..];
    if take_u32(&mut b)? != HELLO_MAGIC || take_u32(&mut b)? != VERSION {
        return Err("not a shardline hello (bad magic or version)".into());
    }
    let tlen = u16::from_le_bytes([buf[20], buf[21]]) as usize;
    if tlen > MAX_TOKEN || HELLO_HEAD + tlen > len {
        return Err(format!("bad token length {tlen}"));
    }
    if buf.len() < 4 + HELLO_HEAD + tlen {
        return more(4 + HELLO_HEAD + tlen, false);
    }
    if !token_eq(
        &buf[4 + HELLO_HEAD..4 + HELLO_HEAD + tlen],
        cfg.token.as_bytes(),
    ) {
        let rank = u32::from_le_bytes(buf[16..20].try_into().unwrap());
        return Err(format!("bad job token (claimed rank {rank})"));
    }
    if buf.len() < 4 + len {
        return more(4 + len, true);
    }
    Ok(Need::Done)
}

/// Parses a whole hello (after its length prefix); returns the sender's rank and endpoint.
pub(crate) fn parse_hello(
    body: &[u8],
    cfg: &Config,
) -> std::result::Result<(usize, Endpoint), String> {
    let mut b = body;
    if take_u32(&mut b)? != HELLO_MAGIC || take_u32(&mut b)? != VERSION {
        return Err("not a shardline hello (bad magic or version)".into());
    }
    let world = take_u32(&mut b)? as usize;
    let rank = take_u32(&mut b)? as usize;
    let tlen = crate::transport::take(&mut b, 2)?;
    let token = crate::transport::take(&mut b, u16::from_le_bytes([tlen[0], tlen[1]]) as usize)?;
    if !token_eq(token, cfg.token.as_bytes()) {
        return Err(format!("bad job token (claimed rank {rank})"));
    }
    if world != cfg.world_size || rank == 0 || rank >= world {
        return Err(format!(
            "rank {rank} of world {world} does not fit this job of {}",
            cfg.world_size
        ));
    }
    let ep = Endpoint::decode(&mut b)?;
    if ep.world_rank != rank {
        return Err(format!(
            "endpoint says rank {} in a hello from rank {rank}",
            ep.world_rank
        ));
    }
    Ok((rank, ep))
}

/// `ranks` as `1, 2, 5` (the first 16, then a count).
fn rank_list(ranks: impl Iterator<Item = usize>) -> String {
    let all: Vec<usize> = ranks.collect();
    let mut s: Vec<String> = all.iter().take(16).map(|r| r.to_string()).collect();
    if all.len() > 16 {
        s.push(format!("and {} more", all.len() - 16));
    }
    s.join(", ")
}

fn coordinate(cfg: &Config, mut me: Endpoint, deadline: Instant) -> Result<Table> {
    let at = resolve(&cfg.coordinator)?;
    let listener = TcpListener::bind(at).map_err(|e| {
        CommError::io(
            format!("rank 0 cannot listen at the coordinator address {at}"),
            e,
        )
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| CommError::io("coordinator set_nonblocking", e))?;
    let mut acceptor = Acceptor::new(
        &listener,
        "bootstrap",
        cfg.world_size - 1,
        HELLO_DEADLINE,
        4 + MAX_HELLO,
    );
    let mut joined: Vec<Option<(TcpStream, Endpoint)>> =
        (0..cfg.world_size).map(|_| None).collect();
    let mut missing = cfg.world_size - 1;
    let mut my_ip = (!at.ip().is_unspecified()).then(|| at.ip());
    let total = cfg.timeout.as_secs_f64();
    let parse = |buf: &[u8]| hello_need(buf, cfg);
    let budget = cfg.liveness();
    let mut life = Life::new(cfg.world_size);
    while missing > 0 {
        let absent = |joined: &[Option<(TcpStream, Endpoint)>]| {
            let absent = (1..cfg.world_size).filter(|&r| joined[r].is_none());
            format!(
                "rank 0 waiting at {at} for {missing} rank(s) to join (missing: rank {})",
                rank_list(absent)
            )
        };
        let what = || absent(&joined);
        // With heartbeats, the wait goes in steps, to watch and greet the ranks that joined.
        let step = match budget {
            Some(b) => deadline.min(Instant::now() + b / 8),
            None => deadline,
        };
        let next = match acceptor.next(&parse, step, &what, total) {
            Ok(h) => Ok(Some(h)),
            Err(CommError::Timeout { .. }) if Instant::now() < deadline => Ok(None),
            Err(e) => Err(e),
        };
        let watched = match (next, budget) {
            (Ok(h), Some(b)) => {
                let waiting = absent(&joined);
                life.watch(&mut joined, b, &waiting).map(|_| h)
            }
            (next, _) => next,
        };
        let hello = match watched {
            Ok(Some(h)) => h,
            Ok(None) => continue,
            Err(e) => {
                // The ranks that joined learn why there is no table (not a refusal).
                let mut body = ABORT_MAGIC.to_le_bytes().to_vec();
                body.extend_from_slice(e.to_string().as_bytes());
                for (stream, _) in joined.iter_mut().flatten() {
                    let _ = stream
                        .set_write_timeout(Some(Duration::from_millis(500)))
                        .and_then(|_| write_message(stream, &body));
                }
                return Err(e);
            }
        };
        let (stream, from) = (hello.stream, hello.from);
        let (rank, mut ep) = match parse_hello(&hello.bytes[4..], cfg) {
            Ok(x) => x,
            Err(why) => {
                tracing::warn!("bootstrap refused a connection from {from}: {why}");
                continue;
            }
        };
        if joined[rank].is_some() {
            tracing::warn!("bootstrap refused {from}: rank {rank} has already joined");
            continue;
        }
        if let Err(e) = stream.set_nonblocking(false) {
            tracing::warn!("bootstrap dropped rank {rank} from {from}: {e}");
            continue;
        }
        if my_ip.is_none() {
            my_ip = stream.local_addr().ok().map(|a| a.ip());
        }
        if let Ok(port) = ep.tcp.parse::<u16>() {
            ep.tcp = SocketAddr::new(from.ip(), port).to_string();
        }
        life.heard[rank] = Instant::now();
        joined[rank] = Some((stream, ep));
        missing -= 1;
    }
    drop(acceptor);
    drop(listener);
    if let Ok(port) = me.tcp.parse::<u16>() {
        me.tcp = SocketAddr::new(my_ip.unwrap_or([127, 0, 0, 1].into()), port).to_string();
    }
    let nonce = fresh_nonce();
    let mut endpoints = vec![me];
    endpoints.extend(
        joined
            .iter()
            .skip(1)
            .map(|j| j.as_ref().expect("all joined").1.clone()),
    );
    let body = encode_table(nonce, &endpoints);
    for (rank, j) in joined.iter_mut().enumerate().skip(1) {
        let (stream, _) = j.as_mut().expect("all joined");
        let left = remaining(
            deadline,
            &format!("rank 0 sending the table to rank {rank}"),
            total,
        )?;
        // A rank that takes nothing for the liveness budget is stopped or cut off.
        let stall = budget.map_or(left, |b| left.min(b));
        stream
            .set_write_timeout(Some(stall))
            .and_then(|_| write_message(stream, &body))
            .map_err(|e| CommError::PeerLost {
                rank,
                detail: format!("sending the bootstrap table: {e}"),
            })?;
    }
    let keep = joined.into_iter().flatten().map(|(s, _)| s).collect();
    Ok(Table {
        endpoints,
        nonce,
        keep,
    })
}

/// Rank 0's watch over the ranks that joined while it waits for the rest.
struct Life {
    /// When each joined rank last sent something.
    heard: Vec<Instant>,
    /// When rank 0 last sent them heartbeats.
    beat_at: Instant,
    scratch: [u8; 64],
}

impl Life {
    fn new(world: usize) -> Life {
        let now = Instant::now();
        Life {
            heard: vec![now; world],
            beat_at: now,
            scratch: [0; 64],
        }
    }

    /// Sends the joined ranks heartbeats when a quarter of `budget` has passed, reads theirs, and
    /// fails naming one that has been silent for `budget` or has hung up; `waiting` says what
    /// rank 0 is doing.
    fn watch(
        &mut self,
        joined: &mut [Option<(TcpStream, Endpoint)>],
        budget: Duration,
        waiting: &str,
    ) -> Result<()> {
        let now = Instant::now();
        let beat = now.duration_since(self.beat_at) >= budget / 4;
        if beat {
            self.beat_at = now;
        }
        for (rank, j) in joined.iter_mut().enumerate() {
            let Some((stream, ep)) = j else { continue };
            let gone = |detail: String| CommError::PeerLost {
                rank,
                detail: format!("{detail}, {waiting}"),
            };
            if beat {
                stream
                    .set_write_timeout(Some(budget / 4))
                    .and_then(|_| write_message(stream, &BEAT_MAGIC.to_le_bytes()))
                    .map_err(|e| {
                        gone(format!(
                            "heartbeat to it while it waited for the table: {e}"
                        ))
                    })?;
            }
            let mut pfd = libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, zero timeout.
            if unsafe { libc::poll(&mut pfd, 1, 0) } > 0 {
                // Readable: the read does not block. Only heartbeats come this way.
                match stream.read(&mut self.scratch) {
                    Ok(0) => {
                        return Err(gone(
                            "it closed its connection to the rendezvous (it gave up or died)"
                                .into(),
                        ))
                    }
                    Ok(_) => self.heard[rank] = now,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(gone(format!("its rendezvous connection: {e}"))),
                }
            } else if now.duration_since(self.heard[rank]) >= budget {
                let local = ep.host == crate::transport::host_identity();
                return Err(CommError::Silent {
                    rank,
                    secs: now.duration_since(self.heard[rank]).as_secs_f64(),
                    what: format!(
                        "after it joined, {waiting} ({}; SHARDLINE_HEARTBEAT={} s is the budget)",
                        crate::heartbeat::state(local.then_some(ep.pid)),
                        budget.as_secs_f64()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Why a joined rank got no table.
enum NoTable {
    Io(std::io::Error),
    /// Rank 0 sent nothing, not even a heartbeat, for this long.
    Silent(Duration),
}

/// The next message from rank 0 other than a heartbeat, sending it heartbeats meanwhile (every
/// quarter of `budget`) and giving up when it has been silent for `budget`.
fn next_message(
    stream: &mut TcpStream,
    deadline: Instant,
    budget: Option<Duration>,
) -> std::result::Result<Vec<u8>, NoTable> {
    let Some(budget) = budget else {
        return read_message(stream, deadline).map_err(NoTable::Io);
    };
    let mut heard = Instant::now();
    let mut beat_at = heard;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(NoTable::Io(std::io::ErrorKind::TimedOut.into()));
        }
        if now.duration_since(heard) >= budget {
            return Err(NoTable::Silent(now.duration_since(heard)));
        }
        if now.duration_since(beat_at) >= budget / 4 {
            beat_at = now;
            stream
                .set_write_timeout(Some(budget / 4))
                .and_then(|_| write_message(stream, &BEAT_MAGIC.to_le_bytes()))
                .map_err(NoTable::Io)?;
        }
        let wait = (deadline - now)
            .min((heard + budget).saturating_duration_since(now))
            .min((beat_at + budget / 4).saturating_duration_since(now));
        let mut pfd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            continue;
        }
        // A message has begun: the rest must follow within the budget too.
        let by = deadline.min(Instant::now() + budget);
        let body = match read_message(stream, by) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut && Instant::now() < deadline => {
                return Err(NoTable::Silent(heard.elapsed()))
            }
            Err(e) => return Err(NoTable::Io(e)),
        };
        heard = Instant::now();
        if body != BEAT_MAGIC.to_le_bytes() {
            return Ok(body);
        }
    }
}

fn join(cfg: &Config, me: Endpoint, deadline: Instant) -> Result<Table> {
    let at = resolve(&cfg.coordinator)?;
    let mut stream = dial(&at.to_string(), deadline, 0, None)?;
    if cfg.token.len() > MAX_TOKEN {
        return Err(CommError::Config(format!(
            "SHARDLINE_JOB_TOKEN has {} bytes; the most is {MAX_TOKEN}",
            cfg.token.len()
        )));
    }
    let body = encode_hello(cfg, &me);
    let total = cfg.timeout.as_secs_f64();
    let started = Instant::now();
    let left = remaining(
        deadline,
        &format!("rank {} joining the rendezvous at {at}", cfg.rank),
        total,
    )?;
    stream
        .set_write_timeout(Some(left))
        .and_then(|_| write_message(&mut stream, &body))
        .map_err(|e| CommError::Bootstrap(format!("sending the hello to rank 0 at {at}: {e}")))?;
    let body = next_message(&mut stream, deadline, cfg.liveness()).map_err(|e| match e {
        NoTable::Silent(quiet) => CommError::Silent {
            rank: 0,
            secs: quiet.as_secs_f64(),
            what: format!(
                "while rank {} waited for the table from it at {at} (its hello went {:.1} s \
                 ago; rank 0 is stopped, hung or cut off; SHARDLINE_HEARTBEAT={} s is the \
                 budget)",
                cfg.rank,
                started.elapsed().as_secs_f64(),
                cfg.heartbeat.as_secs_f64()
            ),
        },
        NoTable::Io(e) => match e.kind() {
            std::io::ErrorKind::TimedOut => CommError::Timeout {
                what: format!(
                "rank {} waiting for the table from rank 0 at {at} (its hello was sent {:.1} s \
                 ago; rank 0 sends the table once every rank has joined: is one of them missing? \
                 see rank 0's log)",
                cfg.rank,
                started.elapsed().as_secs_f64()
            ),
                secs: total,
            },
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe => CommError::Bootstrap(format!(
                "rank 0 at {at} closed the connection without sending the table: it refused \
             rank {} (a wrong job token, world size or rank? see rank 0's log) or it failed",
                cfg.rank
            )),
            _ => CommError::Bootstrap(format!("no table from rank 0 at {at}: {e}")),
        },
    })?;
    if body.starts_with(&ABORT_MAGIC.to_le_bytes()) {
        return Err(CommError::Bootstrap(format!(
            "rank 0 at {at} gave up before every rank joined: {}",
            String::from_utf8_lossy(&body[4..])
        )));
    }
    parse_table(&body, cfg.world_size)
        .map(|(nonce, endpoints)| Table {
            endpoints,
            nonce,
            keep: Vec::new(),
        })
        .map_err(|why| CommError::Bootstrap(format!("bad table from rank 0: {why}")))
}

/// A hello (without its length prefix): magic, version, world size, rank, job token, endpoint.
pub(crate) fn encode_hello(cfg: &Config, me: &Endpoint) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&HELLO_MAGIC.to_le_bytes());
    body.extend_from_slice(&VERSION.to_le_bytes());
    body.extend_from_slice(&(cfg.world_size as u32).to_le_bytes());
    body.extend_from_slice(&(cfg.rank as u32).to_le_bytes());
    body.extend_from_slice(&(cfg.token.len() as u16).to_le_bytes());
    body.extend_from_slice(cfg.token.as_bytes());
    me.encode(&mut body);
    body
}

/// The table rank 0 sends (without its length prefix): magic, nonce, world size, endpoints.
pub(crate) fn encode_table(nonce: u64, endpoints: &[Endpoint]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&TABLE_MAGIC.to_le_bytes());
    body.extend_from_slice(&nonce.to_le_bytes());
    body.extend_from_slice(&(endpoints.len() as u32).to_le_bytes());
    for ep in endpoints {
        ep.encode(&mut body);
    }
    body
}

/// Parses a table for a job of `world` ranks: its nonce and the endpoints in rank order.
pub(crate) fn parse_table(
    body: &[u8],
    world: usize,
) -> std::result::Result<(u64, Vec<Endpoint>), String> {
    let mut b = body;
    if take_u32(&mut b)? != TABLE_MAGIC {
        return Err("bad magic".into());
    }
    let nonce = take_u64(&mut b)?;
    let claimed = take_u32(&mut b)? as usize;
    if claimed != world {
        return Err(format!(
            "table for {claimed} ranks, this rank expects {world}"
        ));
    }
    let endpoints = (0..world)
        .map(|_| Endpoint::decode(&mut b))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if endpoints.iter().enumerate().any(|(i, e)| e.world_rank != i) {
        return Err("ranks out of order".into());
    }
    Ok((nonce, endpoints))
}
