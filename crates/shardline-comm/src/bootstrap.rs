//! The rendezvous: rank 0 listens at the coordinator address; every other rank connects and sends
//! its rank, the job token and its endpoint; rank 0 answers everyone with the full table (and a
//! nonce naming this job). Each incoming connection is read on its own thread under its own short
//! deadline, so garbage, short reads, wrong tokens and silent clients are logged and dropped
//! without holding up the others. Every message is length-prefixed and the length is checked
//! before anything is allocated.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{CommError, Result};
use crate::transport::{remaining, take, take_u32, take_u64, tcp::dial, Endpoint};

const HELLO_MAGIC: u32 = 0x4842_4c53; // "SLBH"
const TABLE_MAGIC: u32 = 0x5442_4c53; // "SLBT"
const VERSION: u32 = 1;
/// Largest bootstrap message accepted (a table of thousands of ranks fits).
const MAX_MESSAGE: usize = 4 << 20;
/// How long one connection may take to deliver its hello.
const HELLO_DEADLINE: Duration = Duration::from_secs(5);

/// Result of the rendezvous.
pub(crate) struct Table {
    pub endpoints: Vec<Endpoint>,
    pub nonce: u64,
}

/// Runs the rendezvous for `cfg`; `me.tcp` holds only this rank's listener port, and the table
/// comes back with full `ip:port` addresses (each rank's IP as rank 0 saw it).
pub(crate) fn rendezvous(cfg: &Config, me: Endpoint) -> Result<Table> {
    let deadline = Instant::now() + cfg.timeout;
    if cfg.world_size == 1 {
        let mut me = me;
        me.tcp = format!("127.0.0.1:{}", me.tcp);
        return Ok(Table {
            endpoints: vec![me],
            nonce: fresh_nonce(),
        });
    }
    if cfg.rank == 0 {
        coordinate(cfg, me, deadline)
    } else {
        join(cfg, me, deadline)
    }
}

fn fresh_nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ ((std::process::id() as u64) << 32) ^ 0x9e37_79b9_7f4a_7c15
}

fn write_message(stream: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(body.len() + 4);
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    stream.write_all(&msg)
}

fn read_message(stream: &mut TcpStream) -> std::result::Result<Vec<u8>, String> {
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .map_err(|e| format!("no message ({e})"))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(format!(
            "message length {len} is over the {MAX_MESSAGE}-byte limit"
        ));
    }
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .map_err(|e| format!("short message ({e})"))?;
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

/// Parses a hello; returns the sender's rank and endpoint.
fn parse_hello(body: &[u8], cfg: &Config) -> std::result::Result<(usize, Endpoint), String> {
    let mut b = body;
    if take_u32(&mut b)? != HELLO_MAGIC || take_u32(&mut b)? != VERSION {
        return Err("not a shardline hello (bad magic or version)".into());
    }
    let world = take_u32(&mut b)? as usize;
    let rank = take_u32(&mut b)? as usize;
    let tlen = take(&mut b, 2)?;
    let token = take(&mut b, u16::from_le_bytes([tlen[0], tlen[1]]) as usize)?;
    if token != cfg.token.as_bytes() {
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
    let (tx, rx) = mpsc::channel::<(
        TcpStream,
        SocketAddr,
        std::result::Result<(usize, Endpoint), String>,
    )>();
    let mut joined: Vec<Option<(TcpStream, Endpoint)>> =
        (0..cfg.world_size).map(|_| None).collect();
    let mut missing = cfg.world_size - 1;
    let mut my_ip = (!at.ip().is_unspecified()).then(|| at.ip());
    let total = cfg.timeout.as_secs_f64();
    while missing > 0 {
        let left = remaining(
            deadline,
            &format!("rank 0 waiting for {missing} rank(s) to join"),
            total,
        )?;
        match listener.accept() {
            Ok((stream, from)) => {
                if my_ip.is_none() {
                    my_ip = stream.local_addr().ok().map(|a| a.ip());
                }
                let tx = tx.clone();
                let cfg = cfg.clone();
                let limit = HELLO_DEADLINE.min(left);
                std::thread::spawn(move || {
                    let mut stream = stream;
                    let parsed = stream
                        .set_nonblocking(false)
                        .and_then(|_| stream.set_read_timeout(Some(limit)))
                        .map_err(|e| e.to_string())
                        .and_then(|_| read_message(&mut stream))
                        .and_then(|body| parse_hello(&body, &cfg));
                    let _ = tx.send((stream, from, parsed));
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!("bootstrap accept failed: {e}"),
        }
        match rx.recv_timeout(Duration::from_millis(2).min(left)) {
            Ok((stream, from, Ok((rank, mut ep)))) => {
                if joined[rank].is_some() {
                    tracing::warn!("bootstrap refused {from}: rank {rank} has already joined");
                    continue;
                }
                ep.tcp = SocketAddr::new(from.ip(), ep.tcp.parse().unwrap_or(0)).to_string();
                joined[rank] = Some((stream, ep));
                missing -= 1;
            }
            Ok((_, from, Err(why))) => {
                tracing::warn!("bootstrap refused a connection from {from}: {why}")
            }
            Err(_) => {}
        }
    }
    me.tcp = SocketAddr::new(
        my_ip.unwrap_or([127, 0, 0, 1].into()),
        me.tcp.parse().unwrap_or(0),
    )
    .to_string();
    let nonce = fresh_nonce();
    let mut endpoints = vec![me];
    endpoints.extend(
        joined
            .iter()
            .skip(1)
            .map(|j| j.as_ref().expect("all joined").1.clone()),
    );
    let mut body = Vec::new();
    body.extend_from_slice(&TABLE_MAGIC.to_le_bytes());
    body.extend_from_slice(&nonce.to_le_bytes());
    body.extend_from_slice(&(cfg.world_size as u32).to_le_bytes());
    for ep in &endpoints {
        ep.encode(&mut body);
    }
    for (rank, j) in joined.iter_mut().enumerate().skip(1) {
        let (stream, _) = j.as_mut().expect("all joined");
        let left = remaining(deadline, "rank 0 sending the table", total)?;
        stream
            .set_write_timeout(Some(left))
            .and_then(|_| write_message(stream, &body))
            .map_err(|e| CommError::PeerLost {
                rank,
                detail: format!("sending the bootstrap table: {e}"),
            })?;
    }
    Ok(Table { endpoints, nonce })
}

fn join(cfg: &Config, me: Endpoint, deadline: Instant) -> Result<Table> {
    let at = resolve(&cfg.coordinator)?;
    let mut stream = dial(&at.to_string(), deadline, 0)?;
    let mut body = Vec::new();
    body.extend_from_slice(&HELLO_MAGIC.to_le_bytes());
    body.extend_from_slice(&VERSION.to_le_bytes());
    body.extend_from_slice(&(cfg.world_size as u32).to_le_bytes());
    body.extend_from_slice(&(cfg.rank as u32).to_le_bytes());
    body.extend_from_slice(&(cfg.token.len() as u16).to_le_bytes());
    body.extend_from_slice(cfg.token.as_bytes());
    me.encode(&mut body);
    let total = cfg.timeout.as_secs_f64();
    let left = remaining(deadline, "joining the rendezvous", total)?;
    stream
        .set_write_timeout(Some(left))
        .and_then(|_| write_message(&mut stream, &body))
        .map_err(|e| CommError::Bootstrap(format!("sending the hello to rank 0 at {at}: {e}")))?;
    let left = remaining(deadline, "waiting for the table from rank 0", total)?;
    stream
        .set_read_timeout(Some(left))
        .map_err(|e| CommError::io("set_read_timeout", e))?;
    let body = read_message(&mut stream).map_err(|why| {
        CommError::Bootstrap(format!(
            "no table from rank 0 at {at}: {why} (refused for a wrong job token or world size? see rank 0's log)"
        ))
    })?;
    let parse = || -> std::result::Result<Table, String> {
        let mut b: &[u8] = &body;
        if take_u32(&mut b)? != TABLE_MAGIC {
            return Err("bad magic".into());
        }
        let nonce = take_u64(&mut b)?;
        let world = take_u32(&mut b)? as usize;
        if world != cfg.world_size {
            return Err(format!(
                "table for {world} ranks, this rank expects {}",
                cfg.world_size
            ));
        }
        let endpoints = (0..world)
            .map(|_| Endpoint::decode(&mut b))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if endpoints.iter().enumerate().any(|(i, e)| e.world_rank != i) {
            return Err("ranks out of order".into());
        }
        Ok(Table { endpoints, nonce })
    };
    parse().map_err(|why| CommError::Bootstrap(format!("bad table from rank 0: {why}")))
}
