//! `shardline launch` over "ssh" to two hosts (network namespaces; the ssh stand-in runs the
//! command line inside the namespace named as the host): one rank per host over tcp, and two per
//! host (shm within a host, tcp across); the job token never on a command line; and no rank left
//! running once the launcher is killed. Needs root and iproute2; says so when it cannot run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common;
use common::{make_hosts, Hosts};

/// A stand-in for ssh: `fake-ssh [OPTIONS] -- HOST COMMAND-LINE` runs the line in namespace HOST
/// in a session of its own, its standard input that of fake-ssh, as sshd would: the remote
/// command is not a child of the launcher and gets no signal sent to the launcher's ranks. Each
/// call's arguments are logged to `argv.log` beside it.
fn fake_ssh(dir: &Path) -> String {
    let path = dir.join("fake-ssh");
    let log = dir.join("argv.log");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\n\
             while [ $# -gt 0 ] && [ \"$1\" != -- ]; do shift; done; shift\n\
             host=\"$1\"; shift\nsetsid ip netns exec \"$host\" sh -c \"$*\"\n",
            log.display()
        ),
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&path).status().unwrap();
    path.display().to_string()
}

fn hosts_or_skip(test: &str) -> Option<Hosts> {
    match make_hosts() {
        Ok((h, _)) => Some(h),
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            None
        }
    }
}

fn launch(hosts: &Hosts, ssh: &str, per_host: &str, command: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shardline"))
        .args([
            "launch",
            "--hosts",
            &hosts.names.join(","),
            "--ranks-per-host",
            per_host,
        ])
        .args([
            "--coordinator",
            &format!("{}:29600", hosts.first_addr),
            "--ssh",
            ssh,
            "--",
        ])
        .args(command)
        .env("SHARDLINE_TIMEOUT", "30")
        .output()
        .unwrap()
}

#[test]
fn launch_runs_a_job_across_two_hosts() {
    let Some(hosts) = hosts_or_skip("launch_runs_a_job_across_two_hosts") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ssh = fake_ssh(dir.path());
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen3-moe-tiny");
    for (per_host, parallel) in [("1", ["--tp", "2"]), ("2", ["--tp", "4"])] {
        let mut cmd = vec!["verify", "--model", model.to_str().unwrap()];
        cmd.extend(parallel);
        let out = launch(&hosts, &ssh, per_host, &cmd);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{per_host} per host: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.matches("verify passed").count(), 1, "{stdout}");
    }
    // ssh was given options, `--`, the host and `sh -s`: the token went on its standard input.
    let argv = std::fs::read_to_string(dir.path().join("argv.log")).unwrap();
    assert_eq!(argv.lines().count(), 2 + 4, "{argv}");
    for line in argv.lines() {
        assert!(
            line.starts_with("-- sl") && line.ends_with(" sh -s"),
            "{argv}"
        );
        assert!(!line.contains("TOKEN"), "{argv}");
    }
}

/// The processes whose environment has `SHARDLINE_COORDINATOR=coordinator` and a rank (the
/// launcher takes the coordinator as a flag, fake-ssh reads its script on standard input).
fn ranks_at(coordinator: &str) -> Vec<u32> {
    let want = format!("SHARDLINE_COORDINATOR={coordinator}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
                return false;
            };
            let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
            vars.contains(&want.as_bytes())
                && vars.iter().any(|v| v.starts_with(b"SHARDLINE_RANK="))
        })
        .collect()
}

/// Starts a long job over two hosts, waits for both ranks, sends `signal` to the launcher and
/// returns how long the ranks took to be gone, and the launcher's stderr.
fn stop_launcher(hosts: &Hosts, ssh: &str, signal: i32) -> (Duration, PathBuf) {
    let coordinator = format!("{}:29600", hosts.first_addr);
    let log = std::env::temp_dir().join(format!("sl-launch-{}-{signal}.log", std::process::id()));
    let mut launcher = Command::new(env!("CARGO_BIN_EXE_shardline"))
        .args([
            "launch",
            "--hosts",
            &hosts.names.join(","),
            "--ranks-per-host",
            "1",
        ])
        .args(["--coordinator", &coordinator, "--ssh", ssh, "--"])
        .args(["run", "--prompt", "x", "--max-tokens", "4000", "--tp", "2"])
        .env("SHARDLINE_TIMEOUT", "30")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while ranks_at(&coordinator).len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the ranks did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on the launcher this test started.
    unsafe { libc::kill(launcher.id() as i32, signal) };
    let sent = Instant::now();
    while !ranks_at(&coordinator).is_empty() {
        if sent.elapsed() > Duration::from_secs(8) {
            for pid in ranks_at(&coordinator) {
                // SAFETY: kill(2) on a rank of this test's job.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            panic!("ranks still running 8 s after signal {signal} to the launcher");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = sent.elapsed();
    let _ = launcher.wait();
    (took, log)
}

#[test]
fn killing_the_launcher_stops_the_remote_ranks() {
    let Some(hosts) = hosts_or_skip("killing_the_launcher_stops_the_remote_ranks") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ssh = fake_ssh(dir.path());
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let (took, log) = stop_launcher(&hosts, &ssh, signal);
        let stderr = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        println!("signal {signal} to the launcher: its remote ranks were gone after {took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}: {stderr}");
        if signal == libc::SIGTERM {
            assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
        }
    }
}

#[test]
fn launch_fails_naming_the_rank_that_failed() {
    let Some(hosts) = hosts_or_skip("launch_fails_naming_the_rank_that_failed") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ssh = fake_ssh(dir.path());
    let out = launch(
        &hosts,
        &ssh,
        "1",
        &["verify", "--model", "/nonexistent-model"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("/nonexistent-model"), "{stderr}");
    assert!(
        stderr.contains("rank 0 failed") || stderr.contains("rank 1 failed"),
        "{stderr}"
    );
    // The error is printed once, by the launcher.
    assert_eq!(stderr.matches("error: ").count(), 1, "{stderr}");

    // Two hosts of one rank each cannot run --tp 4: refused, not run as 2 ranks.
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen3-moe-tiny");
    let out = launch(
        &hosts,
        &ssh,
        "1",
        &["verify", "--model", model.to_str().unwrap(), "--tp", "4"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--tp 4 asks for 4 ranks, but this job has 2"),
        "{stderr}"
    );
}
