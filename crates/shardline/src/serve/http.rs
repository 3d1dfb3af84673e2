//! The HTTP side of `shardline serve`: OpenAI's completions and chat completions (whole, or
//! streamed as server-sent events), the model list, health and Prometheus metrics, on a small
//! tokio runtime of its own. A request is validated here, handed to the engine thread, and its
//! tokens turned into text as they come back ([`Generation`]), cut at the first stop string.
//! Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`. SIGTERM or
//! SIGINT stops the server gracefully: no new connections, the requests in flight finish.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use shardline_model::generate::TextStream;
use shardline_model::scheduler::{FinishReason, GenParams};
use shardline_model::tokenizer::TextCodec;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::batcher::{Event, SubmitError};
use super::chat::Message;
use super::AppState;

/// The largest request body taken.
const MAX_BODY: usize = 4 << 20;

/// How long the requests in flight may take to finish once a shutdown signal came.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// `max_tokens` of a completion that does not say.
const DEFAULT_MAX_TOKENS: usize = 16;

/// Serves the API on `addr` until SIGTERM or SIGINT (or `stop` set by the engine's side), then
/// lets the requests in flight finish (for [`SHUTDOWN_GRACE`] at most, or until a second
/// signal), sets `stop` (the engine loop ends once idle) and returns.
pub fn serve(addr: SocketAddr, state: Arc<AppState>, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("shardline-http")
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    let watched = stop.clone();
    let served = runtime.block_on(async move {
        // Handlers first, so that a signal right after the port opens is not missed.
        let mut signals = Signals::new().context("cannot watch for SIGTERM and SIGINT")?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(
            "serving {} on http://{}",
            state.model_name,
            listener.local_addr()?
        );
        let (tx, rx) = tokio::sync::watch::channel(Shutdown::No);
        let engine_stopped = async move {
            while !watched.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::spawn(async move {
            tokio::select! {
                () = signals.recv() => tracing::info!(
                    "shutting down once the requests in flight finish \
                     (signal again to stop now)"
                ),
                () = engine_stopped => tracing::warn!("the engine stopped; shutting down"),
            }
            let _ = tx.send(Shutdown::Graceful);
            signals.recv().await;
            let _ = tx.send(Shutdown::Now);
        });
        let mut graceful = rx.clone();
        let mut now = rx;
        // Token events are small writes: without TCP_NODELAY they wait on delayed ACKs.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
            let _ = graceful.wait_for(|s| *s != Shutdown::No).await;
        });
        tokio::select! {
            r = server => r.context("the HTTP server failed"),
            () = async {
                let _ = now.wait_for(|s| *s != Shutdown::No).await;
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, now.wait_for(|s| *s == Shutdown::Now))
                    .await;
            } => {
                tracing::warn!("stopping with requests still in flight");
                Ok(())
            }
        }
    });
    stop.store(true, Ordering::Relaxed);
    served
}

/// Where the server is in stopping.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shutdown {
    No,
    /// No new connections; the requests in flight finish.
    Graceful,
    /// Stop now.
    Now,
}

/// SIGTERM and SIGINT, watched from the moment this is made.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NotFound })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Why a request failed, as the client hears it.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    /// A request that cannot be served as it is (400), naming the field at fault.
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<String>,
    },
    #[error("the model `{0}` does not exist")]
    UnknownModel(String),
    #[error("no such route")]
    NotFound,
    #[error("the request body is larger than {MAX_BODY} bytes")]
    TooLarge,
    /// The engine's queue is full, or it is shutting down (503).
    #[error(transparent)]
    Busy(#[from] SubmitError),
    /// The engine failed (500).
    #[error("{0}")]
    Engine(String),
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError::Invalid {
            message: message.into(),
            param: param.map(str::to_string),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::UnknownModel(_) | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Engine(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The body: `{"error": {...}}`.
    fn body(&self) -> Value {
        let kind = match self {
            ApiError::Busy(_) | ApiError::Engine(_) => "server_error",
            _ => "invalid_request_error",
        };
        let (param, code) = match self {
            ApiError::Invalid { param, .. } => (param.as_deref(), None),
            ApiError::UnknownModel(_) => (Some("model"), Some("model_not_found")),
            _ => (None, None),
        };
        json!({"error": {
            "message": self.to_string(),
            "type": kind,
            "param": param,
            "code": code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.body())).into_response()
    }
}

/// A request body as a JSON object, whatever its content type; a body that is not one is a 400
/// in OpenAI's shape (not axum's plain-text rejection).
struct JsonBody(Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<JsonBody, ApiError> {
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge,
                _ => ApiError::invalid(e.body_text(), None),
            })?;
        let value: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}"), None))?;
        if !value.is_object() {
            return Err(ApiError::invalid("the body must be a JSON object", None));
        }
        Ok(JsonBody(value))
    }
}

/// The fields of `body` that `T` knows (others are ignored); a field of the wrong type is a 400
/// naming it.
fn fields<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let param = (path != ".").then_some(path);
        let message = match &param {
            Some(p) => format!("{p}: {}", e.inner()),
            None => e.inner().to_string(),
        };
        ApiError::Invalid { message, param }
    })
}

/// What completions and chat completions share: how to generate, and how to answer.
#[derive(Deserialize)]
struct Sampling {
    model: Option<String>,
    max_tokens: Option<u64>,
    /// Chat's newer name for `max_tokens`.
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    /// 0 or -1: no limit.
    top_k: Option<i64>,
    seed: Option<u64>,
    stop: Option<StopField>,
    /// More token ids that end the generation (vLLM's field).
    stop_token_ids: Option<Vec<u32>>,
    ignore_eos: Option<bool>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    /// Each choice carries its token ids (vLLM's field).
    return_token_ids: Option<bool>,
    n: Option<u64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

/// A completion's prompt: text, or token ids (one prompt per request).
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Ids(Vec<u64>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u64>>),
}

#[derive(Deserialize)]
struct CompletionFields {
    prompt: Prompt,
}

#[derive(Deserialize)]
struct ChatFields {
    messages: Vec<ChatMessage>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

/// A message's content: text, or a list of parts of which only text ones are supported.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

/// Completion or chat completion: the names and shapes of their answers.
#[derive(Clone, Copy)]
enum Api {
    Completion,
    Chat,
}

/// What is fixed about one request's answer.
struct Answer {
    api: Api,
    id: String,
    created: u64,
    model: String,
    token_ids: bool,
    include_usage: bool,
}

impl Answer {
    fn new(api: Api, engine_id: u64, model: &str, sampling: &Sampling) -> Answer {
        let prefix = match api {
            Api::Completion => "cmpl",
            Api::Chat => "chatcmpl",
        };
        Answer {
            api,
            id: format!("{prefix}-{engine_id}-{:08x}", fastrand::u32(..)),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: model.to_string(),
            token_ids: sampling.return_token_ids.unwrap_or(false),
            include_usage: sampling
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        }
    }

    fn envelope(&self, object: &str, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The whole answer of a request that did not stream.
    fn whole(&self, gen: &Generation, text: String, finish: FinishReason) -> Value {
        let mut choice = match self.api {
            Api::Completion => json!({"index": 0, "text": text}),
            Api::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text}}),
        };
        choice["logprobs"] = Value::Null;
        choice["finish_reason"] = finish_reason(Some(finish));
        if self.token_ids {
            choice["token_ids"] = json!(gen.ids);
            choice["prompt_token_ids"] = json!(gen.prompt);
        }
        let object = match self.api {
            Api::Completion => "text_completion",
            Api::Chat => "chat.completion",
        };
        let mut out = self.envelope(object, json!([choice]));
        out["usage"] = gen.usage();
        out
    }

    /// One streamed chunk: `text` (chat: `delta`, opening with the role when `first`).
    fn chunk(
        &self,
        text: &str,
        token_ids: &[u32],
        finish: Option<FinishReason>,
        first: bool,
    ) -> Value {
        let mut choice = match self.api {
            Api::Completion => json!({"index": 0, "text": text}),
            Api::Chat if first => {
                json!({"index": 0, "delta": {"role": "assistant", "content": text}})
            }
            Api::Chat if finish.is_some() && text.is_empty() => json!({"index": 0, "delta": {}}),
            Api::Chat => json!({"index": 0, "delta": {"content": text}}),
        };
        choice["logprobs"] = Value::Null;
        choice["finish_reason"] = finish_reason(finish);
        if self.token_ids {
            choice["token_ids"] = json!(token_ids);
        }
        self.envelope(self.chunk_object(), json!([choice]))
    }

    fn chunk_object(&self) -> &'static str {
        match self.api {
            Api::Completion => "text_completion",
            Api::Chat => "chat.completion.chunk",
        }
    }
}

fn finish_reason(f: Option<FinishReason>) -> Value {
    match f {
        Some(FinishReason::Stop) => "stop".into(),
        Some(FinishReason::Length) => "length".into(),
        None => Value::Null,
    }
}

/// The vocabulary a prompt's ids must fall in: the tokenizer's (the model's is at least as big).
/// Checks `ids` (a prompt of ids) against the model's vocabulary.
fn prompt_ids(state: &AppState, ids: &[u64]) -> Result<Vec<u32>, ApiError> {
    let vocab = state.vocab;
    match ids.iter().find(|&&t| t >= vocab as u64) {
        Some(t) => Err(ApiError::invalid(
            format!("token id {t} is out of the vocabulary ({vocab} tokens)"),
            Some("prompt"),
        )),
        None => Ok(ids.iter().map(|&t| t as u32).collect()),
    }
}

fn tokenize(codec: &TextCodec, text: &str, special: bool) -> Result<Vec<u32>, ApiError> {
    let ids = if special {
        codec.encode(text)
    } else {
        codec.encode_rendered(text)
    };
    ids.map_err(|e| ApiError::invalid(format!("cannot tokenize the prompt: {e}"), None))
}

async fn completions(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let sampling: Sampling = fields(&body)?;
    check_model(&state, &sampling)?;
    let CompletionFields { prompt } = fields(&body)?;
    let prompt = match prompt {
        Prompt::Text(text) => tokenize(&state.codec, &text, true)?,
        Prompt::Ids(ids) => prompt_ids(&state, &ids)?,
        Prompt::Texts(texts) => match <[String; 1]>::try_from(texts) {
            Ok([text]) => tokenize(&state.codec, &text, true)?,
            Err(_) => return Err(one_prompt()),
        },
        Prompt::IdLists(lists) => match <[Vec<u64>; 1]>::try_from(lists) {
            Ok([ids]) => prompt_ids(&state, &ids)?,
            Err(_) => return Err(one_prompt()),
        },
    };
    generate(state, Api::Completion, prompt, &sampling).await
}

fn one_prompt() -> ApiError {
    ApiError::invalid("one prompt per request is supported", Some("prompt"))
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let sampling: Sampling = fields(&body)?;
    check_model(&state, &sampling)?;
    let ChatFields { messages } = fields(&body)?;
    if messages.is_empty() {
        return Err(ApiError::invalid("messages is empty", Some("messages")));
    }
    let messages = messages
        .into_iter()
        .map(|m| {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(text)) => text,
                Some(Content::Parts(parts)) => parts
                    .into_iter()
                    .map(|p| match (p.kind.as_str(), p.text) {
                        ("text", Some(text)) => Ok(text),
                        (kind, _) => Err(ApiError::invalid(
                            format!("content parts of type `{kind}` are not supported"),
                            Some("messages"),
                        )),
                    })
                    .collect::<Result<String, ApiError>>()?,
            };
            Ok(Message {
                role: m.role,
                content,
            })
        })
        .collect::<Result<Vec<Message>, ApiError>>()?;
    let text = state
        .chat
        .render(&messages, true)
        .map_err(|e| ApiError::invalid(e, Some("messages")))?;
    let prompt = tokenize(&state.codec, &text, false)?;
    generate(state, Api::Chat, prompt, &sampling).await
}

fn check_model(state: &AppState, sampling: &Sampling) -> Result<(), ApiError> {
    match &sampling.model {
        Some(m) if *m != state.model_name => Err(ApiError::UnknownModel(m.clone())),
        _ => Ok(()),
    }
}

/// The engine's parameters of a request with `prompt` tokens, and its stop strings; what
/// cannot be served is a 400.
fn gen_params(
    state: &AppState,
    api: Api,
    prompt: usize,
    s: &Sampling,
) -> Result<(GenParams, Vec<String>), ApiError> {
    if prompt == 0 {
        return Err(ApiError::invalid("the prompt is empty", Some("prompt")));
    }
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
    }
    let context = state.max_positions;
    if prompt >= context {
        return Err(ApiError::invalid(
            format!(
                "the prompt has {prompt} tokens; this model's context is {context} tokens, \
                 with room for at least one more"
            ),
            Some(match api {
                Api::Completion => "prompt",
                Api::Chat => "messages",
            }),
        ));
    }
    let room = context - prompt;
    let (max_tokens, param) = match (s.max_tokens, s.max_completion_tokens) {
        (Some(n), _) => (n, "max_tokens"),
        (None, Some(n)) => (n, "max_completion_tokens"),
        // Unsaid: OpenAI's 16 for a completion, the rest of the context for a chat.
        (None, None) => match api {
            Api::Completion => (DEFAULT_MAX_TOKENS.min(room) as u64, "max_tokens"),
            Api::Chat => (room as u64, "max_tokens"),
        },
    };
    if max_tokens == 0 {
        return Err(ApiError::invalid(
            format!("{param} must be at least 1"),
            Some(param),
        ));
    }
    if max_tokens > room as u64 {
        return Err(ApiError::invalid(
            format!(
                "this model's context is {context} tokens; the prompt has {prompt} and \
                 {param} asks for {max_tokens} more"
            ),
            Some(param),
        ));
    }
    let temperature = s.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(ApiError::invalid(
            format!("temperature must be 0 or more, not {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("top_p must be in (0, 1], not {top_p}"),
            Some("top_p"),
        ));
    }
    let top_k = match s.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => k as usize,
        k => {
            return Err(ApiError::invalid(
                format!("top_k must be positive, or -1 or 0 for no limit, not {k}"),
                Some("top_k"),
            ))
        }
    };
    let mut stop_ids = match s.ignore_eos {
        Some(true) => Vec::new(),
        _ => state.eos_ids.clone(),
    };
    stop_ids.extend(s.stop_token_ids.iter().flatten());
    let stops = match &s.stop {
        None => Vec::new(),
        Some(StopField::One(stop)) => vec![stop.clone()],
        Some(StopField::Many(stops)) => stops.clone(),
    };
    let params = GenParams {
        max_tokens: max_tokens as usize,
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k,
        seed: s.seed.unwrap_or_else(|| fastrand::u64(..)),
        stop_ids,
    };
    Ok((
        params,
        stops.into_iter().filter(|s| !s.is_empty()).collect(),
    ))
}

/// Runs `prompt` and answers: the whole completion, or a stream of server-sent events.
async fn generate(
    state: Arc<AppState>,
    api: Api,
    prompt: Vec<u32>,
    sampling: &Sampling,
) -> Result<Response, ApiError> {
    let (params, stops) = gen_params(&state, api, prompt.len(), sampling)?;
    let stream = sampling.stream.unwrap_or(false);
    let every_token = stream && sampling.return_token_ids.unwrap_or(false);
    let mut gen = Generation::start(state.clone(), prompt, params, stops, every_token)?;
    let answer = Answer::new(api, gen.id, &state.model_name, sampling);
    // The first piece comes before the answer starts, so a request the engine refuses gets
    // its status (400, 500) even when it streams.
    let first = gen.next().await?;
    if stream {
        return Ok(Sse::new(event_stream(gen, answer, first)).into_response());
    }
    let mut piece = first;
    let mut text = String::new();
    let finish = loop {
        text.push_str(&piece.text);
        if let Some(f) = piece.finish {
            break f;
        }
        piece = gen.next().await?;
    };
    Ok(Json(answer.whole(&gen, text, finish)).into_response())
}

/// The server-sent events of a streamed answer: a chunk per piece of text, a last chunk with
/// the finish reason, the usage when asked for, then `[DONE]`. The stream owns the
/// [`Generation`]: a client that leaves drops it, which cancels the request.
fn event_stream(
    gen: Generation,
    answer: Answer,
    first: Piece,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    struct Streaming {
        gen: Generation,
        answer: Answer,
        first: Option<Piece>,
        started: bool,
    }
    let state = Streaming {
        gen,
        answer,
        first: Some(first),
        started: false,
    };
    stream::unfold(Some(state), |state| async move {
        let mut s = state?;
        let piece = match s.first.take() {
            Some(p) => Ok(p),
            None => s.gen.next().await,
        };
        let mut events = Vec::new();
        let data = |v: Value| SseEvent::default().data(v.to_string());
        let piece = match piece {
            Ok(p) => p,
            Err(e) => {
                events.push(data(e.body()));
                events.push(SseEvent::default().data("[DONE]"));
                return Some((events, None));
            }
        };
        // A piece of ids without text yet is sent when the request asked for token ids.
        if !piece.text.is_empty() || (s.answer.token_ids && !piece.token_ids.is_empty()) {
            let chunk = s
                .answer
                .chunk(&piece.text, &piece.token_ids, None, !s.started);
            events.push(data(chunk));
            s.started = true;
        }
        let Some(finish) = piece.finish else {
            return Some((events, Some(s)));
        };
        let ids: &[u32] = if piece.text.is_empty() {
            &piece.token_ids
        } else {
            &[]
        };
        events.push(data(s.answer.chunk("", ids, Some(finish), !s.started)));
        if s.answer.include_usage {
            let mut usage = s.answer.envelope(s.answer.chunk_object(), json!([]));
            usage["usage"] = s.gen.usage();
            events.push(data(usage));
        }
        events.push(SseEvent::default().data("[DONE]"));
        Some((events, None))
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok)))
}

/// A piece of a generation's text, with the tokens that came since the last piece.
struct Piece {
    text: String,
    token_ids: Vec<u32>,
    /// Set on the last piece.
    finish: Option<FinishReason>,
}

/// A request in the engine, its tokens turned into text as they come. Text that could be the
/// start of a stop string is held back until it is known not to be; at a stop string the text
/// is cut and the request cancelled. Dropping it before the end cancels the request.
struct Generation {
    state: Arc<AppState>,
    id: u64,
    events: UnboundedReceiver<Event>,
    prompt: Vec<u32>,
    ids: Vec<u32>,
    /// Ids already handed out with a piece.
    ids_out: usize,
    detok: TextStream,
    text: String,
    /// Bytes of `text` already handed out.
    text_out: usize,
    stops: Vec<String>,
    /// Bytes at the end of `text` held back: the longest stop string's, less one.
    hold: usize,
    /// The engine is done with the request (or never took it).
    engine_done: bool,
    /// A piece for every token, its text possibly empty (a stream that returns token ids, as
    /// vLLM's does), rather than only when new text is whole.
    every_token: bool,
}

impl Generation {
    fn start(
        state: Arc<AppState>,
        prompt: Vec<u32>,
        params: GenParams,
        stops: Vec<String>,
        every_token: bool,
    ) -> Result<Generation, ApiError> {
        let (tx, events) = unbounded_channel();
        let id = state.engine.submit(prompt.clone(), params, tx)?;
        let hold = stops.iter().map(|s| s.len()).max().unwrap_or(1) - 1;
        Ok(Generation {
            state,
            id,
            events,
            prompt,
            ids: Vec::new(),
            ids_out: 0,
            detok: TextStream::new(),
            text: String::new(),
            text_out: 0,
            stops,
            hold,
            engine_done: false,
            every_token,
        })
    }

    /// The next piece; the last one has `finish` set (do not ask past it).
    async fn next(&mut self) -> Result<Piece, ApiError> {
        loop {
            let event = self.events.recv().await;
            let codec = &self.state.codec;
            let engine_err = |e: shardline_model::ModelError| ApiError::Engine(e.to_string());
            match event {
                Some(Event::Token(t)) => {
                    self.ids.push(t);
                    if let Some(piece) = self.detok.next(codec, &self.ids).map_err(engine_err)? {
                        self.text.push_str(&piece);
                    }
                    // The request is cancelled when the generation is dropped, after this.
                    if let Some(piece) = self.cut_at_stop() {
                        return Ok(piece);
                    }
                    let mut safe = self.text.len().saturating_sub(self.hold);
                    while !self.text.is_char_boundary(safe) {
                        safe -= 1;
                    }
                    if safe > self.text_out || self.every_token {
                        return Ok(self.take(safe.max(self.text_out), None));
                    }
                }
                Some(Event::Finished(reason)) => {
                    self.engine_done = true;
                    let rest = self.detok.finish(codec, &self.ids).map_err(engine_err)?;
                    self.text.push_str(&rest);
                    return Ok(match self.cut_at_stop() {
                        Some(piece) => piece,
                        None => self.take(self.text.len(), Some(reason)),
                    });
                }
                Some(Event::Rejected(why)) => {
                    self.engine_done = true;
                    return Err(ApiError::invalid(why, None));
                }
                Some(Event::Busy(queued)) => {
                    self.engine_done = true;
                    return Err(ApiError::Busy(SubmitError::QueueFull(queued)));
                }
                Some(Event::Failed(why)) => {
                    self.engine_done = true;
                    return Err(ApiError::Engine(why));
                }
                None => {
                    self.engine_done = true;
                    return Err(ApiError::Engine(
                        "the engine stopped before the request finished".into(),
                    ));
                }
            }
        }
    }

    /// The last piece, when the text not handed out yet holds a stop string: up to it.
    fn cut_at_stop(&mut self) -> Option<Piece> {
        let rest = &self.text[self.text_out..];
        let at = self
            .stops
            .iter()
            .filter_map(|s| rest.find(s.as_str()))
            .min()?;
        self.text.truncate(self.text_out + at);
        Some(self.take(self.text.len(), Some(FinishReason::Stop)))
    }

    /// Hands out the text up to `end` and the ids not handed out yet.
    fn take(&mut self, end: usize, finish: Option<FinishReason>) -> Piece {
        let piece = Piece {
            text: self.text[self.text_out..end].to_string(),
            token_ids: self.ids[self.ids_out..].to_vec(),
            finish,
        };
        self.text_out = end;
        self.ids_out = self.ids.len();
        piece
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt.len(),
            "completion_tokens": self.ids.len(),
            "total_tokens": self.prompt.len() + self.ids.len(),
        })
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // A client that left, or a stop string: free the request's KV blocks at once.
        if !self.engine_done {
            self.state.engine.cancel(self.id);
        }
    }
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "shardline",
            "max_model_len": state.max_positions,
        }],
    }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.engine.metrics.render(),
    )
}
