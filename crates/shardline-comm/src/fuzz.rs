//! Bounded fuzzing (proptest) of every decoder of bytes that arrive from the network: the frame
//! header and the tcp transport's frame stream (heartbeats included), the tcp transport's hello,
//! and the bootstrap's length-prefixed messages, hello and table. Each decoder gets arbitrary
//! bytes (huge length fields included), mutations of real encoded messages and round trips of
//! valid ones; none may panic, and a per-thread allocation tracker checks that none allocates
//! more than its cap allows. 256 cases per property by default; `PROPTEST_CASES` raises it.
//! (The public `Endpoint::decode` is fuzzed in tests/it/fuzz.rs.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;

use crate::bootstrap::{self, BEAT_MAGIC, MAX_HELLO, MAX_MESSAGE, MAX_TOKEN};
use crate::config::Config;
use crate::elem::DType;
use crate::error::CommError;
use crate::heartbeat::Heart;
use crate::progress::{exchange, Incoming, Patience, Region, Sink, Source, DEFAULT_SPIN};
use crate::transport::accept::{Need, PREAUTH_MAX};
use crate::transport::tcp::{self, TcpPair};
use crate::transport::{Endpoint, Pair};
use crate::wire::{checksum, heartbeat_frame, Header, OpCode, HEADER_LEN, MAX_LEN};

// ---- allocation tracking -----------------------------------------------------------------------

/// The system allocator, noting the largest single request made on each thread.
struct Track;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is forwarded to `System` unchanged.
unsafe impl GlobalAlloc for Track {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static TRACK: Track = Track;

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
fn largest_alloc<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    let r = f();
    (r, LARGEST.with(|l| l.get()))
}

#[test]
fn the_tracker_sees_allocations() {
    let (v, big) = largest_alloc(|| vec![1u8; 100_000]);
    assert!(big >= v.len());
}

/// What error strings and small bookkeeping may take, at most.
const SMALL: usize = 1024;

// ---- strategies --------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Mutation {
    Flip(Index, u8),
    Set(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Delete),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..6)
}

fn mutate(mut bytes: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let n = bytes.len();
        match *m {
            _ if n == 0 => {
                if let Mutation::Insert(_, b) = *m {
                    bytes.push(b)
                }
            }
            Mutation::Flip(ref i, bit) => bytes[i.index(n)] ^= 1 << bit,
            Mutation::Set(ref i, b) => bytes[i.index(n)] = b,
            Mutation::Insert(ref i, b) => bytes.insert(i.index(n + 1), b),
            Mutation::Delete(ref i) => {
                bytes.remove(i.index(n));
            }
            Mutation::Truncate(ref i) => bytes.truncate(i.index(n)),
        }
    }
    bytes
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

/// A 32-bit length field biased towards the values that matter: small, just over a cap, huge.
fn len32(cap: usize) -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..4096,
        Just(cap as u32),
        Just(cap as u32 + 1),
        Just(u32::MAX),
        Just(1 << 31),
        any::<u32>(),
    ]
}

fn text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..max).prop_map(|c| c.into_iter().collect())
}

fn endpoint(rank: usize) -> impl Strategy<Value = Endpoint> {
    (any::<u32>(), text(24), text(24), text(24), text(24)).prop_map(
        move |(pid, host, tcp, shm, ucx)| Endpoint {
            world_rank: rank,
            host,
            pid,
            tcp,
            shm,
            ucx,
        },
    )
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9]{0,40}",
        Just("t".repeat(MAX_TOKEN)),
        Just(String::new()),
    ]
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::U8),
        Just(DType::F32),
        Just(DType::F16),
        Just(DType::Bf16)
    ]
}

fn op() -> impl Strategy<Value = OpCode> {
    prop_oneof![
        Just(OpCode::AllReduce),
        Just(OpCode::AllGather),
        Just(OpCode::ReduceScatter),
        Just(OpCode::Broadcast),
        Just(OpCode::AllToAll),
        Just(OpCode::Barrier),
        Just(OpCode::P2p),
        Just(OpCode::Heartbeat),
    ]
}

/// A valid header whose payload is at most `max_len` bytes.
fn header(max_len: u64) -> impl Strategy<Value = Header> {
    (op(), dtype(), any::<u32>(), 0..=max_len, 0..=MAX_LEN).prop_map(
        move |(op, dtype, tag, len, extra)| {
            let len = len - len % dtype.size() as u64;
            let total = (len + extra).min(MAX_LEN);
            Header {
                op,
                dtype,
                tag,
                total,
                len,
            }
        },
    )
}

/// Header bytes with the right magic and checksum but arbitrary fields (codes and lengths), so
/// that decoding gets past its first two checks.
fn sealed_header() -> impl Strategy<Value = [u8; HEADER_LEN]> {
    (
        any::<u8>(),
        any::<u8>(),
        any::<[u8; 6]>(),
        prop_oneof![
            any::<u64>(),
            Just(MAX_LEN),
            Just(MAX_LEN + 1),
            Just(u64::MAX)
        ],
        prop_oneof![
            any::<u64>(),
            Just(MAX_LEN),
            Just(MAX_LEN + 1),
            Just(u64::MAX),
            0u64..64
        ],
    )
        .prop_map(|(op, dt, rest, total, len)| {
            let mut b = heartbeat_frame();
            b[4] = op;
            b[5] = dt;
            b[6..12].copy_from_slice(&rest);
            b[12..20].copy_from_slice(&total.to_le_bytes());
            b[20..28].copy_from_slice(&len.to_le_bytes());
            let sum = checksum(&b[..28]);
            b[28..32].copy_from_slice(&sum.to_le_bytes());
            b
        })
}

// ---- frame header ------------------------------------------------------------------------------

fn check_header(b: &[u8; HEADER_LEN]) -> Result<(), TestCaseError> {
    let (r, big) = largest_alloc(|| Header::decode(b));
    prop_assert!(big <= SMALL, "decoding a header allocated {big} bytes");
    if let Ok(h) = r {
        prop_assert!(h.len <= h.total && h.total <= MAX_LEN, "{h:?}");
        prop_assert_eq!(h.len % h.dtype.size() as u64, 0);
        // A header that decodes encodes the same, but for bytes 6..8 (reserved, not checked).
        let mut same = *b;
        same[6..8].fill(0);
        let sum = checksum(&same[..28]);
        same[28..32].copy_from_slice(&sum.to_le_bytes());
        prop_assert_eq!(h.encode(), same);
    }
    Ok(())
}

proptest! {
    #[test]
    fn header_of_arbitrary_bytes(b in any::<[u8; HEADER_LEN]>()) {
        check_header(&b)?;
    }

    #[test]
    fn header_with_arbitrary_fields_and_a_good_checksum(b in sealed_header()) {
        check_header(&b)?;
        let total = u64::from_le_bytes(b[12..20].try_into().unwrap());
        let len = u64::from_le_bytes(b[20..28].try_into().unwrap());
        let known = OpCode::from_code(b[4]).is_some() && DType::from_code(b[5]).is_some();
        if known && (total > MAX_LEN || len > total) {
            prop_assert!(Header::decode(&b).unwrap_err().contains("impossible lengths"));
        }
    }

    #[test]
    fn header_mutations(h in header(1 << 20), ms in mutations()) {
        let bad = mutate(h.encode().to_vec(), &ms);
        if let Ok(b) = <[u8; HEADER_LEN]>::try_from(bad.as_slice()) {
            check_header(&b)?;
            if b != h.encode() {
                prop_assert!(Header::decode(&b).is_err(), "a changed header went unnoticed");
            }
        }
    }

    #[test]
    fn header_round_trip(h in header(MAX_LEN)) {
        prop_assert_eq!(Header::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn heartbeat_mutations(ms in mutations()) {
        let beat = heartbeat_frame();
        let bad = mutate(beat.to_vec(), &ms);
        if let Ok(b) = <[u8; HEADER_LEN]>::try_from(bad.as_slice()) {
            check_header(&b)?;
            prop_assert_eq!(Header::decode(&b).is_ok(), b == beat);
        }
    }
}

// ---- the tcp frame stream ----------------------------------------------------------------------

/// A tcp pair to peer rank 5 whose far end gets `stream` and is then closed.
fn pair_fed(stream: &[u8]) -> Vec<Option<Box<dyn Pair>>> {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut raw = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (ours, _) = l.accept().unwrap();
    raw.write_all(stream).unwrap();
    drop(raw);
    vec![None, Some(Box::new(TcpPair::new(ours, 5).unwrap()))]
}

/// Receives one frame like `expect` from `stream` (heartbeats first dropped by an idle rank's
/// `heard` when `idle`), as the collectives do.
fn receive(stream: &[u8], expect: Header, idle: bool) -> (crate::Result<Vec<u8>>, usize) {
    let mut pairs = pair_fed(stream);
    let mut buf = vec![0u8; expect.len as usize];
    let (r, big) = largest_alloc(|| {
        if idle {
            let pair = pairs[1].as_deref_mut().unwrap();
            let t = Instant::now();
            // Until the bytes are in (or the connection is seen closed).
            while t.elapsed() < Duration::from_secs(2) {
                match pair.heard(true) {
                    Ok(true) | Err(_) => break,
                    Ok(false) => {}
                }
            }
        }
        let mut recvs = [Incoming::new(
            Source::Peer(1),
            expect,
            Sink::Copy(Region::one(&mut buf)),
        )];
        exchange(
            &mut pairs,
            &[0, 5],
            &mut Heart::new(None, vec![None, Some(None)]),
            &mut [],
            &mut recvs,
            false,
            Patience {
                timeout: Duration::from_secs(10),
                spin: DEFAULT_SPIN,
            },
            "fuzz",
        )
    });
    (r.map(|_| buf), big)
}

fn expect16() -> Header {
    Header {
        op: OpCode::AllReduce,
        dtype: DType::F32,
        tag: 1,
        total: 16,
        len: 16,
    }
}

/// Beats, a frame, its payload and padding, beats.
fn good_stream(h: Header, payload: &[u8], before: usize, after: usize) -> Vec<u8> {
    let beat = heartbeat_frame();
    let mut s = Vec::new();
    for _ in 0..before {
        s.extend_from_slice(&beat);
    }
    s.extend_from_slice(&h.encode());
    s.extend_from_slice(payload);
    s.resize(
        s.len() + crate::wire::padded(payload.len()) - payload.len(),
        0,
    );
    for _ in 0..after {
        s.extend_from_slice(&beat);
    }
    s
}

fn check_outcome(r: &crate::Result<Vec<u8>>, big: usize) -> Result<(), TestCaseError> {
    prop_assert!(big <= SMALL, "receiving a frame allocated {big} bytes");
    if let Err(e) = r {
        prop_assert!(
            matches!(
                e,
                CommError::Protocol { rank: 5, .. }
                    | CommError::Mismatch { rank: 5, .. }
                    | CommError::PeerLost { rank: 5, .. }
            ),
            "unexpected error {e}"
        );
    }
    Ok(())
}

proptest! {
    #[test]
    fn frame_stream_of_arbitrary_bytes(
        junk in bytes(4096),
        sealed in sealed_header(),
        lead in any::<bool>(),
        idle in any::<bool>(),
    ) {
        // Arbitrary bytes, or arbitrary bytes behind a header that gets past the checksum.
        let mut stream = if lead { sealed.to_vec() } else { Vec::new() };
        stream.extend_from_slice(&junk);
        let (r, big) = receive(&stream, expect16(), idle);
        check_outcome(&r, big)?;
        if !lead {
            prop_assert!(r.is_err() || junk.starts_with(&expect16().encode()));
        }
    }

    #[test]
    fn frame_stream_mutations(
        payload in any::<[u8; 16]>(),
        before in 0usize..3,
        after in 0usize..3,
        ms in mutations(),
        idle in any::<bool>(),
    ) {
        let stream = mutate(good_stream(expect16(), &payload, before, after), &ms);
        let (r, big) = receive(&stream, expect16(), idle);
        check_outcome(&r, big)?;
    }

    #[test]
    fn frame_stream_round_trip(
        h in header(256).prop_filter("heartbeats carry no payload", |h| h.op != OpCode::Heartbeat),
        seed in any::<u8>(),
        before in 0usize..3,
        after in 0usize..3,
        idle in any::<bool>(),
    ) {
        let payload: Vec<u8> = (0..h.len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
        let (r, _) = receive(&good_stream(h, &payload, before, after), h, idle);
        prop_assert_eq!(r.unwrap(), payload);
    }
}

// ---- hellos, as the acceptor reads them --------------------------------------------------------

/// Feeds `input` to a hello parser the way the acceptor does (asking it after each read how far
/// to read, refusing a request past the limit), checking the parser's side of that contract: it
/// asks for more than it has, never past `PREAUTH_MAX` before the token checked out nor past
/// `max_hello` after. `Ok(None)`: the input ended first.
fn drive(
    parse: &dyn Fn(&[u8]) -> Result<Need, String>,
    input: &[u8],
    max_hello: usize,
) -> Result<Result<Option<Vec<u8>>, String>, TestCaseError> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let (need, big) = largest_alloc(|| parse(&buf));
        prop_assert!(big <= SMALL, "a hello parser allocated {big} bytes");
        let (upto, authenticated) = match need {
            Err(why) => return Ok(Err(why)),
            Ok(Need::Done) => return Ok(Ok(Some(buf))),
            Ok(Need::More {
                upto,
                authenticated,
            }) => (upto, authenticated),
        };
        let limit = if authenticated {
            max_hello
        } else {
            PREAUTH_MAX
        };
        prop_assert!(
            upto > buf.len(),
            "asked for {upto} bytes with {}",
            buf.len()
        );
        prop_assert!(
            upto <= limit,
            "asked for {upto} bytes, over the {limit}-byte limit"
        );
        if input.len() < upto {
            return Ok(Ok(None));
        }
        buf = input[..upto].to_vec();
    }
}

fn boot_cfg(rank: usize, world: usize, token: &str) -> Config {
    Config::new(rank, world, "127.0.0.1:1", token)
}

/// A bootstrap hello (length prefix and body) from `rank` of `world` with `token`.
fn boot_hello(rank: usize, world: usize, token: &str, ep: &Endpoint) -> Vec<u8> {
    let body = bootstrap::encode_hello(&boot_cfg(rank, world, token), ep);
    let mut msg = (body.len() as u32).to_le_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

/// What `parse_hello` makes of a hello: the sender's rank and endpoint, or why it is refused.
type Parsed = Result<(usize, Endpoint), String>;

/// Rank 0's view of a bootstrap hello: the acceptor with its parser, then `parse_hello`.
fn boot_receive(input: &[u8], cfg: &Config) -> Result<Option<Parsed>, TestCaseError> {
    let parse = |b: &[u8]| bootstrap::hello_need(b, cfg);
    let Ok(Some(hello)) = drive(&parse, input, 4 + MAX_HELLO)? else {
        return Ok(None);
    };
    prop_assert!(hello.len() >= 4 && hello.len() <= 4 + MAX_HELLO);
    let len = u32::from_le_bytes(hello[..4].try_into().unwrap()) as usize;
    prop_assert_eq!(hello.len(), 4 + len);
    let tlen = u16::from_le_bytes([hello[20], hello[21]]) as usize;
    prop_assert_eq!(
        &hello[22..22 + tlen],
        cfg.token.as_bytes(),
        "authentic hello"
    );
    let (r, big) = largest_alloc(|| bootstrap::parse_hello(&hello[4..], cfg));
    prop_assert!(
        big <= hello.len().max(SMALL),
        "parse_hello allocated {big} bytes"
    );
    if let Ok((rank, ep)) = &r {
        prop_assert!(*rank >= 1 && *rank < cfg.world_size);
        prop_assert_eq!(ep.world_rank, *rank);
    }
    Ok(Some(r))
}

/// Rank `me`'s tcp listener's view of a hello: the acceptor with its parser.
fn tcp_receive(input: &[u8], token: &str, nonce: u64) -> Result<Option<Vec<u8>>, TestCaseError> {
    let parse = |b: &[u8]| tcp::hello_need(b, token, nonce);
    let Ok(Some(hello)) = drive(&parse, input, tcp::HELLO_HEAD + MAX_TOKEN)? else {
        return Ok(None);
    };
    // `connect` reads the rank at bytes 12..16.
    prop_assert!(hello.len() >= tcp::HELLO_HEAD);
    prop_assert_eq!(
        &hello[tcp::HELLO_HEAD..],
        token.as_bytes(),
        "authentic hello"
    );
    prop_assert_eq!(&hello[4..12], &nonce.to_le_bytes()[..]);
    Ok(Some(hello))
}

proptest! {
    #[test]
    fn bootstrap_hello_of_arbitrary_bytes(
        prefix in len32(MAX_HELLO),
        junk in bytes(4096),
        raw in any::<bool>(),
        tok in token(),
    ) {
        let mut input = if raw { Vec::new() } else { prefix.to_le_bytes().to_vec() };
        input.extend_from_slice(&junk);
        let cfg = boot_cfg(0, 4, &tok);
        boot_receive(&input, &cfg)?;
        if prefix as usize > MAX_HELLO && !raw {
            let e = bootstrap::hello_need(&input, &cfg).err().unwrap_or_default();
            prop_assert!(e.contains("limit"), "{e}");
        }
    }

    #[test]
    fn bootstrap_hello_with_a_good_head_and_arbitrary_lengths(
        prefix in len32(MAX_HELLO),
        tlen in prop_oneof![any::<u16>(), Just(MAX_TOKEN as u16 + 1), 0u16..64],
        tail in bytes(2048),
        tok in token(),
    ) {
        // Magic and version right, so the token length and the token are reached.
        let good = boot_hello(1, 4, &tok, &Endpoint {
            world_rank: 1, host: String::new(), pid: 0, tcp: String::new(),
            shm: String::new(), ucx: String::new(),
        });
        let mut input = prefix.to_le_bytes().to_vec();
        input.extend_from_slice(&good[4..20]);
        input.extend_from_slice(&tlen.to_le_bytes());
        input.extend_from_slice(&tail);
        boot_receive(&input, &boot_cfg(0, 4, &tok))?;
    }

    #[test]
    fn bootstrap_hello_mutations(
        world in 2usize..9,
        pick in any::<Index>(),
        tok in token(),
        ep in endpoint(0),
        ms in mutations(),
    ) {
        let rank = 1 + pick.index(world - 1);
        let ep = Endpoint { world_rank: rank, ..ep };
        let input = mutate(boot_hello(rank, world, &tok, &ep), &ms);
        boot_receive(&input, &boot_cfg(0, world, &tok))?;
    }

    #[test]
    fn bootstrap_hello_round_trip(
        world in 2usize..9,
        pick in any::<Index>(),
        tok in token(),
        ep in endpoint(0),
    ) {
        let rank = 1 + pick.index(world - 1);
        let ep = Endpoint { world_rank: rank, ..ep };
        let input = boot_hello(rank, world, &tok, &ep);
        let got = boot_receive(&input, &boot_cfg(0, world, &tok))?;
        prop_assert_eq!(got, Some(Ok((rank, ep))));
    }

    #[test]
    fn tcp_hello_of_arbitrary_bytes(
        junk in bytes(4096),
        head in any::<bool>(),
        tlen in prop_oneof![any::<u16>(), Just(MAX_TOKEN as u16), Just(MAX_TOKEN as u16 + 1)],
        tok in token(),
        nonce in any::<u64>(),
    ) {
        // Arbitrary bytes, or arbitrary bytes behind a good magic and nonce and any token length.
        let mut input = Vec::new();
        if head {
            input = tcp::encode_hello("", nonce, 3)[..16].to_vec();
            input.extend_from_slice(&tlen.to_le_bytes());
        }
        input.extend_from_slice(&junk);
        tcp_receive(&input, &tok, nonce)?;
        if head && tlen as usize > MAX_TOKEN {
            prop_assert!(tcp::hello_need(&input, &tok, nonce).is_err());
        }
    }

    #[test]
    fn tcp_hello_mutations(
        tok in token(),
        nonce in any::<u64>(),
        rank in any::<u32>(),
        ms in mutations(),
    ) {
        let input = mutate(tcp::encode_hello(&tok, nonce, rank as usize), &ms);
        tcp_receive(&input, &tok, nonce)?;
    }

    #[test]
    fn tcp_hello_round_trip(tok in token(), nonce in any::<u64>(), rank in any::<u32>()) {
        let hello = tcp::encode_hello(&tok, nonce, rank as usize);
        prop_assert_eq!(tcp_receive(&hello, &tok, nonce)?, Some(hello.clone()));
        prop_assert_eq!(&hello[12..16], &rank.to_le_bytes()[..]);
        // Another group's nonce or another token is refused.
        prop_assert_eq!(tcp_receive(&hello, &tok, !nonce)?, None::<Vec<u8>>);
        prop_assert_eq!(tcp_receive(&hello, &format!("{tok}x"), nonce)?, None::<Vec<u8>>);
    }
}

// ---- the bootstrap table and length-prefixed messages ------------------------------------------

fn check_table(body: &[u8], world: usize) -> Result<(), TestCaseError> {
    let (r, big) = largest_alloc(|| bootstrap::parse_table(body, world));
    let bound = (world * std::mem::size_of::<Endpoint>())
        .max(body.len())
        .max(SMALL);
    prop_assert!(big <= bound, "parse_table allocated {big} bytes");
    if let Ok((_, eps)) = r {
        prop_assert_eq!(eps.len(), world);
        prop_assert!(eps.iter().enumerate().all(|(i, e)| e.world_rank == i));
    }
    Ok(())
}

fn table(max_world: usize) -> impl Strategy<Value = (u64, Vec<Endpoint>)> {
    (any::<u64>(), 1..=max_world).prop_flat_map(|(nonce, world)| {
        let eps: Vec<_> = (0..world).map(endpoint).collect();
        (Just(nonce), eps)
    })
}

proptest! {
    #[test]
    fn table_of_arbitrary_bytes(
        junk in bytes(4096),
        head in any::<bool>(),
        claimed in len32(1 << 20),
        world in 1usize..9,
    ) {
        // Arbitrary bytes, or behind a good magic and nonce, any claimed number of ranks.
        let mut body = Vec::new();
        if head {
            body = bootstrap::encode_table(7, &[])[..12].to_vec();
            body.extend_from_slice(&claimed.to_le_bytes());
        }
        body.extend_from_slice(&junk);
        check_table(&body, world)?;
        if head && claimed as usize != world {
            prop_assert!(bootstrap::parse_table(&body, world).is_err());
        }
    }

    #[test]
    fn table_mutations((nonce, eps) in table(6), ms in mutations()) {
        let body = mutate(bootstrap::encode_table(nonce, &eps), &ms);
        check_table(&body, eps.len())?;
    }

    #[test]
    fn table_round_trip((nonce, eps) in table(6)) {
        let body = bootstrap::encode_table(nonce, &eps);
        prop_assert_eq!(bootstrap::parse_table(&body, eps.len()), Ok((nonce, eps.clone())));
        prop_assert!(bootstrap::parse_table(&body, eps.len() + 1).is_err());
    }
}

/// `bytes` arrive on a socket, then it closes; what `read_message` makes of them, and the largest
/// allocation it made.
fn read_from(bytes: &[u8]) -> (std::io::Result<Vec<u8>>, usize) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut raw = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut ours, _) = l.accept().unwrap();
    raw.write_all(bytes).unwrap();
    drop(raw);
    let deadline = Instant::now() + Duration::from_secs(10);
    largest_alloc(|| bootstrap::read_message(&mut ours, deadline))
}

proptest! {
    #[test]
    fn message_of_arbitrary_bytes(
        prefix in len32(MAX_MESSAGE),
        body in bytes(4096),
        raw in any::<bool>(),
    ) {
        let mut input = if raw { Vec::new() } else { prefix.to_le_bytes().to_vec() };
        input.extend_from_slice(&body);
        let (r, big) = read_from(&input);
        if input.len() < 4 {
            prop_assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
            return Ok(());
        }
        let len = u32::from_le_bytes(input[..4].try_into().unwrap()) as usize;
        let rest = &input[4..];
        if len > MAX_MESSAGE {
            // Refused before its body is allocated.
            prop_assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
            prop_assert!(big <= SMALL, "an over-long message allocated {big} bytes");
        } else {
            prop_assert!(big <= len.max(SMALL), "a {len}-byte message allocated {big} bytes");
            if rest.len() >= len {
                prop_assert_eq!(r.unwrap(), &rest[..len]);
            } else {
                prop_assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
            }
        }
    }

    #[test]
    fn message_round_trip(body in prop_oneof![bytes(4096), Just(BEAT_MAGIC.to_le_bytes().to_vec())]) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut raw = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut ours, _) = l.accept().unwrap();
        bootstrap::write_message(&mut raw, &body).unwrap();
        let got = bootstrap::read_message(&mut ours, Instant::now() + Duration::from_secs(10));
        prop_assert_eq!(got.unwrap(), body);
    }
}
