//! Failure behaviour on real processes: a rank killed with SIGKILL (every other rank fails its
//! pending and its next collective within 2 s naming it) and lengths that differ across ranks.

mod common;

use std::time::Duration;

fn killed(transport: &str) {
    let out = common::run_job("kill", 3, transport, &[], Duration::from_secs(60));
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
