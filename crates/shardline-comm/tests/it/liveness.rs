//! Liveness on real processes: one rank of 2 or 4 is stopped with SIGSTOP (so its sockets stay
//! open and its process lives: nothing but its silence gives it away) while the ranks loop over
//! small all_reduces, or while they sit idle between collectives. Every other rank must fail
//! naming it within a generous budget (the heartbeat budget is 2 s; SHARDLINE_TIMEOUT is 60 s, so
//! the deadline cannot be what catches it). The measured times are printed (`--nocapture`). The
//! stopped rank is killed afterwards. And a loop of small all_reduces completes with heartbeats
//! on and off (its speed is printed, not asserted).

use crate::common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the other ranks may take to fail once the victim is stopped (CI machines are slow
/// and shared; the heartbeat budget is 2 s).
const BUDGET: Duration = Duration::from_secs(10);

/// The ranks of a job, their output collected as it comes.
struct Job {
    children: Vec<Child>,
    /// Each line a rank prints, as it comes, with when it came.
    lines: mpsc::Receiver<(usize, String, Instant)>,
    output: Vec<Arc<Mutex<String>>>,
}

impl Job {
    fn start(scenario: &str, world: usize, transport: &str, extra: &[(&str, &str)]) -> Job {
        let addr = common::free_addr();
        let (tx, lines) = mpsc::channel();
        let mut children = Vec::new();
        let mut output = Vec::new();
        for rank in 0..world {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardline-comm-worker"));
            cmd.arg(scenario).env_remove("SHARDLINE_HEARTBEAT");
            common::set_rank(&mut cmd, rank, world, &addr, transport, 60, extra);
            let mut child = cmd.spawn().expect("cannot start the worker");
            let text = Arc::new(Mutex::new(String::new()));
            let (stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
            let (tx, out) = (tx.clone(), text.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    out.lock().unwrap().push_str(&format!("{line}\n"));
                    let _ = tx.send((rank, line, Instant::now()));
                }
            });
            let err = text.clone();
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = stderr.read_to_string(&mut s);
                err.lock().unwrap().push_str(&s);
            });
            children.push(child);
            output.push(text);
        }
        Job {
            children,
            lines,
            output,
        }
    }

    fn output(&self, rank: usize) -> String {
        self.output[rank].lock().unwrap().clone()
    }

    fn all_output(&self) -> String {
        (0..self.children.len())
            .map(|r| format!("rank {r}: {}", self.output(r)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until every rank has printed a line containing `what`.
    fn wait_for(&mut self, what: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut seen = vec![false; self.children.len()];
        while !seen.iter().all(|&s| s) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((rank, line, _)) if line.contains(what) => seen[rank] = true,
                Ok(_) => {}
                Err(_) => {
                    self.kill_all();
                    panic!(
                        "not every rank said '{what}' within {limit:?}:\n{}",
                        self.all_output()
                    );
                }
            }
        }
    }

    fn signal(&self, rank: usize, sig: libc::c_int) {
        // SAFETY: signalling a child we started and have not reaped.
        unsafe { libc::kill(self.children[rank].id() as libc::pid_t, sig) };
    }

    fn kill_all(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

/// Runs `scenario` on `world` ranks, SIGSTOPs `victim` once all are ready, and returns how long
/// each other rank took to report its error after the stop (each must, within `budget`, naming
/// the victim, and then exit successfully).
fn stop_one(
    scenario: &str,
    world: usize,
    transport: &str,
    victim: usize,
    extra: &[(&str, &str)],
    budget: Duration,
) -> Vec<Duration> {
    let victim_env = victim.to_string();
    let mut env = vec![("WORKER_VICTIM", victim_env.as_str())];
    env.extend_from_slice(extra);
    let mut job = Job::start(scenario, world, transport, &env);
    job.wait_for("ready", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    job.signal(victim, libc::SIGSTOP);
    let stopped = Instant::now();
    let what = format!("{scenario} on {world} ranks over {transport}, rank {victim} stopped");
    let mut took: Vec<Option<Duration>> = vec![None; world];
    took[victim] = Some(Duration::ZERO);
    while took.iter().any(Option::is_none) {
        let left = (stopped + budget).saturating_duration_since(Instant::now());
        match job.lines.recv_timeout(left) {
            Ok((rank, line, at)) if line.contains("detected") => {
                took[rank] = Some(at.saturating_duration_since(stopped))
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // The others exit once they have reported (a few seconds later).
    let mut ok = vec![true; world];
    for (r, c) in job.children.iter_mut().enumerate() {
        if r != victim && took[r].is_some() {
            ok[r] = common::finish_status(c, Duration::from_secs(30));
        }
    }
    // Nothing is left behind: the victim is woken and killed, any other rank left is killed.
    job.signal(victim, libc::SIGCONT);
    job.kill_all();
    // The readers finish once the pipes close.
    std::thread::sleep(Duration::from_millis(50));
    let mut times = Vec::new();
    for r in (0..world).filter(|&r| r != victim) {
        let out = job.output(r);
        let Some(t) = took[r] else {
            panic!(
                "{what}: rank {r} did not fail within {budget:?}:\n{}",
                job.all_output()
            );
        };
        assert!(ok[r], "{what}: rank {r} failed wrongly:\n{out}");
        assert!(
            out.contains(&format!("rank {victim}")),
            "{what}: rank {r} did not name rank {victim}:\n{out}"
        );
        times.push(t);
    }
    for c in &job.children {
        let left = common::segments_of(c.id());
        assert!(left.is_empty(), "{what}: {left:?} left in /dev/shm");
    }
    let detail = job.output((victim + 1) % world);
    println!(
        "{what}: the others failed after {:?}; rank {}: {}",
        times,
        (victim + 1) % world,
        detail
            .lines()
            .find(|l| l.contains("detected"))
            .unwrap_or("")
    );
    times
}

#[test]
fn a_stopped_rank_fails_a_collective_loop_of_2_over_shm() {
    stop_one("stop-loop", 2, "shm", 1, &[], BUDGET);
}

#[test]
fn a_stopped_rank_fails_a_collective_loop_of_2_over_tcp() {
    stop_one("stop-loop", 2, "tcp", 1, &[], BUDGET);
}

#[test]
fn a_stopped_rank_fails_a_collective_loop_of_4_over_shm() {
    stop_one("stop-loop", 4, "shm", 2, &[], BUDGET);
}

#[test]
fn a_stopped_rank_fails_a_collective_loop_of_4_over_tcp() {
    stop_one("stop-loop", 4, "tcp", 2, &[], BUDGET);
}

#[test]
fn a_stopped_rank_fails_idle_ranks_of_2_over_shm() {
    stop_one("stop-idle", 2, "shm", 1, &[], BUDGET);
}

#[test]
fn a_stopped_rank_fails_idle_ranks_of_2_over_tcp() {
    stop_one("stop-idle", 2, "tcp", 1, &[], BUDGET);
}

#[test]
fn a_stopped_rank_fails_idle_ranks_of_4_over_shm() {
    stop_one("stop-idle", 4, "shm", 2, &[], BUDGET);
}

#[test]
fn a_stopped_rank_fails_idle_ranks_of_4_over_tcp() {
    stop_one("stop-idle", 4, "tcp", 2, &[], BUDGET);
}

// Over UCX only heartbeats show a stopped peer on this host (its pidfd stays quiet and UCX's
// shared-memory transports have no keepalive).
#[cfg(feature = "ucx")]
#[test]
fn a_stopped_rank_fails_a_collective_loop_of_2_over_ucx() {
    stop_one("stop-loop", 2, "ucx", 1, &[], BUDGET);
}

#[cfg(feature = "ucx")]
#[test]
fn a_stopped_rank_fails_idle_ranks_of_2_over_ucx() {
    stop_one("stop-idle", 2, "ucx", 1, &[], BUDGET);
}

#[test]
fn small_all_reduces_complete_with_heartbeats_on_and_off() {
    let transports: &[&str] = if cfg!(feature = "ucx") {
        &["shm", "tcp", "ucx"]
    } else {
        &["shm", "tcp"]
    };
    for &transport in transports {
        for hb in ["2", "0"] {
            let out = common::run_job(
                "loop",
                2,
                transport,
                &[("SHARDLINE_HEARTBEAT", hb), ("WORKER_ITERS", "5000")],
                Duration::from_secs(120),
            );
            common::assert_all_ok(&format!("loop over {transport}, heartbeat {hb}"), &out);
            println!(
                "{transport}, SHARDLINE_HEARTBEAT={hb}: {}",
                out[0].output.trim()
            );
        }
    }
}

/// Time to error of the other ranks after one is stopped, median of `LIVENESS_RUNS` (5) runs per
/// case; `LIVENESS_BUDGET` (seconds, default 10) bounds each run, `LIVENESS_TIMEOUT` sets
/// SHARDLINE_TIMEOUT (60) and `LIVENESS_IDLE_SECS` how long an idle rank idles before it tries a
/// barrier (120). Run with
/// `cargo test -p shardline-comm --test it -- liveness:: --ignored --nocapture`.
#[test]
#[ignore]
fn time_to_error_median() {
    let runs: usize = std::env::var("LIVENESS_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let budget = Duration::from_secs_f64(
        std::env::var("LIVENESS_BUDGET")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10.0),
    );
    let timeout = std::env::var("LIVENESS_TIMEOUT").unwrap_or_else(|_| "60".into());
    let idle = std::env::var("LIVENESS_IDLE_SECS").unwrap_or_else(|_| "120".into());
    let extra = [
        ("SHARDLINE_TIMEOUT", timeout.as_str()),
        ("WORKER_IDLE_SECS", idle.as_str()),
    ];
    // LIVENESS_ONLY: run only the cases whose name contains it (e.g. "stop-loop 2 ranks shm").
    let only = std::env::var("LIVENESS_ONLY").unwrap_or_default();
    let mut table = Vec::new();
    for scenario in ["stop-loop", "stop-idle"] {
        for (world, victim) in [(2, 1), (4, 2)] {
            for transport in ["shm", "tcp"] {
                if !format!("{scenario} {world} ranks {transport}").contains(&only) {
                    continue;
                }
                // A run's time: until the last of the other ranks failed.
                let mut all: Vec<Duration> = (0..runs)
                    .map(|_| {
                        let t = stop_one(scenario, world, transport, victim, &extra, budget);
                        t.into_iter().max().unwrap()
                    })
                    .collect();
                all.sort();
                table.push(format!(
                    "{scenario} {world} ranks {transport}: median {:.2} s (min {:.2}, max {:.2}, {runs} runs)",
                    all[all.len() / 2].as_secs_f64(),
                    all[0].as_secs_f64(),
                    all[all.len() - 1].as_secs_f64(),
                ));
            }
        }
    }
    println!("\n{}", table.join("\n"));
}

// The rendezvous: rank 0 and the ranks that joined watch each other while rank 0 waits for the
// last ones (who never come here).

/// Starts ranks `started` of a `world`-rank job whose other ranks never come, lets them join,
/// stops `victim`, and returns each other rank's time from the stop to its exit and its output.
fn stop_in_rendezvous(
    world: usize,
    started: &[usize],
    victim: usize,
) -> Vec<(usize, Duration, bool, String)> {
    let addr = common::free_addr();
    let env = [("SHARDLINE_TRANSPORT", "shm"), ("SHARDLINE_TIMEOUT", "60")];
    let mut ranks: Vec<(usize, Child)> = started
        .iter()
        .map(|&r| (r, common::spawn_rank("smoke", r, world, &addr, &env, None)))
        .collect();
    // Every rank started has joined once rank 0 listens and a moment has passed.
    let t = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "rank 0 never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(700));
    let vpid = ranks.iter().find(|(r, _)| *r == victim).unwrap().1.id();
    // SAFETY: signalling a child we started.
    unsafe { libc::kill(vpid as libc::pid_t, libc::SIGSTOP) };
    let stopped = Instant::now();
    let mut out = Vec::new();
    for (r, c) in ranks.iter_mut().filter(|(r, _)| *r != victim) {
        let deadline = stopped + BUDGET;
        let status = loop {
            if let Some(s) = c.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let took = stopped.elapsed();
        let _ = c.kill();
        let _ = c.wait();
        let (_, text) = common::finish(c, Duration::from_secs(1));
        let Some(status) = status else {
            panic!("rank {r} still waited {BUDGET:?} after rank {victim} stopped: {text}");
        };
        out.push((*r, took, status.success(), text));
    }
    for (_, c) in &mut ranks {
        // SAFETY: as above.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGCONT) };
        let _ = c.kill();
        let _ = c.wait();
    }
    out
}

#[test]
fn a_rank_0_stopped_in_the_rendezvous_fails_the_ranks_that_joined() {
    // Ranks 0 and 1 of 3: rank 1 waits for the table, rank 0 for rank 2.
    for (r, took, ok, out) in stop_in_rendezvous(3, &[0, 1], 0) {
        println!("rendezvous, rank 0 stopped: rank {r} failed after {took:?}: {out}");
        assert!(
            !ok && out.contains("rank 0 sent nothing"),
            "rank {r}: {out}"
        );
    }
}

#[test]
fn a_joined_rank_stopped_in_the_rendezvous_fails_rank_0_which_tells_the_others() {
    // Ranks 0, 1 and 2 of 4 (rank 3 never comes); rank 2 stops after it joined.
    for (r, took, ok, out) in stop_in_rendezvous(4, &[0, 1, 2], 2) {
        println!("rendezvous, rank 2 stopped: rank {r} failed after {took:?}: {out}");
        assert!(
            !ok && out.contains("rank 2 sent nothing"),
            "rank {r}: {out}"
        );
        if r == 1 {
            assert!(out.contains("gave up"), "rank 1 did not hear why: {out}");
        }
    }
}

// Connecting: a rank whose peers got the table but then never connect (a fake rank 0 hands the
// real rank 1 a table whose other ranks are sockets of this test, or a stopped process's
// segments), and a peer whose listener is gone.

const BOOT_HELLO: u32 = 0x4842_4c53; // "SLBH"
const BOOT_TABLE: u32 = 0x5442_4c53; // "SLBT"

/// Plays rank 0 of the rendezvous at `addr` for one joining rank: reads its hello and answers
/// with a table of `others` (by rank) and the joiner's own endpoint.
fn fake_rank_0(
    addr: &str,
    others: Vec<shardline_comm::transport::Endpoint>,
) -> std::thread::JoinHandle<()> {
    use std::io::Write;
    let listener = std::net::TcpListener::bind(addr).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        assert_eq!(body[..4], BOOT_HELLO.to_le_bytes());
        let world = u32::from_le_bytes(body[8..12].try_into().unwrap()) as usize;
        let tlen = u16::from_le_bytes([body[16], body[17]]) as usize;
        let mut rest = &body[18 + tlen..];
        let joiner = shardline_comm::transport::Endpoint::decode(&mut rest).unwrap();
        let mut table = BOOT_TABLE.to_le_bytes().to_vec();
        table.extend_from_slice(&7u64.to_le_bytes());
        table.extend_from_slice(&(world as u32).to_le_bytes());
        for r in 0..world {
            match others.iter().find(|e| e.world_rank == r) {
                Some(e) => e.encode(&mut table),
                None => joiner.encode(&mut table),
            }
        }
        let mut msg = (table.len() as u32).to_le_bytes().to_vec();
        msg.extend_from_slice(&table);
        s.write_all(&msg).unwrap();
        // Keep the connection until the joiner is done with it.
        let _ = s.read(&mut [0u8; 64]);
        std::thread::sleep(Duration::from_secs(1));
    })
}

fn endpoint(rank: usize, pid: u32, tcp: String, shm: &str) -> shardline_comm::transport::Endpoint {
    shardline_comm::transport::Endpoint {
        world_rank: rank,
        host: shardline_comm::transport::host_identity(),
        pid,
        tcp,
        shm: shm.into(),
        ucx: String::new(),
    }
}

/// Rank 1 of a `world`-rank job whose other ranks are `others`, over `transport`: how long its
/// `Group::init` took and its error.
fn join_fake_job(
    world: usize,
    transport: shardline_comm::TransportChoice,
    others: Vec<shardline_comm::transport::Endpoint>,
) -> (Duration, String) {
    let addr = common::free_addr();
    let fake = fake_rank_0(&addr, others);
    let mut cfg = shardline_comm::Config::new(1, world, addr, "test-token");
    cfg.timeout = Duration::from_secs(60);
    cfg.transport = transport;
    let t = Instant::now();
    let e = shardline_comm::Group::init(&cfg)
        .err()
        .expect("a job of absent ranks formed");
    let took = t.elapsed();
    fake.join().unwrap();
    (took, e.to_string())
}

#[test]
fn a_peer_that_never_connects_over_tcp_fails_the_connection_naming_it() {
    // Rank 0's listener takes the connection (the kernel does, the process never reads); rank 2
    // never dials rank 1.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = held.local_addr().unwrap().to_string();
    let others = vec![
        endpoint(0, std::process::id(), at.clone(), "/nonexistent-0"),
        endpoint(2, std::process::id(), at, "/nonexistent-2"),
    ];
    let (took, e) = join_fake_job(3, shardline_comm::TransportChoice::Tcp, others);
    println!("tcp connect, rank 2 silent: failed after {took:?}: {e}");
    assert!(
        e.contains("rank 2 sent nothing") && e.contains("connect"),
        "{e}"
    );
    assert!(took < BUDGET, "{took:?}");
}

#[test]
fn a_stopped_peer_whose_segment_never_appears_fails_the_connection_naming_it() {
    let mut stopped = Command::new("sleep").arg("60").spawn().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(stopped.id() as libc::pid_t, libc::SIGSTOP) };
    let seg = format!("/dev/shm/shardline-liveness-test-{}", std::process::id());
    let others = vec![endpoint(0, stopped.id(), "127.0.0.1:1".into(), &seg)];
    let (took, e) = join_fake_job(2, shardline_comm::TransportChoice::Shm, others);
    stopped.kill().unwrap();
    stopped.wait().unwrap();
    println!("shm connect, rank 0 stopped: failed after {took:?}: {e}");
    assert!(
        e.contains("rank 0 sent nothing") && e.contains("is stopped"),
        "{e}"
    );
    assert!(took < BUDGET, "{took:?}");
}

#[test]
fn a_peer_whose_listener_is_gone_fails_the_dial_naming_it() {
    let gone = common::free_addr(); // bound and closed: connections are refused
    let others = vec![endpoint(0, std::process::id(), gone, "/nonexistent-0")];
    let (took, e) = join_fake_job(2, shardline_comm::TransportChoice::Tcp, others);
    println!("tcp dial refused: failed after {took:?}: {e}");
    assert!(e.contains("rank 0 is gone") && e.contains("refused"), "{e}");
    assert!(took < BUDGET, "{took:?}");
}
