//! `shardline bench serve`: a load generator for an OpenAI-compatible completions server
//! (`shardline serve`, or any other): a fixed number of streamed requests, a fixed number in
//! flight, and their time to first token, inter-token latency, end-to-end latency and throughput.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::record::{Sink, Stats};

/// At most this much of an error response's body goes into the failure message.
const ERROR_BODY_MAX: usize = 2048;
/// The longest model list read from GET /v1/models.
const MODELS_BODY_MAX: usize = 1 << 20;

/// What the run measures; shown by `--help`.
const SEMANTICS: &str = "\
Sends `--requests` completion requests to `--url` (POST /v1/completions), `--concurrency` of them\n\
in flight at a time: one client per slot, each with its own HTTP/1.1 connection, sends its next\n\
request as soon as its last one has finished. A prompt is `--prompt-len` token ids drawn from\n\
0..`--prompt-vocab` (seeded by `--seed`, so runs send the same prompts); each request asks for\n\
`--output-len` tokens with temperature 0, ignore_eos and stream, so that every request generates\n\
exactly that many, and return_token_ids, so that a server that supports it (shardline, vLLM)\n\
sends a chunk per token even while a character's bytes are incomplete.\n\
The model name comes from `--model`, else from GET /v1/models (the first listed).\n\
\n\
Per request, timed from before it is sent: the time to first token (`ttft_ms_*`, the arrival of\n\
the first server-sent event carrying a token), the inter-token latencies (`itl_ms_*`, the gaps\n\
between successive token events, pooled over all requests), and the end-to-end latency\n\
(`median_us`, `p99_us`, until `data: [DONE]`). Output tokens are the usage chunk's\n\
`completion_tokens`, else the token events counted. `duration_s` is the wall-clock time from the\n\
first request sent to the last one finished; `req_per_s` is the successful requests over it, and\n\
`output_tok_per_s` their output tokens over it. `failed` counts requests answered with a status\n\
other than 200 or whose stream broke (an error event, no [DONE], no token, or a wait past\n\
`--timeout-s`); percentiles cover the successful ones. The run fails if every request failed.\n\
Example: shardline bench serve --url http://127.0.0.1:8000 --concurrency 8 --requests 64\n\
--prompt-len 128 --output-len 128 --json serve.jsonl";

#[derive(clap::Args)]
#[command(after_help = SEMANTICS)]
pub struct ServeArgs {
    /// The server's base URL (http only); requests go to its /v1/completions.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Requests in flight at a time.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    /// The model name the requests give (default: the first one GET /v1/models lists).
    #[arg(long)]
    model: Option<String>,
    /// Prompt token ids are drawn from 0..N: inside the vocabulary of any real model (the tiny
    /// test models have 256 tokens).
    #[arg(long, default_value_t = 1000)]
    prompt_vocab: u32,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The longest any one wait may take, in seconds: a connection, a response's head, or the
    /// next piece of a stream.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// Also write the record as a JSON line to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Where the requests go.
struct Target {
    /// The `--url` as given, for messages.
    url: String,
    /// Host name or address to connect to (no IPv6 brackets).
    host: String,
    port: u16,
    /// The `Host` header.
    authority: String,
    /// The URL's path, without a trailing slash, put before `/v1/...`.
    prefix: String,
}

impl Target {
    fn parse(url: &str) -> anyhow::Result<Target> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("--url {url} is not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => bail!("--url {url}: only http:// is supported, not {other}://"),
            None => bail!("--url {url} has no scheme: give it as http://HOST:PORT"),
        }
        let authority = uri
            .authority()
            .with_context(|| format!("--url {url} has no host"))?;
        Ok(Target {
            url: url.to_string(),
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: uri.port_u16().unwrap_or(80),
            authority: authority.as_str().to_string(),
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }
}

/// Why a request did not count.
struct Failure {
    /// The HTTP status, when the server answered with one other than 200.
    status: Option<StatusCode>,
    message: String,
}

impl Failure {
    fn broken(message: impl Into<String>) -> Failure {
        Failure {
            status: None,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(status) => write!(f, "HTTP {status}: {}", self.message),
            None => write!(f, "{}", self.message),
        }
    }
}

/// The timings of one successful request.
struct Done {
    ttft: Duration,
    /// Gaps between successive token events.
    itl: Vec<Duration>,
    e2e: Duration,
    output_tokens: usize,
}

/// One client slot: its connection to the server, made again whenever it is gone.
struct Client {
    target: Arc<Target>,
    timeout: Duration,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    fn new(target: Arc<Target>, timeout: Duration) -> Client {
        Client {
            target,
            timeout,
            sender: None,
        }
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let t = &self.target;
        let stream = timeout(self.timeout, TcpStream::connect((t.host.as_str(), t.port)))
            .await
            .map_err(|_| {
                anyhow::anyhow!("connecting to {} timed out after {:?}", t.url, self.timeout)
            })?
            .with_context(|| format!("cannot connect to {}", t.url))?;
        stream
            .set_nodelay(true)
            .with_context(|| format!("cannot set TCP_NODELAY on the connection to {}", t.url))?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP handshake with {} failed", t.url))?;
        // The connection's errors come back through the request that was using it.
        tokio::spawn(conn);
        Ok(sender)
    }

    /// Sends a request to `{prefix}{path}` and waits for the response's head.
    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<Response<Incoming>> {
        let t = self.target.clone();
        // A kept-alive connection the server has closed answers `ready` with an error.
        let kept = match self.sender.take() {
            Some(mut sender) => timeout(self.timeout, sender.ready())
                .await
                .is_ok_and(|r| r.is_ok())
                .then_some(sender),
            None => None,
        };
        let mut sender = match kept {
            Some(sender) => sender,
            None => self.connect().await?,
        };
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", t.prefix))
            .header(HOST, t.authority.as_str())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json, text/event-stream")
            .body(Full::new(body))
            .context("cannot build the HTTP request")?;
        let res = timeout(self.timeout, sender.send_request(req))
            .await
            .map_err(|_| {
                anyhow::anyhow!("no response from {}{path} within {:?}", t.url, self.timeout)
            })?
            .with_context(|| format!("request to {}{path} failed", t.url))?;
        // Kept for the next request; whoever reads the body drops it if the body is left unread.
        self.sender = Some(sender);
        Ok(res)
    }

    /// The next piece of a body, `None` at its end; each wait has the deadline.
    async fn next_data(&self, body: &mut Incoming) -> Result<Option<Bytes>, Failure> {
        loop {
            match timeout(self.timeout, body.frame()).await {
                Err(_) => {
                    return Err(Failure::broken(format!(
                        "nothing from the stream within {:?}",
                        self.timeout
                    )))
                }
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => return Err(Failure::broken(format!("stream broken: {e}"))),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// The start of a body (at most `limit` bytes), as text.
    async fn read_body(&self, body: &mut Incoming, limit: usize) -> String {
        let mut text = Vec::new();
        while text.len() < limit {
            match self.next_data(body).await {
                Ok(Some(data)) => text.extend_from_slice(&data),
                Ok(None) => break,
                Err(e) => {
                    text.extend_from_slice(format!(" ({e})").as_bytes());
                    break;
                }
            }
        }
        text.truncate(limit);
        String::from_utf8_lossy(&text).trim().to_string()
    }

    /// GET `{prefix}/v1/models`: the first model id listed.
    async fn first_model(&mut self) -> anyhow::Result<String> {
        let url = format!("{}/v1/models", self.target.url.trim_end_matches('/'));
        let mut res = self.send(Method::GET, "/v1/models", Bytes::new()).await?;
        let status = res.status();
        let body = self.read_body(res.body_mut(), MODELS_BODY_MAX).await;
        anyhow::ensure!(status == StatusCode::OK, "GET {url}: HTTP {status}: {body}");
        let list: Value = serde_json::from_str(&body)
            .with_context(|| format!("GET {url} did not answer JSON: {body}"))?;
        list["data"][0]["id"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("GET {url} lists no model: {body}; give --model"))
    }

    /// One streamed completion request, timed from before it is sent.
    async fn completion(&mut self, body: Bytes) -> Result<Done, Failure> {
        let start = Instant::now();
        let mut res = self
            .send(Method::POST, "/v1/completions", body)
            .await
            .map_err(|e| Failure::broken(format!("{e:#}")))?;
        if res.status() != StatusCode::OK {
            let message = self.read_body(res.body_mut(), ERROR_BODY_MAX).await;
            self.sender = None;
            return Err(Failure {
                status: Some(res.status()),
                message,
            });
        }
        let result = self.read_stream(res.body_mut(), start).await;
        // The connection serves the next request once this body has ended; a broken one, or one
        // that says more after [DONE], is dropped and the next request makes a new one.
        if result.is_err() || !matches!(self.next_data(res.body_mut()).await, Ok(None)) {
            self.sender = None;
        }
        result
    }

    /// Reads server-sent events until `data: [DONE]`, timing the token events.
    async fn read_stream(&self, body: &mut Incoming, start: Instant) -> Result<Done, Failure> {
        let mut pending = Vec::new();
        let mut tokens_at = Vec::new();
        let mut usage_tokens = None;
        loop {
            let Some(data) = self.next_data(body).await? else {
                return Err(Failure::broken("the stream ended before data: [DONE]"));
            };
            let arrived = Instant::now();
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let Some(payload) = line.strip_prefix(b"data:") else {
                    continue;
                };
                let payload = String::from_utf8_lossy(payload);
                match parse_event(payload.trim())? {
                    Event::Done => {
                        let first = *tokens_at
                            .first()
                            .ok_or_else(|| Failure::broken("the stream had no token"))?;
                        return Ok(Done {
                            ttft: first - start,
                            itl: tokens_at.windows(2).map(|w| w[1] - w[0]).collect(),
                            e2e: arrived - start,
                            output_tokens: usage_tokens.unwrap_or(tokens_at.len()),
                        });
                    }
                    Event::Token => tokens_at.push(arrived),
                    Event::Usage(n) => usage_tokens = Some(n),
                    Event::Other => {}
                }
            }
        }
    }
}

/// What one `data:` line says.
enum Event {
    /// `[DONE]`.
    Done,
    /// A chunk with generated text (or one with no text that does not just finish the stream:
    /// a token whose text is not complete yet).
    Token,
    /// The usage chunk's `completion_tokens`.
    Usage(usize),
    /// Anything else (a chunk that only carries the finish reason).
    Other,
}

fn parse_event(payload: &str) -> Result<Event, Failure> {
    if payload == "[DONE]" {
        return Ok(Event::Done);
    }
    let v: Value = serde_json::from_str(payload)
        .map_err(|e| Failure::broken(format!("a stream event is not JSON ({e}): {payload}")))?;
    if let Some(error) = v.get("error") {
        return Err(Failure::broken(format!(
            "the stream reported an error: {error}"
        )));
    }
    if let Some(choice) = v["choices"].get(0) {
        let text = choice["text"].as_str().unwrap_or("");
        if !text.is_empty() || choice["finish_reason"].is_null() {
            return Ok(Event::Token);
        }
    }
    match v["usage"]["completion_tokens"].as_u64() {
        Some(n) => Ok(Event::Usage(n as usize)),
        None => Ok(Event::Other),
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    for (name, v) in [
        ("--concurrency", args.concurrency),
        ("--requests", args.requests),
        ("--prompt-len", args.prompt_len),
        ("--output-len", args.output_len),
        ("--timeout-s", args.timeout_s as usize),
        ("--prompt-vocab", args.prompt_vocab as usize),
    ] {
        anyhow::ensure!(v > 0, "{name} must be at least 1");
    }
    let target = Arc::new(Target::parse(&args.url)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(bench(args, target))
}

async fn bench(args: ServeArgs, target: Arc<Target>) -> anyhow::Result<()> {
    let wait = Duration::from_secs(args.timeout_s);
    let model = match &args.model {
        Some(m) => m.clone(),
        None => Client::new(target.clone(), wait).first_model().await?,
    };
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        (0..args.requests)
            .map(|_| {
                let prompt: Vec<u32> = (0..args.prompt_len)
                    .map(|_| rng.u32(..args.prompt_vocab))
                    .collect();
                let body = json!({
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": args.output_len,
                    "temperature": 0,
                    "ignore_eos": true,
                    "stream": true,
                    "stream_options": {"include_usage": true},
                    // A chunk per token, even where its text is not whole yet (vLLM's option).
                    "return_token_ids": true,
                });
                Bytes::from(body.to_string())
            })
            .collect(),
    );

    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let slots: Vec<_> = (0..args.concurrency.min(args.requests))
        .map(|_| {
            let (next, bodies) = (next.clone(), bodies.clone());
            let mut client = Client::new(target.clone(), wait);
            tokio::spawn(async move {
                let mut results = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else {
                        return results;
                    };
                    results.push((i, client.completion(body.clone()).await));
                }
            })
        })
        .collect();
    let mut results = Vec::with_capacity(args.requests);
    for slot in slots {
        results.extend(slot.await.context("a client task panicked")?);
    }
    let duration = start.elapsed().as_secs_f64();
    results.sort_by_key(|(i, _)| *i);

    let mut done = Vec::new();
    let mut failures = Vec::new();
    for (_, r) in results {
        match r {
            Ok(d) => done.push(d),
            Err(f) => failures.push(f),
        }
    }
    if let Some(first) = failures.first() {
        if done.is_empty() {
            bail!(
                "all {} requests to {} failed; the first: {first}",
                args.requests,
                target.url
            );
        }
        tracing::warn!(
            "bench serve: {} of {} requests failed; the first: {first}",
            failures.len(),
            args.requests
        );
    }

    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let mut e2e_us: Vec<f64> = done.iter().map(|d| d.e2e.as_secs_f64() * 1e6).collect();
    let mut ttft_ms: Vec<f64> = done.iter().map(|d| ms(&d.ttft)).collect();
    let mut itl_ms: Vec<f64> = done.iter().flat_map(|d| d.itl.iter().map(ms)).collect();
    let output_tokens: usize = done.iter().map(|d| d.output_tokens).sum();
    let ttft = Stats::from_samples(&mut ttft_ms);
    // One output token per request leaves no gaps to report.
    let (itl_p50, itl_p99) = if itl_ms.is_empty() {
        (Value::Null, Value::Null)
    } else {
        let s = Stats::from_samples(&mut itl_ms);
        (round3(s.median_us).into(), round3(s.p99_us).into())
    };
    let fields: Map<String, Value> = json!({
        "model": model,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "seed": args.seed,
        "duration_s": round3(duration),
        "req_per_s": round3(done.len() as f64 / duration),
        "output_tok_per_s": round3(output_tokens as f64 / duration),
        "ttft_ms_p50": round3(ttft.median_us),
        "ttft_ms_p99": round3(ttft.p99_us),
        "itl_ms_p50": itl_p50,
        "itl_ms_p99": itl_p99,
        "failed": failures.len(),
    })
    .as_object()
    .cloned()
    .unwrap_or_default();
    Sink::new(args.json.as_deref())?.write("serve", Stats::from_samples(&mut e2e_us), fields)
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
