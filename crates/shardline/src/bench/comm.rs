//! `shardline bench comm`: latency and bandwidth of shardline-comm's collectives and point-to-point
//! messages. The command spawns its own ranks (it re-executes this binary with the rank in the
//! environment), puts a barrier before each timed operation, and records the slowest rank's time
//! of each iteration. Only rank 0 prints and writes JSON.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use half::{bf16, f16};
use serde_json::{Map, Value};
use shardline_comm::{Algo, Config, Elem, Group, ReduceOp, TransportChoice};

use super::record::{Sink, Stats};

/// Set in the environment of the ranks this command spawns.
const CHILD_ENV: &str = "SHARDLINE_BENCH_COMM_CHILD";
const ALL_OPS: &[&str] = &[
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "all_to_all",
    "send_recv",
];

/// Arguments of `shardline bench comm` (the meaning of `bytes` is in its `--help`).
#[derive(Args, Debug)]
pub struct CommArgs {
    /// Operations, comma separated: all_reduce, all_gather, reduce_scatter, broadcast,
    /// all_to_all, send_recv, or all.
    #[arg(long, default_value = "all_reduce,send_recv")]
    op: String,
    /// Transport: shm, tcp or ucx (ucx needs a build with the cargo feature `ucx`).
    #[arg(long, default_value = "shm")]
    transport: String,
    /// Number of ranks to spawn on this machine.
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// Element type: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Buffer sizes in bytes, comma separated.
    #[arg(
        long,
        default_value = "8,64,512,4096,8192,16384,65536,262144,1048576,4194304,16777216"
    )]
    sizes: String,
    /// Timed iterations per case (default: 2000 for small buffers, fewer for large, at least 20).
    #[arg(long)]
    iters: Option<usize>,
    /// all_reduce algorithm: auto, direct or ring.
    #[arg(long, default_value = "auto")]
    algo: String,
    /// Also write one JSON object per case to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Pin rank r to the r-th CPU this process may use ("core", as mpirun does by default for
    /// small jobs) or leave placement to the scheduler ("none").
    #[arg(long, default_value = "core")]
    bind: String,
    /// Give up (and kill the ranks) after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
}

struct Plan {
    ops: Vec<&'static str>,
    sizes: Vec<usize>,
    algo: Option<Algo>,
    transport: TransportChoice,
    bind: bool,
}

fn plan(a: &CommArgs) -> anyhow::Result<Plan> {
    let mut ops = Vec::new();
    for o in a.op.split(',').map(str::trim) {
        match ALL_OPS.iter().find(|&&k| k == o) {
            Some(k) => ops.push(*k),
            None if o == "all" => ops.extend_from_slice(ALL_OPS),
            None => bail!(
                "unknown --op '{o}' (expected one of {} or all)",
                ALL_OPS.join(", ")
            ),
        }
    }
    let sizes = a
        .sizes
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .with_context(|| format!("--sizes: '{s}' is not a byte count"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if a.ranks == 0 || a.ranks > 64 {
        bail!("--ranks {} must be between 1 and 64", a.ranks);
    }
    if a.ranks < 2 && ops.contains(&"send_recv") {
        bail!("send_recv needs --ranks 2 or more");
    }
    let transport = TransportChoice::parse(&a.transport)?;
    if transport == TransportChoice::Auto {
        bail!("--transport must be shm, tcp or ucx");
    }
    let bind = match a.bind.as_str() {
        "core" => true,
        "none" => false,
        other => bail!("--bind '{other}' (expected core or none)"),
    };
    Ok(Plan {
        ops,
        sizes,
        algo: Algo::parse(&a.algo)?,
        transport,
        bind,
    })
}

pub fn run(a: CommArgs) -> anyhow::Result<()> {
    let plan = plan(&a)?;
    if std::env::var_os(CHILD_ENV).is_some() {
        return match a.dtype.as_str() {
            "f32" => rank_main::<f32>(&a, &plan),
            "f16" => rank_main::<f16>(&a, &plan),
            "bf16" => rank_main::<bf16>(&a, &plan),
            other => bail!("unknown --dtype '{other}' (expected f32, f16 or bf16)"),
        };
    }
    launch(&a)
}

/// Spawns the ranks and waits for them, killing all on a failure or the deadline.
fn launch(a: &CommArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find this executable to spawn the ranks")?;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let token = format!("bench-{}-{nanos}", std::process::id());
    let mut children: Vec<Child> = (0..a.ranks)
        .map(|rank| {
            Command::new(&exe)
                .args(std::env::args_os().skip(1))
                .env(CHILD_ENV, "1")
                .env("SHARDLINE_RANK", rank.to_string())
                .env("SHARDLINE_WORLD_SIZE", a.ranks.to_string())
                .env("SHARDLINE_COORDINATOR", &addr)
                .env("SHARDLINE_JOB_TOKEN", &token)
                .spawn()
                .with_context(|| format!("cannot spawn rank {rank}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    let mut done = vec![false; a.ranks];
    let mut failure = None;
    while failure.is_none() && done.iter().any(|d| !d) {
        for (rank, c) in children.iter_mut().enumerate() {
            if done[rank] {
                continue;
            }
            if let Some(s) = c.try_wait()? {
                done[rank] = true;
                if !s.success() {
                    failure = Some(format!("rank {rank} failed ({s})"));
                }
            }
        }
        if Instant::now() > deadline {
            failure = Some(format!("the ranks did not finish within {} s", a.timeout_s));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(why) = failure {
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
        bail!("bench comm: {why}");
    }
    Ok(())
}

/// Pins this process to the `rank`-th CPU of its allowed set (wrapping around).
fn bind_to_core(rank: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; the calls only read and write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) != 0 {
            bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
        }
        let allowed: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect();
        let Some(&cpu) = allowed.get(rank % allowed.len().max(1)) else {
            bail!("no CPU to bind rank {rank} to")
        };
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
            bail!(
                "sched_setaffinity to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

fn rank_main<T: Elem>(a: &CommArgs, plan: &Plan) -> anyhow::Result<()> {
    let mut cfg = Config::from_env()?;
    if plan.bind {
        bind_to_core(cfg.rank)?;
    }
    cfg.transport = plan.transport;
    let g = Group::init(&cfg)?;
    let mut sink = if g.rank() == 0 {
        Some(Sink::new(a.json.as_deref())?)
    } else {
        None
    };
    for &op in &plan.ops {
        for &bytes in &plan.sizes {
            let iters = a
                .iters
                .unwrap_or((50_000_000 / bytes.max(4096)).clamp(20, 2000));
            let stats = measure::<T>(&g, op, bytes, iters, plan.algo)?;
            if let Some(sink) = sink.as_mut() {
                let mut f = Map::new();
                f.insert("op".into(), op.into());
                f.insert("transport".into(), a.transport.clone().into());
                f.insert("dtype".into(), T::DTYPE.name().into());
                f.insert("ranks".into(), g.size().into());
                f.insert("bytes".into(), bytes.into());
                let gbps = bytes as f64 / (stats.median_us * 1e3);
                f.insert("gbps".into(), Value::from((gbps * 1000.0).round() / 1000.0));
                if let Some(algo) = plan.algo.filter(|_| op == "all_reduce") {
                    f.insert("algo".into(), format!("{algo:?}").to_lowercase().into());
                }
                sink.write("comm", stats, f)?;
            }
        }
    }
    Ok(())
}

/// Times `iters` runs of `op` (after a warm-up); each sample is the slowest rank's time.
fn measure<T: Elem>(
    g: &Group,
    op: &str,
    bytes: usize,
    iters: usize,
    algo: Option<Algo>,
) -> anyhow::Result<Stats> {
    let (n, me) = (g.size(), g.rank());
    let esize = T::DTYPE.size();
    let mut count = (bytes / esize).max(1);
    if matches!(op, "all_gather" | "reduce_scatter" | "all_to_all") {
        count = (count / n).max(1) * n;
    }
    let one = T::from_f32(1.0);
    let mut a = vec![one; count];
    let mut b = vec![one; count];
    let warmup = (iters / 10).max(5);
    let mut samples = vec![0f32; iters];
    for i in 0..warmup + iters {
        g.barrier()?;
        let t = Instant::now();
        match op {
            "all_reduce" => match algo {
                Some(algo) => g.all_reduce_with(&mut a, ReduceOp::Sum, algo)?,
                None => g.all_reduce(&mut a, ReduceOp::Sum)?,
            },
            "all_gather" => g.all_gather(&a[..count / n], &mut b)?,
            "reduce_scatter" => g.reduce_scatter(&a, &mut b[..count / n], ReduceOp::Sum)?,
            "broadcast" => g.broadcast(&mut a, 0)?,
            "all_to_all" => g.all_to_all(&a, &mut b)?,
            "send_recv" => match me {
                0 => {
                    g.send(1, &a, 0)?;
                    g.recv(1, &mut b, 0)?;
                }
                1 => {
                    g.recv(0, &mut b, 0)?;
                    g.send(0, &b, 0)?;
                }
                _ => {}
            },
            other => bail!("unknown op {other}"),
        }
        let us = t.elapsed().as_secs_f64() * 1e6;
        if i >= warmup {
            // send_recv: rank 0's round trip, halved, is the one-way latency.
            samples[i - warmup] = match (op, me) {
                ("send_recv", 0) => (us / 2.0) as f32,
                ("send_recv", _) => 0.0,
                _ => us as f32,
            };
        }
        if op == "all_reduce" {
            a.fill(one); // keep the values from growing without bound
        }
    }
    g.all_reduce(&mut samples, ReduceOp::Max)?;
    let mut samples: Vec<f64> = samples.iter().map(|&s| s as f64).collect();
    Ok(Stats::from_samples(&mut samples))
}
