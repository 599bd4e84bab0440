//! Fake OpenAI-compatible LLM provider whose faults are chosen by the request's model name; used by integration tests, the demo and the load benchmark.
//!
//! The model string is split on `+` into `key` / `key=value` parts (unknown parts are ignored,
//! so `deepseek-chat` is healthy, while `deepseek-chat+tokens=3+cut=2` would answer with three
//! words but drops the stream after two content chunks). Times are in milliseconds.
//!
//! When `fail-times=N` or `down-for=MS` is present, the *failure* parts (`reset`, `silent`,
//! `unauthorized`, `rate-limit*`, `error=CODE`, `content-filter`) and the *body* faults (`cut`,
//! `stall`, `malformed`, `no-done`) only apply inside that window; without an explicit failure
//! part the window answers 500 (`fail-times`) or 503 (`down-for`). Shaping parts (`tokens`,
//! `latency`, `chunk-delay`, `slow-first-token`, `gate`) and request-dependent ones
//! (`context-length`, `no-prefill`) always apply.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, Instant};

/// The benchmark sends millions of requests; older entries are dropped beyond this.
const LOG_CAPACITY: usize = 10_000;
/// Upper bound for every "hold forever" fault so a forgotten client cannot pin a task for good.
const HOLD_CAP: Duration = Duration::from_secs(3600);
const DEFAULT_WORDS: usize = 12;
/// Keeps `tokens=N` from turning a typo into a multi-gigabyte allocation.
const MAX_WORDS: usize = 100_000;
const MAX_BODY_BYTES: usize = 32 << 20;
/// Keeps `rate-limit-date=S` from overflowing `SystemTime`.
const MAX_RETRY_AFTER_SECS: u64 = 10 * 365 * 86_400;
const STREAM_CHANNEL_CAPACITY: usize = 16;
const MALFORMED_EVENT: &[u8] = b"data: {\"id\": broken json\n\n";
const MALFORMED_JSON: &[u8] = b"{\"id\": broken json";
const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

static X_FAKE_PROVIDER: HeaderName = HeaderName::from_static("x-fake-provider");

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A running fake provider. Dropping it stops accepting new connections, like [`FakeProvider::shutdown`].
pub struct FakeProvider {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

/// One request as the fake provider received it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    /// First path segment when the path is `/{label}/v1/...`, `""` for `/v1/...`.
    pub label: String,
    pub method: Method,
    /// Path after the label, e.g. `/v1/chat/completions`.
    pub path: String,
    /// The `model` field of the JSON body (`""` if none).
    pub model: String,
    /// The Authorization header as received.
    pub authorization: Option<String>,
    pub headers: HeaderMap,
    /// Parsed JSON body (`Value::Null` if not JSON).
    pub body: Value,
    pub at: Instant,
}

impl FakeProvider {
    /// Binds `addr` (use 127.0.0.1:0 in tests) and serves in a spawned task (HTTP/1.1 and h2c).
    pub async fn start(addr: SocketAddr) -> std::io::Result<FakeProvider> {
        // A backlog like the sidecar's: a burst of new connections from a cold sidecar must
        // not lose handshakes here (a dropped SYN costs the client a second).
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(1024)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), stop_rx));
        Ok(FakeProvider { addr, shared, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL a config can use for a named fake provider: `http://127.0.0.1:PORT/{label}/v1`.
    pub fn base_url(&self, label: &str) -> String {
        if label.is_empty() {
            format!("http://{}/v1", self.addr)
        } else {
            format!("http://{}/{label}/v1", self.addr)
        }
    }

    /// Every request seen so far (oldest first, at most the last 10 000), including faulted ones.
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.shared.log).iter().cloned().collect()
    }

    /// Requests whose label == `label`.
    pub fn requests_for(&self, label: &str) -> Vec<SeenRequest> {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.label == label)
            .cloned()
            .collect()
    }

    /// Opens the gate named `name`; a gate opened before anyone waits stays open.
    pub fn release(&self, name: &str) {
        self.shared.release(name);
    }

    /// Stops accepting and closes the listener (existing connections may finish).
    ///
    /// The listener is closed by the accept task, so it may take one scheduler turn to go away.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// For the `llm-sidecar-fake-provider --listen ADDR` binary: prints one
/// `fake provider listening on http://ADDR` line, then serves until ctrl-c or SIGTERM.
pub async fn run_standalone(addr: SocketAddr) -> std::io::Result<()> {
    let provider = FakeProvider::start(addr).await?;
    // Listening for the signals before saying so: a SIGTERM right after the line is seen must
    // stop the provider cleanly, not kill it with the default action.
    let terminated = termination()?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "fake provider listening on http://{}", provider.addr())?;
        out.flush()?;
    }
    terminated.await?;
    provider.shutdown();
    Ok(())
}

/// Resolves on ctrl-c or SIGTERM; both are listened for from the moment this returns.
fn termination() -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => Ok(()),
                _ = term.recv() => Ok(()),
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async { tokio::signal::ctrl_c().await })
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state

#[derive(Default)]
struct Shared {
    log: Mutex<VecDeque<SeenRequest>>,
    gates: Mutex<HashMap<String, watch::Sender<bool>>>,
    windows: Mutex<HashMap<String, WindowState>>,
    next_id: AtomicU64,
}

struct WindowState {
    first_seen: Instant,
    count: u64,
}

/// Whether the failure parts of a model string apply to this request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Window {
    /// No `fail-times` / `down-for`: faults always apply.
    Always,
    /// Inside the window; the status to use when no explicit failure part is given.
    Active(StatusCode),
    Over,
}

/// A poisoned lock only means another request panicked mid-update; the log and counters are
/// still usable, and a fake provider must keep answering.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn record(&self, req: SeenRequest) {
        let mut log = lock(&self.log);
        while log.len() >= LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(req);
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn release(&self, name: &str) {
        lock(&self.gates)
            .entry(name.to_owned())
            .or_insert_with(|| watch::channel(false).0)
            .send_replace(true);
    }

    fn gate(&self, name: &str) -> watch::Receiver<bool> {
        lock(&self.gates)
            .entry(name.to_owned())
            .or_insert_with(|| watch::channel(false).0)
            .subscribe()
    }

    fn window(&self, model: &str, faults: &Faults) -> Window {
        if faults.fail_times.is_none() && faults.down_for.is_none() {
            return Window::Always;
        }
        let now = Instant::now();
        let mut windows = lock(&self.windows);
        let state = windows.entry(model.to_owned()).or_insert(WindowState {
            first_seen: now,
            count: 0,
        });
        state.count = state.count.saturating_add(1);
        let by_time = faults
            .down_for
            .is_some_and(|d| now.saturating_duration_since(state.first_seen) < d);
        let by_count = faults.fail_times.is_some_and(|n| state.count <= n);
        if by_time {
            Window::Active(StatusCode::SERVICE_UNAVAILABLE)
        } else if by_count {
            Window::Active(StatusCode::INTERNAL_SERVER_ERROR)
        } else {
            Window::Over
        }
    }
}

async fn wait_gate(mut gate: watch::Receiver<bool>) {
    // The sender lives in the gate map for the provider's lifetime, so this only ends on release.
    let _ = gate.wait_for(|open| *open).await;
}

// ---------------------------------------------------------------------------------------------
// Server

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let stream = tokio::select! {
            biased;
            // The guard returned by wait_for is not Send; drop it inside the branch future.
            _ = async { let _ = stop.wait_for(|stopped| *stopped).await; } => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Typically EMFILE under benchmark load; back off instead of spinning.
                    tracing::warn!(error = %err, "fake provider: accept failed");
                    sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        // Streamed chunks are small and latency-sensitive.
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let builder = Arc::clone(&builder);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(Arc::clone(&shared), req));
            if let Err(err) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %err, "fake provider: connection ended with error");
            }
        });
    }
}

/// Returned from the service (or as a body error) to make hyper drop the connection.
#[derive(Debug, thiserror::Error)]
#[error("fake provider fault: {0}")]
struct FaultAbort(&'static str);

enum RespBody {
    Full(Option<Bytes>),
    Channel {
        rx: mpsc::Receiver<Result<Bytes, BoxError>>,
        abort: Option<BoxError>,
    },
}

impl RespBody {
    fn channel(rx: mpsc::Receiver<Result<Bytes, BoxError>>) -> RespBody {
        RespBody::Channel { rx, abort: None }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RespBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            RespBody::Channel { rx, abort } => {
                if let Some(err) = abort.take() {
                    return Poll::Ready(Some(Err(err)));
                }
                match rx.poll_recv(cx) {
                    // hyper throws away bytes it has buffered but not flushed when a body fails,
                    // which would hide the chunks sent before a `cut`. Returning Pending once
                    // makes it flush first; the self-wake brings it straight back for the error.
                    Poll::Ready(Some(Err(err))) => {
                        *abort = Some(err);
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                    other => other.map(|item| item.map(|res| res.map(Frame::data))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, RespBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RespBody::Full(None) => SizeHint::with_exact(0),
            RespBody::Channel { .. } => SizeHint::default(),
        }
    }
}

type HandlerResult = Result<Response<RespBody>, BoxError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Chat,
    Legacy,
    Embeddings,
    Models,
    Echo,
    WrongMethod,
    NotFound,
}

/// Splits `/{label}/v1/...` or `/v1/...` into (label, path after the label).
fn split_label(path: &str) -> Option<(&str, &str)> {
    if path.starts_with("/v1/") {
        return Some(("", path));
    }
    let tail = path.strip_prefix('/')?;
    let (label, _) = tail.split_once('/')?;
    let rest = tail.get(label.len()..)?;
    (!label.is_empty() && rest.starts_with("/v1/")).then_some((label, rest))
}

fn route(method: &Method, labelled: Option<(&str, &str)>) -> Route {
    let Some((_, rest)) = labelled else {
        return Route::NotFound;
    };
    let (route, expected) = match rest {
        "/v1/chat/completions" => (Route::Chat, Method::POST),
        "/v1/completions" => (Route::Legacy, Method::POST),
        "/v1/embeddings" => (Route::Embeddings, Method::POST),
        "/v1/models" => (Route::Models, Method::GET),
        _ => return Route::Echo,
    };
    if *method == expected {
        route
    } else {
        Route::WrongMethod
    }
}

/// Asks the fake provider to send back the request's W3C `traceparent` as `x-fake-traceparent`,
/// so a test sees what a provider received. Only when asked: a provider does not echo it, and
/// an extra answer header on every traced request would count as tracing's cost in the bench.
pub const ECHO_TRACEPARENT: &str = "x-fake-echo-traceparent";

/// Answers one request (see [`ECHO_TRACEPARENT`]).
async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> HandlerResult {
    let traceparent = req
        .headers()
        .contains_key(ECHO_TRACEPARENT)
        .then(|| req.headers().get("traceparent").cloned())
        .flatten();
    let mut response = answer(shared, req).await?;
    if let Some(value) = traceparent {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-fake-traceparent"), value);
    }
    Ok(response)
}

async fn answer(shared: Arc<Shared>, req: Request<Incoming>) -> HandlerResult {
    let (parts, body) = req.into_parts();
    let (bytes, too_large) = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => (collected.to_bytes(), false),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => (Bytes::new(), true),
        // The client went away mid-body; there is nobody to answer.
        Err(err) => return Err(err),
    };
    let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();

    let path = parts.uri.path();
    let labelled = split_label(path);
    let route = route(&parts.method, labelled);
    let (label, rest) = labelled.unwrap_or(("", path));
    let label = label.to_owned();
    let shown = if label.is_empty() { "fake" } else { &label }.to_owned();

    let ctx = RequestCtx::extract(route, parsed.as_ref());
    let echo_body = if route == Route::Echo {
        Some(parsed.clone().unwrap_or(Value::Null))
    } else {
        None
    };
    shared.record(SeenRequest {
        label: label.clone(),
        method: parts.method.clone(),
        path: rest.to_owned(),
        model: ctx.model.clone(),
        authorization: parts
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        headers: parts.headers.clone(),
        body: parsed.unwrap_or(Value::Null),
        at: Instant::now(),
    });

    if too_large {
        return Ok(error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            &shown,
            "Request body too large",
            "invalid_request_error",
            None,
            Some("request_too_large"),
        ));
    }
    match route {
        Route::NotFound => {
            return Ok(error_response(
                StatusCode::NOT_FOUND,
                &shown,
                &format!("Unknown request URL: {} {}", parts.method, path),
                "invalid_request_error",
                None,
                Some("unknown_url"),
            ))
        }
        Route::WrongMethod => {
            return Ok(error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &shown,
                &format!("Method {} not allowed for {}", parts.method, rest),
                "invalid_request_error",
                None,
                Some("method_not_allowed"),
            ))
        }
        Route::Models => {
            let models = json!({
                "object": "list",
                "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}],
            });
            return Ok(json_response(StatusCode::OK, &shown, &models));
        }
        Route::Chat | Route::Legacy | Route::Embeddings if !ctx.json_ok => {
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                &shown,
                "We could not parse the JSON body of your request.",
                "invalid_request_error",
                None,
                Some("invalid_json"),
            ))
        }
        _ => {}
    }

    let faults = Faults::parse(&ctx.model);
    let window = shared.window(&ctx.model, &faults);
    if !faults.latency.is_zero() {
        sleep(faults.latency).await;
    }
    let faults_apply = window != Window::Over;
    if faults_apply {
        if faults.reset {
            return Err(FaultAbort("reset").into());
        }
        if faults.silent {
            sleep(HOLD_CAP).await;
            return Err(FaultAbort("silent hold expired").into());
        }
        if let Some(resp) = failure_response(&faults, &shown) {
            return Ok(resp);
        }
        if let Window::Active(status) = window {
            if !faults.has_body_fault() {
                return Ok(server_error(status, &shown));
            }
        }
    }

    let param = match route {
        Route::Legacy => "prompt",
        Route::Embeddings => "input",
        _ => "messages",
    };
    if let (Some(max), Some(prompt)) = (faults.context_length, ctx.prompt_tokens) {
        if prompt > max {
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                &shown,
                &format!(
                    "This model's maximum context length is {max} tokens. However, your messages resulted in {prompt} tokens."
                ),
                "invalid_request_error",
                Some(param),
                Some("context_length_exceeded"),
            ));
        }
    }
    if faults.no_prefill && ctx.prefill.is_some() {
        return Ok(error_response(
            StatusCode::BAD_REQUEST,
            &shown,
            "assistant prefill is not supported by this model",
            "invalid_request_error",
            Some("messages"),
            Some("prefill_not_supported"),
        ));
    }

    let body_faults = if faults_apply {
        BodyFaults::from(&faults)
    } else {
        BodyFaults::default()
    };
    let created = unix_now();

    if matches!(route, Route::Chat | Route::Legacy) && ctx.stream {
        let flavor = if route == Route::Chat {
            Flavor::Chat
        } else {
            Flavor::Legacy
        };
        let plan = Plan::new(&shown, &faults, &ctx);
        let chunks = Chunks {
            flavor,
            id: flavor.id(shared.next_id()),
            created,
            model: ctx.model,
            include_usage: ctx.include_usage,
        };
        let (tx, rx) = mpsc::channel(STREAM_CHANNEL_CAPACITY);
        let job = StreamJob {
            chunks,
            plan,
            slow_first_token: faults.slow_first_token,
            gate: faults.gate.map(|name| shared.gate(&name)),
            body: body_faults,
        };
        tokio::spawn(job.run(Emitter {
            tx,
            delay: faults.chunk_delay,
            started: false,
        }));
        let mut resp = Response::new(RespBody::channel(rx));
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(X_FAKE_PROVIDER.clone(), provider_header(&shown));
        return Ok(resp);
    }

    // Non-streaming: everything that delays the first byte happens before the headers.
    if !faults.slow_first_token.is_zero() {
        sleep(faults.slow_first_token).await;
    }
    if let Some(name) = &faults.gate {
        let gate = shared.gate(name);
        tokio::select! {
            _ = wait_gate(gate) => {}
            _ = sleep(HOLD_CAP) => {}
        }
    }
    let value = match route {
        Route::Chat | Route::Legacy => {
            let plan = Plan::new(&shown, &faults, &ctx);
            let flavor = if route == Route::Chat {
                Flavor::Chat
            } else {
                Flavor::Legacy
            };
            flavor.full_response(&flavor.id(shared.next_id()), created, &ctx.model, &plan)
        }
        Route::Embeddings => embeddings_response(&ctx),
        _ => json!({"echo": {
            "method": parts.method.as_str(),
            "path": rest,
            "label": label,
            "body": echo_body.unwrap_or(Value::Null),
        }}),
    };
    Ok(non_stream_response(&shown, to_bytes(&value), &body_faults))
}

// ---------------------------------------------------------------------------------------------
// Fault grammar

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RateLimit {
    RetryAfterSecs(u64),
    NoRetryAfter,
    RetryAfterDate(u64),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Faults {
    tokens: Option<usize>,
    chunk_delay: Duration,
    latency: Duration,
    slow_first_token: Duration,
    rate_limit: Option<RateLimit>,
    error: Option<StatusCode>,
    reset: bool,
    silent: bool,
    unauthorized: bool,
    content_filter: bool,
    cut: Option<usize>,
    stall: Option<usize>,
    malformed: Option<usize>,
    no_done: bool,
    context_length: Option<u64>,
    no_prefill: bool,
    down_for: Option<Duration>,
    fail_times: Option<u64>,
    gate: Option<String>,
}

fn millis(v: Option<&str>) -> Option<Duration> {
    v?.parse::<u64>()
        .ok()
        .map(|ms| Duration::from_millis(ms).min(HOLD_CAP))
}

fn number<T: std::str::FromStr>(v: Option<&str>) -> Option<T> {
    v?.parse().ok()
}

impl Faults {
    /// Parts with a missing or unparsable value are ignored like unknown parts, so a model
    /// name never turns into a 400 just because it happens to contain a `+`.
    fn parse(model: &str) -> Faults {
        let mut f = Faults::default();
        for part in model.split('+') {
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (part, None),
            };
            match key {
                "tokens" => {
                    if let Some(n) = number::<usize>(value) {
                        f.tokens = Some(n.min(MAX_WORDS));
                    }
                }
                "chunk-delay" => f.chunk_delay = millis(value).unwrap_or(f.chunk_delay),
                "latency" => f.latency = millis(value).unwrap_or(f.latency),
                "slow-first-token" => {
                    f.slow_first_token = millis(value).unwrap_or(f.slow_first_token)
                }
                "rate-limit" => match value {
                    None => f.rate_limit = Some(RateLimit::RetryAfterSecs(1)),
                    Some(v) => {
                        if let Ok(s) = v.parse() {
                            f.rate_limit = Some(RateLimit::RetryAfterSecs(s));
                        }
                    }
                },
                "rate-limit-no-retry-after" => f.rate_limit = Some(RateLimit::NoRetryAfter),
                "rate-limit-date" => {
                    if let Some(s) = number::<u64>(value) {
                        f.rate_limit = Some(RateLimit::RetryAfterDate(s.min(MAX_RETRY_AFTER_SECS)));
                    }
                }
                "error" => {
                    f.error = number::<u16>(value)
                        .filter(|c| (400..=599).contains(c))
                        .and_then(|c| StatusCode::from_u16(c).ok())
                        .or(f.error);
                }
                "reset" => f.reset = true,
                "silent" => f.silent = true,
                "unauthorized" => f.unauthorized = true,
                "content-filter" => f.content_filter = true,
                "cut" => f.cut = number(value).or(f.cut),
                "stall" => f.stall = number(value).or(f.stall),
                "malformed" => f.malformed = number(value).or(f.malformed),
                "no-done" => f.no_done = true,
                "context-length" => f.context_length = number(value).or(f.context_length),
                "no-prefill" => f.no_prefill = true,
                "down-for" => f.down_for = millis(value).or(f.down_for),
                "fail-times" => f.fail_times = number(value).or(f.fail_times),
                "gate" => {
                    if let Some(name) = value.filter(|v| !v.is_empty()) {
                        f.gate = Some(name.to_owned());
                    }
                }
                _ => {}
            }
        }
        f
    }

    fn has_body_fault(&self) -> bool {
        self.cut.is_some() || self.stall.is_some() || self.malformed.is_some() || self.no_done
    }
}

/// The body faults that survive the `fail-times` / `down-for` window check.
#[derive(Clone, Copy, Debug, Default)]
struct BodyFaults {
    cut: Option<usize>,
    stall: Option<usize>,
    malformed: Option<usize>,
    no_done: bool,
}

impl From<&Faults> for BodyFaults {
    fn from(f: &Faults) -> Self {
        BodyFaults {
            cut: f.cut,
            stall: f.stall,
            malformed: f.malformed,
            no_done: f.no_done,
        }
    }
}

fn failure_response(f: &Faults, shown: &str) -> Option<Response<RespBody>> {
    if f.unauthorized {
        return Some(error_response(
            StatusCode::UNAUTHORIZED,
            shown,
            "Incorrect API key provided",
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        ));
    }
    if let Some(rl) = f.rate_limit {
        let mut resp = error_response(
            StatusCode::TOO_MANY_REQUESTS,
            shown,
            "Rate limit reached",
            "requests",
            None,
            Some("rate_limit_exceeded"),
        );
        let retry_after = match rl {
            RateLimit::RetryAfterSecs(s) => Some(HeaderValue::from(s)),
            RateLimit::NoRetryAfter => None,
            RateLimit::RetryAfterDate(s) => {
                let at = SystemTime::now()
                    .checked_add(Duration::from_secs(s))
                    .unwrap_or_else(SystemTime::now);
                HeaderValue::from_str(&http_date(at)).ok()
            }
        };
        if let Some(v) = retry_after {
            resp.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
        return Some(resp);
    }
    if let Some(status) = f.error {
        return Some(server_error(status, shown));
    }
    if f.content_filter {
        return Some(error_response(
            StatusCode::BAD_REQUEST,
            shown,
            "The response was filtered due to the prompt triggering content management policy.",
            "invalid_request_error",
            Some("prompt"),
            Some("content_policy_violation"),
        ));
    }
    None
}

fn server_error(status: StatusCode, shown: &str) -> Response<RespBody> {
    error_response(
        status,
        shown,
        &format!(
            "The fake provider failed on purpose with status {}.",
            status.as_u16()
        ),
        "server_error",
        None,
        None,
    )
}

// ---------------------------------------------------------------------------------------------
// Request parsing

#[derive(Debug, Default)]
struct RequestCtx {
    /// False when the body was not valid JSON.
    json_ok: bool,
    model: String,
    stream: bool,
    include_usage: bool,
    max_tokens: Option<u64>,
    /// None where the endpoint has no prompt (echo, models).
    prompt_tokens: Option<u64>,
    /// Text of the last message when it is an assistant message (chat only).
    prefill: Option<String>,
    inputs: Vec<String>,
}

/// Message content may be a plain string or an array of typed parts; only text counts.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| match p {
                Value::String(s) => Some(s.as_str()),
                other => other.get("text").and_then(Value::as_str),
            })
            .collect(),
        _ => String::new(),
    }
}

fn tokens_for_chars(chars: usize) -> u64 {
    (chars as u64).div_ceil(4).max(1)
}

impl RequestCtx {
    fn extract(route: Route, body: Option<&Value>) -> RequestCtx {
        let Some(body) = body else {
            return RequestCtx::default();
        };
        let str_field = |name: &str| body.get(name).and_then(Value::as_str);
        let mut ctx = RequestCtx {
            json_ok: true,
            model: str_field("model").unwrap_or_default().to_owned(),
            stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
            include_usage: body
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_tokens: body
                .get("max_completion_tokens")
                .or_else(|| body.get("max_tokens"))
                .and_then(Value::as_u64),
            ..RequestCtx::default()
        };
        match route {
            Route::Chat => {
                let messages = body
                    .get("messages")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let chars = messages
                    .iter()
                    .map(|m| content_text(m.get("content")).chars().count())
                    .sum();
                ctx.prompt_tokens = Some(tokens_for_chars(chars));
                ctx.prefill = messages
                    .last()
                    .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
                    .map(|m| content_text(m.get("content")));
            }
            Route::Legacy => {
                let chars = match body.get("prompt") {
                    Some(Value::String(s)) => s.chars().count(),
                    Some(Value::Array(items)) => items
                        .iter()
                        .filter_map(Value::as_str)
                        .map(|s| s.chars().count())
                        .sum(),
                    _ => 0,
                };
                ctx.prompt_tokens = Some(tokens_for_chars(chars));
            }
            Route::Embeddings => {
                ctx.inputs = match body.get("input") {
                    Some(Value::String(s)) => vec![s.clone()],
                    // Token-id arrays are embedded by their JSON text: still deterministic.
                    Some(Value::Array(items)) => items
                        .iter()
                        .map(|v| match v {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect(),
                    Some(other) => vec![other.to_string()],
                    None => vec![String::new()],
                };
                let chars = ctx.inputs.iter().map(|s| s.chars().count()).sum();
                ctx.prompt_tokens = Some(tokens_for_chars(chars));
            }
            _ => {}
        }
        ctx
    }
}

// ---------------------------------------------------------------------------------------------
// Answers

/// What a completion will say: the pieces still to send after prefill and `max_tokens`.
#[derive(Debug)]
struct Plan {
    pieces: Vec<String>,
    finish_reason: &'static str,
    prompt_tokens: u64,
}

fn full_answer(shown: &str, words: usize) -> Vec<String> {
    let mut pieces = Vec::with_capacity(words + 1);
    pieces.push(format!("Hello from {shown}."));
    pieces.extend((1..=words).map(|i| format!(" w{i}")));
    pieces
}

/// A prefill that is a prefix of the full answer means the model continues after it; a piece
/// the prefill only partly covers is sent from where the prefill stops, so the concatenation
/// prefill + answer is always exactly the full answer.
fn continuation(full: Vec<String>, prefill: &str) -> Vec<String> {
    if !full.concat().starts_with(prefill) {
        return full;
    }
    let mut start = 0usize;
    let mut out = Vec::with_capacity(full.len());
    for piece in full {
        let end = start + piece.len();
        if end <= prefill.len() {
            // fully covered
        } else if start < prefill.len() {
            match piece.get(prefill.len() - start..) {
                Some(rest) => out.push(rest.to_owned()),
                None => out.push(piece),
            }
        } else {
            out.push(piece);
        }
        start = end;
    }
    out
}

impl Plan {
    fn new(shown: &str, faults: &Faults, ctx: &RequestCtx) -> Plan {
        let full = full_answer(shown, faults.tokens.unwrap_or(DEFAULT_WORDS));
        let mut pieces = match &ctx.prefill {
            Some(prefill) => continuation(full, prefill),
            None => full,
        };
        let mut finish_reason = "stop";
        if let Some(max) = ctx.max_tokens {
            let max = usize::try_from(max).unwrap_or(usize::MAX);
            if max < pieces.len() {
                pieces.truncate(max);
                finish_reason = "length";
            }
        }
        Plan {
            pieces,
            finish_reason,
            prompt_tokens: ctx.prompt_tokens.unwrap_or(1),
        }
    }

    fn usage(&self) -> Value {
        let completion = self.pieces.len() as u64;
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    Chat,
    Legacy,
}

impl Flavor {
    fn id(self, n: u64) -> String {
        match self {
            Flavor::Chat => format!("chatcmpl-fake-{n}"),
            Flavor::Legacy => format!("cmpl-fake-{n}"),
        }
    }

    fn full_response(self, id: &str, created: u64, model: &str, plan: &Plan) -> Value {
        let content = plan.pieces.concat();
        match self {
            Flavor::Chat => json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": null,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": null,
                    "finish_reason": plan.finish_reason,
                }],
                "usage": plan.usage(),
            }),
            Flavor::Legacy => json!({
                "id": id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": null,
                "choices": [{
                    "text": content,
                    "index": 0,
                    "finish_reason": plan.finish_reason,
                    "logprobs": null,
                }],
                "usage": plan.usage(),
            }),
        }
    }
}

/// Deterministic pseudo-embedding: FNV-1a of the text with a per-dimension seed, in [-1, 1].
fn embed(text: &str) -> Vec<f64> {
    (0u64..8)
        .map(|dim| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ dim.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for b in text.as_bytes() {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
            // Top 24 bits keep the values short in JSON while staying distinct.
            let unit = (h >> 40) as f64 / f64::from(1u32 << 24);
            unit * 2.0 - 1.0
        })
        .collect()
}

fn embeddings_response(ctx: &RequestCtx) -> Value {
    let data: Vec<Value> = ctx
        .inputs
        .iter()
        .enumerate()
        .map(|(i, text)| json!({"object": "embedding", "index": i, "embedding": embed(text)}))
        .collect();
    let prompt = ctx.prompt_tokens.unwrap_or(1);
    json!({
        "object": "list",
        "data": data,
        "model": ctx.model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    })
}

/// Builds the SSE events of one streamed completion.
struct Chunks {
    flavor: Flavor,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl Chunks {
    fn event(&self, choices: Value, usage: Option<Value>) -> Bytes {
        let mut obj = Map::with_capacity(7);
        obj.insert("id".into(), Value::from(self.id.as_str()));
        let object = match self.flavor {
            Flavor::Chat => "chat.completion.chunk",
            Flavor::Legacy => "text_completion",
        };
        obj.insert("object".into(), Value::from(object));
        obj.insert("created".into(), Value::from(self.created));
        obj.insert("model".into(), Value::from(self.model.as_str()));
        obj.insert("system_fingerprint".into(), Value::Null);
        obj.insert("choices".into(), choices);
        // Like OpenAI: with include_usage every chunk has a usage key, null until the last one.
        if self.include_usage || usage.is_some() {
            obj.insert("usage".into(), usage.unwrap_or(Value::Null));
        }
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"data: ");
        if serde_json::to_writer(&mut out, &Value::Object(obj)).is_err() {
            out.extend_from_slice(b"{}");
        }
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }

    fn role(&self) -> Option<Bytes> {
        match self.flavor {
            Flavor::Chat => Some(self.event(
                json!([{
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": null,
                    "finish_reason": null,
                }]),
                None,
            )),
            Flavor::Legacy => None,
        }
    }

    fn content(&self, text: &str) -> Bytes {
        let choice = match self.flavor {
            Flavor::Chat => json!({
                "index": 0,
                "delta": {"content": text},
                "logprobs": null,
                "finish_reason": null,
            }),
            Flavor::Legacy => json!({
                "text": text,
                "index": 0,
                "logprobs": null,
                "finish_reason": null,
            }),
        };
        self.event(Value::Array(vec![choice]), None)
    }

    fn finish(&self, reason: &str) -> Bytes {
        let choice = match self.flavor {
            Flavor::Chat => json!({
                "index": 0,
                "delta": {},
                "logprobs": null,
                "finish_reason": reason,
            }),
            Flavor::Legacy => json!({
                "text": "",
                "index": 0,
                "logprobs": null,
                "finish_reason": reason,
            }),
        };
        self.event(Value::Array(vec![choice]), None)
    }

    fn usage(&self, usage: Value) -> Bytes {
        self.event(Value::Array(Vec::new()), Some(usage))
    }
}

/// The client is gone or the stream was aborted on purpose; either way stop producing.
struct Stop;

/// Feeds the channel-backed body, one event per frame.
struct Emitter {
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
    delay: Duration,
    started: bool,
}

impl Emitter {
    async fn emit(&mut self, event: Bytes) -> Result<(), Stop> {
        if self.started && !self.delay.is_zero() {
            self.hold(sleep(self.delay)).await?;
        }
        self.started = true;
        self.tx.send(Ok(event)).await.map_err(|_| Stop)
    }

    /// Waits for `until` (at most [`HOLD_CAP`]) unless the client goes away first.
    async fn hold(&self, until: impl Future<Output = ()>) -> Result<(), Stop> {
        tokio::select! {
            _ = until => Ok(()),
            _ = sleep(HOLD_CAP) => Ok(()),
            _ = self.tx.closed() => Err(Stop),
        }
    }

    /// Makes hyper fail the body, which drops the connection (HTTP/1) or resets the stream (h2).
    async fn abort(&self, why: &'static str) -> Stop {
        let _ = self.tx.send(Err(FaultAbort(why).into())).await;
        Stop
    }
}

struct StreamJob {
    chunks: Chunks,
    plan: Plan,
    slow_first_token: Duration,
    gate: Option<watch::Receiver<bool>>,
    body: BodyFaults,
}

impl StreamJob {
    async fn run(mut self, mut em: Emitter) {
        let _ = self.produce(&mut em).await;
    }

    async fn produce(&mut self, em: &mut Emitter) -> Result<(), Stop> {
        if !self.slow_first_token.is_zero() {
            em.hold(sleep(self.slow_first_token)).await?;
        }
        if let Some(role) = self.chunks.role() {
            em.emit(role).await?;
        }
        self.checkpoint(em, 0).await?;
        for i in 0..self.plan.pieces.len() {
            let event = match self.plan.pieces.get(i) {
                Some(piece) => self.chunks.content(piece),
                None => break,
            };
            em.emit(event).await?;
            self.checkpoint(em, i + 1).await?;
        }
        em.emit(self.chunks.finish(self.plan.finish_reason)).await?;
        if self.chunks.include_usage {
            em.emit(self.chunks.usage(self.plan.usage())).await?;
        }
        if !self.body.no_done {
            em.emit(Bytes::from_static(DONE_EVENT)).await?;
        }
        Ok(())
    }

    /// Applies the faults due after `sent` content chunks.
    async fn checkpoint(&mut self, em: &mut Emitter, sent: usize) -> Result<(), Stop> {
        if self.body.malformed == Some(sent) {
            em.emit(Bytes::from_static(MALFORMED_EVENT)).await?;
        }
        if sent == 1 {
            if let Some(gate) = self.gate.take() {
                em.hold(wait_gate(gate)).await?;
            }
        }
        if self.body.stall == Some(sent) {
            em.hold(std::future::pending()).await?;
            return Err(em.abort("stall hold expired").await);
        }
        if self.body.cut == Some(sent) {
            return Err(em.abort("cut").await);
        }
        Ok(())
    }
}

fn non_stream_response(shown: &str, body: Bytes, faults: &BodyFaults) -> Response<RespBody> {
    if faults.cut.is_some() || faults.stall.is_some() {
        let stall = faults.cut.is_none();
        let full_len = body.len();
        let half = body.slice(..full_len / 2);
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let em = Emitter {
                tx,
                delay: Duration::ZERO,
                started: true,
            };
            if em.tx.send(Ok(half)).await.is_err() {
                return;
            }
            if stall && em.hold(std::future::pending()).await.is_err() {
                return;
            }
            em.abort(if stall { "stall hold expired" } else { "cut" })
                .await;
        });
        let mut resp = Response::new(RespBody::channel(rx));
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        // The promised length is what makes the truncation visible to HTTP/1 clients.
        headers.insert(CONTENT_LENGTH, HeaderValue::from(full_len));
        headers.insert(X_FAKE_PROVIDER.clone(), provider_header(shown));
        return resp;
    }
    let body = if faults.malformed.is_some() {
        Bytes::from_static(MALFORMED_JSON)
    } else {
        body
    };
    bytes_response(StatusCode::OK, shown, body)
}

fn provider_header(shown: &str) -> HeaderValue {
    HeaderValue::from_str(shown).unwrap_or_else(|_| HeaderValue::from_static("fake"))
}

fn to_bytes(value: &Value) -> Bytes {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .unwrap_or_else(|_| Bytes::from_static(b"{}"))
}

fn bytes_response(status: StatusCode, shown: &str, body: Bytes) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::Full(Some(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(X_FAKE_PROVIDER.clone(), provider_header(shown));
    resp
}

fn json_response(status: StatusCode, shown: &str, value: &Value) -> Response<RespBody> {
    bytes_response(status, shown, to_bytes(value))
}

fn error_response(
    status: StatusCode,
    shown: &str,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response<RespBody> {
    let body = json!({"error": {"message": message, "type": kind, "param": param, "code": code}});
    json_response(status, shown, &body)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// IMF-fixdate (RFC 9110 §5.6.7), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(t: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let weekday = DAYS.get((days % 7) as usize).copied().unwrap_or("Thu");
    let month_name = MONTHS
        .get(month.saturating_sub(1) as usize)
        .copied()
        .unwrap_or("Jan");
    format!(
        "{weekday}, {day:02} {month_name} {year:04} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31), proleptic Gregorian; the
/// era-based method keeps it exact without a calendar table.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;

    type TestClient = Client<HttpConnector, Full<Bytes>>;

    fn client() -> TestClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    async fn provider() -> FakeProvider {
        FakeProvider::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
    }

    fn chat(model: &str) -> Value {
        json!({"model": model, "messages": [{"role": "user", "content": "Say hello, please!"}]})
    }

    fn chat_stream(model: &str, include_usage: bool) -> Value {
        let mut body = chat(model);
        body["stream"] = json!(true);
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
        body
    }

    async fn send(
        client: &TestClient,
        method: Method,
        url: &str,
        body: Bytes,
        auth: Option<&str>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        let mut req = Request::builder()
            .method(method)
            .uri(url)
            .header(CONTENT_TYPE, "application/json");
        if let Some(auth) = auth {
            req = req.header(http::header::AUTHORIZATION, auth);
        }
        client.request(req.body(Full::new(body)).unwrap()).await
    }

    async fn post(client: &TestClient, url: &str, body: &Value) -> Response<Incoming> {
        send(client, Method::POST, url, to_bytes(body), None)
            .await
            .unwrap()
    }

    async fn json_of(resp: Response<Incoming>) -> Value {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn chat_url(fp: &FakeProvider, label: &str) -> String {
        format!("{}/chat/completions", fp.base_url(label))
    }

    fn split_events(buf: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(buf)
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap_or(e).to_owned())
            .collect()
    }

    /// Reads a streamed body to its end: (SSE payloads, whether the body ended with an error).
    async fn read_events(mut body: Incoming) -> (Vec<String>, bool) {
        let mut buf = Vec::new();
        let errored = loop {
            match body.frame().await {
                None => break false,
                Some(Err(_)) => break true,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                    }
                }
            }
        };
        (split_events(&buf), errored)
    }

    fn content_pieces(events: &[String]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter_map(|v| {
                v.pointer("/choices/0/delta/content")
                    .or_else(|| v.pointer("/choices/0/text"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .filter(|s| !s.is_empty())
            .collect()
    }

    fn words(label: &str, n: usize) -> String {
        let mut s = format!("Hello from {label}.");
        for i in 1..=n {
            s.push_str(&format!(" w{i}"));
        }
        s
    }

    #[tokio::test]
    async fn healthy_non_stream_has_openai_shape_and_usage() {
        let fp = provider().await;
        let resp = post(
            &client(),
            &chat_url(&fp, "deepseek"),
            &chat("deepseek-chat"),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(resp.headers()["x-fake-provider"], "deepseek");
        let declared: usize = resp.headers()[CONTENT_LENGTH]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(declared, bytes.len());
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-fake-"));
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "deepseek-chat");
        assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
        assert_eq!(v["system_fingerprint"], Value::Null);
        assert_eq!(v["choices"][0]["index"], 0);
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], words("deepseek", 12));
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        // "Say hello, please!" is 18 characters -> ceil(18 / 4) = 5.
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 13, "total_tokens": 18})
        );
    }

    #[tokio::test]
    async fn unlabelled_path_says_fake_and_max_tokens_truncates() {
        let fp = provider().await;
        let mut body = chat("m+tokens=5");
        body["max_tokens"] = json!(3);
        let resp = post(&client(), &chat_url(&fp, ""), &body).await;
        assert_eq!(resp.headers()["x-fake-provider"], "fake");
        let v = json_of(resp).await;
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "Hello from fake. w1 w2"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 3);
    }

    #[tokio::test]
    async fn healthy_stream_event_sequence() {
        let fp = provider().await;
        let client = client();
        for include_usage in [false, true] {
            let resp = post(
                &client,
                &chat_url(&fp, "openai"),
                &chat_stream("gpt+tokens=3", include_usage),
            )
            .await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.headers()[CONTENT_TYPE], "text/event-stream");
            assert_eq!(resp.headers()["x-fake-provider"], "openai");
            let (events, errored) = read_events(resp.into_body()).await;
            assert!(!errored);
            let expected_len = if include_usage { 8 } else { 7 };
            assert_eq!(events.len(), expected_len, "{events:#?}");
            assert_eq!(events.last().unwrap(), "[DONE]");
            let chunks: Vec<Value> = events[..expected_len - 1]
                .iter()
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
            let id = chunks[0]["id"].as_str().unwrap();
            for c in &chunks {
                assert_eq!(c["object"], "chat.completion.chunk");
                assert_eq!(c["model"], "gpt+tokens=3");
                assert_eq!(c["id"], id);
                assert!(c["created"].is_u64());
            }
            assert_eq!(
                chunks[0]["choices"][0]["delta"],
                json!({"role": "assistant", "content": ""})
            );
            let pieces: Vec<&str> = chunks[1..5]
                .iter()
                .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
                .collect();
            assert_eq!(pieces, ["Hello from openai.", " w1", " w2", " w3"]);
            assert_eq!(chunks[5]["choices"][0]["delta"], json!({}));
            assert_eq!(chunks[5]["choices"][0]["finish_reason"], "stop");
            if include_usage {
                assert_eq!(chunks[6]["choices"], json!([]));
                assert_eq!(
                    chunks[6]["usage"],
                    json!({"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
                );
                assert_eq!(chunks[0]["usage"], Value::Null);
            } else {
                assert!(chunks[0].get("usage").is_none());
            }
        }
    }

    #[tokio::test]
    async fn chunk_delay_spaces_events() {
        let fp = provider().await;
        let start = Instant::now();
        let resp = post(
            &client(),
            &chat_url(&fp, "a"),
            &chat_stream("m+tokens=2+chunk-delay=15", false),
        )
        .await;
        let (events, errored) = read_events(resp.into_body()).await;
        assert!(!errored);
        assert_eq!(events.len(), 6);
        // role, 3 content, finish, [DONE] -> 5 gaps of 15 ms.
        assert!(start.elapsed() >= Duration::from_millis(75));
    }

    #[tokio::test]
    async fn reset_closes_the_connection_without_a_response() {
        let fp = provider().await;
        let err = send(
            &client(),
            Method::POST,
            &chat_url(&fp, "x"),
            to_bytes(&chat("m+reset")),
            None,
        )
        .await
        .unwrap_err();
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        let mut incomplete = false;
        while let Some(e) = source {
            if let Some(h) = e.downcast_ref::<hyper::Error>() {
                incomplete |= h.is_incomplete_message();
            }
            source = e.source();
        }
        assert!(incomplete, "{err:?}");
        assert_eq!(fp.requests_for("x").len(), 1);
    }

    // Multi-threaded like the benchmark binary: the chunks before the cut must still be flushed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cut_drops_the_stream_after_k_content_chunks() {
        let fp = provider().await;
        let resp = post(
            &client(),
            &chat_url(&fp, "c"),
            &chat_stream("m+cut=3", true),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let (events, errored) = read_events(resp.into_body()).await;
        assert!(errored);
        assert_eq!(content_pieces(&events), ["Hello from c.", " w1", " w2"]);
        assert_eq!(events.len(), 4, "role + 3 content: {events:#?}");
        assert!(!events
            .iter()
            .any(|e| e == "[DONE]" || e.contains("\"stop\"")));
    }

    #[tokio::test]
    async fn cut_non_stream_sends_half_a_body() {
        let fp = provider().await;
        let resp = post(&client(), &chat_url(&fp, "c"), &chat("m+cut=1")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let declared: usize = resp.headers()[CONTENT_LENGTH]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let mut body = resp.into_body();
        let mut got = Vec::new();
        let errored = loop {
            match body.frame().await {
                None => break false,
                Some(Err(_)) => break true,
                Some(Ok(frame)) => got.extend_from_slice(&frame.into_data().unwrap()),
            }
        };
        assert!(errored);
        assert_eq!(got.len(), declared / 2);
        assert!(serde_json::from_slice::<Value>(&got).is_err());
    }

    #[tokio::test]
    async fn stream_body_faults() {
        let fp = provider().await;
        let client = client();
        let url = chat_url(&fp, "s");

        let resp = post(&client, &url, &chat_stream("m+tokens=2+malformed=1", false)).await;
        let (events, errored) = read_events(resp.into_body()).await;
        assert!(!errored);
        assert_eq!(events[2], "{\"id\": broken json");
        assert_eq!(events.len(), 7);
        assert_eq!(events.last().unwrap(), "[DONE]");

        let resp = post(&client, &url, &chat_stream("m+tokens=2+no-done", true)).await;
        let (events, errored) = read_events(resp.into_body()).await;
        assert!(!errored);
        assert_eq!(events.len(), 6);
        assert!(events.last().unwrap().contains("\"usage\":{"));

        let start = Instant::now();
        let resp = post(&client, &url, &chat_stream("m+slow-first-token=40", false)).await;
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(start.elapsed() >= Duration::from_millis(40));
        assert!(String::from_utf8_lossy(&first).contains("\"role\""));

        // Headers do not wait for the first token.
        let slow = chat_stream("m+slow-first-token=600000", false);
        let resp = tokio::time::timeout(Duration::from_secs(10), post(&client, &url, &slow))
            .await
            .expect("headers must come before the first token");
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn stall_holds_the_stream_open() {
        let fp = provider().await;
        let resp = post(
            &client(),
            &chat_url(&fp, "s"),
            &chat_stream("m+stall=1", false),
        )
        .await;
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        while !String::from_utf8_lossy(&buf).contains("Hello from s.") {
            let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
            buf.extend_from_slice(&data);
        }
        let next = tokio::time::timeout(Duration::from_millis(50), body.frame()).await;
        assert!(next.is_err(), "stalled stream must not send more");
    }

    #[tokio::test]
    async fn rate_limits() {
        let fp = provider().await;
        let client = client();
        let url = chat_url(&fp, "r");

        let resp = post(&client, &url, &chat("m+rate-limit=2")).await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[http::header::RETRY_AFTER], "2");
        let v = json_of(resp).await;
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(v["error"]["type"], "requests");

        let resp = post(&client, &url, &chat("m+rate-limit")).await;
        assert_eq!(resp.headers()[http::header::RETRY_AFTER], "1");

        let resp = post(&client, &url, &chat("m+rate-limit-no-retry-after")).await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(resp.headers().get(http::header::RETRY_AFTER).is_none());

        let resp = post(&client, &url, &chat("m+rate-limit-date=30")).await;
        let date = resp.headers()[http::header::RETRY_AFTER].to_str().unwrap();
        assert!(date.ends_with(" GMT") && date.len() == 29, "{date}");
    }

    #[test]
    fn http_date_is_imf_fixdate() {
        let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(http_date(t), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
    }

    #[tokio::test]
    async fn error_unauthorized_and_content_filter() {
        let fp = provider().await;
        let client = client();
        let url = chat_url(&fp, "e");

        let resp = post(&client, &url, &chat("m+error=502")).await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        let v = json_of(resp).await;
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!(v["error"]["code"], Value::Null);

        let resp = post(&client, &url, &chat("m+unauthorized")).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(json_of(resp).await["error"]["code"], "invalid_api_key");

        let resp = post(&client, &url, &chat("m+content-filter")).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            json_of(resp).await["error"]["code"],
            "content_policy_violation"
        );
    }

    #[tokio::test]
    async fn context_length_exceeded() {
        let fp = provider().await;
        let client = client();
        let url = chat_url(&fp, "ctx");
        let long = json!({"model": "m+context-length=5", "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Please tell me a long story."},
        ]});
        let resp = post(&client, &url, &long).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let v = json_of(resp).await;
        assert_eq!(v["error"]["code"], "context_length_exceeded");
        assert_eq!(v["error"]["param"], "messages");
        assert_eq!(
            v["error"]["message"],
            "This model's maximum context length is 5 tokens. However, your messages resulted in 14 tokens."
        );
        let resp = post(&client, &url, &chat("m+context-length=5")).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn prefill_continues_after_covered_pieces() {
        let fp = provider().await;
        let client = client();
        let url = chat_url(&fp, "p");
        let with_prefill = |model: &str, prefill: &str| {
            json!({"model": model, "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": prefill},
            ]})
        };

        let v = json_of(
            post(
                &client,
                &url,
                &with_prefill("m+tokens=4", "Hello from p. w1"),
            )
            .await,
        )
        .await;
        assert_eq!(v["choices"][0]["message"]["content"], " w2 w3 w4");
        assert_eq!(v["usage"]["completion_tokens"], 3);

        // A prefill ending inside a piece continues from where it stops.
        let v = json_of(
            post(
                &client,
                &url,
                &with_prefill("m+tokens=2", "Hello from p. w"),
            )
            .await,
        )
        .await;
        assert_eq!(v["choices"][0]["message"]["content"], "1 w2");

        // Not a prefix of the answer: the full answer.
        let v = json_of(post(&client, &url, &with_prefill("m+tokens=1", "Sure!")).await).await;
        assert_eq!(v["choices"][0]["message"]["content"], "Hello from p. w1");

        let mut body = with_prefill("m+tokens=3", "Hello from p.");
        body["stream"] = json!(true);
        let (events, _) = read_events(post(&client, &url, &body).await.into_body()).await;
        assert_eq!(content_pieces(&events), [" w1", " w2", " w3"]);

        let resp = post(&client, &url, &with_prefill("m+no-prefill", "Hello")).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            json_of(resp).await["error"]["code"],
            "prefill_not_supported"
        );
        let resp = post(&client, &url, &chat("m+no-prefill")).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn fail_times_then_healthy() {
        let fp = provider().await;
        let client = client();
        let url = chat_url(&fp, "f");
        let statuses = |model: &'static str| {
            let client = client.clone();
            let url = url.clone();
            async move {
                let mut out = Vec::new();
                for _ in 0..3 {
                    out.push(post(&client, &url, &chat(model)).await.status().as_u16());
                }
                out
            }
        };
        assert_eq!(statuses("m+fail-times=1").await, [500, 200, 200]);
        assert_eq!(statuses("m+fail-times=2+error=503").await, [503, 503, 200]);
        assert_eq!(statuses("m+fail-times=1+rate-limit").await, [429, 200, 200]);

        // A failing window can also hold a body fault.
        let resp = post(&client, &url, &chat_stream("m+fail-times=1+cut=1", false)).await;
        assert!(read_events(resp.into_body()).await.1);
        let resp = post(&client, &url, &chat_stream("m+fail-times=1+cut=1", false)).await;
        let (events, errored) = read_events(resp.into_body()).await;
        assert!(!errored);
        assert_eq!(events.last().unwrap(), "[DONE]");
    }

    #[tokio::test]
    async fn down_for_then_healthy() {
        let fp = provider().await;
        let client = client();
        let url = chat_url(&fp, "d");
        for _ in 0..2 {
            let resp = post(&client, &url, &chat("m+down-for=600000")).await;
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        let resp = post(&client, &url, &chat("m+down-for=60")).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        // Waiting out the fault's own (real) delay.
        tokio::time::sleep(Duration::from_millis(70)).await;
        let resp = post(&client, &url, &chat("m+down-for=60")).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn latency_delays_headers() {
        let fp = provider().await;
        let start = Instant::now();
        let resp = post(&client(), &chat_url(&fp, "l"), &chat("m+latency=40")).await;
        assert!(start.elapsed() >= Duration::from_millis(40));
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn silent_never_answers() {
        let fp = provider().await;
        let client = client();
        let url = chat_url(&fp, "q");
        let pending = tokio::time::timeout(
            Duration::from_millis(50),
            post(&client, &url, &chat("m+silent")),
        )
        .await;
        assert!(pending.is_err());
        assert_eq!(fp.requests_for("q").len(), 1);
    }

    #[tokio::test]
    async fn gate_holds_stream_after_first_chunk_until_released() {
        let fp = provider().await;
        let client = client();
        let resp = post(
            &client,
            &chat_url(&fp, "g"),
            &chat_stream("m+tokens=2+gate=g1", false),
        )
        .await;
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        while !String::from_utf8_lossy(&buf).contains("Hello from g.") {
            let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
            buf.extend_from_slice(&data);
        }
        assert_eq!(split_events(&buf).len(), 2);
        let next = tokio::time::timeout(Duration::from_millis(50), body.frame()).await;
        assert!(next.is_err(), "gate must hold the stream");

        fp.release("g1");
        let (rest, errored) = read_events(body).await;
        assert!(!errored);
        assert_eq!(content_pieces(&rest), [" w1", " w2"]);
        assert_eq!(rest.last().unwrap(), "[DONE]");

        // Released before anyone waits: stays open, for streams and non-streams alike.
        fp.release("g2");
        let resp = post(
            &client,
            &chat_url(&fp, "g"),
            &chat_stream("m+gate=g2", false),
        )
        .await;
        assert_eq!(
            read_events(resp.into_body()).await.0.last().unwrap(),
            "[DONE]"
        );
        let resp = post(&client, &chat_url(&fp, "g"), &chat("m+gate=g2")).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn non_stream_gate_waits_before_headers() {
        let fp = provider().await;
        let client = client();
        let url = chat_url(&fp, "g");
        let body = chat("m+gate=g3");
        let req = post(&client, &url, &body);
        tokio::pin!(req);
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut req)
            .await
            .is_err());
        fp.release("g3");
        assert_eq!(req.await.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn request_log_records_label_model_and_authorization() {
        let fp = provider().await;
        let client = client();
        send(
            &client,
            Method::POST,
            &chat_url(&fp, "deepseek"),
            to_bytes(&chat("deepseek-chat+tokens=1")),
            Some("Bearer sk-test"),
        )
        .await
        .unwrap();
        send(
            &client,
            Method::POST,
            &format!("http://{}/v1/chat/completions", fp.addr()),
            Bytes::from_static(b"not json"),
            None,
        )
        .await
        .unwrap();

        let all = fp.requests();
        assert_eq!(all.len(), 2);
        let seen = &fp.requests_for("deepseek")[0];
        assert_eq!(seen.label, "deepseek");
        assert_eq!(seen.method, Method::POST);
        assert_eq!(seen.path, "/v1/chat/completions");
        assert_eq!(seen.model, "deepseek-chat+tokens=1");
        assert_eq!(seen.authorization.as_deref(), Some("Bearer sk-test"));
        assert_eq!(seen.headers[CONTENT_TYPE], "application/json");
        assert_eq!(seen.body["messages"][0]["role"], "user");
        let bare = &fp.requests_for("")[0];
        assert_eq!(bare.path, "/v1/chat/completions");
        assert_eq!(bare.body, Value::Null);
        assert_eq!(bare.authorization, None);
        assert!(all[0].at <= all[1].at);
    }

    #[test]
    fn request_log_is_bounded() {
        let shared = Shared::default();
        for i in 0..LOG_CAPACITY + 5 {
            shared.record(SeenRequest {
                label: String::new(),
                method: Method::GET,
                path: i.to_string(),
                model: String::new(),
                authorization: None,
                headers: HeaderMap::new(),
                body: Value::Null,
                at: Instant::now(),
            });
        }
        let log = lock(&shared.log);
        assert_eq!(log.len(), LOG_CAPACITY);
        assert_eq!(log.front().unwrap().path, "5");
    }

    #[tokio::test]
    async fn invalid_json_is_a_400() {
        let fp = provider().await;
        let resp = send(
            &client(),
            Method::POST,
            &chat_url(&fp, "j"),
            Bytes::from_static(b"{\"model\": "),
            None,
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let v = json_of(resp).await;
        assert_eq!(
            v,
            json!({"error": {
                "message": "We could not parse the JSON body of your request.",
                "type": "invalid_request_error",
                "param": null,
                "code": "invalid_json",
            }})
        );
    }

    #[tokio::test]
    async fn other_endpoints() {
        let fp = provider().await;
        let client = client();
        let base = fp.base_url("o");

        let resp = send(
            &client,
            Method::GET,
            &format!("{base}/models"),
            Bytes::new(),
            None,
        )
        .await
        .unwrap();
        assert_eq!(json_of(resp).await["data"][0]["id"], "fake-model");

        let body = json!({"model": "emb", "input": ["a", "b", "a"]});
        let v = json_of(post(&client, &format!("{base}/embeddings"), &body).await).await;
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "emb");
        assert_eq!(v["data"][1]["index"], 1);
        assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 8);
        assert_eq!(v["data"][0]["embedding"], v["data"][2]["embedding"]);
        assert_ne!(v["data"][0]["embedding"], v["data"][1]["embedding"]);
        assert_eq!(v["usage"], json!({"prompt_tokens": 1, "total_tokens": 1}));
        let v = json_of(
            post(
                &client,
                &format!("{base}/embeddings"),
                &json!({"input": "a"}),
            )
            .await,
        )
        .await;
        assert_eq!(v["data"].as_array().unwrap().len(), 1);

        let body = json!({"model": "whatever", "x": 1});
        let v = json_of(post(&client, &format!("{base}/responses"), &body).await).await;
        assert_eq!(
            v,
            json!({"echo": {"method": "POST", "path": "/v1/responses", "label": "o", "body": body}})
        );

        let resp = send(
            &client,
            Method::GET,
            &format!("http://{}/nope", fp.addr()),
            Bytes::new(),
            None,
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(resp.headers()["x-fake-provider"], "fake");
        assert_eq!(
            json_of(resp).await["error"]["type"],
            "invalid_request_error"
        );
    }

    #[tokio::test]
    async fn legacy_completions() {
        let fp = provider().await;
        let client = client();
        let url = format!("{}/completions", fp.base_url("lg"));
        let body = json!({"model": "davinci+tokens=2", "prompt": "12345"});
        let v = json_of(post(&client, &url, &body).await).await;
        assert_eq!(v["object"], "text_completion");
        assert!(v["id"].as_str().unwrap().starts_with("cmpl-fake-"));
        assert_eq!(v["choices"][0]["text"], "Hello from lg. w1 w2");
        assert_eq!(v["choices"][0]["logprobs"], Value::Null);
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5})
        );

        let body = json!({"model": "davinci+tokens=2", "prompt": "12345", "stream": true});
        let (events, errored) = read_events(post(&client, &url, &body).await.into_body()).await;
        assert!(!errored);
        assert_eq!(content_pieces(&events), ["Hello from lg.", " w1", " w2"]);
        assert_eq!(events.len(), 5);
        assert_eq!(events.last().unwrap(), "[DONE]");

        let resp = post(
            &client,
            &url,
            &json!({"model": "m+error=504", "prompt": "x"}),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    }

    #[tokio::test]
    async fn serves_h2c() {
        let fp = provider().await;
        let client: TestClient = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let resp = post(
            &client,
            &chat_url(&fp, "h2"),
            &chat_stream("m+tokens=1", false),
        )
        .await;
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let (events, errored) = read_events(resp.into_body()).await;
        assert!(!errored);
        assert_eq!(events.last().unwrap(), "[DONE]");
    }

    #[tokio::test]
    async fn shutdown_closes_the_listener() {
        let fp = provider().await;
        let addr = fp.addr();
        fp.shutdown();
        let refused = tokio::time::timeout(Duration::from_secs(5), async {
            while tokio::net::TcpStream::connect(addr).await.is_ok() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(refused.is_ok());
    }

    #[test]
    fn fault_grammar() {
        let f = Faults::parse("deepseek-chat");
        assert_eq!(f, Faults::default());
        let f = Faults::parse(
            "x+tokens=3+chunk-delay=5+latency=7+cut=2+gate=a+fail-times=1+error=503+bogus+tokens=oops",
        );
        assert_eq!(f.tokens, Some(3));
        assert_eq!(f.chunk_delay, Duration::from_millis(5));
        assert_eq!(f.latency, Duration::from_millis(7));
        assert_eq!(f.cut, Some(2));
        assert_eq!(f.gate.as_deref(), Some("a"));
        assert_eq!(f.fail_times, Some(1));
        assert_eq!(f.error, Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(Faults::parse("m+error=200").error, None);
        assert_eq!(
            Faults::parse("m+tokens=999999999999").tokens,
            Some(MAX_WORDS)
        );
        assert_eq!(
            Faults::parse("m+rate-limit").rate_limit,
            Some(RateLimit::RetryAfterSecs(1))
        );
    }
}
