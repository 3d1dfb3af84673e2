//! Spawns the ranks of a test job (the `shardline-comm-worker` binary) and collects their
//! outcome, killing every child on a deadline so a hang fails the test instead of stalling it.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What one rank did.
pub struct Outcome {
    pub rank: usize,
    pub success: bool,
    pub output: String,
}

/// A coordinator address that is free right now.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Runs `scenario` on `world` ranks over `transport`; `extra` adds environment variables.
pub fn run_job(
    scenario: &str,
    world: usize,
    transport: &str,
    extra: &[(&str, &str)],
    limit: Duration,
) -> Vec<Outcome> {
    let addr = free_addr();
    let mut children: Vec<Child> = (0..world)
        .map(|rank| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardline-comm-worker"));
            cmd.arg(scenario)
                .env("SHARDLINE_RANK", rank.to_string())
                .env("SHARDLINE_WORLD_SIZE", world.to_string())
                .env("SHARDLINE_COORDINATOR", &addr)
                .env("SHARDLINE_JOB_TOKEN", "test-token")
                .env("SHARDLINE_TRANSPORT", transport)
                .env("SHARDLINE_TIMEOUT", "20")
                // Small rings: less /dev/shm (64 MiB in a default container) and more wrap-arounds.
                .env("SHARDLINE_SHM_RING_BYTES", "262144")
                .env_remove("SHARDLINE_ALLREDUCE_ALGO")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            for (k, v) in extra {
                cmd.env(k, v);
            }
            cmd.spawn().expect("cannot start the worker")
        })
        .collect();
    let deadline = Instant::now() + limit;
    let mut status: Vec<Option<bool>> = vec![None; world];
    while status.iter().any(Option::is_none) {
        for (i, c) in children.iter_mut().enumerate() {
            if status[i].is_none() {
                if let Some(s) = c.try_wait().unwrap() {
                    status[i] = Some(s.success());
                }
            }
        }
        if Instant::now() > deadline {
            for c in &mut children {
                let _ = c.kill();
            }
            for c in &mut children {
                let _ = c.wait();
            }
            let outs: Vec<String> = children.iter_mut().map(read_all).collect();
            panic!("{scenario} on {world} ranks over {transport} did not finish in {limit:?}; output:\n{}", outs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    children
        .iter_mut()
        .enumerate()
        .map(|(rank, c)| Outcome {
            rank,
            success: status[rank].unwrap(),
            output: read_all(c),
        })
        .collect()
}

fn read_all(c: &mut Child) -> String {
    let mut s = String::new();
    if let Some(o) = c.stdout.as_mut() {
        let _ = o.read_to_string(&mut s);
    }
    if let Some(e) = c.stderr.as_mut() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// Panics with every rank's output unless all succeeded.
pub fn assert_all_ok(what: &str, outcomes: &[Outcome]) {
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.success)
        .map(|o| format!("rank {}: {}", o.rank, o.output))
        .collect();
    assert!(failed.is_empty(), "{what} failed:\n{}", failed.join("\n"));
}
