//! `shardline serve` through the real binary, over a small HTTP/1.1 client of its own: batched
//! greedy outputs equal each request's output alone (on one rank and over two), KV blocks come
//! back (after the requests, and after a client that leaves mid-stream), the error paths, the
//! framing of streamed answers, stop strings, chat templates, and a graceful SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use crate::common;
use serde_json::{json, Value};

/// The fixture the tests serve: 128 positions, a byte-level tokenizer (token id = byte).
const FIXTURE: &str = "qwen2-moe-tiny";

/// How long anything may take before a test gives up (a server start, a request).
const DEADLINE: Duration = Duration::from_secs(60);

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

/// A port nobody listens on, below Linux's ephemeral range (32768 and up), so that the port a
/// server's launcher picks for its ranks' coordinator (a bind to port 0) cannot be the same.
fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let offset = (std::process::id() % 1000) as u16 * 12;
    loop {
        let port = 20_000 + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A `shardline serve` process (and the ranks it started), killed on drop.
struct Server {
    child: Child,
    port: u16,
    log: tempfile::NamedTempFile,
}

impl Server {
    /// Serves the model in `dir` with `extra` arguments and `envs` set; returns once `/health`
    /// answers.
    fn start_dir(dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Server {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_shardline"))
            .args(["serve", "--model", dir.to_str().unwrap()])
            .args(["--port", &port.to_string(), "--kv-positions", "4096"])
            .args(extra)
            .env_remove("SHARDLINE_MODEL")
            .env_remove("SHARDLINE_TP")
            .env_remove("SHARDLINE_EP")
            .env_remove("SHARDLINE_DEVICE")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            // Its own process group: the ranks of `--tp 2` are killed with it.
            .process_group(0)
            .spawn()
            .expect("cannot start the shardline binary");
        let mut server = Server { child, port, log };
        let start = Instant::now();
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("the server exited ({status}): {}", server.log());
            }
            let health = Reply::try_send(port, "GET", "/health", "").map(|r| r.status);
            if health.is_ok_and(|s| s == 200) {
                return server;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no /health in time: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start(extra: &[&str]) -> Server {
        Server::start_dir(&fixture(FIXTURE), extra, &[])
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Sends a request; a server that does not answer fails the test, showing its log.
    fn send(&self, method: &str, path: &str, body: &str) -> Reply {
        Reply::try_send(self.port, method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}; the server's log:\n{}", self.log()))
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut reply = self.send("GET", path, "");
        (reply.status, reply.body())
    }

    /// POSTs `body`; the status and the body parsed as JSON.
    fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let mut reply = self.send("POST", path, body);
        let text = reply.body();
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}; {}", self.log()));
        (reply.status, value)
    }

    /// A completion that must succeed.
    fn complete(&self, request: &Value) -> Value {
        let (status, body) = self.post("/v1/completions", &request.to_string());
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The value of metric `name`.
    fn metric(&self, name: &str) -> f64 {
        let (status, text) = self.get("/metrics");
        assert_eq!(status, 200);
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    /// Waits until no sequence runs and every KV block is back.
    fn wait_idle(&self) {
        let start = Instant::now();
        while self.metric("shardline_kv_blocks_used") != 0.0
            || self.metric("shardline_running_sequences") != 0.0
        {
            assert!(start.elapsed() < DEADLINE, "{}", self.get("/metrics").1);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this test started.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// An HTTP/1.1 response being read (the request said `Connection: close`).
struct Reply {
    reader: BufReader<TcpStream>,
    status: u16,
    chunked: bool,
    /// Body bytes read and not yet taken.
    buf: Vec<u8>,
    done: bool,
}

impl Reply {
    /// Sends a request and reads the response's head.
    fn try_send(port: u16, method: &str, path: &str, body: &str) -> Result<Reply, String> {
        let io = |e: std::io::Error| e.to_string();
        let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(io)?;
        stream.set_read_timeout(Some(DEADLINE)).map_err(io)?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).map_err(io)?;
        stream.write_all(body.as_bytes()).map_err(io)?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).map_err(io)?;
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("a bad status line: {line:?}"))?;
        let mut chunked = false;
        loop {
            line.clear();
            reader.read_line(&mut line).map_err(io)?;
            if line.trim_end().is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
        }
        Ok(Reply {
            reader,
            status,
            chunked,
            buf: Vec::new(),
            done: false,
        })
    }

    /// Reads more of the body into `buf`; false at its end.
    fn fill(&mut self) -> bool {
        if self.done {
            return false;
        }
        if !self.chunked {
            let mut block = [0u8; 8192];
            let n = self.reader.read(&mut block).unwrap();
            self.buf.extend_from_slice(&block[..n]);
            self.done = n == 0;
            return n > 0;
        }
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        let size = line.trim().split(';').next().unwrap();
        let size = usize::from_str_radix(size, 16)
            .unwrap_or_else(|_| panic!("a bad chunk size line: {line:?}"));
        let mut chunk = vec![0u8; size + 2];
        self.reader.read_exact(&mut chunk).unwrap();
        assert!(chunk.ends_with(b"\r\n"), "a chunk without its CRLF");
        chunk.truncate(size);
        self.buf.extend_from_slice(&chunk);
        self.done = size == 0;
        !self.done
    }

    fn body(&mut self) -> String {
        while self.fill() {}
        String::from_utf8(std::mem::take(&mut self.buf)).unwrap()
    }

    /// The next server-sent event (its text without the blank line after it).
    fn next_event(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buf.drain(..i + 2).take(i).collect();
                return Some(String::from_utf8(event).unwrap());
            }
            if !self.fill() {
                assert!(self.buf.is_empty(), "a partial event at the end");
                return None;
            }
        }
    }
}

/// A streamed answer checked for its framing: every event one `data: ` line, JSON chunks, the
/// last `[DONE]`. Returns the chunks.
fn sse_chunks(reply: &mut Reply) -> Vec<Value> {
    assert_eq!(reply.status, 200);
    let mut events = Vec::new();
    while let Some(event) = reply.next_event() {
        events.push(event);
    }
    assert_eq!(events.last().map(String::as_str), Some("data: [DONE]"));
    events[..events.len() - 1]
        .iter()
        .map(|e| {
            assert!(!e.contains('\n'), "one line per event: {e:?}");
            let data = e.strip_prefix("data: ").expect("a data line");
            serde_json::from_str(data).unwrap_or_else(|err| panic!("{err}: {data}"))
        })
        .collect()
}

/// The greedy request `i` of the batching tests: prompts of 3 to 70 ids (several chunks of a
/// 32-token step), 8 to 12 new tokens.
fn batch_request(i: usize) -> Value {
    let len = 3 + (i * 29) % 68;
    let prompt: Vec<usize> = (0..len).map(|k| (i * 37 + k * 11 + 5) % 256).collect();
    json!({
        "prompt": prompt,
        "max_tokens": 8 + i % 5,
        "temperature": 0,
        "ignore_eos": true,
        "return_token_ids": true,
    })
}

fn token_ids(answer: &Value) -> Vec<u64> {
    let choice = &answer["choices"][0];
    choice["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no token_ids: {answer}"))
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

/// The 16 requests all at once from threads (a quarter of them starting a little later, while
/// the others run); their token ids, and the most sequences seen running at once.
fn all_at_once(server: &Server, requests: &[Value]) -> (Vec<Vec<u64>>, f64) {
    let barrier = Barrier::new(requests.len() + 1);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            barrier.wait();
            let mut most: f64 = 0.0;
            while !done.load(Ordering::Relaxed) {
                most = most.max(server.metric("shardline_running_sequences"));
            }
            most
        });
        let handles: Vec<_> = requests
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    if i % 4 == 3 {
                        std::thread::sleep(Duration::from_millis(i as u64 / 4));
                    }
                    let answer = server.complete(r);
                    assert_eq!(answer["choices"][0]["finish_reason"], "length");
                    token_ids(&answer)
                })
            })
            .collect();
        let ids = handles.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, Ordering::Relaxed);
        (ids, watcher.join().unwrap())
    })
}

/// 16 greedy requests, each alone and then all at once, give the same tokens; then every block
/// is back.
fn batched_equals_alone(extra: &[&str]) {
    let mut args = vec!["--step-tokens", "32"];
    args.extend(extra);
    let server = Server::start(&args);
    let requests: Vec<Value> = (0..16).map(batch_request).collect();
    let alone: Vec<Vec<u64>> = requests
        .iter()
        .map(|r| {
            let ids = token_ids(&server.complete(r));
            assert_eq!(ids.len() as u64, r["max_tokens"].as_u64().unwrap());
            ids
        })
        .collect();
    // The watcher may miss the overlap on a busy machine: a few tries to see one.
    let mut most_running = Vec::new();
    for _ in 0..3 {
        let (batched, most) = all_at_once(&server, &requests);
        for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
            assert_eq!(a, b, "request {i}: alone, then batched");
        }
        most_running.push(most);
        if most > 1.0 {
            break;
        }
    }
    assert!(
        most_running.iter().any(|&n| n > 1.0),
        "the requests never ran together: {most_running:?}"
    );
    server.wait_idle();
}

#[test]
fn batched_greedy_outputs_equal_each_request_alone() {
    batched_equals_alone(&[]);
}

#[test]
fn batched_greedy_outputs_equal_each_request_alone_over_two_ranks() {
    batched_equals_alone(&["--tp", "2"]);
}

#[test]
fn a_client_that_leaves_mid_stream_gives_its_blocks_back() {
    let server = Server::start(&[]);
    let max_tokens = 120;
    let request = json!({
        "prompt": [1, 2, 3, 4, 5],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
    })
    .to_string();
    // The generation would go on for `max_tokens`; the client leaves after its first event, so
    // fewer are generated. A test thread descheduled for the whole generation can miss that:
    // a few tries.
    let mut generated = Vec::new();
    for _ in 0..3 {
        let before = server.metric("shardline_generated_tokens_total");
        let mut reply = server.send("POST", "/v1/completions", &request);
        assert_eq!(reply.status, 200);
        let first = reply.next_event().expect("a first event");
        assert!(first.starts_with("data: {"), "{first}");
        drop(reply);
        server.wait_idle();
        generated.push(server.metric("shardline_generated_tokens_total") - before);
        if generated.last() < Some(&(max_tokens as f64)) {
            break;
        }
    }
    assert!(
        generated.iter().any(|&n| n < max_tokens as f64),
        "the generation was not cut short: {generated:?} tokens"
    );
    assert_eq!(server.get("/health"), (200, "ok".to_string()));
}

/// The error body OpenAI's clients expect; returns its message.
fn openai_error(status: u16, body: &Value, want_status: u16, want_type: &str) -> String {
    assert_eq!(status, want_status, "{body}");
    let error = &body["error"];
    assert_eq!(error["type"], want_type, "{body}");
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "{body}"
    );
    error["message"].as_str().expect("a message").to_string()
}

#[test]
fn bad_requests_get_openai_errors() {
    let server = Server::start(&[]);
    let post = |body: &str| server.post("/v1/completions", body);
    let invalid = |body: &str| {
        let (status, value) = post(body);
        openai_error(status, &value, 400, "invalid_request_error");
        value["error"].clone()
    };
    let e = invalid("{\"prompt\": [1, 2,");
    assert!(
        e["message"].as_str().unwrap().contains("not valid JSON"),
        "{e}"
    );
    let e = invalid(r#"{"prompt": [1, 2], "max_tokens": "x"}"#);
    assert_eq!(e["param"], "max_tokens");
    assert_eq!(e["code"], Value::Null);
    let e = invalid(r#"{"prompt": [1, 2], "temperature": -1}"#);
    assert_eq!(e["param"], "temperature");
    let e = invalid(r#"{"prompt": [1, 2], "top_p": 0}"#);
    assert_eq!(e["param"], "top_p");
    let e = invalid(r#"{"prompt": [1, 2], "max_tokens": 0}"#);
    assert_eq!(e["param"], "max_tokens");
    let e = invalid(r#"{"prompt": [1, 2], "max_tokens": 100000000000}"#);
    assert_eq!(e["param"], "max_tokens");
    let e = invalid(r#"{"prompt": [], "max_tokens": 4}"#);
    assert_eq!(e["param"], "prompt");
    let e = invalid(r#"{"prompt": [1, 256]}"#);
    assert!(e["message"].as_str().unwrap().contains("256"), "{e}");
    let long: Vec<u32> = (0..130).map(|i| i % 200).collect();
    let e = invalid(&json!({"prompt": long, "max_tokens": 4}).to_string());
    assert_eq!(e["param"], "prompt");
    let e = invalid(&json!({"prompt": &long[..100], "max_tokens": 40}).to_string());
    assert!(e["message"].as_str().unwrap().contains("128"), "{e}");
    let e = invalid(r#"{"max_tokens": 4}"#);
    assert!(e["message"].as_str().unwrap().contains("prompt"), "{e}");
    let e = invalid("[1, 2]");
    assert!(e["message"].as_str().unwrap().contains("object"), "{e}");
    let (status, body) = server.post("/v1/chat/completions", r#"{"messages": []}"#);
    openai_error(status, &body, 400, "invalid_request_error");
    let (status, body) = post(r#"{"prompt": [1, 2], "model": "gpt-4"}"#);
    let message = openai_error(status, &body, 404, "invalid_request_error");
    assert!(message.contains("gpt-4"), "{message}");
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(5 << 20));
    let (status, body) = post(&big);
    openai_error(status, &body, 413, "invalid_request_error");
    // Unknown fields are fine; the model's own name too.
    let answer = server.complete(&json!({
        "prompt": [1, 2],
        "max_tokens": 2,
        "model": FIXTURE,
        "frequency_penalty": 0,
        "user": "me",
    }));
    assert_eq!(answer["usage"]["completion_tokens"], 2, "{answer}");
    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], FIXTURE);
    assert_eq!(server.get("/health"), (200, "ok".to_string()));
    server.wait_idle();
}

#[test]
fn a_full_queue_answers_503() {
    let server = Server::start(&["--queue", "1", "--max-running", "1"]);
    let request = json!({
        "prompt": [1, 2, 3],
        "max_tokens": 60,
        "temperature": 0,
        "ignore_eos": true,
    })
    .to_string();
    // One runs, one waits in the queue: of many at once, some are refused. Each flood is a
    // fresh chance for requests to meet in the queue.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let flood: Vec<(u16, Value)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..24)
                .map(|_| s.spawn(|| server.post("/v1/completions", &request)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (status, body) in &flood {
            match status {
                200 => assert_eq!(body["usage"]["completion_tokens"], 60, "{body}"),
                _ => {
                    openai_error(*status, body, 503, "server_error");
                }
            }
        }
        statuses.extend(flood.iter().map(|f| f.0));
        if statuses.contains(&503) {
            break;
        }
    }
    assert!(statuses.contains(&503), "no 503: {statuses:?}");
    assert!(statuses.contains(&200), "none served: {statuses:?}");
    server.wait_idle();
}

/// The streamed text of a completion (checking the framing and the last chunks), with its
/// finish reason and usage.
fn streamed(server: &Server, path: &str, mut request: Value) -> (String, String, Value) {
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let mut reply = server.send("POST", path, &request.to_string());
    let chunks = sse_chunks(&mut reply);
    let chat = path.contains("chat");
    let (usage, chunks) = chunks.split_last().expect("chunks");
    assert_eq!(usage["choices"], json!([]), "{usage}");
    let (last, pieces) = chunks.split_last().expect("a last chunk");
    let mut text = String::new();
    for (i, chunk) in pieces.iter().enumerate() {
        let choice = &chunk["choices"][0];
        assert_eq!(choice["finish_reason"], Value::Null, "{chunk}");
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        assert_eq!(chunk["object"], object);
        let piece = if chat {
            if i == 0 {
                assert_eq!(choice["delta"]["role"], "assistant", "{chunk}");
            }
            &choice["delta"]["content"]
        } else {
            &choice["text"]
        };
        text.push_str(piece.as_str().unwrap());
    }
    let finish = last["choices"][0]["finish_reason"].as_str().unwrap();
    (text, finish.to_string(), usage["usage"].clone())
}

#[test]
fn streamed_text_and_stop_strings_match_the_whole_answer() {
    let server = Server::start(&[]);
    let request = json!({
        "prompt": "Hello, world",
        "max_tokens": 40,
        "temperature": 0,
        "ignore_eos": true,
    });
    let whole = server.complete(&request);
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(whole["object"], "text_completion");
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    let (streamed_text, finish, usage) = streamed(&server, "/v1/completions", request.clone());
    assert_eq!(streamed_text, text);
    assert_eq!(finish, "length");
    assert_eq!(usage, whole["usage"]);
    assert_eq!(usage["completion_tokens"], 40);

    // A stop string from the middle of the text: the answer ends just before its first
    // occurrence, streamed or not.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 20, "{text:?}");
    let stop: String = chars[12..15].iter().collect();
    let cut = &text[..text.find(&stop).unwrap()];
    let mut with_stop = request.clone();
    with_stop["stop"] = json!(["never in it \u{1F600}", stop]);
    let whole = server.complete(&with_stop);
    assert_eq!(whole["choices"][0]["text"], cut, "stop {stop:?}");
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    assert!(whole["usage"]["completion_tokens"].as_u64().unwrap() < 40);
    let (streamed_text, finish, _) = streamed(&server, "/v1/completions", with_stop);
    assert_eq!(streamed_text, cut, "stop {stop:?}");
    assert_eq!(finish, "stop");

    // Chat: the same framing with deltas.
    let chat = json!({
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 20,
        "temperature": 0,
        "ignore_eos": true,
    });
    let (status, whole) = server.post("/v1/chat/completions", &chat.to_string());
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    let message = &whole["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    let (streamed_text, finish, _) = streamed(&server, "/v1/chat/completions", chat);
    assert_eq!(streamed_text, message["content"].as_str().unwrap());
    assert_eq!(finish, "length");
    server.wait_idle();
}

/// The prompt ids a chat request ran with (the fixtures' tokenizer: one id per byte).
fn chat_prompt(server: &Server, messages: Value) -> (u16, Value) {
    let request = json!({
        "messages": messages,
        "max_tokens": 1,
        "return_token_ids": true,
    });
    server.post("/v1/chat/completions", &request.to_string())
}

fn prompt_text(answer: &Value) -> String {
    let ids = answer["choices"][0]["prompt_token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer}"));
    let bytes: Vec<u8> = ids.iter().map(|i| i.as_u64().unwrap() as u8).collect();
    String::from_utf8(bytes).unwrap()
}

#[test]
fn chat_prompts_are_rendered_with_the_model_template() {
    // The fixtures have no chat template: the documented plain format.
    let server = Server::start(&[]);
    let (status, answer) = chat_prompt(
        &server,
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        prompt_text(&answer),
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    );
    drop(server);

    // A model directory with Mixtral-Instruct's template in tokenizer_config.json. The expected
    // text is Jinja2's rendering with transformers' settings.
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(FIXTURE)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let template = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";
    let config = json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let server = Server::start_dir(dir.path(), &[], &[]);
    let (status, answer) = chat_prompt(
        &server,
        json!([
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": [{"type": "text", "text": "Again"}]},
        ]),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        prompt_text(&answer),
        "<s>[INST] Hi [/INST]Hello</s>[INST] Again [/INST]"
    );
    let (status, answer) = chat_prompt(
        &server,
        json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
    );
    let message = openai_error(status, &answer, 400, "invalid_request_error");
    assert!(message.contains("roles must alternate"), "{message}");
}

#[test]
fn sigterm_lets_the_request_in_flight_finish_and_exits_0() {
    let mut server = Server::start(&[]);
    let request = json!({
        "prompt": [7, 8, 9],
        "max_tokens": 100,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut reply = server.send("POST", "/v1/completions", &request.to_string());
    let first = reply.next_event().expect("a first event");
    // SAFETY: kill(2) on the server this test started.
    assert_eq!(
        unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) },
        0
    );
    let mut events = vec![first];
    while let Some(event) = reply.next_event() {
        events.push(event);
    }
    assert_eq!(events.last().unwrap(), "data: [DONE]");
    let usage: Value =
        serde_json::from_str(events[events.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 100, "{usage}");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "still running: {}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}: {}", server.log());
    assert!(TcpStream::connect(("127.0.0.1", server.port)).is_err());
}

#[test]
fn an_idle_server_over_two_ranks_outlives_the_collective_deadline() {
    // The other rank waits for each step with the group's deadline (1 s here): rank 0 must keep
    // it alive while no request comes.
    let server = Server::start_dir(
        &fixture(FIXTURE),
        &["--tp", "2"],
        &[("SHARDLINE_TIMEOUT", "1")],
    );
    std::thread::sleep(Duration::from_millis(3000));
    let body = server.complete(&json!({"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0}));
    assert_eq!(body["usage"]["completion_tokens"], 3, "{body}");
}

#[test]
fn a_stopped_rank_ends_an_idle_server_over_two_ranks_naming_it() {
    // Rank 1 waits for rank 0's next step; rank 0 waits for requests, in no collective at all
    // (it broadcasts an empty step now and then, which a stopped rank 1 would take for ever in
    // its buffers). Only the heartbeats tell rank 0 that rank 1 stopped.
    let mut server = Server::start(&["--tp", "2"]);
    let ranks = common::ranks_of(server.child.id());
    let (victim, _) = *ranks
        .iter()
        .find(|(_, r)| *r == 1)
        .unwrap_or_else(|| panic!("no rank 1 among {ranks:?}"));
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on a rank of the server this test started.
    unsafe { libc::kill(victim as i32, libc::SIGSTOP) };
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        if stopped.elapsed() > Duration::from_secs(20) {
            // SAFETY: as above.
            unsafe { libc::kill(victim as i32, libc::SIGKILL) };
            panic!(
                "the server still runs 20 s after rank 1 stopped: {}",
                server.log()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = stopped.elapsed();
    // SAFETY: as above (the rank is gone with the launcher already, or goes now).
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let log = server.log();
    println!("the server ended {took:?} after rank 1 stopped: {log}");
    assert!(!status.success(), "{log}");
    assert!(log.contains("rank 1 sent nothing"), "{log}");
}
