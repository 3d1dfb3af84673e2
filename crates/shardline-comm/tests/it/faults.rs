//! Failure behaviour on real processes: a rank killed with SIGKILL (every other rank fails its
//! pending and its next collective within 2 s naming it, and no rank leaves a shared-memory
//! segment behind, nor does one killed during the rendezvous) and lengths that differ across
//! ranks.

use crate::common;

use std::time::{Duration, Instant};

fn killed(transport: &str) {
    let out = common::run_job("kill", 3, transport, &[], Duration::from_secs(60));
    for o in &out {
        let left = common::segments_of(o.pid);
        assert!(left.is_empty(), "rank {} left {left:?} in /dev/shm", o.rank);
    }
    for o in &out[..2] {
        assert!(o.success, "rank {} over {transport}: {}", o.rank, o.output);
        assert!(
            o.output.contains("rank 2"),
            "rank {} did not name the dead rank: {}",
            o.rank,
            o.output
        );
    }
    assert!(!out[2].success, "the victim was supposed to die");
}

#[test]
fn killed_rank_is_reported_over_shm() {
    killed("shm");
}

#[test]
fn killed_rank_is_reported_over_tcp() {
    killed("tcp");
}

#[test]
fn a_rank_killed_during_the_rendezvous_leaves_no_segment() {
    // Ranks 0 and 1 of 3: rank 2 never comes, so both wait in the rendezvous.
    let addr = common::free_addr();
    let shm = [("SHARDLINE_TRANSPORT", "shm")];
    let mut rank0 = common::spawn_rank("smoke", 0, 3, &addr, &shm, None);
    let start = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "rank 0 never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut rank1 = common::spawn_rank("smoke", 1, 3, &addr, &shm, None);
    // Rank 1 has bound its transports and joined once rank 0 holds its connection.
    std::thread::sleep(Duration::from_millis(500));
    let pids = [rank0.id(), rank1.id()];
    for child in [&mut rank1, &mut rank0] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    for (rank, pid) in pids.iter().enumerate() {
        let left = common::segments_of(*pid);
        assert!(left.is_empty(), "rank {rank} left {left:?} in /dev/shm");
    }
}

#[test]
fn different_lengths_are_reported_on_every_rank() {
    for transport in ["shm", "tcp"] {
        let out = common::run_job("mismatch", 2, transport, &[], Duration::from_secs(60));
        common::assert_all_ok(&format!("mismatch over {transport}"), &out);
        for o in &out {
            assert!(
                o.output.contains("different lengths"),
                "rank {}: {}",
                o.rank,
                o.output
            );
        }
    }
}

#[cfg(feature = "ucx")]
#[test]
fn killed_rank_is_reported_over_ucx() {
    killed("ucx");
}
