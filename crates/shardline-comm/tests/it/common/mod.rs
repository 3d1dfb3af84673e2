//! Spawns the ranks of a test job (the `shardline-comm-worker` binary) and collects their
//! outcome, killing every child on a deadline so a hang fails the test instead of stalling it.

// Each test module uses its own part of these helpers.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What one rank did.
pub struct Outcome {
    pub rank: usize,
    pub pid: u32,
    pub success: bool,
    pub output: String,
}

/// A coordinator address that is free right now.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A connection to rank 0's listener at `addr`, retried for up to 10 s while it starts.
pub fn connect(addr: &str) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("rank 0 never listened at {addr}: {e}"),
        }
    }
}

/// Starts one rank of a `world`-rank job of `scenario` meeting at `addr`, its output piped; with
/// `shell`, the worker runs after that shell line (e.g. `ulimit -v 300000`).
pub fn spawn_rank(
    scenario: &str,
    rank: usize,
    world: usize,
    addr: &str,
    extra: &[(&str, &str)],
    shell: Option<&str>,
) -> Child {
    let worker = env!("CARGO_BIN_EXE_shardline-comm-worker");
    let mut cmd = match shell {
        Some(line) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("{line} && exec \"$0\" \"$1\""))
                .arg(worker)
                .arg(scenario);
            c
        }
        None => {
            let mut c = Command::new(worker);
            c.arg(scenario);
            c
        }
    };
    set_rank(&mut cmd, rank, world, addr, "tcp", 20, extra);
    cmd.spawn().expect("cannot start the worker")
}

/// Makes `cmd` rank `rank` of a `world`-rank job meeting at `addr` over `transport`, each wait
/// bounded by `timeout_s` seconds, with small shm rings (less /dev/shm, 64 MiB in a default
/// container, and more wrap-arounds) and its output piped; `extra` variables go last.
pub fn set_rank(
    cmd: &mut Command,
    rank: usize,
    world: usize,
    addr: &str,
    transport: &str,
    timeout_s: u32,
    extra: &[(&str, &str)],
) {
    cmd.env("SHARDLINE_RANK", rank.to_string())
        .env("SHARDLINE_WORLD_SIZE", world.to_string())
        .env("SHARDLINE_COORDINATOR", addr)
        .env("SHARDLINE_JOB_TOKEN", "test-token")
        .env("SHARDLINE_TRANSPORT", transport)
        .env("SHARDLINE_TIMEOUT", timeout_s.to_string())
        .env("SHARDLINE_SHM_RING_BYTES", "262144")
        .env_remove("SHARDLINE_ALLREDUCE_ALGO")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
}

/// Waits for `child` at most `limit`, killing it past that; returns whether it succeeded and
/// its output.
pub fn finish(child: &mut Child, limit: Duration) -> (bool, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return (s.success(), read_all(child));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (
                false,
                format!("killed after {limit:?}: {}", read_all(child)),
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `child` at most `limit`, killing it past that; whether it exited successfully (its
/// output is left to whoever reads its pipes).
pub fn finish_status(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.success();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The shared-memory segments (and their temporary names) of process `pid` in /dev/shm.
pub fn segments_of(pid: u32) -> Vec<String> {
    let prefix = format!("shardline-{pid}-");
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// A field of /proc/PID/status in kB (`VmRSS`, `VmHWM`), while the process lives.
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The TCP sockets process `pid` listens on (from /proc/net/tcp and its descriptors).
pub fn listening(pid: u32) -> Vec<std::net::SocketAddr> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local_address, state 0A (LISTEN), inode
            if f.len() < 10 || f[3] != "0A" || !inodes.iter().any(|i| i == f[9]) {
                return None;
            }
            let (ip, port) = f[1].split_once(':')?;
            let ip = u32::from_str_radix(ip, 16).ok()?;
            let port = u16::from_str_radix(port, 16).ok()?;
            Some(std::net::SocketAddr::from((ip.to_le_bytes(), port)))
        })
        .collect()
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
            cmd.arg(scenario);
            set_rank(&mut cmd, rank, world, &addr, transport, 20, extra);
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
            pid: c.id(),
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
