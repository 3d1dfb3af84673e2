//! The progress engine: drives a set of outgoing and incoming frames over the pairs at once until
//! all are complete, so that no exchange can deadlock on full buffers. Incoming payloads go
//! straight from the transport into a sink (copy, reduce in place, or accumulate in f32). Waiting
//! spins briefly, then yields, then sleeps in growing steps; while waiting it watches every peer of
//! the group (not only the ones in this exchange) so that a dead rank fails the collective quickly,
//! and it pulses the group's heartbeats when they are due (see `heartbeat`), so that a silent one
//! does too.

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use crate::elem::{self, DType, ReduceOp};
use crate::error::{CommError, Result};
use crate::heartbeat::Heart;
use crate::transport::Pair;
use crate::wire::{padded, Header, OpCode, HEADER_LEN};

/// Frames of one exchange, kept on the stack for groups of up to 16 ranks.
pub(crate) type Sends<'a> = SmallVec<[Outgoing<'a>; 16]>;
pub(crate) type Recvs<'a> = SmallVec<[Incoming<'a>; 16]>;

const ZERO_PAD: [u8; 8] = [0; 8];

/// A frame on its way out.
pub(crate) struct Outgoing<'a> {
    peer: usize,
    hdr: [u8; HEADER_LEN],
    data: &'a [u8],
    pos: usize,
}

impl<'a> Outgoing<'a> {
    pub fn new(peer: usize, header: Header, data: &'a [u8]) -> Outgoing<'a> {
        debug_assert_eq!(header.len as usize, data.len());
        Outgoing {
            peer,
            hdr: header.encode(),
            data,
            pos: 0,
        }
    }

    /// The same frame with its data now read from `data` (an identical copy of the old data).
    pub fn moved_to<'b>(&self, data: &'b [u8]) -> Outgoing<'b> {
        debug_assert_eq!(data, self.data);
        Outgoing {
            peer: self.peer,
            hdr: self.hdr,
            data,
            pos: self.pos,
        }
    }

    fn total(&self) -> usize {
        HEADER_LEN + padded(self.data.len())
    }

    pub fn done(&self) -> bool {
        self.pos == self.total()
    }

    /// Offers the rest of the frame to `pair`; with `copy`, only what the pair takes at once.
    fn poll(&mut self, pair: &mut dyn Pair, copy: bool) -> Result<bool> {
        let pad = padded(self.data.len()) - self.data.len();
        let parts: [&[u8]; 3] = [&self.hdr, self.data, &ZERO_PAD[..pad]];
        // Skip what already went out.
        let mut skip = self.pos;
        let mut rest: SmallVec<[&[u8]; 3]> = SmallVec::new();
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
            } else {
                rest.push(&p[skip..]);
                skip = 0;
            }
        }
        let n = if copy {
            pair.try_write_copy(&rest)?
        } else {
            pair.try_write(&rest)?
        };
        self.pos += n;
        Ok(n > 0)
    }
}

/// A writable byte region of a caller's buffer. Several regions may cover the same buffer (every
/// peer's data is reduced into it): the exchange writes through one region at a time, on one
/// thread, and never while a `&` or `&mut` to the buffer is in use elsewhere.
pub(crate) struct Region<'a> {
    ptr: *mut u8,
    len: usize,
    _buf: PhantomData<&'a mut [u8]>,
}

impl<'a> Region<'a> {
    /// `copies` regions over all of `buf`.
    pub fn alias(buf: &'a mut [u8], copies: usize) -> impl Iterator<Item = Region<'a>> {
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        (0..copies).map(move |_| Region {
            ptr,
            len,
            _buf: PhantomData,
        })
    }

    /// The same for an f32 accumulator.
    pub fn alias_f32(acc: &'a mut [f32], copies: usize) -> impl Iterator<Item = Region<'a>> {
        Region::alias(bytemuck::cast_slice_mut(acc), copies)
    }

    pub fn one(buf: &'a mut [u8]) -> Region<'a> {
        Region {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: PhantomData,
        }
    }

    /// SAFETY: the caller holds no other reference into the buffer while the slice lives (see the
    /// type's documentation; `exchange` applies sinks one at a time).
    unsafe fn bytes(&mut self) -> &mut [u8] {
        std::slice::from_raw_parts_mut(self.ptr, self.len)
    }
}

/// Where an incoming payload goes.
pub(crate) enum Sink<'a> {
    /// Copied into the buffer.
    Copy(Region<'a>),
    /// Reduced into the buffer (`dst = op(dst, payload)`) in the buffer's type.
    Reduce { dst: Region<'a>, op: ReduceOp },
    /// Accumulated in an f32 buffer: the first source of an ordered exchange sets, later ones combine.
    Accumulate {
        acc: Region<'a>,
        op: ReduceOp,
        first: bool,
    },
}

impl Sink<'_> {
    fn apply(&mut self, dtype: DType, at: usize, src: &[u8]) {
        // SAFETY: see `Region`; each call holds the only live view of its buffer.
        unsafe {
            match self {
                Sink::Copy(dst) => dst.bytes()[at..at + src.len()].copy_from_slice(src),
                Sink::Reduce { dst, op } => {
                    elem::reduce_into(dtype, *op, &mut dst.bytes()[at..at + src.len()], src)
                }
                Sink::Accumulate { acc, op, first } => {
                    let e = dtype.size();
                    let acc: &mut [f32] = bytemuck::cast_slice_mut(acc.bytes());
                    elem::accumulate(
                        dtype,
                        *op,
                        &mut acc[at / e..(at + src.len()) / e],
                        src,
                        *first,
                    )
                }
            }
        }
    }
}

/// Where an incoming payload comes from.
pub(crate) enum Source<'a> {
    Peer(usize),
    /// This rank's own contribution, taking its place in an ordered exchange.
    Local(&'a [u8]),
}

/// A frame on its way in: header first (checked against `expect`), then payload, then padding.
pub(crate) struct Incoming<'a> {
    source: Source<'a>,
    expect: Header,
    sink: Sink<'a>,
    hdr: [u8; HEADER_LEN],
    pos: usize,
}

impl<'a> Incoming<'a> {
    pub fn new(source: Source<'a>, expect: Header, sink: Sink<'a>) -> Incoming<'a> {
        Incoming {
            source,
            expect,
            sink,
            hdr: [0; HEADER_LEN],
            pos: 0,
        }
    }

    fn total(&self) -> usize {
        match self.source {
            Source::Peer(_) => HEADER_LEN + padded(self.expect.len as usize),
            Source::Local(_) => 1,
        }
    }

    fn done(&self) -> bool {
        self.pos == self.total()
    }

    fn poll(&mut self, pairs: &mut [Option<Box<dyn Pair>>], ranks: &[usize]) -> Result<bool> {
        let peer = match self.source {
            Source::Local(data) => {
                self.sink.apply(self.expect.dtype, 0, data);
                self.pos = 1;
                return Ok(true);
            }
            Source::Peer(p) => p,
        };
        let pair = pairs[peer].as_deref_mut().expect("no pair to a peer");
        let mut progressed = false;
        while self.pos < HEADER_LEN {
            let at = self.pos;
            let hdr = &mut self.hdr;
            let n = pair.try_read_with(HEADER_LEN - at, 1, &mut |b| {
                hdr[at..at + b.len()].copy_from_slice(b)
            })?;
            if n == 0 {
                return Ok(progressed);
            }
            progressed = true;
            self.pos += n;
            if self.pos == HEADER_LEN {
                let got = Header::decode(&self.hdr).map_err(|detail| CommError::Protocol {
                    rank: ranks[peer],
                    detail,
                })?;
                if got.op == OpCode::Heartbeat {
                    // Between two frames: dropped, and the real header follows.
                    self.pos = 0;
                    continue;
                }
                got.check_matches(&self.expect)
                    .map_err(|detail| CommError::Mismatch {
                        rank: ranks[peer],
                        detail,
                    })?;
            }
        }
        let len = self.expect.len as usize;
        let dtype = self.expect.dtype;
        while self.pos < HEADER_LEN + len {
            let at = self.pos - HEADER_LEN;
            let sink = &mut self.sink;
            let n =
                pair.try_read_with(len - at, dtype.size(), &mut |b| sink.apply(dtype, at, b))?;
            if n == 0 {
                return Ok(progressed);
            }
            progressed = true;
            self.pos += n;
        }
        let end = self.total();
        while self.pos < end {
            let n = pair.try_read_with(end - self.pos, 1, &mut |_| {})?;
            if n == 0 {
                return Ok(progressed);
            }
            progressed = true;
            self.pos += n;
        }
        Ok(progressed)
    }

    fn peer(&self) -> Option<usize> {
        match self.source {
            Source::Peer(p) => Some(p),
            Source::Local(_) => None,
        }
    }
}

/// How long an exchange may take, and how long it spins before yielding the CPU.
#[derive(Clone, Copy)]
pub(crate) struct Patience {
    pub timeout: Duration,
    pub spin: Duration,
}

/// Offers every frame of `sends` to its pair once, without waiting, and so that nothing is read
/// from their data afterwards (the caller goes on with the rest from a copy); true when all went
/// out.
pub(crate) fn push_once(
    pairs: &mut [Option<Box<dyn Pair>>],
    sends: &mut [Outgoing],
) -> Result<bool> {
    for s in sends.iter_mut() {
        s.poll(
            pairs[s.peer].as_deref_mut().expect("no pair to a peer"),
            true,
        )?;
    }
    Ok(sends.iter().all(Outgoing::done))
}

/// Progressing passes between two looks at the clock for a due heartbeat pulse.
const PULSE_POLLS: u32 = 64;

/// Runs `heart`'s pulse at `now` if it is due (or, with `waiting`, whenever heartbeats are on),
/// with what the exchange knows of half-sent and half-read frames.
#[allow(clippy::too_many_arguments)]
fn pulse(
    heart: &mut Heart,
    pairs: &mut [Option<Box<dyn Pair>>],
    ranks: &[usize],
    sends: &[Outgoing],
    recvs: &[Incoming],
    now: Instant,
    waiting: bool,
    what: &str,
) -> Result<()> {
    if !(heart.due(now) || waiting && heart.on()) {
        return Ok(());
    }
    let half = |p: usize| {
        (
            sends.iter().any(|s| s.peer == p && s.pos > 0 && !s.done()),
            recvs
                .iter()
                .any(|r| r.peer() == Some(p) && r.pos > 0 && !r.done()),
        )
    };
    heart.pulse(pairs, ranks, now, &half, &|| {
        format!("while this rank waited in {what}")
    })
}

/// Drives `sends` and `recvs` to completion. With `ordered`, incoming frames are consumed strictly
/// in the order given (so that an f32 accumulation has the same order on every rank); sends always
/// progress together. `ranks` maps group ranks to world ranks for error messages; `heart` is the
/// group's heartbeat state, pulsed when due. On failure every pair is aborted, so that no
/// transfer still reads or writes the frames' buffers once this returns.
#[allow(clippy::too_many_arguments)]
pub(crate) fn exchange(
    pairs: &mut [Option<Box<dyn Pair>>],
    ranks: &[usize],
    heart: &mut Heart,
    sends: &mut [Outgoing],
    recvs: &mut [Incoming],
    ordered: bool,
    patience: Patience,
    what: &str,
) -> Result<()> {
    let r = drive(pairs, ranks, heart, sends, recvs, ordered, patience, what);
    if r.is_err() {
        for pair in pairs.iter_mut().flatten() {
            pair.abort();
        }
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn drive(
    pairs: &mut [Option<Box<dyn Pair>>],
    ranks: &[usize],
    heart: &mut Heart,
    sends: &mut [Outgoing],
    recvs: &mut [Incoming],
    ordered: bool,
    patience: Patience,
    what: &str,
) -> Result<()> {
    let timeout = patience.timeout;
    let mut wait = Backoff::new(patience.spin);
    pulse(heart, pairs, ranks, sends, recvs, wait.start, false, what)?;
    let mut next_recv = 0;
    let mut polls = 0u32;
    loop {
        let mut progressed = false;
        let mut all_done = true;
        for s in sends.iter_mut().filter(|s| !s.done()) {
            let pair = pairs[s.peer].as_deref_mut().expect("no pair to a peer");
            progressed |= s.poll(pair, false)?;
            all_done &= s.done();
        }
        if ordered {
            while next_recv < recvs.len() {
                progressed |= recvs[next_recv].poll(pairs, ranks)?;
                if !recvs[next_recv].done() {
                    all_done = false;
                    break;
                }
                next_recv += 1;
            }
        } else {
            for r in recvs.iter_mut().filter(|r| !r.done()) {
                progressed |= r.poll(pairs, ranks)?;
                all_done &= r.done();
            }
        }
        if all_done {
            return Ok(());
        }
        if progressed {
            wait.reset();
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(PULSE_POLLS) {
                // A long stream to some peers must not starve the others of heartbeats.
                pulse(
                    heart,
                    pairs,
                    ranks,
                    sends,
                    recvs,
                    Instant::now(),
                    false,
                    what,
                )?;
            }
            continue;
        }
        if wait.idle() {
            for pair in pairs.iter_mut().flatten() {
                pair.check_alive()?;
            }
            // Waiting anyway: a pulse at every check times a silence to 10 ms.
            pulse(
                heart,
                pairs,
                ranks,
                sends,
                recvs,
                Instant::now(),
                true,
                what,
            )?;
            if wait.start.elapsed() > timeout {
                let pending: Vec<usize> = sends
                    .iter()
                    .filter(|s| !s.done())
                    .map(|s| ranks[s.peer])
                    .chain(
                        recvs
                            .iter()
                            .filter(|r| !r.done())
                            .filter_map(|r| r.peer().map(|p| ranks[p])),
                    )
                    .collect();
                return Err(CommError::Timeout {
                    what: format!("in {what} waiting for ranks {pending:?}"),
                    secs: timeout.as_secs_f64(),
                });
            }
        }
    }
}

/// Spin, then yield, then sleep: fast when the peer is on another core, and still quick when
/// more ranks than cores share the machine. `idle` returns true every few milliseconds of
/// waiting, when the caller should check deadlines and peers.
struct Backoff {
    spin: Duration,
    start: Instant,
    idle_since: Option<Instant>,
    polls: u32,
    last_check: Instant,
}

const SPIN_POLLS: u32 = 256;
/// Default time a waiting rank spins before it yields (override: SHARDLINE_SPIN_US). Ranks that
/// outnumber this host's CPUs do not spin at all: the peer they wait for may need their core.
pub(crate) const DEFAULT_SPIN: Duration = Duration::from_micros(20);
const YIELD_TIME: Duration = Duration::from_millis(2);
const CHECK_EVERY: Duration = Duration::from_millis(10);

impl Backoff {
    fn new(spin: Duration) -> Backoff {
        let now = Instant::now();
        Backoff {
            spin,
            start: now,
            idle_since: None,
            polls: 0,
            last_check: now,
        }
    }

    fn reset(&mut self) {
        self.idle_since = None;
        self.polls = 0;
    }

    fn idle(&mut self) -> bool {
        self.polls += 1;
        if self.polls < SPIN_POLLS {
            std::hint::spin_loop();
            return false;
        }
        let now = Instant::now();
        let since = *self.idle_since.get_or_insert(now);
        let idle = now - since;
        if idle < self.spin {
            std::hint::spin_loop();
        } else if idle < self.spin + YIELD_TIME {
            std::thread::yield_now();
        } else {
            // Grows with the wait, capped so a late peer costs at most ~0.5 ms extra.
            let us = (idle.as_micros() as u64 / 20).clamp(50, 500);
            std::thread::sleep(Duration::from_micros(us));
        }
        if now - self.last_check >= CHECK_EVERY {
            self.last_check = now;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tcp::TcpPair;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    /// A pair whose far end is a raw socket the test writes into, as peer rank 5.
    fn raw_pair() -> (Vec<Option<Box<dyn Pair>>>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let raw = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        (
            vec![None, Some(Box::new(TcpPair::new(ours, 5).unwrap()))],
            raw,
        )
    }

    fn expect(len: u64) -> Header {
        Header {
            op: crate::wire::OpCode::AllReduce,
            dtype: DType::F32,
            tag: 1,
            total: len,
            len,
        }
    }

    /// Receives one 16-byte all_reduce frame from peer 5 over `pairs`, within `timeout`.
    fn recv16(pairs: &mut [Option<Box<dyn Pair>>], timeout: Duration) -> Result<[u8; 16]> {
        let mut buf = [0u8; 16];
        let mut recvs = [Incoming::new(
            Source::Peer(1),
            expect(16),
            Sink::Copy(Region::one(&mut buf)),
        )];
        exchange(
            pairs,
            &[0, 5],
            &mut Heart::new(None, vec![None, Some(None)]),
            &mut [],
            &mut recvs,
            false,
            Patience {
                timeout,
                spin: DEFAULT_SPIN,
            },
            "test",
        )?;
        Ok(buf)
    }

    fn receive(bytes: &[u8], close: bool, timeout_ms: u64) -> Result<()> {
        let (mut pairs, mut raw) = raw_pair();
        raw.write_all(bytes).unwrap();
        if close {
            drop(raw);
        } else {
            std::mem::forget(raw); // keep the far end silent but open
        }
        recv16(&mut pairs, Duration::from_millis(timeout_ms)).map(|_| ())
    }

    #[test]
    fn garbage_is_a_protocol_error_naming_the_peer() {
        let e = receive(&[0xab; 64], false, 2000).unwrap_err();
        assert!(matches!(e, CommError::Protocol { rank: 5, .. }), "{e}");
    }

    #[test]
    fn a_huge_claimed_length_is_refused_before_any_allocation() {
        let mut h = expect(16);
        h.len = 1 << 50;
        h.total = 1 << 50;
        let e = receive(&h.encode(), false, 2000).unwrap_err();
        assert!(e.to_string().contains("impossible lengths"), "{e}");
        h.len = 8;
        h.total = 8;
        let e = receive(&h.encode(), false, 2000).unwrap_err();
        assert!(matches!(e, CommError::Mismatch { rank: 5, .. }), "{e}");
    }

    #[test]
    fn a_short_frame_then_eof_is_peer_lost_and_silence_times_out() {
        let e = receive(&expect(16).encode()[..10], true, 2000).unwrap_err();
        assert!(matches!(e, CommError::PeerLost { rank: 5, .. }), "{e}");
        let t = Instant::now();
        let e = receive(&[], false, 200).unwrap_err();
        assert!(
            matches!(e, CommError::Timeout { .. }) && e.to_string().contains("[5]"),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn heartbeats_between_frames_are_dropped_and_count_as_life() {
        let (mut pairs, mut raw) = raw_pair();
        let beat = crate::wire::heartbeat_frame();
        let payload: Vec<u8> = (1..=16).collect();
        let mut bytes = beat.to_vec();
        bytes.extend_from_slice(&beat);
        bytes.extend_from_slice(&expect(16).encode());
        bytes.extend_from_slice(&payload);
        bytes.extend_from_slice(&beat);
        raw.write_all(&bytes).unwrap();
        let buf = recv16(&mut pairs, Duration::from_secs(5)).unwrap();
        assert_eq!(buf.to_vec(), payload);
        let pair = pairs[1].as_deref_mut().unwrap();
        // The trailing heartbeat: life, and an idle rank drops it, but not a frame behind it.
        let t = Instant::now();
        while !pair.heard(true).unwrap() {
            assert!(t.elapsed() < Duration::from_secs(5));
        }
        raw.write_all(&expect(16).encode()).unwrap();
        raw.write_all(&payload).unwrap();
        let t = Instant::now();
        while !pair.heard(true).unwrap() {
            assert!(t.elapsed() < Duration::from_secs(5));
        }
        assert!(!pair.heard(true).unwrap(), "no news is no life");
        let buf = recv16(&mut pairs, Duration::from_secs(5)).unwrap();
        assert_eq!(buf.to_vec(), payload);
    }

    #[test]
    fn a_good_frame_arriving_byte_by_byte_is_received() {
        let (mut pairs, mut raw) = raw_pair();
        let payload: Vec<u8> = (1..=16).collect();
        let mut frame = expect(16).encode().to_vec();
        frame.extend_from_slice(&payload);
        let writer = std::thread::spawn(move || {
            for b in frame {
                raw.write_all(&[b]).unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
            raw
        });
        let buf = recv16(&mut pairs, Duration::from_secs(5)).unwrap();
        assert_eq!(buf.to_vec(), payload);
        drop(writer.join().unwrap());
    }
}
