//! One rank of a multi-process test of `shardline-comm` (tests/ spawns several). It joins the
//! group described by the SHARDLINE_* environment and runs the scenario named by its argument,
//! checking every result exactly; it exits non-zero with the reason on the first wrong value.
//! Values are small integers, exact in f32, f16 and bf16 sums over a few ranks.

use std::time::{Duration, Instant};

use half::{bf16, f16};
use shardline_comm::{Algo, CommError, Elem, Group, ReduceOp};

type Check = Result<(), String>;

/// Rank `r`'s value at element `i`.
fn val(r: usize, i: usize) -> f32 {
    ((r * 3 + i) % 5) as f32
}

fn expect_eq<T: Elem>(what: &str, got: &[T], want: impl Fn(usize) -> f32) -> Check {
    if let Some(i) = (0..got.len()).find(|&i| got[i] != T::from_f32(want(i))) {
        return Err(format!(
            "{what}: element {i} of {} is {:?}, expected {}",
            got.len(),
            got[i],
            want(i)
        ));
    }
    Ok(())
}

fn ctx<T>(what: &str, r: Result<T, CommError>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

fn collectives<T: Elem>(g: &Group, sizes: &[usize]) -> Check {
    let (me, n) = (g.rank(), g.size());
    let name = T::DTYPE.name();
    for &len in sizes {
        for algo in [Algo::Direct, Algo::Ring, Algo::Doubling] {
            for op in [ReduceOp::Sum, ReduceOp::Max] {
                let mut buf: Vec<T> = (0..len).map(|i| T::from_f32(val(me, i))).collect();
                ctx("all_reduce", g.all_reduce_with(&mut buf, op, algo))?;
                let want = |i| match op {
                    ReduceOp::Sum => (0..n).map(|r| val(r, i)).sum(),
                    ReduceOp::Max => (0..n).map(|r| val(r, i)).fold(0.0, f32::max),
                };
                expect_eq(
                    &format!("all_reduce {op:?} {algo:?} {name} x{len}"),
                    &buf,
                    want,
                )?;
            }
        }
        let mut buf: Vec<T> = (0..len).map(|i| T::from_f32(val(me, i))).collect();
        ctx("all_reduce", g.all_reduce(&mut buf, ReduceOp::Sum))?;
        expect_eq(&format!("all_reduce auto {name} x{len}"), &buf, |i| {
            (0..n).map(|r| val(r, i)).sum()
        })?;

        let input: Vec<T> = (0..len).map(|i| T::from_f32(val(me, i))).collect();
        let mut out = vec![T::from_f32(9.0); len * n];
        ctx("all_gather", g.all_gather(&input, &mut out))?;
        expect_eq(&format!("all_gather {name} x{len}"), &out, |i| {
            val(i / len.max(1), i % len.max(1))
        })?;

        let input: Vec<T> = (0..len * n).map(|i| T::from_f32(val(me, i))).collect();
        let mut out = vec![T::from_f32(9.0); len];
        ctx(
            "reduce_scatter",
            g.reduce_scatter(&input, &mut out, ReduceOp::Sum),
        )?;
        expect_eq(&format!("reduce_scatter {name} x{len}"), &out, |i| {
            (0..n).map(|r| val(r, me * len + i)).sum()
        })?;

        let root = n - 1;
        let mut buf: Vec<T> = (0..len)
            .map(|i| T::from_f32(if me == root { val(root, i) } else { 9.0 }))
            .collect();
        ctx("broadcast", g.broadcast(&mut buf, root))?;
        expect_eq(&format!("broadcast {name} x{len}"), &buf, |i| val(root, i))?;

        // all_to_all: element j of block p sent by rank r is val(r, p * len + j).
        let input: Vec<T> = (0..len * n).map(|i| T::from_f32(val(me, i))).collect();
        let mut out = vec![T::from_f32(9.0); len * n];
        ctx("all_to_all", g.all_to_all(&input, &mut out))?;
        expect_eq(&format!("all_to_all {name} x{len}"), &out, |i| {
            val(i / len.max(1), me * len + i % len.max(1))
        })?;
    }
    // all_to_all_v: rank r sends (r + p) % 3 elements to p, all equal to r + p.
    let send_counts: Vec<usize> = (0..n).map(|p| (me + p) % 3).collect();
    let input: Vec<T> = (0..n)
        .flat_map(|p| std::iter::repeat_n(T::from_f32((me + p) as f32), send_counts[p]))
        .collect();
    let recv_counts = send_counts.clone();
    let mut out = vec![T::from_f32(99.0); recv_counts.iter().sum()];
    ctx(
        "all_to_all_v",
        g.all_to_all_v(&input, &send_counts, &mut out, &recv_counts),
    )?;
    let want: Vec<f32> = (0..n)
        .flat_map(|p| std::iter::repeat_n((p + me) as f32, recv_counts[p]))
        .collect();
    expect_eq(&format!("all_to_all_v {name}"), &out, |i| want[i])?;

    ctx("barrier", g.barrier())?;
    if n > 1 {
        // send_recv around the ring, then plain send/recv from rank 0 to rank 1.
        let data: Vec<T> = (0..5).map(|i| T::from_f32(val(me, i))).collect();
        let mut got = vec![T::from_f32(9.0); 5];
        ctx(
            "send_recv",
            g.send_recv((me + 1) % n, &data, (me + n - 1) % n, &mut got, 7),
        )?;
        expect_eq(&format!("send_recv {name}"), &got, |i| {
            val((me + n - 1) % n, i)
        })?;
        if me == 0 {
            ctx("send", g.send(1, &data, 8))?;
        } else if me == 1 {
            ctx("recv", g.recv(0, &mut got, 8))?;
            expect_eq(&format!("recv {name}"), &got, |i| val(0, i))?;
        }
    }
    Ok(())
}

/// Sums of inexact values must still be bitwise equal on every rank (tensor parallelism relies
/// on every rank holding the same hidden state).
fn identical_everywhere(g: &Group) -> Check {
    let (me, n) = (g.rank(), g.size());
    for (algo, len) in [
        (Algo::Direct, 1000),
        (Algo::Ring, 30_001),
        (Algo::Doubling, 1000),
    ] {
        let mut buf: Vec<f32> = (0..len)
            .map(|i| ((me * 7919 + i * 104_729) % 1000) as f32 * 0.001_3 + 1e-7 * i as f32)
            .collect();
        ctx(
            "all_reduce",
            g.all_reduce_with(&mut buf, ReduceOp::Sum, algo),
        )?;
        let mut all = vec![0f32; len * n];
        ctx("all_gather", g.all_gather(&buf, &mut all))?;
        for r in 0..n {
            let theirs = &all[r * len..(r + 1) * len];
            if let Some(i) = (0..len).find(|&i| theirs[i].to_bits() != buf[i].to_bits()) {
                return Err(format!(
                    "{algo:?} all_reduce differs between rank {me} and rank {r} at {i}: {} vs {}",
                    buf[i], theirs[i]
                ));
            }
        }
    }
    Ok(())
}

fn split_and_async(g: &Group) -> Check {
    let (me, n) = (g.rank(), g.size());
    // Even and odd ranks, each subgroup in reverse order of rank.
    let sub =
        ctx("split", g.split(Some((me % 2) as u32), -(me as i64)))?.ok_or("split gave no group")?;
    let members: Vec<usize> = (0..n).filter(|r| r % 2 == me % 2).rev().collect();
    if sub.size() != members.len() || members[sub.rank()] != me {
        return Err(format!(
            "split: rank {me} got rank {} of {} in its subgroup",
            sub.rank(),
            sub.size()
        ));
    }
    let mut buf = vec![me as f32 + 1.0; 33];
    ctx(
        "subgroup all_reduce",
        sub.all_reduce(&mut buf, ReduceOp::Sum),
    )?;
    let want: f32 = members.iter().map(|&r| r as f32 + 1.0).sum();
    expect_eq("subgroup all_reduce", &buf, |_| want)?;
    let none = ctx(
        "split(None)",
        g.split(if me == 0 { None } else { Some(1) }, 0),
    )?;
    if none.is_some() != (me != 0) {
        return Err("split with no color still gave a group".into());
    }
    drop(none);
    drop(sub);

    let a = g.all_reduce_async(vec![f16::from_f32(me as f32); 1000], ReduceOp::Max);
    let b = g.all_gather_async(vec![bf16::from_f32(me as f32); 3]);
    // all_to_all_v_async: rank r sends r + 1 copies of 10 * r + p to rank p.
    let send_counts = vec![me + 1; n];
    let input: Vec<f32> = (0..n)
        .flat_map(|p| std::iter::repeat_n((10 * me + p) as f32, me + 1))
        .collect();
    let recv_counts: Vec<usize> = (1..=n).collect();
    let v = g.all_to_all_v_async(input, &send_counts, &recv_counts);
    let bad = g.all_to_all_v_async(vec![0.0f32; 3], &[1], &[1]);
    let mut c = vec![1.0f32; 10];
    ctx("sync after async", g.all_reduce(&mut c, ReduceOp::Sum))?;
    expect_eq("sync after async", &c, |_| n as f32)?;
    expect_eq("all_reduce_async", &ctx("wait", a.wait())?, |_| {
        (n - 1) as f32
    })?;
    expect_eq("all_gather_async", &ctx("wait", b.wait())?, |i| {
        (i / 3) as f32
    })?;
    let want: Vec<f32> = (0..n)
        .flat_map(|p| std::iter::repeat_n((10 * p + me) as f32, p + 1))
        .collect();
    expect_eq("all_to_all_v_async", &ctx("wait", v.wait())?, |i| want[i])?;
    match bad.wait() {
        Err(CommError::InvalidArgument(_)) => {}
        other => return Err(format!("all_to_all_v_async with bad counts gave {other:?}")),
    }
    Ok(())
}

/// The last rank dies by SIGKILL while the others are inside an all_reduce; they must fail within
/// 2 s naming it, and their next collective must fail at once.
fn kill(g: &Group) -> Check {
    let (me, n) = (g.rank(), g.size());
    let victim = n - 1;
    ctx("barrier", g.barrier())?;
    if me == victim {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: raising a signal at ourselves.
        unsafe { libc::raise(libc::SIGKILL) };
        unreachable!("SIGKILL returned");
    }
    let start = Instant::now();
    let mut buf = vec![1.0f32; 2048];
    let err = match g.all_reduce(&mut buf, ReduceOp::Sum) {
        Ok(()) => return Err("all_reduce succeeded although a rank died".into()),
        Err(e) => e.to_string(),
    };
    let waited = start.elapsed();
    let named = format!("rank {victim}");
    if !err.contains(&named) || waited > Duration::from_millis(300 + 2000) {
        return Err(format!(
            "after {waited:?}: '{err}' (wanted '{named}' within 2 s of the kill)"
        ));
    }
    let t = Instant::now();
    match g.all_reduce(&mut buf, ReduceOp::Sum) {
        Err(e) if e.to_string().contains(&named) && t.elapsed() < Duration::from_secs(2) => {
            println!("rank {me}: detected: {err}");
            // Stay alive a moment so the other survivors see only the victim die.
            std::thread::sleep(Duration::from_millis(500));
            Ok(())
        }
        other => Err(format!("next collective after the death: {other:?}")),
    }
}

/// The rank a liveness scenario's test stops (`WORKER_VICTIM`, default the last).
fn victim(g: &Group) -> usize {
    std::env::var("WORKER_VICTIM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(g.size() - 1)
}

/// Says "ready" on stdout once every rank is past a barrier (the test stops the victim then).
fn ready(g: &Group) -> Check {
    use std::io::Write;
    ctx("barrier", g.barrier())?;
    println!("rank {}: ready", g.rank());
    std::io::stdout().flush().map_err(|e| e.to_string())
}

/// The outcome of a rank that saw `err`: fine when it names the victim. The rank stays a few
/// seconds more, so that the other ranks see only the victim fail, not this one exit.
fn detected(g: &Group, err: CommError) -> Check {
    let named = format!("rank {}", victim(g));
    let err = err.to_string();
    if err.contains(&named) {
        println!("rank {}: detected: {err}", g.rank());
        std::thread::sleep(Duration::from_secs(3));
        Ok(())
    } else {
        Err(format!("'{err}' does not name {named}"))
    }
}

/// Small all_reduces in a loop until one fails (the test SIGSTOPs the victim meanwhile); the
/// error must name the victim.
fn stop_loop(g: &Group) -> Check {
    ready(g)?;
    let start = Instant::now();
    let mut buf = vec![1.0f32; 2048];
    while start.elapsed() < Duration::from_secs(120) {
        if let Err(e) = g.all_reduce(&mut buf, ReduceOp::Sum) {
            return detected(g, e);
        }
        buf.fill(1.0);
    }
    Err("no collective failed within 120 s".into())
}

/// No collective at all after the barrier: the rank sleeps and asks the group whether it still
/// stands (`Group::check`) every 20 ms; after `WORKER_IDLE_SECS` (default 120) it runs a barrier.
/// The failure must name the victim.
fn stop_idle(g: &Group) -> Check {
    ready(g)?;
    let idle = std::env::var("WORKER_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120.0);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs_f64(idle) {
        std::thread::sleep(Duration::from_millis(20));
        if let Err(e) = g.check() {
            return detected(g, e);
        }
    }
    match g.barrier() {
        Err(e) => detected(g, e),
        Ok(()) => Err(format!(
            "nothing failed in {idle} s of idling and a barrier"
        )),
    }
}

/// `WORKER_ITERS` (default 20000) all_reduces of 256 f32, checked; prints the time per call.
fn small_loop(g: &Group) -> Check {
    let iters: usize = std::env::var("WORKER_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let n = g.size() as f32;
    let mut buf = vec![0f32; 256];
    ctx("barrier", g.barrier())?;
    let start = Instant::now();
    for i in 0..iters {
        buf.fill((i % 7) as f32);
        ctx("all_reduce", g.all_reduce(&mut buf, ReduceOp::Sum))?;
        if buf[0] != (i % 7) as f32 * n {
            return Err(format!(
                "all_reduce {i}: {} instead of {}",
                buf[0],
                (i % 7) as f32 * n
            ));
        }
    }
    let per = start.elapsed() / iters.max(1) as u32;
    println!(
        "rank {}: {iters} all_reduces of 256 f32, {per:?} each",
        g.rank()
    );
    Ok(())
}

/// One all_reduce and a barrier, then this rank's peak resident memory (VmHWM) on stdout.
fn smoke(g: &Group) -> Check {
    let mut buf = vec![1.0f32; 1000];
    ctx("all_reduce", g.all_reduce(&mut buf, ReduceOp::Sum))?;
    expect_eq("all_reduce", &buf, |_| g.size() as f32)?;
    ctx("barrier", g.barrier())?;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap_or("?")
        .trim();
    println!("rank {}: ok, peak RSS {peak}", g.rank());
    Ok(())
}

/// Rank 0 passes one element more than the others: every rank must get a mismatch error.
fn mismatch(g: &Group) -> Check {
    let mut buf = vec![1.0f32; if g.rank() == 0 { 11 } else { 10 }];
    match g.all_reduce(&mut buf, ReduceOp::Sum) {
        Err(e @ CommError::Mismatch { .. }) => {
            println!("rank {}: detected: {e}", g.rank());
            Ok(())
        }
        other => Err(format!("expected a mismatch error, got {other:?}")),
    }
}

fn main() {
    let scenario = std::env::args().nth(1).unwrap_or_default();
    let run = || -> Check {
        let g = ctx("init", Group::from_env())?;
        match scenario.as_str() {
            "collectives" => {
                let big = std::env::var("WORKER_BIG").is_ok();
                collectives::<f32>(&g, &[0, 1, 7, 2048, 33_333])?;
                collectives::<f16>(&g, &[0, 1, 7, 4099])?;
                collectives::<bf16>(&g, &[1, 6, 40_001])?;
                if big {
                    let mut buf: Vec<f32> = (0..4 << 20).map(|i| val(g.rank(), i)).collect();
                    ctx("16 MB all_reduce", g.all_reduce(&mut buf, ReduceOp::Sum))?;
                    expect_eq("16 MB all_reduce", &buf, |i| {
                        (0..g.size()).map(|r| val(r, i)).sum()
                    })?;
                    // Direct with 4 MB: more than a ring or socket buffer takes at once, so the
                    // sends continue from a snapshot while the buffer is reduced in place.
                    for op in [ReduceOp::Sum, ReduceOp::Max] {
                        let mut buf: Vec<f32> = (0..1 << 20).map(|i| val(g.rank(), i)).collect();
                        ctx(
                            "4 MB direct all_reduce",
                            g.all_reduce_with(&mut buf, op, Algo::Direct),
                        )?;
                        expect_eq("4 MB direct all_reduce", &buf, |i| {
                            let vals = (0..g.size()).map(|r| val(r, i));
                            match op {
                                ReduceOp::Sum => vals.sum(),
                                ReduceOp::Max => vals.fold(0.0, f32::max),
                            }
                        })?;
                    }
                }
                identical_everywhere(&g)?;
                split_and_async(&g)
            }
            "smoke" => smoke(&g),
            "kill" => kill(&g),
            "mismatch" => mismatch(&g),
            "stop-loop" => stop_loop(&g),
            "stop-idle" => stop_idle(&g),
            "loop" => small_loop(&g),
            other => Err(format!("unknown scenario '{other}'")),
        }
    };
    if let Err(why) = run() {
        eprintln!(
            "worker rank {}: {why}",
            std::env::var("SHARDLINE_RANK").unwrap_or_default()
        );
        std::process::exit(1);
    }
}
