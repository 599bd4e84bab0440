//! Builders shared by the integration tests: a fake provider, the real sidecar on port 0 and a
//! real HTTP client, all on loopback, plus `eventually` for eventually-consistent checks.
#![allow(dead_code)]

pub mod cache;
pub mod redis;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub use fake_provider::FakeProvider;
use llm_sidecar::config::ConfigSource;
use llm_sidecar::settings::Settings;
use llm_sidecar::Sidecar;

pub const RELAY_KEY: &str = "sk-relay-test-key-0001";
pub const OFFICIAL_KEY: &str = "sk-official-test-key-0002";
pub const APP_KEY: &str = "sk-app-key-must-not-leak";

pub async fn fake() -> FakeProvider {
    FakeProvider::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("fake provider starts")
}

/// A config with one relay (`sheep`) and one official provider (`deep`) on the fake provider,
/// and routes whose upstream models pick fake-provider behaviours.
pub fn config(fake: &FakeProvider, routing_enabled: bool) -> String {
    config_with(fake, routing_enabled, "")
}

pub fn config_with(fake: &FakeProvider, routing_enabled: bool, extra_routes: &str) -> String {
    format!(
        "holy_sheep_routing_enabled: {routing_enabled}
timeouts:
  response_headers: 2s
default_route: chat
providers:
  sheep:
    kind: relay
    base_url: {relay}
    api_key: {{ env: TEST_RELAY_KEY }}
  deep:
    kind: official
    base_url: {official}
    api_key: {{ env: TEST_OFFICIAL_KEY }}
routes:
  chat:
    aliases: [chat-latest]
    context_window: 64000
    relay: {{ provider: sheep, model: relay-model }}
    official: {{ provider: deep, model: official-model }}
  embed:
    relay: {{ provider: sheep, model: relay-embed }}
    official: {{ provider: deep, model: official-embed }}
{extra_routes}",
        relay = fake.base_url("sheep"),
        official = fake.base_url("deep"),
    )
}

pub fn key_env() -> Arc<HashMap<String, String>> {
    Arc::new(
        [
            ("TEST_RELAY_KEY".to_string(), RELAY_KEY.to_string()),
            ("TEST_OFFICIAL_KEY".to_string(), OFFICIAL_KEY.to_string()),
        ]
        .into(),
    )
}

pub fn test_settings() -> Settings {
    Settings {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        config_poll: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(10),
        ..Settings::default()
    }
}

pub async fn sidecar(config_text: &str) -> Sidecar {
    sidecar_with(test_settings(), config_text).await
}

pub async fn sidecar_with(settings: Settings, config_text: &str) -> Sidecar {
    let source = match &settings.config_path {
        Some(path) => ConfigSource::File(path.clone()),
        None => ConfigSource::Embedded,
    };
    Sidecar::start(&settings, config_text, source, key_env())
        .await
        .expect("sidecar starts")
}

/// A sidecar whose routing config is a file it polls.
pub struct FileSidecar {
    pub sidecar: Sidecar,
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

pub async fn file_sidecar(text: &str) -> FileSidecar {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("routing.yaml");
    write_atomically(&path, text);
    let mut settings = test_settings();
    settings.config_path = Some(path.clone());
    FileSidecar {
        sidecar: sidecar_with(settings, text).await,
        path,
        _dir: dir,
    }
}

impl FileSidecar {
    /// Swaps in `text` and waits until the sidecar serves it.
    pub async fn reload(&self, text: &str) {
        let generation = self.sidecar.store.load().generation;
        write_atomically(&self.path, text);
        eventually(Duration::from_secs(10), "the new config", || async {
            self.sidecar.store.load().generation > generation
        })
        .await;
    }
}

/// Writes a config file the way editors and kubelet do: a whole new file renamed into place.
pub fn write_atomically(path: &PathBuf, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write temp config");
    std::fs::rename(&tmp, path).expect("rename config into place");
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub fn chat_body(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "Say hello."}],
    })
    .to_string()
}

pub fn post(addr: SocketAddr, path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {APP_KEY}"))
        .body(Full::new(body.into()))
        .expect("request builds")
}

pub fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .expect("request builds")
}

pub async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Response<Incoming> {
    client
        .request(req)
        .await
        .expect("request reaches the sidecar")
}

/// Sends and reads the whole body.
pub async fn call(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let response = send(client, req).await;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body reads")
        .to_bytes();
    (status, headers, body)
}

pub async fn call_json(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
) -> (StatusCode, http::HeaderMap, serde_json::Value) {
    let (status, headers, body) = call(client, req).await;
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("body is JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, headers, json)
}

pub fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// A chat completion through the sidecar, as the app would send it; the status as a number so
/// tests can compare `(status, provider)` pairs.
pub async fn ask(sidecar: &Sidecar, model: &str, stream: bool) -> (u16, http::HeaderMap, Bytes) {
    let (status, headers, body) = call(
        &client(),
        post(
            sidecar.data_addr,
            "/v1/chat/completions",
            chat_body(model, stream),
        ),
    )
    .await;
    (status.as_u16(), headers, body)
}

/// [`ask`] with the JSON body parsed, like [`call_json`].
pub async fn ask_json(
    sidecar: &Sidecar,
    model: &str,
    stream: bool,
) -> (StatusCode, http::HeaderMap, serde_json::Value) {
    call_json(
        &client(),
        post(
            sidecar.data_addr,
            "/v1/chat/completions",
            chat_body(model, stream),
        ),
    )
    .await
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|line| line.strip_prefix("data:").map(|d| d.trim().to_string()))
        })
        .collect()
}

/// The assistant text carried by stream chunks.
pub fn stream_text(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

pub async fn metrics_text(client: &HttpClient, admin: SocketAddr) -> String {
    let (_, _, body) = call(client, get(admin, "/metrics")).await;
    String::from_utf8_lossy(&body).into_owned()
}

/// The value of one sample line in Prometheus text, e.g. `llm_sidecar_config_generation`.
pub fn metric_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls `check` until it returns true, failing the test after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A loopback port with nothing listening on it.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    port
}

/// Runs `llm-sidecar check-config PATH` and returns what it printed and its exit status.
pub fn check_config(path: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_llm-sidecar"))
        .arg("check-config")
        .arg(path)
        .output()
        .expect("llm-sidecar runs")
}
