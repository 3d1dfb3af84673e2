//! `shardline bench serve` end to end: against a real `shardline serve` of the tiny Mixtral
//! fixture its record has the keys it documents and no failed request, and against a port where
//! nothing listens it fails at once, naming the URL.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The server process, killed however the test ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether GET /health answers 200.
fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req =
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// Runs `shardline bench serve ARGS`, killed past `limit`.
fn bench_serve(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardline"))
        .args(["bench", "serve"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("bench serve {args:?} did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn bench_serve_against_the_tiny_model_writes_a_record_with_no_failures() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/mixtral-tiny");
    let port = free_port();
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_shardline"))
            .arg("serve")
            .arg("--model")
            .arg(&model)
            .args(["--port", &port.to_string(), "--kv-positions", "4096"])
            .env_remove("SHARDLINE_DEVICE")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while !healthy(port) {
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("shardline serve exited before it was healthy: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "shardline serve not healthy in 120 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("serve.jsonl");
    let url = format!("http://127.0.0.1:{port}");
    let out = bench_serve(
        &[
            "--url",
            &url,
            "--concurrency",
            "4",
            "--requests",
            "8",
            "--prompt-len",
            "8",
            "--output-len",
            "8",
            "--prompt-vocab",
            "256",
            "--timeout-s",
            "60",
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "bench serve failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&json).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one record:\n{text}");
    let r: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    for key in [
        "bench",
        "median_us",
        "p99_us",
        "iters",
        "concurrency",
        "requests",
        "prompt_len",
        "output_len",
        "duration_s",
        "req_per_s",
        "output_tok_per_s",
        "ttft_ms_p50",
        "ttft_ms_p99",
        "itl_ms_p50",
        "itl_ms_p99",
        "failed",
    ] {
        assert!(r.get(key).is_some(), "record without '{key}': {r}");
    }
    assert_eq!(r["bench"], "serve", "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(r["iters"], 8, "{r}");
    assert!(r["output_tok_per_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["ttft_ms_p50"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["itl_ms_p50"].as_f64().is_some(), "{r}");
    let p50 = r["median_us"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 <= r["p99_us"].as_f64().unwrap(), "{r}");
}

#[test]
fn bench_serve_without_a_server_fails_at_once_naming_the_url() {
    let url = "http://127.0.0.1:1";
    let started = Instant::now();
    let out = bench_serve(
        &["--url", url, "--requests", "2", "--timeout-s", "60"],
        Duration::from_secs(30),
    );
    assert!(
        !out.status.success(),
        "bench serve with no server succeeded"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(url),
        "the error does not name {url}: {stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?} to fail",
        started.elapsed()
    );
}
