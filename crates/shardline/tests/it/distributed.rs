//! `verify`, `run` and `bench` split over ranks started by the local launcher (real processes,
//! shm, tcp and, in a build with the `ucx` feature, ucx): the same tolerance and the same text
//! as one rank, one report (rank 0's), and plans that cannot work refused before any rank starts.

use crate::common;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

fn shardline(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shardline"))
        .args(args)
        .env_remove("SHARDLINE_RANK")
        .env("SHARDLINE_TIMEOUT", "30")
        .output()
        .expect("the shardline binary runs")
}

#[test]
fn verify_passes_split_over_ranks_on_shm_and_tcp() {
    // Each case with the type its partial sums travel in: f32, unless told the model's own.
    let cases: &[(&str, &[&str], &str)] = &[
        ("qwen2-moe-tiny", &["--tp", "2"], "f32"),
        (
            "qwen2-moe-tiny",
            &["--tp", "2", "--transport", "tcp"],
            "f32",
        ),
        ("mixtral-tiny", &["--tp", "4", "--ep", "2"], "f32"),
        (
            "mixtral-tiny-bf16",
            &["--ep", "2", "--transport", "tcp", "--reduce-dtype", "model"],
            "bf16",
        ),
        ("mixtral-tiny-bf16", &["--tp", "2"], "f32"),
        (
            "mixtral-tiny-f16",
            &["--tp", "4", "--ep", "2", "--reduce-dtype", "model"],
            "f16",
        ),
        ("qwen3-moe-tiny", &["--tp", "4"], "f32"),
        ("llama-tiny", &["--tp", "2"], "f32"),
    ];
    for (name, parallel, sums) in cases {
        let dir = fixture(name);
        let mut args = vec!["verify", "--model", dir.to_str().unwrap()];
        args.extend_from_slice(parallel);
        let out = shardline(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name} {parallel:?}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.matches("verify passed").count(),
            1,
            "{name} {parallel:?}: one report, from rank 0: {stdout}"
        );
        assert!(
            stdout.contains(&format!(" {sums} sums)")),
            "{name} {parallel:?}: not {sums} sums: {stdout}"
        );
    }
}

#[test]
#[cfg_attr(not(feature = "ucx"), ignore = "built without the `ucx` feature")]
fn verify_passes_split_over_ranks_on_ucx() {
    for (name, parallel) in [
        ("qwen2-moe-tiny", ["--tp", "2"]),
        ("mixtral-tiny", ["--tp", "4"]),
    ] {
        let dir = fixture(name);
        let mut args = vec!["verify", "--model", dir.to_str().unwrap()];
        args.extend_from_slice(&parallel);
        args.extend_from_slice(&["--transport", "ucx"]);
        let out = shardline(&args);
        assert!(
            out.status.success(),
            "{name} {parallel:?} ucx: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("verify passed"));
    }
}

#[test]
fn impossible_plans_are_refused_before_any_rank_starts() {
    for (name, args, why) in [
        (
            "mixtral-tiny",
            vec!["--tp", "3"],
            "4 attention heads do not split over 3 ranks",
        ),
        (
            "mixtral-tiny",
            vec!["--tp", "4", "--ep", "3"],
            "--ep 3 does not divide the 4 ranks",
        ),
        (
            "llama-tiny",
            vec!["--tp", "2", "--ep", "2"],
            "the model has no experts",
        ),
    ] {
        let dir = fixture(name);
        let mut full = vec!["verify", "--model", dir.to_str().unwrap()];
        full.extend(&args);
        let out = shardline(&full);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
        assert_eq!(
            stderr.matches("refused").count(),
            1,
            "{args:?}: refused once: {stderr}"
        );
    }
}

/// Whether process `pid` is still running (a zombie has exited; only its parent has not reaped
/// it yet).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// When a fault strikes a job: while its ranks prefill a long prompt, or while they decode.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Prefill,
    Decode,
}

/// One fault: rank `victim` of a `run --tp N --transport T` job gets `signal` in `phase`.
#[derive(Clone, Copy, Debug)]
struct Fault {
    tp: usize,
    transport: &'static str,
    phase: Phase,
    signal: i32,
    victim: usize,
}

/// Runs a job, strikes it with `fault`, and checks what an operator needs: the launcher fails
/// promptly, naming the victim, and leaves no rank running and nothing in /dev/shm. A prefill
/// reads `long_prompt` (and generates a few tokens), a decode a short prompt (and generates many).
/// Returns the time from the signal to the launcher's exit.
fn strike(fault: Fault, long_prompt: &Path) -> std::time::Duration {
    use std::io::Read;
    use std::time::{Duration, Instant};
    let tp = fault.tp.to_string();
    let (prompt_file, max_tokens) = match fault.phase {
        Phase::Prefill => (long_prompt.to_path_buf(), "16"),
        Phase::Decode => (long_prompt.with_file_name("short.txt"), "3000"),
    };
    if fault.phase == Phase::Decode {
        std::fs::write(&prompt_file, "Shardline").unwrap();
    }
    let mut launcher = Command::new(env!("CARGO_BIN_EXE_shardline"))
        .args(["run", "--max-tokens", max_tokens, "--tp", &tp])
        .args(["--transport", fault.transport])
        .arg("--prompt-file")
        .arg(&prompt_file)
        .env_remove("SHARDLINE_RANK")
        .env_remove("SHARDLINE_HEARTBEAT")
        .env("SHARDLINE_TIMEOUT", "60")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Rank 0 echoes the prompt before it prefills, and streams the generated text after: the
    // length of what came out tells the phase.
    let prompt_len = std::fs::read_to_string(&prompt_file)
        .unwrap()
        .trim_end()
        .len();
    let want = match fault.phase {
        Phase::Prefill => prompt_len,
        Phase::Decode => prompt_len + 16,
    };
    let mut stdout = launcher.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    while seen.len() < want {
        let n = stdout.read(&mut chunk).unwrap();
        if n == 0 {
            let mut stderr = String::new();
            let _ = launcher
                .stderr
                .as_mut()
                .unwrap()
                .read_to_string(&mut stderr);
            panic!("{fault:?}: the job ended before the fault: {stderr}");
        }
        seen.extend_from_slice(&chunk[..n]);
    }
    let ranks = common::ranks_of(launcher.id());
    assert_eq!(ranks.len(), fault.tp, "{fault:?}: ranks {ranks:?}");
    let (victim, _) = *ranks.iter().find(|(_, r)| *r == fault.victim).unwrap();
    let struck = Instant::now();
    // SAFETY: kill(2) on a rank this test's launcher started.
    unsafe { libc::kill(victim as i32, fault.signal) };
    // Drain stdout on its own thread so the launcher never blocks writing it.
    let rest = std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = stdout.read_to_end(&mut rest);
        rest
    });
    let status = loop {
        if let Some(s) = launcher.try_wait().unwrap() {
            break s;
        }
        if struck.elapsed() > Duration::from_secs(20) {
            let _ = launcher.kill();
            for (pid, _) in &ranks {
                // SAFETY: kill(2) on a rank this test's launcher started.
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            }
            panic!("{fault:?}: the job did not end within 20 s of the fault");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = struck.elapsed();
    let mut stderr = String::new();
    launcher
        .stderr
        .as_mut()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    seen.extend(rest.join().unwrap());
    assert!(
        !status.success(),
        "{fault:?}: the launcher succeeded: {stderr}"
    );
    if fault.phase == Phase::Prefill {
        assert!(
            seen.len() <= prompt_len + 1,
            "{fault:?}: text was generated, so the fault came after the prefill"
        );
    }
    // The report (the first failure's error and its causes) names the victim as lost.
    let report: Vec<&str> = stderr
        .lines()
        .skip_while(|l| !l.to_ascii_lowercase().starts_with("error"))
        .take_while(|l| !l.trim_start().starts_with("then rank"))
        .collect();
    let v = fault.victim;
    assert!(
        [
            format!("rank {v} failed (signal"),
            format!("peer rank {v} is gone"),
            format!("rank {v} sent nothing"),
        ]
        .iter()
        .any(|lost| report.iter().any(|l| l.contains(lost.as_str()))),
        "{fault:?}: the report does not name rank {v} as lost: {stderr}"
    );
    let wait_gone = Instant::now();
    while ranks.iter().any(|(pid, _)| running(*pid)) {
        assert!(
            wait_gone.elapsed() < Duration::from_secs(5),
            "{fault:?}: ranks still running after the launcher exited: {ranks:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let left: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    ranks
                        .iter()
                        .any(|(pid, _)| n.starts_with(&format!("shardline-{pid}-")))
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{fault:?}: left in /dev/shm: {left:?}");
    took
}

/// SIGKILL and SIGSTOP of a rank (rank 0, the one that schedules, included) while a job prefills
/// and while it decodes, over 2 and 4 ranks, on shm and tcp: every pair of these choices occurs.
/// A killed rank shows at once (its sockets close, its process is gone); a stopped one by its
/// silence, within the liveness budget (2 s by default). The budget asserted here is generous,
/// for loaded machines; the printed times are the real figures.
#[test]
fn a_killed_or_stopped_rank_fails_the_job_promptly_naming_it() {
    use libc::{SIGKILL, SIGSTOP};
    use std::time::Duration;
    use Phase::{Decode, Prefill};
    // About 3700 prompt tokens: a prefill of a second or more on the built-in model.
    let dir = std::env::temp_dir().join(format!("shardline-faults-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompt = dir.join("prompt.txt");
    std::fs::write(&prompt, vec!["shard line"; 340].join(" ")).unwrap();
    let cases = [
        (2, "shm", Decode, SIGKILL, 1),
        (2, "shm", Decode, SIGSTOP, 0),
        (2, "tcp", Prefill, SIGKILL, 0),
        (2, "tcp", Prefill, SIGSTOP, 1),
        (4, "shm", Prefill, SIGKILL, 3),
        (4, "shm", Prefill, SIGSTOP, 2),
        (4, "tcp", Decode, SIGKILL, 2),
        (4, "tcp", Decode, SIGSTOP, 1),
    ];
    for (tp, transport, phase, signal, victim) in cases {
        let fault = Fault {
            tp,
            transport,
            phase,
            signal,
            victim,
        };
        let took = strike(fault, &prompt);
        println!("{fault:?}: the job failed {took:?} after the signal");
        let budget = Duration::from_secs(if signal == SIGKILL { 5 } else { 10 });
        assert!(took < budget, "{fault:?}: took {took:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts a long `run --tp 2`, waits for both ranks, sends `signal` to the launcher; returns how
/// long the ranks took to be gone (checked in /proc) and the launcher's stderr.
fn stop_launcher(signal: i32) -> (std::time::Duration, String) {
    use std::time::{Duration, Instant};
    let mut launcher = Command::new(env!("CARGO_BIN_EXE_shardline"))
        .args(["run", "--prompt", "x", "--max-tokens", "4000", "--tp", "2"])
        .env_remove("SHARDLINE_RANK")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let ranks = loop {
        let r = common::ranks_of(launcher.id());
        if r.len() == 2 {
            break r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the ranks did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on the launcher this test started.
    unsafe { libc::kill(launcher.id() as i32, signal) };
    let sent = Instant::now();
    let alive = || ranks.iter().filter(|(pid, _)| running(*pid)).count();
    while alive() > 0 {
        if sent.elapsed() > Duration::from_secs(8) {
            for (pid, _) in &ranks {
                // SAFETY: kill(2) on a rank this test's launcher started.
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            }
            panic!(
                "{} rank(s) still running 8 s after signal {signal} to the launcher",
                alive()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = sent.elapsed();
    let _ = launcher.wait();
    let mut stderr = String::new();
    std::io::Read::read_to_string(launcher.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (took, stderr)
}

#[test]
fn killing_the_launcher_stops_its_ranks() {
    use std::time::Duration;
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGKILL] {
        let (took, stderr) = stop_launcher(signal);
        println!("signal {signal} to the launcher: its ranks were gone after {took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}: {stderr}");
        if signal != libc::SIGKILL {
            assert!(stderr.contains("stopped by SIG"), "{stderr}");
        }
    }
}

#[test]
fn bench_decode_over_two_ranks_reports_the_communication() {
    let json = std::env::temp_dir().join(format!("sl-bench-tp-{}.jsonl", std::process::id()));
    let out = shardline(&[
        "bench",
        "decode",
        "--preset",
        "mixtral-mini",
        "--dtype",
        "bf16",
        "--iters",
        "5",
        "--tp",
        "2",
        "--reduce-dtype",
        "model",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&json).unwrap();
    let _ = std::fs::remove_file(&json);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one record, from rank 0: {text}");
    let r: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(r["tp"], 2);
    assert_eq!(r["transport"], "shm");
    // Told to, a bf16 model's sums travel in bf16, half the bytes of f32.
    assert_eq!(r["sum_dtype"], "bf16", "{r}");
    assert!(r["comm_us_per_layer"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["median_us"].as_f64().unwrap() > r["comm_us_per_layer"].as_f64().unwrap());
}

/// The first line `run` prints for `prompt` (greedy, 24 new tokens) split as `parallel` says.
fn greedy_text(prompt: &str, parallel: &[&str]) -> String {
    let mut args = vec!["run", "--prompt", prompt, "--max-tokens", "24"];
    args.extend_from_slice(parallel);
    let out = shardline(&args);
    assert!(
        out.status.success(),
        "{parallel:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    stdout.lines().next().unwrap_or_default().to_string()
}

#[test]
fn greedy_text_is_the_same_on_one_rank_and_split_over_ranks() {
    // Split over ranks, greedy decoding picks each token with a distributed argmax over the
    // ranks' slices of the vocabulary.
    let one = greedy_text("Shardline", &[]);
    assert!(one.len() > "Shardline".len(), "nothing generated: {one:?}");
    assert_eq!(greedy_text("Shardline", &["--tp", "2"]), one);
    assert_eq!(
        greedy_text(
            "Shardline",
            &["--tp", "4", "--ep", "2", "--transport", "tcp"]
        ),
        one
    );
}

#[test]
fn a_long_prompt_gives_the_same_text_with_its_rows_dispatched_to_the_expert_ranks() {
    // 300 byte tokens: at --ep 2 each rank owns 150 rows, three chunks of expert dispatch (two at
    // --tp 4 --ep 2), exchanged between processes by the group's progress thread.
    let prompt =
        "Shardline dispatches the prompt's rows to the ranks that own their experts. ".repeat(4);
    let prompt = &prompt[..300];
    let one = greedy_text(prompt, &[]);
    assert!(one.len() > prompt.len(), "nothing generated: {one:?}");
    assert_eq!(greedy_text(prompt, &["--ep", "2"]), one);
    assert_eq!(
        greedy_text(prompt, &["--tp", "4", "--ep", "2", "--transport", "tcp"]),
        one
    );
}

#[test]
#[cfg_attr(not(feature = "ucx"), ignore = "built without the `ucx` feature")]
fn generated_text_is_the_same_on_one_rank_and_split_over_ranks_on_ucx() {
    // Tensor parallel (all-reduces and the distributed argmax), and expert parallel with a
    // prompt long enough that its rows are dispatched by the progress thread's all_to_all_v.
    let one = greedy_text("Shardline", &[]);
    assert!(one.len() > "Shardline".len(), "nothing generated: {one:?}");
    assert_eq!(
        greedy_text("Shardline", &["--tp", "2", "--transport", "ucx"]),
        one
    );
    assert_eq!(
        greedy_text(
            "Shardline",
            &["--tp", "4", "--ep", "2", "--transport", "ucx"]
        ),
        one
    );
    let prompt =
        "Shardline dispatches the prompt's rows to the ranks that own their experts. ".repeat(4);
    let prompt = &prompt[..300];
    let one = greedy_text(prompt, &[]);
    assert_eq!(
        greedy_text(prompt, &["--ep", "2", "--transport", "ucx"]),
        one
    );
}
