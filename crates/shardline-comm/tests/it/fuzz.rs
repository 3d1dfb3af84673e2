//! Bounded fuzzing (proptest) of `Endpoint::decode`, the public decoder of the endpoint records
//! that arrive in bootstrap hellos and tables and in `split` records: arbitrary bytes (huge
//! string lengths included), mutations of real encodings and round trips. It never panics and
//! allocates no more than the record holds. The crate-private decoders (frame header, tcp frame
//! stream and heartbeats, tcp and bootstrap hellos, the table, length-prefixed messages) are
//! fuzzed in src/fuzz.rs. 256 cases per property by default; `PROPTEST_CASES` raises it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use proptest::sample::Index;
use shardline_comm::transport::Endpoint;

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

fn largest_alloc<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    let r = f();
    (r, LARGEST.with(|l| l.get()))
}

fn text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..max).prop_map(|c| c.into_iter().collect())
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    (
        any::<u32>(),
        any::<u32>(),
        text(40),
        text(40),
        text(40),
        text(40),
    )
        .prop_map(|(rank, pid, host, tcp, shm, ucx)| Endpoint {
            world_rank: rank as usize,
            host,
            pid,
            tcp,
            shm,
            ucx,
        })
}

/// Decodes `bytes`, checking that it neither panics nor allocates more than they hold, and that
/// what decodes re-encodes to the bytes it consumed.
fn check(bytes: &[u8]) -> Result<Option<Endpoint>, TestCaseError> {
    let mut b = bytes;
    let (r, big) = largest_alloc(|| Endpoint::decode(&mut b));
    prop_assert!(
        big <= bytes.len().max(1024),
        "decoding {} bytes allocated {big}",
        bytes.len()
    );
    match r {
        Ok(ep) => {
            let used = bytes.len() - b.len();
            let mut again = Vec::new();
            ep.encode(&mut again);
            prop_assert_eq!(&again[..], &bytes[..used]);
            Ok(Some(ep))
        }
        Err(_) => Ok(None),
    }
}

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

fn mutate(mut bytes: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let n = bytes.len();
        match *m {
            Mutation::Insert(ref i, b) => bytes.insert(i.index(n + 1), b),
            _ if n == 0 => {}
            Mutation::Flip(ref i, bit) => bytes[i.index(n)] ^= 1 << bit,
            Mutation::Set(ref i, b) => bytes[i.index(n)] = b,
            Mutation::Delete(ref i) => {
                bytes.remove(i.index(n));
            }
            Mutation::Truncate(ref i) => bytes.truncate(i.index(n)),
        }
    }
    bytes
}

proptest! {
    #[test]
    fn endpoint_of_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        check(&bytes)?;
    }

    #[test]
    fn endpoint_with_huge_string_lengths(
        head in any::<[u8; 8]>(),
        lens in any::<[u16; 4]>(),
        which in 0usize..4,
        tail in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        // Each string's length is claimed in turn; a claim past the record's end is refused.
        let mut bytes = head.to_vec();
        for &l in &lens[..which] {
            bytes.extend_from_slice(&(l % 8).to_le_bytes());
            bytes.extend(std::iter::repeat_n(b'a', (l % 8) as usize));
        }
        bytes.extend_from_slice(&lens[which].max(u16::MAX - 1).to_le_bytes());
        bytes.extend_from_slice(&tail);
        prop_assert_eq!(check(&bytes)?, None);
    }

    #[test]
    fn endpoint_mutations(ep in endpoint(), ms in prop::collection::vec(mutation(), 1..6)) {
        let mut bytes = Vec::new();
        ep.encode(&mut bytes);
        check(&mutate(bytes, &ms))?;
    }

    #[test]
    fn endpoint_round_trip(eps in prop::collection::vec(endpoint(), 1..4)) {
        let mut bytes = Vec::new();
        for ep in &eps {
            ep.encode(&mut bytes);
        }
        let mut b = &bytes[..];
        for ep in &eps {
            prop_assert_eq!(&Endpoint::decode(&mut b).unwrap(), ep);
        }
        prop_assert!(b.is_empty());
    }
}
