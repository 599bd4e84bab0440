//! Builders for the cache tests: a route `chat` on the fake provider, a deterministic chat
//! request, and a call that reads the whole answer.

use serde_json::{json, Value};

use super::*;

/// A route `chat` whose relay and official models are `relay` and `official` (fake provider
/// fault strings), cached as `cache` says; `extra` goes at the top level.
pub fn config(
    fake: &FakeProvider,
    relay: &str,
    official: &str,
    cache: &str,
    extra: &str,
) -> String {
    format!(
        "holy_sheep_routing_enabled: true
timeouts:
  response_headers: 30s
resilience:
  attempts_per_target: 1
{extra}
providers:
  sheep:
    kind: relay
    base_url: {relay_url}
    api_key: {{ env: TEST_RELAY_KEY }}
  deep:
    kind: official
    base_url: {official_url}
    api_key: {{ env: TEST_OFFICIAL_KEY }}
routes:
  chat:
    relay: {{ provider: sheep, model: '{relay}', price: {{ input: 1, output: 2 }} }}
    official: {{ provider: deep, model: '{official}' }}
    {cache}
",
        relay_url = fake.base_url("sheep"),
        official_url = fake.base_url("deep"),
    )
}

pub const CACHED: &str = "cache: { ttl: 10m, max_stale: 24h }";

/// A deterministic chat request asking `question`, with `extra` fields on top.
pub fn request(stream: bool, question: &str, extra: Value) -> String {
    let mut body = json!({
        "model": "chat",
        "stream": stream,
        "temperature": 0,
        "messages": [{"role": "user", "content": question}],
    });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body.to_string()
}

/// Posts `body` as a chat completion with `headers` added; the status, headers and whole body.
pub async fn ask(
    sidecar: &Sidecar,
    body: String,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, Bytes) {
    let mut req = post(sidecar.data_addr, "/v1/chat/completions", body);
    for (name, value) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_str(value).unwrap(),
        );
    }
    let (status, headers, body) = call(&client(), req).await;
    (status.as_u16(), headers, body)
}

/// The assistant's text of a plain answer.
pub fn content(body: &[u8]) -> String {
    let answer: Value = serde_json::from_slice(body).expect("a JSON answer");
    answer["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

pub async fn stats(sidecar: &Sidecar) -> Value {
    call_json(&client(), get(sidecar.admin_addr, "/stats"))
        .await
        .2
}
