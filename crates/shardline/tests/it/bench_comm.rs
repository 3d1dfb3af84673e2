//! `shardline bench comm` end to end: it spawns its ranks, and every JSON record has the keys
//! README.md lists for the comm bench ("Benchmarks").

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn bench_comm_writes_one_record_per_case_with_the_design_keys() {
    let dir = std::env::temp_dir().join(format!("shardline-bench-comm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("comm.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardline"))
        .args([
            "bench",
            "comm",
            "--op",
            "all_reduce,all_gather,send_recv",
            "--transport",
            "tcp",
        ])
        .args([
            "--ranks", "3", "--sizes", "8,1000", "--iters", "5", "--bind", "none",
        ])
        .args(["--timeout-s", "60", "--json"])
        .arg(&json)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("bench comm did not finish in 90 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "bench comm failed: {status}");
    let text = std::fs::read_to_string(&json).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 6, "3 ops x 2 sizes:\n{text}");
    for r in &records {
        for key in [
            "bench",
            "op",
            "transport",
            "dtype",
            "ranks",
            "bytes",
            "gbps",
            "median_us",
            "p99_us",
            "iters",
        ] {
            assert!(r.get(key).is_some(), "record without '{key}': {r}");
        }
        assert_eq!(
            (
                r["bench"].as_str(),
                r["ranks"].as_u64(),
                r["iters"].as_u64()
            ),
            (Some("comm"), Some(3), Some(5))
        );
        assert!(r["median_us"].as_f64().unwrap() > 0.0, "{r}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_comm_refuses_bad_arguments_with_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_shardline"))
        .args(["bench", "comm", "--op", "all_reduse"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown --op 'all_reduse'"), "{err}");
}
