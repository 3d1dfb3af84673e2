//! Two UCP workers of this process connected to each other, driven from one thread: frames of
//! every size, heartbeats, the length cap, registration, and injected transient and permanent
//! failures.

use std::time::{Duration, Instant};

use super::*;
use crate::transport::host_identity;

const UCS_ERR_IO_ERROR: ffi::ucs_status_t = -3;
const HEADER: usize = 32;

/// Transports of ranks 0 and 1 and the pairs between them: (t0, t1, pair 0→1, pair 1→0).
fn connected() -> (UcxTransport, UcxTransport, Box<dyn Pair>, Box<dyn Pair>) {
    let mut t = [UcxTransport::new().unwrap(), UcxTransport::new().unwrap()];
    let table: Vec<Endpoint> = (0..2)
        .map(|r| Endpoint {
            world_rank: r,
            host: host_identity(),
            pid: std::process::id(),
            tcp: format!("127.0.0.1:{}", 40000 + r),
            shm: String::new(),
            ucx: t[r].address(),
        })
        .collect();
    let mut pairs = Vec::new();
    for (me, tr) in t.iter_mut().enumerate() {
        let setup = Setup {
            me,
            table: &table,
            token: "",
            nonce: 0,
            deadline: Instant::now() + Duration::from_secs(10),
            silence: None,
        };
        let mut out = tr.connect(&setup, &[1 - me]).unwrap();
        pairs.push(out.pop().unwrap().1);
    }
    let b = pairs.pop().unwrap();
    let a = pairs.pop().unwrap();
    let [t0, t1] = t;
    (t0, t1, a, b)
}

/// A frame as the engine writes it: header, payload, padding to 8 bytes.
fn frame(len: usize, seed: u8) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let hdr = vec![seed; HEADER];
    let data = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    (hdr, data, vec![0; len.next_multiple_of(8) - len])
}

/// Sends `frames` from `a` (copying them all when `copy`) while `b` reads them with 4-byte
/// alignment; returns what `b` read. Fails on the first error or after 20 s.
fn transfer(
    a: &mut dyn Pair,
    b: &mut dyn Pair,
    frames: &[(Vec<u8>, Vec<u8>, Vec<u8>)],
    copy: bool,
) -> Result<Vec<u8>> {
    let total: usize = frames
        .iter()
        .map(|(h, d, p)| h.len() + d.len() + p.len())
        .sum();
    let mut got = Vec::with_capacity(total);
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut f, mut pos) = (0, 0);
    while got.len() < total {
        assert!(
            Instant::now() < deadline,
            "stuck at {} of {total}",
            got.len()
        );
        if f < frames.len() {
            let (h, d, p) = &frames[f];
            let parts = [&h[..], &d[..], &p[..]];
            let mut skip = pos;
            let mut rest: Vec<&[u8]> = Vec::new();
            for part in parts {
                if skip >= part.len() {
                    skip -= part.len();
                } else {
                    rest.push(&part[skip..]);
                    skip = 0;
                }
            }
            pos += if copy {
                a.try_write_copy(&rest)?
            } else {
                a.try_write(&rest)?
            };
            if pos == h.len() + d.len() + p.len() {
                (f, pos) = (f + 1, 0);
            }
        }
        b.try_read_with(total - got.len(), 4, &mut |bytes| {
            got.extend_from_slice(bytes)
        })?;
    }
    Ok(got)
}

fn flat(frames: &[(Vec<u8>, Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    frames
        .iter()
        .flat_map(|(h, d, p)| h.iter().chain(d).chain(p).copied())
        .collect()
}

fn stats(t: &UcxTransport) -> crate::transport::regcache::CacheStats {
    t.shared.cache.lock().unwrap().stats()
}

#[test]
fn frames_of_every_size_arrive_whole_and_in_order() {
    let (t0, t1, mut a, mut b) = connected();
    let frames: Vec<_> = [0, 8, 8192, 20_000, 5 * MSG_MAX + 4, 12, 3 * MSG_MAX]
        .iter()
        .enumerate()
        .map(|(i, &n)| frame(n, i as u8))
        .collect();
    let got = transfer(&mut *a, &mut *b, &frames, false).unwrap();
    assert!(got == flat(&frames), "the bytes differ");
    // The large messages were received into registered pool buffers, reused (hits).
    let s = stats(&t1);
    assert!(s.misses >= 1 && s.hits >= 1, "{s:?}");
    // Copied sends (the direct all-reduce's first push) are registered on the sending side.
    let got = transfer(&mut *a, &mut *b, &frames[3..5], true).unwrap();
    assert!(got == flat(&frames[3..5]), "the copied bytes differ");
    assert!(stats(&t0).misses >= 1, "{:?}", stats(&t0));
    // Every buffer a pair registered is unregistered when the pair frees it.
    drop((a, b));
    for t in [&t0, &t1] {
        let s = stats(t);
        assert_eq!(s.invalidations + s.evictions, s.misses, "{s:?}");
    }
    assert_eq!(t0.retries() + t1.retries(), 0);
}

#[test]
fn memory_the_group_registers_is_sent_with_its_registration_until_it_is_released() {
    let (t0, _t1, mut a, mut b) = connected();
    let registry = t0.registry().expect("ucx registers memory");
    // A payload above GATHER_MAX goes zero-copy from the caller's memory: here, registered memory.
    let frames = vec![frame(3 * GATHER_MAX, 1)];
    registry.register(&frames[0].1);
    let registered = stats(&t0);
    assert_eq!(registered.misses, 1, "{registered:?}");
    let got = transfer(&mut *a, &mut *b, &frames, false).unwrap();
    assert!(got == flat(&frames), "the bytes differ");
    let sent = stats(&t0);
    assert!(
        sent.hits > registered.hits,
        "the send did not find the registration: {sent:?}"
    );
    assert_eq!(sent.misses, registered.misses, "{sent:?}");
    // Released before the memory goes, then memory allocated again (perhaps at the same
    // address): no send uses the old registration, and nothing is registered behind the owner's
    // back.
    registry.release(&frames[0].1);
    drop(frames);
    let released = stats(&t0);
    assert_eq!(
        released.invalidations,
        sent.invalidations + 1,
        "{released:?}"
    );
    let frames = vec![frame(3 * GATHER_MAX, 2)];
    let got = transfer(&mut *a, &mut *b, &frames, false).unwrap();
    assert!(got == flat(&frames), "the bytes differ");
    let after = stats(&t0);
    assert_eq!(
        (after.hits, after.misses),
        (released.hits, released.misses),
        "{after:?}"
    );
}

#[test]
fn a_transient_failure_is_retried_once_counted_and_recovers() {
    let (t0, t1, mut a, mut b) = connected();
    let frames = vec![frame(8192, 1), frame(2 * MSG_MAX, 2)];
    t0.shared
        .faults
        .lock()
        .unwrap()
        .push((Call::Send, ffi::UCS_ERR_NO_RESOURCE));
    t1.shared
        .faults
        .lock()
        .unwrap()
        .push((Call::Recv, ffi::UCS_ERR_BUSY));
    let got = transfer(&mut *a, &mut *b, &frames, false).unwrap();
    assert!(got == flat(&frames));
    assert_eq!((t0.retries(), t1.retries()), (1, 1));
    // The group goes on.
    let got = transfer(&mut *a, &mut *b, &frames, false).unwrap();
    assert!(got == flat(&frames));
    assert_eq!((t0.retries(), t1.retries()), (1, 1));
}

#[test]
fn a_permanent_failure_fails_at_once_naming_the_peer() {
    let (t0, _t1, mut a, mut b) = connected();
    let frames = vec![frame(64, 1)];
    t0.shared
        .faults
        .lock()
        .unwrap()
        .push((Call::Send, UCS_ERR_IO_ERROR));
    let e = transfer(&mut *a, &mut *b, &frames, false).unwrap_err();
    match &e {
        CommError::Transport { rank, address, .. } => {
            assert_eq!(*rank, 1);
            assert!(address.contains("127.0.0.1:40001"), "{e}");
        }
        other => panic!("not a transport failure: {other}"),
    }
    assert!(e.to_string().contains("rank 1 at 127.0.0.1:40001"), "{e}");
    assert_eq!(t0.retries(), 0, "a permanent failure is not retried");
    // A transient failure that happens again on the retry fails too: retried once only.
    let (t0, _t1, mut a, mut b) = connected();
    for _ in 0..2 {
        t0.shared
            .faults
            .lock()
            .unwrap()
            .push((Call::Send, ffi::UCS_ERR_NO_RESOURCE));
    }
    let e = transfer(&mut *a, &mut *b, &frames, false).unwrap_err();
    assert!(matches!(e, CommError::Transport { rank: 1, .. }), "{e}");
    assert_eq!(t0.retries(), 1);
}

#[test]
fn a_message_longer_than_the_cap_is_refused_naming_the_sender() {
    let (t0, t1, _a, mut b) = connected();
    // A raw endpoint from rank 0's worker sends a message of MSG_MAX + 8 bytes as rank 0's
    // first data message.
    let addr: Vec<u8> = (0..t1.address.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&t1.address[i..i + 2], 16).unwrap())
        .collect();
    let flag = AtomicBool::new(false);
    let ep = create_ep(&t0.shared, &addr, &flag, true).unwrap();
    let big = vec![7u8; MSG_MAX + 8];
    // SAFETY: `big` is never freed (forgotten below): UCX may hold the send until the process
    // ends.
    let req = unsafe {
        let param: ffi::ucp_request_param_t = std::mem::zeroed();
        ffi::ucp_tag_send_nbx(
            ep,
            big.as_ptr() as *const c_void,
            big.len(),
            data_tag(0, 0),
            &param,
        )
    };
    assert!(!ffi::is_err(req));
    let deadline = Instant::now() + Duration::from_secs(10);
    let e = loop {
        t0.shared.progress();
        match b.try_read_with(64, 1, &mut |_| {}) {
            Err(e) => break e,
            Ok(n) => assert_eq!(n, 0),
        }
        assert!(
            Instant::now() < deadline,
            "the long message was never refused"
        );
    };
    assert!(matches!(e, CommError::Protocol { rank: 0, .. }), "{e}");
    assert!(e.to_string().contains(&format!("{}", MSG_MAX + 8)), "{e}");
    // SAFETY: closing the raw endpoint (forcibly), then releasing its send request, which UCX
    // frees once it is done with it (the process ends first).
    unsafe {
        let mut param: ffi::ucp_request_param_t = std::mem::zeroed();
        param.op_attr_mask = ffi::UCP_OP_ATTR_FIELD_FLAGS;
        param.flags = ffi::UCP_EP_CLOSE_FLAG_FORCE;
        let mut close = ffi::ucp_ep_close_nbx(ep, &param);
        if ffi::is_err(close) {
            close = std::ptr::null_mut();
        }
        while settle(&mut close) == ffi::UCS_INPROGRESS && Instant::now() < deadline {
            t0.shared.progress();
        }
        if !req.is_null() {
            ffi::ucp_request_free(req);
        }
    }
    std::mem::forget(big);
}

#[test]
fn heartbeats_cross_apart_from_data_and_count_as_life() {
    let (_t0, _t1, mut a, mut b) = connected();
    let wait_heard = |b: &mut dyn Pair| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !b.heard(false).unwrap() {
            assert!(Instant::now() < deadline, "nothing heard");
        }
    };
    assert!(!b.heard(true).unwrap(), "no news is no life");
    let sent = a.sent();
    assert!(a.beat(false).unwrap());
    assert!(a.sent() > sent);
    wait_heard(&mut *b);
    assert!(!b.heard(true).unwrap(), "a heartbeat counts once");
    // A heartbeat sent in the middle of a frame does not disturb it.
    let frames = vec![frame(3 * MSG_MAX, 9)];
    let (h, d, p) = &frames[0];
    let mut pos = a.try_write(&[&h[..], &d[..], &p[..]]).unwrap();
    assert!(a.beat(false).unwrap());
    wait_heard(&mut *b);
    let mut got = Vec::new();
    let total = h.len() + d.len() + p.len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < total {
        assert!(Instant::now() < deadline);
        if pos < total {
            let parts = if pos < HEADER {
                vec![&h[pos..], &d[..], &p[..]]
            } else {
                vec![&d[pos - HEADER..], &p[..]]
            };
            pos += a.try_write(&parts).unwrap();
        }
        b.try_read_with(total - got.len(), 4, &mut |x| got.extend_from_slice(x))
            .unwrap();
    }
    assert!(got == flat(&frames));
}

#[test]
fn an_aborted_pair_refuses_further_calls() {
    let (_t0, _t1, mut a, _b) = connected();
    let (h, d, p) = frame(4 * MSG_MAX, 3);
    // Nobody reads: the large payload stays in flight from `d`.
    let mut written = 0;
    for _ in 0..100 {
        let parts = [&h[..], &d[..], &p[..]];
        let mut skip = written;
        let rest: Vec<&[u8]> = parts
            .iter()
            .filter_map(|part| {
                if skip >= part.len() {
                    skip -= part.len();
                    None
                } else {
                    let r = &part[skip..];
                    skip = 0;
                    Some(r)
                }
            })
            .collect();
        written += a.try_write(&rest).unwrap();
    }
    assert!(written < HEADER + d.len(), "sent {written} bytes to nobody");
    a.abort();
    assert!(matches!(
        a.try_write(&[&h[..]]),
        Err(CommError::Poisoned(_))
    ));
    assert!(matches!(
        a.try_read_with(8, 1, &mut |_| {}),
        Err(CommError::Poisoned(_))
    ));
    assert!(a.heard(true).is_err() && a.beat(true).is_err());
    // UCX 1.13 cannot cancel a rendezvous send that its receiver has not taken: `d` stays
    // alive until the pair and its worker are gone.
    drop(a);
    drop(d);
}

#[test]
fn memory_freed_and_allocated_again_is_registered_again_with_ucx() {
    let t = UcxTransport::new().unwrap();
    let mut cache = t.shared.cache.lock().unwrap();
    let first = vec![1u8; MSG_MAX].into_boxed_slice();
    let addr = first.as_ptr() as usize;
    let reg = cache.get(addr, MSG_MAX).unwrap();
    assert!(!reg.handle().0.is_null());
    drop(reg);
    cache.get(addr, MSG_MAX).unwrap();
    assert_eq!((cache.stats().misses, cache.stats().hits), (1, 1));
    // The owner frees the memory and tells the cache; the allocator may well hand the same
    // address out again, with other pages behind it.
    assert_eq!(cache.invalidate(addr, MSG_MAX), 1);
    drop(first);
    let second = vec![2u8; MSG_MAX].into_boxed_slice();
    let again = second.as_ptr() as usize;
    let reg = cache.get(again, MSG_MAX).unwrap();
    assert!(!reg.handle().0.is_null());
    assert_eq!(
        (cache.stats().misses, cache.stats().hits),
        (2, 1),
        "registered anew (same address: {})",
        again == addr
    );
    drop(reg);
    cache.invalidate(again, MSG_MAX);
}
