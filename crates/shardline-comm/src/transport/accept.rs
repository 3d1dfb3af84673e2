//! Accepting connections that open with a hello (the rendezvous and the tcp transport's
//! listener), on the caller's thread: one `poll` loop over the listener and every connection
//! still saying hello, all non-blocking. Each connection has one deadline for its whole hello,
//! however slowly its bytes come. A protocol's parser reads only as far as it needs to check the
//! job token (a few KiB at most) before it may ask for more. The connections not yet past the
//! token check are capped; past the cap, the oldest is closed at once. Nothing here spawns a
//! thread, and running out of descriptors or memory for a socket is logged and waited out, never
//! a panic.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::remaining;
use crate::error::{CommError, Result};

/// The most bytes read from a connection before it passed the token check.
pub(crate) const PREAUTH_MAX: usize = 4096;
/// Connections past the token check whose hello is still coming are not capped (only a peer
/// holding the token gets there), but they are bounded by the parser's `Need::More` sizes.
const BASE_PENDING: usize = 64;
/// How many refusals are logged at warn level before the rest go to debug.
const LOUD_REFUSALS: usize = 10;
/// Connections accepted per pass before the pending ones are read again.
const ACCEPT_BATCH: usize = 32;

/// What a protocol's parser makes of the bytes of a hello read so far.
pub(crate) enum Need {
    /// Read until there are this many bytes in all, then ask again. `authenticated` says whether
    /// the bytes so far carried the right token (until then at most [`PREAUTH_MAX`] bytes).
    More { upto: usize, authenticated: bool },
    /// The hello is complete and authentic.
    Done,
}

/// A protocol's hello parser: `Err` refuses the connection (the reason is logged).
pub(crate) type Parser<'p> = &'p dyn Fn(&[u8]) -> std::result::Result<Need, String>;

struct Pending {
    stream: TcpStream,
    from: SocketAddr,
    deadline: Instant,
    buf: Vec<u8>,
    /// Bytes of `buf` filled.
    have: usize,
    authenticated: bool,
}

/// A connection whose hello is complete and authentic.
pub(crate) struct Hello {
    /// Non-blocking, positioned right after the hello.
    pub stream: TcpStream,
    pub from: SocketAddr,
    /// The whole hello.
    pub bytes: Vec<u8>,
}

/// Accepts connections on a listener and reads their hellos (see the module documentation).
pub(crate) struct Acceptor<'l> {
    listener: &'l TcpListener,
    /// The listener's role in log lines ("bootstrap", "tcp").
    role: &'static str,
    per_hello: Duration,
    /// The most bytes a hello may have once authenticated.
    max_hello: usize,
    /// The most connections not yet past the token check.
    cap: usize,
    pending: VecDeque<Pending>,
    ready: VecDeque<Hello>,
    refused: usize,
    /// When accepting last failed for want of resources (then the listener rests a little).
    starved: Option<Instant>,
}

impl<'l> Acceptor<'l> {
    /// An acceptor on `listener` (which must be non-blocking) expecting up to `peers` real peers;
    /// each connection gets `per_hello` for its hello, which may grow to `max_hello` bytes once
    /// authenticated.
    pub fn new(
        listener: &'l TcpListener,
        role: &'static str,
        peers: usize,
        per_hello: Duration,
        max_hello: usize,
    ) -> Acceptor<'l> {
        Acceptor {
            listener,
            role,
            per_hello,
            max_hello,
            cap: BASE_PENDING + peers,
            pending: VecDeque::new(),
            ready: VecDeque::new(),
            refused: 0,
            starved: None,
        }
    }

    fn refuse(&mut self, from: SocketAddr, why: &str) {
        self.refused += 1;
        let role = self.role;
        if self.refused < LOUD_REFUSALS {
            tracing::warn!("{role} listener refused a connection from {from}: {why}");
        } else if self.refused == LOUD_REFUSALS {
            tracing::warn!(
                "{role} listener refused a connection from {from}: {why} (further refusals are \
                 logged at debug level)"
            );
        } else {
            tracing::debug!("{role} listener refused a connection from {from}: {why}");
        }
    }

    /// The next connection with a complete, authentic hello. Fails with a timeout describing
    /// `what()` when `deadline` passes first (`total` seconds: the deadline's whole length).
    pub fn next(
        &mut self,
        parse: Parser,
        deadline: Instant,
        what: &dyn Fn() -> String,
        total: f64,
    ) -> Result<Hello> {
        loop {
            if let Some(h) = self.ready.pop_front() {
                return Ok(h);
            }
            let left = remaining(deadline, &what(), total)?;
            let now = Instant::now();
            // Hellos past their deadline go.
            let mut i = 0;
            while i < self.pending.len() {
                if self.pending[i].deadline <= now {
                    let p = self.pending.remove(i).expect("index checked");
                    let why = format!(
                        "no complete hello within {:.1} s ({} bytes came)",
                        self.per_hello.as_secs_f64(),
                        p.have
                    );
                    self.refuse(p.from, &why);
                } else {
                    i += 1;
                }
            }
            let mut wait = left;
            if let Some(first) = self.pending.iter().map(|p| p.deadline).min() {
                wait = wait.min(first.saturating_duration_since(now));
            }
            let listening = match self.starved {
                Some(at) if now.duration_since(at) < Duration::from_millis(50) => {
                    wait = wait.min(Duration::from_millis(50) - now.duration_since(at));
                    false
                }
                _ => true,
            };
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.pending.len() + 1);
            fds.push(libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: if listening { libc::POLLIN } else { 0 },
                revents: 0,
            });
            fds.extend(self.pending.iter().map(|p| libc::pollfd {
                fd: p.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }));
            // Round up so that a wait of less than a millisecond does not spin.
            let ms = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(CommError::io(format!("{} listener: poll", self.role), e));
            }
            if r == 0 {
                continue;
            }
            // Read the connections that have something (indices shift as some go, so walk back).
            for i in (0..self.pending.len()).rev() {
                if fds[i + 1].revents != 0 {
                    self.read_one(i, parse);
                }
            }
            if fds[0].revents != 0 {
                self.accept_some()?;
            }
        }
    }

    /// Accepts what the listener has (up to a batch), closing the oldest unauthenticated
    /// connections past the cap.
    fn accept_some(&mut self) -> Result<()> {
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok((stream, from)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        self.refuse(from, &format!("set_nonblocking: {e}"));
                        continue;
                    }
                    let unauthenticated = self.pending.iter().filter(|p| !p.authenticated).count();
                    if unauthenticated >= self.cap {
                        if let Some(i) = self.pending.iter().position(|p| !p.authenticated) {
                            let old = self.pending.remove(i).expect("index found");
                            let why = format!(
                                "{} connections were still saying hello (the oldest goes)",
                                self.cap
                            );
                            self.refuse(old.from, &why);
                        }
                    }
                    self.pending.push_back(Pending {
                        stream,
                        from,
                        deadline: Instant::now() + self.per_hello,
                        buf: Vec::new(),
                        have: 0,
                        authenticated: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection waits in the backlog while
                    // the listener rests; the pending hellos go on (and free descriptors).
                    if self.starved.is_none() {
                        tracing::warn!(
                            "{} listener cannot accept a connection ({e}); retrying",
                            self.role
                        );
                    }
                    self.starved = Some(Instant::now());
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Reads what pending connection `i` has, as far as its parser wants; moves it to `ready`
    /// when its hello is complete, or drops it when it is refused or gone.
    fn read_one(&mut self, i: usize, parse: Parser) {
        let outcome = {
            let p = &mut self.pending[i];
            step(p, parse, self.max_hello)
        };
        match outcome {
            Ok(false) => {}
            Ok(true) => {
                let p = self.pending.remove(i).expect("index in range");
                let mut bytes = p.buf;
                bytes.truncate(p.have);
                self.ready.push_back(Hello {
                    stream: p.stream,
                    from: p.from,
                    bytes,
                });
            }
            Err(why) => {
                let p = self.pending.remove(i).expect("index in range");
                self.refuse(p.from, &why);
            }
        }
    }
}

/// Reads and parses one connection until it would block; true once its hello is complete.
fn step(p: &mut Pending, parse: Parser, max_hello: usize) -> std::result::Result<bool, String> {
    loop {
        if p.have == p.buf.len() {
            match parse(&p.buf[..p.have])? {
                Need::Done => return Ok(true),
                Need::More {
                    upto,
                    authenticated,
                } => {
                    let limit = if authenticated {
                        max_hello
                    } else {
                        PREAUTH_MAX
                    };
                    if upto > limit {
                        return Err(format!(
                            "a hello of {upto} bytes is over the {limit}-byte limit"
                        ));
                    }
                    if upto <= p.have {
                        return Err("the hello parser asked for no more bytes".into());
                    }
                    p.authenticated = authenticated;
                    p.buf.resize(upto, 0);
                }
            }
        }
        match p.stream.read(&mut p.buf[p.have..]) {
            Ok(0) => {
                return Err(format!(
                    "closed after {} bytes, before a complete hello",
                    p.have
                ))
            }
            Ok(n) => p.have += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the hello: {e}")),
        }
    }
}

/// Whether `a` equals `b`, in time that depends only on their lengths (job tokens).
pub(crate) fn token_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..b.len() {
        // Against itself when the lengths differ, so the time still follows `b` alone.
        let x = if a.len() == b.len() { a[i] } else { b[i] };
        diff |= std::hint::black_box(x ^ b[i]);
    }
    std::hint::black_box(diff) == 0
}

/// Reads exactly `buf.len()` bytes from a blocking `stream` by `deadline` (one deadline for the
/// whole message, however its bytes are spread out): `TimedOut` when it passes first.
pub(crate) fn read_exact_by(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> io::Result<()> {
    let mut have = 0;
    while have < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[have..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_by_content_and_length() {
        assert!(token_eq(b"abc", b"abc"));
        assert!(token_eq(b"", b""));
        assert!(!token_eq(b"abd", b"abc"));
        assert!(!token_eq(b"ab", b"abc"));
        assert!(!token_eq(b"abcd", b"abc"));
        assert!(!token_eq(b"x", b""));
    }
}
