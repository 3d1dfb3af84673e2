//! The `run`, `verify` and `bench decode` commands through the real binary: exit codes, output
//! and error messages.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

fn shardline(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardline"))
        .args(args)
        .env_remove("SHARDLINE_MODEL")
        .output()
        .expect("cannot start the shardline binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn verify_passes_on_a_fixture() {
    let dir = fixture("qwen2-moe-tiny");
    let out = shardline(&["verify", "--model", dir.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "verify failed: {stdout}{}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("greedy 8/8 agree") && stdout.contains("verify passed"),
        "{stdout}"
    );
}

#[test]
fn verify_fails_with_a_named_error_on_a_bad_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("ref.json");
    std::fs::write(&reference, "{\"prompt_ids\": [1, 2]}").unwrap();
    let dir = fixture("llama-tiny");
    let out = shardline(&[
        "verify",
        "--model",
        dir.to_str().unwrap(),
        "--reference",
        reference.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("ref.json") && stderr.contains("not a reference file"),
        "{stderr}"
    );
}

#[test]
fn run_builtin_model_is_deterministic_and_prints_timings() {
    let args = [
        "run",
        "--prompt",
        "Hello",
        "--max-tokens",
        "6",
        "--temperature",
        "0.8",
        "--seed",
        "9",
    ];
    let a = shardline(&args);
    assert!(a.status.success(), "{}", text(&a.stderr));
    let stdout = text(&a.stdout);
    assert_eq!(
        stdout.lines().count(),
        1,
        "only the text on stdout: {stdout}"
    );
    assert!(stdout.starts_with("Hello"));
    let stderr = text(&a.stderr);
    let timings = stderr.lines().last().unwrap();
    assert!(
        timings.starts_with("[prefill 5 tokens:") && timings.contains("decode 6 tokens"),
        "{timings}"
    );
    let b = shardline(&args);
    assert_eq!(text(&b.stdout).lines().next(), stdout.lines().next());
}

#[test]
fn run_refuses_a_prompt_longer_than_max_positions() {
    let dir = fixture("mixtral-tiny");
    let prompt = "x".repeat(200);
    let out = shardline(&["run", "--model", dir.to_str().unwrap(), "--prompt", &prompt]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("max_position_embeddings (128)"), "{stderr}");
}

#[test]
fn run_names_a_broken_config() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), "not json").unwrap();
    let out = shardline(&["run", "--model", tmp.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("config.json") && stderr.contains("malformed JSON"),
        "{stderr}"
    );
}

#[test]
fn bench_decode_writes_a_record() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("decode.jsonl");
    let dir = fixture("mixtral-tiny");
    let out = shardline(&[
        "bench",
        "decode",
        "--model",
        dir.to_str().unwrap(),
        "--layers",
        "2",
        "--kv-len",
        "16",
        "--iters",
        "20",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line = std::fs::read_to_string(&json).unwrap();
    let rec: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    for (key, value) in [
        ("bench", "decode"),
        ("device", "cpu"),
        ("dtype", "f32"),
        ("exec", "split"),
    ] {
        assert_eq!(rec[key], value, "{rec}");
    }
    assert_eq!(rec["layers"], 2);
    assert_eq!(rec["iters"], 20);
    assert_eq!(rec["tp"], 1);
    assert!(rec["median_us"].as_f64().unwrap() > 0.0);
    assert!(rec["p99_us"].as_f64().unwrap() >= rec["median_us"].as_f64().unwrap());
    assert!(rec["gbps"].as_f64().unwrap() > 0.0);
    // f32 q [96, 64] + k, v [48, 64] + o [64, 96] + 2 norms [64] + router [4, 64]
    // + top-2 x 3 x [64, 64].
    let elems = (96 + 48 + 48 + 96) * 64 + 2 * 64 + 4 * 64 + 2 * 3 * 64 * 64;
    assert_eq!(rec["weight_bytes_per_layer"], 4 * elems);
    // A whole step is the head (embedding, norm, logits) and the layers.
    let (step, head) = (
        rec["step_us"].as_f64().unwrap(),
        rec["head_us"].as_f64().unwrap(),
    );
    assert!(step > head && head > 0.0, "{rec}");
    assert!(rec["step_p99_us"].as_f64().unwrap() >= step, "{rec}");
}

#[test]
fn bench_decode_runs_op_by_op_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("decode.jsonl");
    let dir = fixture("qwen2-moe-tiny");
    let out = shardline(&[
        "bench",
        "decode",
        "--model",
        dir.to_str().unwrap(),
        "--exec",
        "per-op",
        "--kv-len",
        "16",
        "--iters",
        "10",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rec: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&json).unwrap().trim()).unwrap();
    assert_eq!(rec["exec"], "per-op", "{rec}");
    assert!(rec["median_us"].as_f64().unwrap() > 0.0);
}

#[test]
fn run_chat_answers_each_line_and_ends_at_end_of_input() {
    use std::io::Write;
    let dir = fixture("qwen2-moe-tiny");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_shardline"))
        .args([
            "run",
            "--chat",
            "--max-tokens",
            "5",
            "--model",
            dir.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello there\nand again\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).lines().count(),
        2,
        "one reply line per message: {}",
        text(&out.stdout)
    );
}

#[test]
fn run_refuses_sampling_settings_that_mean_nothing() {
    for (flag, value, says) in [
        ("--temperature", "-1", "temperature -1"),
        ("--temperature", "NaN", "temperature NaN"),
        ("--top-p", "2", "top_p 2"),
        ("--top-p", "0", "top_p 0"),
    ] {
        let out = shardline(&["run", "--max-tokens", "2", flag, value]);
        assert!(!out.status.success(), "{flag} {value} was accepted");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(says), "{flag} {value}: {stderr}");
    }
}
