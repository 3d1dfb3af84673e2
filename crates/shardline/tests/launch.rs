//! `shardline launch` over "ssh" to two hosts (network namespaces; the ssh stand-in runs the
//! command line inside the namespace named as the host): one rank per host over tcp, and two per
//! host (shm within a host, tcp across). Needs root and iproute2; says so when it cannot run.

use std::path::Path;
use std::process::Command;

mod common;
use common::{make_hosts, Hosts};

/// A stand-in for ssh: `fake-ssh HOST COMMAND-LINE` runs the line in namespace HOST.
fn fake_ssh(dir: &Path) -> String {
    let path = dir.join("fake-ssh");
    std::fs::write(
        &path,
        "#!/bin/sh\nhost=\"$1\"; shift\nexec ip netns exec \"$host\" sh -c \"$1\"\n",
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
