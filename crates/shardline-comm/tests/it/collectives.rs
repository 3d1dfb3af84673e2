//! Every collective, dtype and transport on real processes, for world sizes 1 to 4: sizes 0, 1,
//! odd, 8 KB and beyond the direct/ring threshold, one 16 MB all_reduce, subgroups and async
//! calls, all checked exactly (see src/bin/shardline-comm-worker.rs).

use crate::common;

use std::time::Duration;

fn job(world: usize, transport: &str) {
    let out = common::run_job(
        "collectives",
        world,
        transport,
        &[("WORKER_BIG", "1")],
        Duration::from_secs(120),
    );
    common::assert_all_ok(
        &format!("collectives on {world} ranks over {transport}"),
        &out,
    );
}

#[test]
fn world_1() {
    job(1, "auto");
}

#[test]
fn world_2_shm() {
    job(2, "shm");
}

#[test]
fn world_2_tcp() {
    job(2, "tcp");
}

#[test]
fn world_3_shm() {
    job(3, "shm");
}

#[test]
fn world_3_tcp() {
    job(3, "tcp");
}

#[test]
fn world_4_shm() {
    job(4, "shm");
}

#[test]
fn world_4_tcp() {
    job(4, "tcp");
}

#[cfg(feature = "ucx")]
#[test]
fn world_2_ucx() {
    job(2, "ucx");
}

#[cfg(feature = "ucx")]
#[test]
fn world_3_ucx() {
    job(3, "ucx");
}
