//! `verify` split over ranks started by the local launcher (real processes, shm and tcp): the
//! same tolerance as one rank, one report (rank 0's), and plans that cannot work refused before
//! any rank starts.

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
    let cases: &[(&str, &[&str])] = &[
        ("qwen2-moe-tiny", &["--tp", "2"]),
        ("qwen2-moe-tiny", &["--tp", "2", "--transport", "tcp"]),
        ("mixtral-tiny", &["--tp", "4", "--ep", "2"]),
        ("mixtral-tiny-bf16", &["--ep", "2", "--transport", "tcp"]),
        ("qwen3-moe-tiny", &["--tp", "4"]),
        ("llama-tiny", &["--tp", "2"]),
    ];
    for (name, parallel) in cases {
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
