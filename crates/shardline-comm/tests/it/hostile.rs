//! The rendezvous listener of a real rank 0 (a process, under `ulimit -v 300000`) while hostile
//! clients are connected to it: garbage bytes, a length prefix of 4 GiB, forty clients that
//! announce a 4 MiB message and deliver all of it but the last byte, a client trickling a byte a
//! second, and 200 idle connections. A real rank 1 still joins, the job completes, rank 0 does
//! not panic, and its resident memory stays bounded. And the same on the peer (tcp) listener,
//! which binds loopback for a job on one host: silent, garbage and idle connections there do not
//! hold up the rank that really connects.

use crate::common::{self, connect};

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sends `bytes`, giving up after a few seconds or on the first error (rank 0 may close).
fn send(s: &mut TcpStream, bytes: &[u8]) -> bool {
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(bytes).is_ok()
}

#[test]
fn hostile_clients_on_the_rendezvous_neither_stop_the_job_nor_grow_rank_0() {
    let addr = common::free_addr();
    let mut rank0 = common::spawn_rank("smoke", 0, 2, &addr, &[], Some("ulimit -v 300000"));
    let pid = rank0.id();
    let stop = Arc::new(AtomicBool::new(false));
    let mut held = vec![connect(&addr)];
    let mut threads = Vec::new();
    for _ in 0..8 {
        let mut s = connect(&addr);
        send(&mut s, &[0xff; 64]);
        held.push(s);
    }
    let mut s = connect(&addr);
    send(&mut s, &u32::MAX.to_le_bytes());
    held.push(s);
    for _ in 0..40 {
        let mut s = connect(&addr);
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let body = vec![0x5au8; (4 << 20) - 1];
            let _ = send(&mut s, &(4u32 << 20).to_le_bytes()) && send(&mut s, &body);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    {
        let mut s = connect(&addr);
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut ok = send(&mut s, &100u32.to_le_bytes());
            while ok && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1000));
                ok = send(&mut s, &[1]);
            }
        }));
    }
    for i in 0..200 {
        match TcpStream::connect(&addr) {
            Ok(s) => held.push(s),
            Err(e) => {
                let (_, out) = common::finish(&mut rank0, Duration::from_secs(5));
                panic!("rank 0 stopped listening after {i} idle connections ({e}): {out}");
            }
        }
    }
    // Rank 0's resident memory while all of them are connected.
    let mut peak_kb = 0;
    for _ in 0..40 {
        if let Some(kb) = common::status_kb(pid, "VmRSS") {
            peak_kb = peak_kb.max(kb);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let joined = Instant::now();
    let mut rank1 = common::spawn_rank("smoke", 1, 2, &addr, &[], None);
    let (ok1, out1) = common::finish(&mut rank1, Duration::from_secs(12));
    let took = joined.elapsed();
    let (ok0, out0) = common::finish(&mut rank0, Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    drop(held);
    for t in threads {
        let _ = t.join();
    }
    println!(
        "rank 0 under attack: VmRSS at most {peak_kb} kB while sampled; rank 1 joined and the \
         job finished in {took:?}; rank 0 said: {}",
        out0.lines().find(|l| l.contains("peak RSS")).unwrap_or("-")
    );
    assert!(ok0 && ok1, "rank 0: {out0}\nrank 1: {out1}");
    assert!(!out0.contains("panicked"), "{out0}");
    assert!(
        peak_kb <= 100_000,
        "rank 0 grew to {peak_kb} kB under attack"
    );
}

#[test]
fn hostile_clients_on_the_peer_listener_do_not_hold_up_the_real_peer() {
    let addr = common::free_addr();
    let env = [("SHARDLINE_TIMEOUT", "10")];
    let mut rank0 = common::spawn_rank("smoke", 0, 2, &addr, &env, None);
    let pid = rank0.id();
    // Rank 0's peer listener: the one that is not the coordinator's.
    let started = Instant::now();
    let data = loop {
        let socks = common::listening(pid);
        if let Some(s) = socks.iter().find(|s| s.to_string() != addr) {
            if socks.len() == 2 {
                break *s;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "rank 0 never listened twice: {socks:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        data.ip().is_loopback(),
        "a job on one host listens on loopback only, not {data}"
    );
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect(&data.to_string()));
    }
    for _ in 0..4 {
        let mut s = connect(&data.to_string());
        send(&mut s, &[0xee; 40]);
        held.push(s);
    }
    // (The listener's backlog holds 128 until rank 0 accepts, after the rendezvous.)
    for _ in 0..100 {
        held.push(connect(&data.to_string()));
    }
    let joined = Instant::now();
    let mut rank1 = common::spawn_rank("smoke", 1, 2, &addr, &env, None);
    let (ok1, out1) = common::finish(&mut rank1, Duration::from_secs(12));
    let took = joined.elapsed();
    let (ok0, out0) = common::finish(&mut rank0, Duration::from_secs(5));
    drop(held);
    println!("with 112 hostile connections on rank 0's peer listener, the job took {took:?}");
    assert!(ok0 && ok1, "rank 0: {out0}\nrank 1: {out1}");
    assert!(
        took < Duration::from_secs(5),
        "the hostile connections held the job up for {took:?}"
    );
}
