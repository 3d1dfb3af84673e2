//! TCP transport: one socket per pair, TCP_NODELAY, non-blocking. Reads go through a per-pair
//! buffer so that one `recv` can pick up several frames, and the progress engine polls instead of
//! blocking per message (a blocking read costs tens of microseconds of wake-up). Writes use
//! `sendmsg` with `MSG_NOSIGNAL` so a dead peer is an error, never a SIGPIPE. The listener binds
//! the address the peers are told about (loopback for a job on one host) and reads the hellos of
//! all connecting peers at once through an [`Acceptor`].

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::accept::{token_eq, Acceptor, Need};
use super::{remaining, take, take_u32, take_u64, Endpoint, Pair, Setup, Transport};
use crate::bootstrap::MAX_TOKEN;
use crate::error::{CommError, Result};
use crate::wire::{heartbeat_frame, HEADER_LEN};

const HELLO_MAGIC: u32 = 0x4854_4c53; // "SLTH"
/// Magic, nonce, rank and token length.
pub(crate) const HELLO_HEAD: usize = 18;
/// Bytes read ahead per pair; frames larger than this stream through it.
const READ_BUF: usize = 256 * 1024;
/// How long one accepted connection may take to say its whole hello before it is dropped.
const HELLO_DEADLINE: Duration = Duration::from_secs(2);

/// A bound, not yet connected TCP transport.
pub struct TcpTransport {
    listener: TcpListener,
    addr: SocketAddr,
    /// Connections to the lower ranks, dialed and greeted by `offer` (group rank, stream).
    dialed: Vec<(usize, TcpStream)>,
}

impl TcpTransport {
    /// Binds a listener on `ip` (an ephemeral port).
    pub fn bind(ip: std::net::IpAddr) -> Result<TcpTransport> {
        let listener = TcpListener::bind((ip, 0))
            .map_err(|e| CommError::io(format!("cannot listen on {ip} for peer connections"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| CommError::io("listener address", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| CommError::io("listener set_nonblocking", e))?;
        Ok(TcpTransport {
            listener,
            addr,
            dialed: Vec::new(),
        })
    }

    /// The address published in the table.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// The address the listener is bound to.
    pub fn socket_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn reaches(&self, _me: &Endpoint, _peer: &Endpoint) -> bool {
        true
    }

    /// Dials the lower ranks of `peers` and says hello: a connection opened by a hello carrying
    /// the job token, the group nonce and the dialer's rank. Their listeners were bound before
    /// they published their endpoints, so the kernel completes the connection even while the peer
    /// process is busy (or stopped); a listener that refuses is gone.
    fn offer(&mut self, setup: &Setup, peers: &[usize]) -> Result<()> {
        let Setup {
            me,
            table,
            token,
            nonce,
            deadline,
            silence,
        } = *setup;
        self.dialed.clear();
        for &p in peers.iter().filter(|&&p| p < me) {
            let mut stream = dial(&table[p].tcp, deadline, table[p].world_rank, silence)?;
            let hello = encode_hello(token, nonce, me);
            stream
                .write_all(&hello)
                .map_err(|e| CommError::io(format!("hello to rank {}", table[p].world_rank), e))?;
            self.dialed.push((p, stream));
        }
        Ok(())
    }

    /// Takes the connections `offer` dialed and accepts the higher ranks' (connections with
    /// anything but this group's hello are dropped and logged). A higher rank that has not
    /// connected within the liveness budget fails the connection, named.
    fn connect(&mut self, setup: &Setup, peers: &[usize]) -> Result<Vec<(usize, Box<dyn Pair>)>> {
        let Setup {
            me,
            table,
            token,
            nonce,
            deadline,
            silence,
        } = *setup;
        let mut out: Vec<(usize, Box<dyn Pair>)> = Vec::new();
        for (p, stream) in self.dialed.drain(..) {
            out.push((p, Box::new(TcpPair::new(stream, table[p].world_rank)?)));
        }
        let mut waiting: Vec<usize> = peers.iter().copied().filter(|&p| p > me).collect();
        let total = deadline
            .saturating_duration_since(Instant::now())
            .as_secs_f64();
        let started = Instant::now();
        let parse = |buf: &[u8]| hello_need(buf, token, nonce);
        let mut acceptor = Acceptor::new(
            &self.listener,
            "tcp",
            waiting.len(),
            HELLO_DEADLINE,
            HELLO_HEAD + MAX_TOKEN,
        );
        while !waiting.is_empty() {
            let what = || {
                let ranks: Vec<usize> = waiting.iter().map(|&p| table[p].world_rank).collect();
                format!("waiting for ranks {ranks:?} to connect over tcp")
            };
            // Waits in steps of a quarter of the budget, to give up on a silent peer in time.
            let step = match silence {
                Some(s) => deadline.min(Instant::now() + s / 4),
                None => deadline,
            };
            let hello = match acceptor.next(&parse, step, &what, total) {
                Ok(h) => h,
                Err(CommError::Timeout { .. }) if Instant::now() < deadline => {
                    let (Some(budget), Some(&p)) = (silence, waiting.first()) else {
                        continue;
                    };
                    if started.elapsed() >= budget {
                        let ep = &table[p];
                        let local = ep.host == table[me].host;
                        return Err(CommError::Silent {
                            rank: ep.world_rank,
                            secs: started.elapsed().as_secs_f64(),
                            what: format!(
                                "while this rank waited for it to connect over tcp ({}; \
                                 SHARDLINE_HEARTBEAT={} s is the budget)",
                                crate::heartbeat::state(local.then_some(ep.pid)),
                                budget.as_secs_f64()
                            ),
                        });
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            let rank = u32::from_le_bytes(hello.bytes[12..16].try_into().unwrap()) as usize;
            if waiting.contains(&rank) {
                waiting.retain(|&r| r != rank);
                out.push((
                    rank,
                    Box::new(TcpPair::new(hello.stream, table[rank].world_rank)?),
                ));
            } else {
                tracing::warn!(
                    "refused a tcp connection from {}: unexpected rank {rank}",
                    hello.from
                );
            }
        }
        Ok(out)
    }
}

/// Connects to `addr`, retrying while the peer is not listening yet, until `deadline`. With a
/// liveness budget (`silence`), the peer's listener is known to exist already: refusals for that
/// long mean it is gone, and an attempt that gets no answer for that long means its host no
/// longer answers; either fails naming the rank.
pub(crate) fn dial(
    addr: &str,
    deadline: Instant,
    rank: usize,
    silence: Option<Duration>,
) -> Result<TcpStream> {
    let total = deadline
        .saturating_duration_since(Instant::now())
        .as_secs_f64();
    let started = Instant::now();
    let sock: SocketAddr = addr
        .parse()
        .map_err(|_| CommError::Config(format!("rank {rank} published a bad address '{addr}'")))?;
    loop {
        let mut wait = remaining(
            deadline,
            &format!("connecting to rank {rank} at {addr}"),
            total,
        )?;
        if let Some(budget) = silence {
            wait = wait.min(
                budget
                    .saturating_sub(started.elapsed())
                    .max(Duration::from_millis(1)),
            );
        }
        match TcpStream::connect_timeout(&sock, wait) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut
                ) =>
            {
                if let Some(budget) = silence.filter(|b| started.elapsed() >= *b) {
                    let secs = started.elapsed().as_secs_f64();
                    return Err(if e.kind() == io::ErrorKind::ConnectionRefused {
                        CommError::PeerLost {
                            rank,
                            detail: format!(
                                "its listener at {addr} refused every connection for {secs:.1} s: \
                                 it has exited, or a firewall rejects the port \
                                 (SHARDLINE_HEARTBEAT={} s is the budget)",
                                budget.as_secs_f64()
                            ),
                        }
                    } else {
                        CommError::Silent {
                            rank,
                            secs,
                            what: format!(
                                "while this rank dialed it at {addr}: its host does not answer \
                                 (down, cut off, or a firewall drops the port; \
                                 SHARDLINE_HEARTBEAT={} s is the budget)",
                                budget.as_secs_f64()
                            ),
                        }
                    });
                }
                std::thread::sleep(Duration::from_millis(10).min(wait))
            }
            Err(e) => {
                return Err(CommError::io(
                    format!("connecting to rank {rank} at {addr}"),
                    e,
                ))
            }
        }
    }
}

/// The hello a dialer sends: magic, the group's nonce, its rank and the job token.
pub(crate) fn encode_hello(token: &str, nonce: u64, rank: usize) -> Vec<u8> {
    let mut hello = Vec::with_capacity(HELLO_HEAD + token.len());
    hello.extend_from_slice(&HELLO_MAGIC.to_le_bytes());
    hello.extend_from_slice(&nonce.to_le_bytes());
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(token.len() as u16).to_le_bytes());
    hello.extend_from_slice(token.as_bytes());
    hello
}

/// How much of a hello `buf` still lacks (see [`Need`]): magic, this group's nonce, the dialer's
/// rank and the job token.
pub(crate) fn hello_need(buf: &[u8], token: &str, nonce: u64) -> std::result::Result<Need, String> {
    if buf.len() < HELLO_HEAD {
        return Ok(Need::More {
            upto: HELLO_HEAD,
            authenticated: false,
        });
    }
    let mut b = buf;
    if take_u32(&mut b)? != HELLO_MAGIC {
        return Err("not a shardline hello (bad magic)".into());
    }
    let theirs = take_u64(&mut b)?;
    let _rank = take_u32(&mut b)?;
    let len = take(&mut b, 2)?;
    let len = u16::from_le_bytes([len[0], len[1]]) as usize;
    if len > MAX_TOKEN {
        return Err(format!("token length {len} is too long"));
    }
    if buf.len() < HELLO_HEAD + len {
        return Ok(Need::More {
            upto: HELLO_HEAD + len,
            authenticated: false,
        });
    }
    if !token_eq(&buf[HELLO_HEAD..], token.as_bytes()) {
        return Err("bad job token".into());
    }
    if theirs != nonce {
        return Err("hello for another group".into());
    }
    Ok(Need::Done)
}

/// One peer over TCP.
pub struct TcpPair {
    stream: TcpStream,
    peer: usize,
    rbuf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Bytes sent, heartbeats included.
    sent: u64,
    /// Bytes received, and their count when `heard` last looked.
    got: u64,
    seen: u64,
    /// The heartbeat frame, and how much of the one under way is still to go (a heartbeat that
    /// went out in part is finished before anything else is written).
    beat: [u8; HEADER_LEN],
    beat_left: usize,
}

impl TcpPair {
    pub(crate) fn new(stream: TcpStream, peer_world_rank: usize) -> Result<TcpPair> {
        let ctx = |e| {
            CommError::io(
                format!("setting up the socket to rank {peer_world_rank}"),
                e,
            )
        };
        stream.set_nodelay(true).map_err(ctx)?;
        stream.set_nonblocking(true).map_err(ctx)?;
        stream.set_read_timeout(None).map_err(ctx)?;
        Ok(TcpPair {
            stream,
            peer: peer_world_rank,
            rbuf: vec![0u8; READ_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            sent: 0,
            got: 0,
            seen: 0,
            beat: heartbeat_frame(),
            beat_left: 0,
        })
    }

    fn lost(&self, e: io::Error) -> CommError {
        CommError::PeerLost {
            rank: self.peer,
            detail: format!("tcp: {e}"),
        }
    }

    /// Reads whatever the socket has into the free end of the buffer.
    fn fill(&mut self) -> Result<()> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.rbuf.len() {
            self.rbuf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.end == self.rbuf.len() {
            return Ok(()); // full: the caller consumes first (an empty read would look like EOF)
        }
        match self.stream.read(&mut self.rbuf[self.end..]) {
            Ok(0) => Err(CommError::PeerLost {
                rank: self.peer,
                detail: "tcp connection closed (EOF)".into(),
            }),
            Ok(n) => {
                self.end += n;
                self.got += n as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(self.lost(e)),
        }
    }

    /// `sendmsg` of `parts` without blocking: bytes written (0 when the socket is full).
    fn send_parts(&mut self, parts: &[&[u8]]) -> Result<usize> {
        let iov: smallvec::SmallVec<[libc::iovec; 4]> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        if iov.is_empty() {
            return Ok(0);
        }
        // SAFETY: msghdr is plain data; the iovecs point into `parts`, alive for the call.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = iov.len() as _;
            libc::sendmsg(
                self.stream.as_raw_fd(),
                &msg,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            self.sent += n as u64;
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
            _ => Err(self.lost(e)),
        }
    }

    /// Sends what is left of a heartbeat under way; true when none is left.
    fn finish_beat(&mut self) -> Result<bool> {
        if self.beat_left > 0 {
            let beat = self.beat;
            let n = self.send_parts(&[&beat[HEADER_LEN - self.beat_left..]])?;
            self.beat_left -= n;
        }
        Ok(self.beat_left == 0)
    }
}

impl Pair for TcpPair {
    fn try_write(&mut self, parts: &[&[u8]]) -> Result<usize> {
        if self.beat_left > 0 && !self.finish_beat()? {
            return Ok(0);
        }
        self.send_parts(parts)
    }

    fn try_read_with(
        &mut self,
        max: usize,
        align: usize,
        consume: &mut dyn FnMut(&[u8]),
    ) -> Result<usize> {
        let want = align.min(max);
        if self.end - self.start < want || self.end - self.start < max {
            self.fill()?;
        }
        let avail = (self.end - self.start).min(max);
        let n = if avail == max {
            avail
        } else {
            avail - avail % align
        };
        if n == 0 {
            return Ok(0);
        }
        consume(&self.rbuf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }

    fn sent(&self) -> u64 {
        self.sent
    }

    fn beat(&mut self, between_frames: bool) -> Result<bool> {
        if self.beat_left == 0 {
            if !between_frames {
                return Ok(false);
            }
            self.beat_left = HEADER_LEN;
        }
        self.finish_beat()?;
        Ok(true)
    }

    fn heard(&mut self, between_frames: bool) -> Result<bool> {
        self.fill()?;
        if between_frames {
            // Heartbeats that wait at the front go, so that an idle link's do not pile up.
            while self.end - self.start >= HEADER_LEN
                && self.rbuf[self.start..self.start + HEADER_LEN] == self.beat
            {
                self.start += HEADER_LEN;
            }
        }
        let new = self.got != self.seen;
        self.seen = self.got;
        // A full buffer: the peer waits for this rank to read, so it cannot say more.
        Ok(new || self.end - self.start == self.rbuf.len())
    }

    fn check_alive(&mut self) -> Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let r = unsafe { libc::poll(&mut pfd, 1, 0) };
        if r > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return Err(CommError::PeerLost {
                rank: self.peer,
                detail: "tcp connection closed or reset".into(),
            });
        }
        Ok(())
    }
}
