//! Property tests against input-driven bugs: request bodies, SSE streams, configs and pods.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_json::{json, Value};

use llm_sidecar::config::{self, layers, ConfigError, ConfigSource};
use llm_sidecar::inject::{self, Decision, PatchOp, Scope, Template};
use llm_sidecar::openai::RequestBody;
use llm_sidecar::proxy::sse::{inspect, Chunk, RawEvent, SseParser};
use support::*;

/// Case counts are per block and moderate: the whole file runs in a few seconds in debug.
fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        // What these found is pinned by plain tests next to the code it broke.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// JSON request bodies

/// Keys a chat request has, a few near misses, and anything else.
fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec![
            "model", "stream", "messages", "stream_options", "max_tokens", "temperature",
            "tools", "n", "prompt", "input", "Model", "model ", "", "a\"b", "\\", "é",
        ])
        .prop_map(str::to_string),
        1 => any::<String>(),
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        prop_oneof![
            select(vec!["", "chat", "[DONE]", "{", "\"", "\\u0000", "\u{2028}"])
                .prop_map(str::to_string),
            any::<String>(),
        ]
        .prop_map(Value::String),
    ]
}

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((json_key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// The models the test config serves (`chat`, its alias, `embed`), one it does not, and
/// values of the wrong type.
fn model_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => select(vec!["chat", "chat-latest", "embed"]).prop_map(Value::from),
        1 => select(vec!["gpt-9", "", "CHAT", "chat "]).prop_map(Value::from),
        1 => json_value(),
    ]
}

fn messages_value() -> impl Strategy<Value = Value> {
    let message = (
        select(vec!["system", "user", "assistant", "tool", "nobody"]),
        prop_oneof![
            any::<String>().prop_map(Value::String),
            json_value(),
            Just(json!([{"type": "text", "text": "hi"}])),
        ],
    )
        .prop_map(|(role, content)| json!({"role": role, "content": content}));
    prop_oneof![
        3 => prop::collection::vec(message, 0..4).prop_map(Value::Array),
        1 => json_value(),
    ]
}

/// One top-level member of a request object: the routing fields with right or wrong types,
/// anything else with any value.
fn member() -> impl Strategy<Value = (String, Value)> {
    prop_oneof![
        2 => model_value().prop_map(|v| ("model".to_string(), v)),
        2 => prop_oneof![any::<bool>().prop_map(Value::Bool), Just(Value::Null), json_value()]
            .prop_map(|v| ("stream".to_string(), v)),
        2 => messages_value().prop_map(|v| ("messages".to_string(), v)),
        1 => prop_oneof![Just(json!({"include_usage": true})), json_value()]
            .prop_map(|v| ("stream_options".to_string(), v)),
        1 => prop_oneof![(0u64..5).prop_map(Value::from), json_value()]
            .prop_map(|v| ("max_tokens".to_string(), v)),
        2 => (json_key(), json_value()),
    ]
}

/// A request object as a client may write it: members in order, keys possibly repeated, keys
/// possibly written with `\u` escapes, compact or spaced out.
#[derive(Clone, Debug)]
struct Object {
    members: Vec<(String, Value)>,
    escape_keys: bool,
    spaced: bool,
}

fn object() -> impl Strategy<Value = Object> {
    (
        prop::collection::vec(member(), 0..6),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(members, escape_keys, spaced)| Object {
            members,
            escape_keys,
            spaced,
        })
}

impl Object {
    fn render(&self) -> Vec<u8> {
        let gap = if self.spaced { " \n\t" } else { "" };
        let mut out = format!("{gap}{{");
        for (i, (key, value)) in self.members.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(gap);
            if self.escape_keys {
                out.push('"');
                for c in key.chars() {
                    match c {
                        'a'..='z' | 'A'..='Z' => out.push_str(&format!("\\u{:04x}", c as u32)),
                        _ => {
                            let quoted = serde_json::to_string(&c.to_string()).unwrap();
                            out.push_str(&quoted[1..quoted.len() - 1]);
                        }
                    }
                }
                out.push('"');
            } else {
                out.push_str(&serde_json::to_string(key).unwrap());
            }
            out.push_str(gap);
            out.push(':');
            out.push_str(gap);
            if self.spaced {
                out.push_str(&serde_json::to_string_pretty(value).unwrap());
            } else {
                out.push_str(&serde_json::to_string(value).unwrap());
            }
        }
        out.push_str(gap);
        out.push('}');
        out.push_str(gap);
        out.into_bytes()
    }

    fn last(&self, key: &str) -> Option<&Value> {
        self.members
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// A `model` or `stream` member of the wrong type: the body must be refused.
    fn wrong_types(&self) -> bool {
        self.members.iter().any(|(k, v)| {
            (k == "model" && !v.is_string()) || (k == "stream" && !(v.is_boolean() || v.is_null()))
        })
    }

    fn repeats_a_key(&self) -> bool {
        let mut seen = std::collections::HashSet::new();
        self.members.iter().any(|(k, _)| !seen.insert(k.as_str()))
    }
}

/// Valid JSON with one fault put in: cut short, a byte changed, a byte put in.
fn damaged_json() -> impl Strategy<Value = Vec<u8>> {
    (object(), any::<Index>(), any::<u8>(), 0..3u8).prop_map(|(o, at, byte, how)| {
        let mut bytes = o.render();
        let i = at.index(bytes.len() + 1);
        match how {
            0 => bytes.truncate(i),
            1 if i < bytes.len() => bytes[i] = byte,
            _ => bytes.insert(i, byte),
        }
        bytes
    })
}

/// A request a client would send (a served model, `stream` a boolean, messages) with a few
/// other members of any kind.
fn plausible_object() -> impl Strategy<Value = Object> {
    (
        select(vec!["chat", "chat-latest", "embed"]),
        prop::option::of(any::<bool>()),
        messages_value(),
        prop::collection::vec(member(), 0..3),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(model, stream, messages, more, escape_keys, spaced)| {
            let mut members = vec![
                ("model".to_string(), Value::from(model)),
                ("messages".to_string(), messages),
            ];
            if let Some(stream) = stream {
                members.push(("stream".to_string(), Value::Bool(stream)));
            }
            members.extend(more);
            Object {
                members,
                escape_keys,
                spaced,
            }
        })
}

fn any_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => plausible_object().prop_map(|o| o.render()),
        3 => object().prop_map(|o| o.render()),
        2 => damaged_json(),
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

/// What `RequestBody::parse` must say about any bytes: never a panic; an accepted body is a
/// JSON object whose routing fields are read as a full parse reads them (the last of a repeated
/// key), and it is forwarded as valid JSON with only `model` changed.
fn check_parse(bytes: &[u8]) -> Result<(), TestCaseError> {
    let parsed = match RequestBody::parse(bytes) {
        Err(why) => {
            prop_assert!(!why.to_string().trim().is_empty(), "an empty reason");
            return Ok(());
        }
        Ok(parsed) => parsed,
    };
    prop_assert!(
        serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok(),
        "accepted bytes that are not JSON"
    );
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    prop_assert_eq!(first, Some(&b'{'), "accepted JSON that is not an object");
    let rendered = parsed.with_model("routed-model");
    let out: serde_json::Map<String, Value> = match serde_json::from_slice(&rendered) {
        Ok(out) => out,
        // A number serde_json cannot hold as a Value (1e400) is still valid JSON, forwarded
        // verbatim.
        Err(_) => {
            prop_assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&rendered).is_ok());
            return Ok(());
        }
    };
    if let Ok(Value::Object(mut original)) = serde_json::from_slice::<Value>(bytes) {
        prop_assert_eq!(
            parsed.model.as_deref(),
            original.get("model").and_then(Value::as_str)
        );
        prop_assert_eq!(
            parsed.stream,
            original
                .get("stream")
                .and_then(Value::as_bool)
                .unwrap_or(false)
        );
        if original.contains_key("model") {
            original.insert("model".into(), Value::from("routed-model"));
        }
        prop_assert_eq!(out, original, "only `model` may change");
    }
    let options: Value = serde_json::from_str(&parsed.stream_options_with_usage())
        .map_err(|e| TestCaseError::fail(format!("stream_options is not JSON: {e}")))?;
    prop_assert_eq!(&options["include_usage"], &Value::Bool(true));
    Ok(())
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn the_request_reader_takes_any_bytes(bytes in any_body()) {
        check_parse(&bytes)?;
    }

    #[test]
    fn the_request_reader_takes_any_json_value(value in json_value()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        check_parse(&bytes)?;
        if !value.is_object() {
            prop_assert!(RequestBody::parse(&bytes).is_err());
        }
    }

    #[test]
    fn the_request_reader_refuses_exactly_the_wrong_objects(o in object()) {
        let bytes = o.render();
        check_parse(&bytes)?;
        match RequestBody::parse(&bytes) {
            Ok(parsed) => {
                prop_assert!(!o.wrong_types(), "accepted a wrong type");
                prop_assert_eq!(parsed.model.as_deref(), o.last("model").and_then(Value::as_str));
                let stream = o.last("stream").and_then(Value::as_bool).unwrap_or(false);
                prop_assert_eq!(parsed.stream, stream);
            }
            // A repeated key may be refused (a stricter reader); nothing else may.
            Err(why) => prop_assert!(o.wrong_types() || o.repeats_a_key(), "refused: {}", why),
        }
    }
}

/// A body POSTed to `/v1/chat/completions` of the real server, with the fake provider behind it:
/// forwarded (a 2xx from upstream) or refused with a 400 in the OpenAI error shape (a 404 for a
/// model the config does not serve) that no provider saw; never a 5xx, never a hang.
#[test]
fn the_server_forwards_or_refuses_any_body() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (fake, sidecar) = rt.block_on(async {
        let fake = fake().await;
        // A generous header timeout: on a loaded machine a slow answer is not the property.
        let text = config(&fake, true).replace("response_headers: 2s", "response_headers: 10s");
        let sidecar = sidecar(&text).await;
        (fake, sidecar)
    });
    let client = rt.block_on(async { client() });
    let served = ["chat", "chat-latest", "embed"];
    let mut runner = TestRunner::new(cases(48));
    let result = runner.run(&any_body(), |body| {
        let seen_before = fake.requests().len();
        let (status, headers, answer) = rt
            .block_on(async {
                let req = post(sidecar.data_addr, "/v1/chat/completions", body.clone());
                tokio::time::timeout(Duration::from_secs(10), call(&client, req)).await
            })
            .map_err(|_| TestCaseError::fail("no answer within 10 s"))?;
        let seen = fake.requests().len() - seen_before;
        let parsed = RequestBody::parse(&body);
        let model = parsed.as_ref().ok().and_then(|p| p.model.as_deref());
        let status = status.as_u16();
        let text = String::from_utf8_lossy(&answer);
        match status {
            200..=299 => {
                prop_assert!(seen >= 1, "a {} no provider answered", status);
                prop_assert!(model.is_some_and(|m| served.contains(&m)), "forwarded");
            }
            400 | 404 => {
                prop_assert_eq!(seen, 0, "the provider saw a refused request");
                let error: Value = serde_json::from_slice(&answer)
                    .map_err(|e| TestCaseError::fail(format!("not JSON ({e}): {text}")))?;
                prop_assert!(
                    error["error"]["message"]
                        .as_str()
                        .is_some_and(|m| !m.is_empty()),
                    "no message: {}",
                    text
                );
                prop_assert!(error["error"]["type"].is_string(), "no type: {}", text);
                prop_assert!(!header(&headers, "x-llm-sidecar-error").is_empty());
                if status == 404 {
                    // Only a well-formed body naming a model this config does not serve.
                    prop_assert_eq!(header(&headers, "x-llm-sidecar-error"), "model_not_found");
                    prop_assert!(model.is_some_and(|m| !served.contains(&m)), "{}", text);
                } else {
                    prop_assert!(
                        parsed.is_err() || model.is_none(),
                        "refused a good body: {}",
                        text
                    );
                }
            }
            _ => prop_assert!(false, "answered {}: {}", status, text),
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    rt.block_on(async move {
        drop(sidecar);
        drop(fake);
    });
}

// ---------------------------------------------------------------------------------------------
// SSE

/// One event as a provider writes it, with the `data` the parser must find in it.
#[derive(Clone, Debug)]
struct Event {
    lines: Vec<String>,
    crlf: bool,
    data: Option<String>,
    /// The data is neither `[DONE]` nor a JSON object: the sidecar drops and counts it.
    garbage: bool,
}

impl Event {
    fn bytes(&self) -> Vec<u8> {
        let eol = if self.crlf { "\r\n" } else { "\n" };
        let mut out = String::new();
        for line in &self.lines {
            out.push_str(line);
            out.push_str(eol);
        }
        out.push_str(eol);
        out.into_bytes()
    }
}

/// A line of text for a `data:` field: no line breaks.
fn line_text() -> impl Strategy<Value = String> {
    any::<String>().prop_map(|s| s.replace(['\r', '\n'], ""))
}

fn chunk_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        (
            line_text(),
            prop::option::of(select(vec!["stop", "length"]))
        )
            .prop_map(|(text, finish)| {
                json!({"id": "c1", "object": "chat.completion.chunk", "model": "m",
                   "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]})
            }),
        Just(json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}})),
        Just(json!({"error": {"message": "overloaded"}})),
        json_value().prop_map(|v| json!({"choices": v})),
    ]
}

fn garbage_text() -> impl Strategy<Value = String> {
    prop_oneof![
        select(vec![
            "{\"id\": broken json",
            "42",
            "[1,2]",
            "\"text\"",
            "null",
            "",
            "[DONE",
            "{"
        ])
        .prop_map(str::to_string),
        line_text(),
    ]
    .prop_filter("garbage", |s| is_garbage(s))
}

fn is_garbage(data: &str) -> bool {
    data.trim() != "[DONE]" && !serde_json::from_str::<Value>(data).is_ok_and(|v| v.is_object())
}

fn other_line() -> impl Strategy<Value = String> {
    select(vec![
        "event: message",
        ": keep-alive",
        "id: 7",
        "retry: 1000",
        ":",
    ])
    .prop_map(str::to_string)
}

fn event() -> impl Strategy<Value = Event> {
    // The payload: a JSON chunk on one line or pretty-printed over several, `[DONE]`, garbage,
    // or none (a comment or keep-alive).
    let payload = prop_oneof![
        4 => (chunk_json(), any::<bool>()).prop_map(|(v, pretty)| Some(if pretty {
            serde_json::to_string_pretty(&v).unwrap()
        } else {
            v.to_string()
        })),
        1 => Just(Some("[DONE]".to_string())),
        2 => garbage_text().prop_map(Some),
        1 => Just(None),
    ];
    (
        payload,
        prop::collection::vec(other_line(), 0..3),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(data, mut lines, crlf, spaced)| {
            if let Some(data) = &data {
                for part in data.split('\n') {
                    // `data:x` and `data: x` are the same field; one leading space is dropped.
                    let sep = if spaced || part.starts_with(' ') {
                        "data: "
                    } else {
                        "data:"
                    };
                    lines.push(format!("{sep}{part}"));
                }
            }
            if lines.is_empty() {
                lines.push(": keep-alive".into());
            }
            let garbage = data.as_deref().is_some_and(is_garbage);
            Event {
                lines,
                crlf,
                data,
                garbage,
            }
        })
}

/// Feeds `bytes` in the pieces `cuts` makes, then finishes the stream.
fn parse_in_pieces(bytes: &[u8], cuts: &[Index]) -> (Vec<RawEvent>, Option<RawEvent>) {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    let mut parser = SseParser::default();
    let mut events = Vec::new();
    for w in at.windows(2) {
        events.extend(parser.push(&bytes[w[0]..w[1]]));
    }
    let rest = parser.finish();
    (events, rest)
}

fn parse_whole(bytes: &[u8]) -> (Vec<RawEvent>, Option<RawEvent>) {
    let mut parser = SseParser::default();
    let events = parser.push(bytes);
    (events, parser.finish())
}

/// Arbitrary bytes that look a little like a stream: events, garbage and cuts mixed.
fn stream_like_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => event().prop_map(|e| e.bytes()),
        2 => prop::collection::vec(
            select(vec![b'\n', b'\r', b'd', b':', b' ', b'{', b'}', 0xff, b'a']), 0..12),
        1 => prop::collection::vec(any::<u8>(), 0..24),
    ];
    prop::collection::vec(piece, 0..8).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn a_stream_cut_anywhere_gives_the_events_it_was_made_of(
        events in prop::collection::vec(event(), 0..8),
        cuts in prop::collection::vec(any::<Index>(), 0..12),
    ) {
        let bytes: Vec<u8> = events.iter().flat_map(Event::bytes).collect();
        let whole = parse_whole(&bytes);
        prop_assert_eq!(whole.0.len(), events.len());
        for (got, want) in whole.0.iter().zip(&events) {
            prop_assert_eq!(&got.raw[..], &want.bytes()[..]);
            prop_assert_eq!(&got.data, &want.data);
        }
        prop_assert!(whole.1.is_none(), "a whole stream leaves nothing over");
        prop_assert_eq!(parse_in_pieces(&bytes, &cuts), whole);
    }

    #[test]
    fn any_bytes_cut_anywhere_parse_as_when_fed_whole(
        bytes in stream_like_bytes(),
        cuts in prop::collection::vec(any::<Index>(), 0..12),
    ) {
        let whole = parse_whole(&bytes);
        prop_assert_eq!(parse_in_pieces(&bytes, &cuts), whole.clone());
        // Nothing is lost or made up: the events are the input, bar trailing whitespace.
        let mut joined: Vec<u8> = whole.0.iter().flat_map(|e| e.raw.to_vec()).collect();
        if let Some(rest) = &whole.1 {
            joined.extend_from_slice(&rest.raw);
        }
        prop_assert!(bytes.starts_with(&joined));
        prop_assert!(bytes[joined.len()..].iter().all(u8::is_ascii_whitespace));
        for e in whole.0.iter().chain(&whole.1) {
            let ended = e.raw.ends_with(b"\n\n") || e.raw.ends_with(b"\r\n\r\n");
            prop_assert!(ended || Some(e) == whole.1.as_ref(), "{:?}", e);
            if let Some(data) = &e.data {
                // Never a panic; what is not dropped is `[DONE]` or a JSON object.
                if inspect(data) != Chunk::Malformed {
                    prop_assert!(!is_garbage(data), "{:?} passed as a chunk", data);
                }
            }
        }
    }

    #[test]
    fn garbage_in_a_stream_is_counted_as_dropped_chunks(
        events in prop::collection::vec(event(), 0..10),
        cuts in prop::collection::vec(any::<Index>(), 0..12),
    ) {
        let bytes: Vec<u8> = events.iter().flat_map(Event::bytes).collect();
        let (got, rest) = parse_in_pieces(&bytes, &cuts);
        prop_assert!(rest.is_none());
        let dropped = got
            .iter()
            .filter_map(|e| e.data.as_deref())
            .filter(|d| inspect(d) == Chunk::Malformed)
            .count();
        prop_assert_eq!(dropped, events.iter().filter(|e| e.garbage).count());
        for (e, want) in got.iter().zip(&events) {
            if let (Some(d), false) = (&e.data, want.garbage) {
                prop_assert!(inspect(d) != Chunk::Malformed, "{:?} dropped", d);
            }
        }
    }

    #[test]
    fn any_text_is_told_apart_without_a_panic(
        data in prop_oneof![line_text(), any::<String>(), json_value().prop_map(|v| v.to_string())],
    ) {
        let chunk = inspect(&data);
        prop_assert_eq!(chunk == Chunk::Malformed, is_garbage(&data), "{:?}", data);
    }
}

// ---------------------------------------------------------------------------------------------
// Routing config

type Yaml = serde_yaml::Value;

/// Every field name of the routing config's schema (`src/config/schema.rs`).
const SCHEMA_FIELDS: &[&str] = &[
    "holy_sheep_routing_enabled",
    "holy_sheep_fallback_only",
    "rollout_percent",
    "shadow_percent",
    "timeouts",
    "default_route",
    "resilience",
    "guard",
    "shadow",
    "providers",
    "routes",
    "response_headers",
    "attempts_per_target",
    "deadline",
    "first_token_timeout",
    "stream_idle_timeout",
    "header_timeout_per_10k_tokens",
    "backoff_base",
    "backoff_max",
    "rate_limit_waits",
    "low_latency_threshold",
    "breaker_failures",
    "breaker_cooldown",
    "breaker_max_cooldown",
    "retry_budget_ratio",
    "retry_budget_min_per_second",
    "enabled",
    "window",
    "min_requests",
    "max_error_rate",
    "max_p95_latency",
    "hold",
    "kind",
    "base_url",
    "api_key",
    "env",
    "file",
    "aliases",
    "context_window",
    "fallbacks",
    "truncate_to_fit",
    "relay",
    "official",
    "provider",
    "model",
    "supports_prefill",
    "price",
    "input",
    "output",
    "cached_input",
    "max_concurrency",
    "daily_budget_usd",
    "equivalence_threshold",
    "timeout",
    "log",
    "log_content",
];

fn yaml_key() -> impl Strategy<Value = Yaml> {
    prop_oneof![
        4 => select(SCHEMA_FIELDS.to_vec()).prop_map(Yaml::from),
        2 => select(vec!["sheep", "deep", "chat", "a.b", "deepseek-v3.2", "no such", ""])
            .prop_map(Yaml::from),
        1 => any::<String>().prop_map(Yaml::from),
        1 => prop_oneof![
            any::<i64>().prop_map(Yaml::from),
            any::<bool>().prop_map(Yaml::from),
            Just(Yaml::Null),
        ],
    ]
}

fn yaml_leaf() -> impl Strategy<Value = Yaml> {
    prop_oneof![
        Just(Yaml::Null),
        any::<bool>().prop_map(Yaml::Bool),
        any::<i64>().prop_map(Yaml::from),
        any::<u64>().prop_map(Yaml::from),
        any::<f64>().prop_map(Yaml::from),
        select(vec![
            "relay",
            "official",
            "sheep",
            "chat",
            "http://127.0.0.1:1/v1",
            "https://x/v1",
            "15s",
            "0s",
            "250ms",
            "2m",
            "5h",
            "18446744073709551615s",
            "18446744073709551615m",
            "true",
            "yes",
            "25",
            "150%",
            "",
            " ",
        ])
        .prop_map(Yaml::from),
        any::<String>().prop_map(Yaml::from),
    ]
}

fn yaml_value() -> impl Strategy<Value = Yaml> {
    yaml_leaf().prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Yaml::Sequence),
            prop::collection::vec((yaml_key(), inner), 0..6)
                .prop_map(|kv| Yaml::Mapping(kv.into_iter().collect())),
        ]
    })
}

/// A document shaped like a config at the top, anything below.
fn yaml_config() -> impl Strategy<Value = Yaml> {
    prop_oneof![
        4 => prop::collection::vec(
            (select(SCHEMA_FIELDS[..11].to_vec()).prop_map(Yaml::from), yaml_value()),
            0..8,
        )
            .prop_map(|kv| Yaml::Mapping(kv.into_iter().collect())),
        1 => yaml_value(),
    ]
}

/// Where a node sits in a document.
#[derive(Clone, Debug)]
enum Step {
    Key(Yaml),
    Item(usize),
}

fn node_paths(node: &Yaml, here: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    match node {
        Yaml::Mapping(map) => {
            for (k, v) in map {
                here.push(Step::Key(k.clone()));
                out.push(here.clone());
                node_paths(v, here, out);
                here.pop();
            }
        }
        Yaml::Sequence(items) => {
            for (i, v) in items.iter().enumerate() {
                here.push(Step::Item(i));
                out.push(here.clone());
                node_paths(v, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn parent_mut<'a>(doc: &'a mut Yaml, path: &[Step]) -> Option<&'a mut Yaml> {
    let mut node = doc;
    for step in path {
        node = match (step, node) {
            (Step::Key(k), Yaml::Mapping(m)) => m.get_mut(k)?,
            (Step::Item(i), Yaml::Sequence(s)) => s.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(node)
}

/// What a mutation does to the node it picks.
#[derive(Clone, Debug)]
enum Mutation {
    Drop,
    /// A value of another type.
    Retype(Yaml),
    /// A value of the same kind out of its range: a number, a duration, a URL (picked from the
    /// list for the node's kind).
    OutOfRange(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let other_type = prop_oneof![
        Just(Yaml::Null),
        any::<bool>().prop_map(Yaml::Bool),
        Just(Yaml::from(7)),
        Just(Yaml::from(-1.5)),
        Just(Yaml::from("text")),
        Just(Yaml::Sequence(vec![])),
        Just(Yaml::Sequence(vec![Yaml::from(1)])),
        Just(Yaml::Mapping(Default::default())),
    ];
    prop_oneof![
        1 => Just(Mutation::Drop),
        2 => other_type.prop_map(Mutation::Retype),
        2 => any::<Index>().prop_map(Mutation::OutOfRange),
    ]
}

/// Values out of range for a node like `like`.
fn out_of_range(like: &Yaml, pick: Index) -> Yaml {
    let numbers = || {
        vec![
            Yaml::from(-1),
            Yaml::from(0),
            Yaml::from(101),
            Yaml::from(4_294_967_296u64),
            Yaml::from(u64::MAX),
            Yaml::from(i64::MIN),
            Yaml::from(1e300),
            Yaml::from(f64::NAN),
            Yaml::from(f64::INFINITY),
            Yaml::from(-0.0),
        ]
    };
    let durations = [
        "0s",
        "0ms",
        "-5s",
        "5h",
        "1.5s",
        "99999999999999999999s",
        "18446744073709551615s",
        "18446744073709551615ms",
        "307445734561825861m",
        "18446744073709551615m",
        "1000000000000000000s",
    ];
    let urls = [
        "",
        "ftp://x/v1",
        "http://",
        "http://[::1",
        "127.0.0.1:1",
        " https://x/v1 ",
    ];
    let list: Vec<Yaml> = match like {
        Yaml::Number(_) => numbers(),
        Yaml::String(s) if s.starts_with("http") => urls.iter().map(|&u| Yaml::from(u)).collect(),
        Yaml::String(s) if settings_duration(s) => {
            durations.iter().map(|&d| Yaml::from(d)).collect()
        }
        _ => numbers()
            .into_iter()
            .chain(durations.iter().map(|&d| Yaml::from(d)))
            .collect(),
    };
    list[pick.index(list.len())].clone()
}

/// `15s`, `250ms`, `2m`.
fn settings_duration(s: &str) -> bool {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && digits.len() < s.len()
}

fn mutate(doc: &mut Yaml, paths: &[Vec<Step>], at: Index, m: &Mutation) {
    let path = &paths[at.index(paths.len())];
    let (last, parent) = path.split_last().expect("a path has a step");
    let Some(parent) = parent_mut(doc, parent) else {
        return; // An earlier mutation removed it.
    };
    if let Mutation::Drop = m {
        match (last, parent) {
            (Step::Key(k), Yaml::Mapping(map)) => drop(map.remove(k)),
            (Step::Item(i), Yaml::Sequence(s)) if *i < s.len() => drop(s.remove(*i)),
            _ => {}
        }
        return;
    }
    let slot = match (last, parent) {
        (Step::Key(k), Yaml::Mapping(map)) => map.get_mut(k),
        (Step::Item(i), Yaml::Sequence(s)) => s.get_mut(*i),
        _ => None,
    };
    if let Some(slot) = slot {
        *slot = match m {
            Mutation::Retype(v) => v.clone(),
            Mutation::OutOfRange(pick) => out_of_range(slot, *pick),
            Mutation::Drop => return,
        };
    }
}

fn default_config() -> Yaml {
    serde_yaml::from_str(config::EMBEDDED_DEFAULT).unwrap()
}

/// The embedded default with one to three mutations.
fn mutated_default() -> impl Strategy<Value = Yaml> {
    prop::collection::vec((any::<Index>(), mutation()), 1..4).prop_map(|ms| {
        let mut doc = default_config();
        for (at, m) in &ms {
            let mut paths = Vec::new();
            node_paths(&doc, &mut Vec::new(), &mut paths);
            if !paths.is_empty() {
                mutate(&mut doc, &paths, *at, m);
            }
        }
        doc
    })
}

/// A key as the config's reader sees it: a string's text, another scalar as YAML writes it.
fn scalar_text(key: &Yaml) -> Option<String> {
    match key {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Null | Yaml::Bool(_) | Yaml::Number(_) => serde_yaml::to_string(key)
            .ok()
            .map(|t| t.trim_end().to_string()),
        _ => None,
    }
}

/// Whether an error path (`routes.deepseek-v3.2.fallbacks[0]`; names may hold dots) names a
/// field: it can be followed through the document, and where the document ends, what is left
/// is one schema field (a default the check compared with, or the field found missing).
fn names_a_field(doc: &Yaml, path: &str) -> bool {
    follows(doc, path, true)
}

/// `rest` is what is left of the path at `node`; below the root a key follows a `.`, an item
/// is `[i]` (keys may hold both).
fn follows(node: &Yaml, rest: &str, root: bool) -> bool {
    if rest.is_empty() {
        return true;
    }
    if let (Some(after), Yaml::Sequence(items)) = (rest.strip_prefix('['), node) {
        let item = after.split_once(']').and_then(|(index, after)| {
            let i: usize = index.parse().ok()?;
            Some((items.get(i)?, after))
        });
        if item.is_some_and(|(item, after)| follows(item, after, false)) {
            return true;
        }
    }
    let rest = match rest.strip_prefix('.') {
        _ if root => rest,
        Some(rest) => rest,
        None => return false,
    };
    if let Yaml::Mapping(map) = node {
        // Each way to end the key here: at a `.`, a `[`, or the end.
        let ends = rest
            .match_indices(['.', '['])
            .map(|(i, _)| i)
            .chain([rest.len()]);
        for end in ends {
            let (segment, after) = rest.split_at(end);
            let matches = |k: &Yaml| match k {
                Yaml::String(k) => k == segment,
                // A number or boolean key is named as written (`.2` for 0.2).
                other => serde_yaml::from_str::<Yaml>(segment).is_ok_and(|s| &s == other),
            };
            if map
                .iter()
                .any(|(k, v)| matches(k) && follows(v, after, false))
            {
                return true;
            }
        }
    }
    SCHEMA_FIELDS.contains(&rest)
}

/// A rejected config's errors: each has words, and a path that names a field of the document
/// (empty only when the whole document is wrong: not YAML, not a mapping, or missing one of the
/// required top-level sections, which the message names).
fn check_errors(text: &str, doc: Option<&Yaml>, err: &ConfigError) -> Result<(), TestCaseError> {
    prop_assert!(!err.0.is_empty(), "rejected without an error");
    for e in &err.0 {
        prop_assert!(
            !e.message.trim().is_empty(),
            "an error without words: {:?}",
            e
        );
        let root_problem = doc.is_none_or(|d| !d.is_mapping())
            || e.message.starts_with("missing field `providers`")
            || e.message.starts_with("missing field `routes`")
            // A top-level key that is the empty string: its path is its (empty) name.
            || e.message.starts_with("unknown field ``")
            // A top-level key that is itself a mapping or a list (`? a:`) names no field.
            || doc.and_then(Yaml::as_mapping).is_some_and(|m| {
                m.keys()
                    .any(|k| k.is_mapping() || k.is_sequence())
            });
        // The message does not repeat the path (or the path of the mapping holding the field).
        let mut prefix = Some(e.path.as_str());
        while let Some(p) = prefix.filter(|p| !p.is_empty()) {
            prop_assert!(
                !e.message.starts_with(&format!("{p}: ")),
                "the path twice: {:?}",
                e
            );
            prefix = p.rfind(['.', '[']).map(|i| &p[..i]);
        }
        // A key the YAML broke off before is not a field (serde_path_to_error writes it `?`).
        if !text.contains('?') {
            prop_assert!(!e.path.contains('?'), "{:?}", e);
        }
        if e.path.is_empty() {
            prop_assert!(root_problem, "no path for {:?}", e);
            continue;
        }
        if let Some(doc) = doc {
            prop_assert!(
                names_a_field(doc, &e.path),
                "{:?} names no field of\n{}",
                e,
                serde_yaml::to_string(doc).unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// An accepted config holds durations the request path can use: added to a clock reading
/// (deadlines, breaker cooldowns) and scaled by a large prompt (the header timeout).
fn check_usable(snapshot: &config::Snapshot) -> Result<(), TestCaseError> {
    let now = tokio::time::Instant::now();
    let r = &snapshot.resilience;
    let g = &snapshot.guard;
    for (name, d) in [
        (
            "timeouts.response_headers",
            snapshot.timeouts.response_headers,
        ),
        ("resilience.deadline", r.deadline),
        ("resilience.first_token_timeout", r.first_token_timeout),
        ("resilience.stream_idle_timeout", r.stream_idle_timeout),
        ("resilience.backoff_max", r.backoff_max),
        ("resilience.breaker_max_cooldown", r.breaker.max_cooldown),
        ("guard.window", g.window),
        ("guard.hold", g.hold),
        ("shadow.timeout", snapshot.shadow.timeout),
    ] {
        prop_assert!(
            now.checked_add(d).is_some(),
            "{} = {:?} overflows a clock reading",
            name,
            d
        );
    }
    let scaled = r
        .header_timeout_per_10k_tokens
        .checked_mul(10_000)
        .and_then(|s| s.checked_add(snapshot.timeouts.response_headers))
        .and_then(|t| now.checked_add(t));
    prop_assert!(
        scaled.is_some(),
        "the header timeout of a 100 M-token prompt overflows"
    );
    Ok(())
}

fn check_config_text(text: &str, doc: Option<&Yaml>) -> Result<(), TestCaseError> {
    let env: HashMap<String, String> = HashMap::new();
    let compiled = config::compile(text, ConfigSource::Embedded, 1, &env);
    match &compiled {
        Ok(snapshot) => check_usable(snapshot)?,
        Err(err) => check_errors(text, doc, err)?,
    }
    // `check-config` validates what is not a ConfigMap exactly as the sidecar loads it.
    let is_configmap = doc.and_then(|d| d.get("kind")).and_then(Yaml::as_str) == Some("ConfigMap");
    if !is_configmap {
        let checked = layers::check(text, ConfigSource::Embedded, &env);
        prop_assert_eq!(checked.is_ok(), compiled.is_ok());
        if let (Err(a), Err(b)) = (&checked, &compiled) {
            prop_assert_eq!(a, b);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn any_yaml_config_is_accepted_or_rejected_by_field_path(doc in yaml_config()) {
        let text = serde_yaml::to_string(&doc).unwrap();
        check_config_text(&text, Some(&doc))?;
    }

    #[test]
    fn a_mutated_default_config_is_accepted_or_rejected_by_field_path(doc in mutated_default()) {
        let text = serde_yaml::to_string(&doc).unwrap();
        check_config_text(&text, Some(&doc))?;
    }

    #[test]
    fn any_text_as_a_config_never_panics(text in prop_oneof![
        any::<String>(),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| {
            // A slice of the default config: cut mid-line, mid-mapping.
            let d = config::EMBEDDED_DEFAULT;
            let (a, b) = (a.index(d.len()), b.index(d.len()));
            let (a, b) = (a.min(b), a.max(b));
            d.get(a..b).unwrap_or_default().to_string()
        }),
    ]) {
        let doc = serde_yaml::from_str::<Yaml>(&text).ok();
        check_config_text(&text, doc.as_ref())?;
    }
}

/// A ConfigMap manifest as `check-config` reads it: flag keys and a routing YAML (the default,
/// mutated) among unknown keys, values of any type.
fn configmap_manifest() -> impl Strategy<Value = Yaml> {
    let value = prop_oneof![
        4 => select(vec!["true", "false", "yes", "maybe", "25", "150", "-1", "12.5", "25%", ""])
            .prop_map(Yaml::from),
        1 => yaml_leaf(),
    ];
    let entry = prop_oneof![
        4 => (
            select(vec![
                "holy_sheep_routing_enabled", "holy_sheep_fallback_only", "rollout_percent",
                "shadow_percent", "holy_sheep_routing_enable",
            ])
            .prop_map(Yaml::from),
            value,
        ),
        2 => mutated_default()
            .prop_map(|d| {
                let text = serde_yaml::to_string(&d).unwrap();
                (Yaml::from("config.yaml"), Yaml::from(text))
            }),
        1 => (yaml_key(), yaml_leaf()),
    ];
    (prop::collection::vec(entry, 0..5), any::<bool>()).prop_map(|(data, named)| {
        let mut manifest = serde_yaml::Mapping::new();
        manifest.insert("apiVersion".into(), "v1".into());
        manifest.insert("kind".into(), "ConfigMap".into());
        if named {
            let mut meta = serde_yaml::Mapping::new();
            meta.insert("name".into(), "llm-sidecar".into());
            meta.insert("namespace".into(), "apps".into());
            manifest.insert("metadata".into(), Yaml::Mapping(meta));
        }
        manifest.insert("data".into(), Yaml::Mapping(data.into_iter().collect()));
        Yaml::Mapping(manifest)
    })
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn any_configmap_manifest_is_checked_key_by_key(manifest in configmap_manifest()) {
        let text = serde_yaml::to_string(&manifest).unwrap();
        let env: HashMap<String, String> = HashMap::new();
        match layers::check(&text, ConfigSource::Embedded, &env) {
            Ok(snapshot) => check_usable(&snapshot)?,
            Err(err) => {
                prop_assert!(!err.0.is_empty());
                for e in &err.0 {
                    prop_assert!(!e.message.trim().is_empty(), "{:?}", e);
                    // `data.<key>`, or `data.config.yaml: <path in the routing YAML>`.
                    let key = e.path.strip_prefix("data.").unwrap_or_default();
                    let key = key.split_once(": ").map_or(key, |(k, _)| k);
                    let named = manifest["data"]
                        .as_mapping()
                        .is_some_and(|d| d.keys().any(|k| scalar_text(k).as_deref() == Some(key)));
                    prop_assert!(named, "{:?} names no key of the ConfigMap {}", e, text);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Injector

fn template(mode: &str) -> Template {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject/sidecar.yaml"),
    )
    .expect("the chart's sidecar template");
    Template::parse(&text.replace("mode: native", &format!("mode: {mode}"))).expect("template")
}

fn env_var() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            3 => Just(inject::BASE_URL_ENV),
            2 => Just(inject::API_KEY_ENV),
            1 => select(vec!["LOG_LEVEL", "openai_base_url", "A/B~C"]),
        ],
        prop_oneof![
            select(vec![
                "https://api.deepseek.com/v1",
                "http://127.0.0.1:4000/v1",
                ""
            ])
            .prop_map(|v| json!({"value": v})),
            Just(json!({"valueFrom": {"secretKeyRef": {"name": "keys", "key": "k"}}})),
            Just(json!({})),
        ],
    )
        .prop_map(|(name, mut var)| {
            var["name"] = json!(name);
            var
        })
}

/// `Some(list)`, `Some([])` or absent.
fn maybe_list<S: Strategy<Value = Value>>(
    item: S,
    max: usize,
) -> impl Strategy<Value = Option<Value>> {
    prop::option::of(prop::collection::vec(item, 0..max).prop_map(Value::Array))
}

fn container() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            20 => select(vec!["app", "worker", "migrate", "app"]),
            1 => Just("llm-sidecar"),
        ],
        maybe_list(env_var(), 5),
        maybe_list(Just(json!({"secretRef": {"name": "app-keys"}})), 2),
    )
        .prop_map(|(name, env, env_from)| {
            let mut c = json!({"name": name, "image": format!("registry.example/{name}:1")});
            if let Some(env) = env {
                c["env"] = env;
            }
            if let Some(env_from) = env_from {
                c["envFrom"] = env_from;
            }
            c
        })
}

/// `Some(map)` (possibly empty) or absent, its entries drawn from `entry`.
fn string_map(
    entry: impl Strategy<Value = (&'static str, &'static str)>,
) -> impl Strategy<Value = Option<Value>> {
    prop::option::of(
        prop::collection::vec(entry, 0..5)
            .prop_map(|kv| json!(kv.into_iter().collect::<std::collections::BTreeMap<_, _>>())),
    )
}

/// `key` with one of `values`.
fn entry(
    key: &'static str,
    values: Vec<&'static str>,
) -> impl Strategy<Value = (&'static str, &'static str)> {
    select(values).prop_map(move |v| (key, v))
}

/// A pod as the API server sends it: any containers, env, init containers, labels and
/// annotations, the injector's own keys among them with right and wrong values (mostly right,
/// so most pods get as far as the patch).
fn pod_json() -> impl Strategy<Value = Value> {
    let yes_no = || {
        vec![
            "true", "true", "true", " TRUE ", "false", " False ", "yes", "",
        ]
    };
    let label = prop_oneof![
        3 => entry(inject::INJECT, yes_no()),
        1 => entry("app", vec!["web"]),
        1 => entry("app.kubernetes.io/name", vec!["llm-sidecar", "web"]),
        1 => entry("app.kubernetes.io/component", vec!["injector", "api"]),
        1 => entry("a~b/c", vec!["x"]),
    ];
    let annotation = prop_oneof![
        4 => entry(inject::INJECT, yes_no()),
        1 => entry(
            inject::IMAGE,
            vec!["registry.example/llm-sidecar:2", "registry.example/x:1", "two words", " "],
        ),
        1 => entry(inject::RESOURCES, vec![r#"{"requests":{"cpu":"100m"}}"#, "{}", "lots"]),
        1 => entry(inject::CONFIGMAP, vec!["llm-sidecar-canary", "cm", "Bad_Name"]),
        1 => entry(inject::MODE, vec!["native", "container", " container", "sidecar"]),
        1 => entry("kubectl.kubernetes.io/default-container", vec!["app", "worker"]),
        2 => entry("team", vec!["search"]),
        1 => entry("a~b/c", vec!["x"]),
        // Already injected: rare.
        1 => entry(inject::STATUS, vec!["injected"]),
    ];
    (
        string_map(label),
        string_map(annotation),
        prop::option::weighted(
            0.95,
            (
                prop::collection::vec(container(), 0..4),
                maybe_list(container(), 3),
            ),
        ),
    )
        .prop_map(|(labels, annotations, spec)| {
            let mut metadata = json!({"generateName": "app-"});
            if let Some(l) = labels {
                metadata["labels"] = l;
            }
            if let Some(a) = annotations {
                metadata["annotations"] = a;
            }
            let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata});
            if let Some((containers, init)) = spec {
                pod["spec"] = json!({"containers": containers});
                if let Some(init) = init {
                    pod["spec"]["initContainers"] = init;
                }
            }
            pod
        })
}

/// RFC 6902 `add` and `replace` (all the injector emits), strictly: a missing parent, an index
/// past the end or a `replace` of nothing is an error, as on the API server.
fn apply(doc: &Value, patch: &[PatchOp]) -> Result<Value, String> {
    let mut doc = doc.clone();
    for op in patch {
        let (parent, last) = op
            .path
            .rsplit_once('/')
            .ok_or_else(|| format!("{}: not a pointer", op.path))?;
        let last = last.replace("~1", "/").replace("~0", "~");
        let target = doc
            .pointer_mut(parent)
            .ok_or_else(|| format!("{}: no {parent}", op.path))?;
        let index = |len: usize, past_end: bool| -> Result<usize, String> {
            let i: usize = last
                .parse()
                .map_err(|_| format!("{}: not an index", op.path))?;
            let ok = i < len || (past_end && i == len);
            ok.then_some(i)
                .ok_or_else(|| format!("{}: index past the end", op.path))
        };
        match (op.op.as_str(), target) {
            ("add", Value::Array(list)) if last == "-" => list.push(op.value.clone()),
            ("add", Value::Array(list)) => {
                let i = index(list.len(), true)?;
                list.insert(i, op.value.clone());
            }
            ("replace", Value::Array(list)) => {
                let i = index(list.len(), false)?;
                list[i] = op.value.clone();
            }
            ("add", Value::Object(map)) => {
                map.insert(last, op.value.clone());
            }
            ("replace", Value::Object(map)) if map.contains_key(&last) => {
                map.insert(last, op.value.clone());
            }
            (op_name, target) => return Err(format!("cannot {op_name} {} in {target}", op.path)),
        }
    }
    Ok(doc)
}

/// The value the kubelet gives a container's variable: the last entry of that name wins.
fn effective_env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .rev()
        .find(|e| e["name"] == name)
}

/// What the pod's own labels and annotations say about injection (a label beats an annotation).
fn opt_in(pod: &Value) -> Option<String> {
    let meta = &pod["metadata"];
    meta["labels"][inject::INJECT]
        .as_str()
        .or_else(|| meta["annotations"][inject::INJECT].as_str())
        .map(|v| v.trim().to_ascii_lowercase())
}

fn check_injection(
    doc: &Value,
    namespace: &str,
    scope: Scope,
    template: &Template,
) -> Result<(), TestCaseError> {
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(doc.clone())
        .map_err(|e| TestCaseError::fail(format!("the pod does not parse: {e}")))?;
    let decision = inject::review(&pod, namespace, scope, template);
    let opt = opt_in(doc);
    if opt.as_deref() == Some("false") {
        prop_assert!(
            matches!(decision, Decision::Skip(_)),
            "an opted-out pod: {:?}",
            decision
        );
    }
    if inject::SYSTEM_NAMESPACES.contains(&namespace) || (scope == Scope::Pod && opt.is_none()) {
        prop_assert!(matches!(decision, Decision::Skip(_)), "{:?}", decision);
    }
    let Decision::Inject { mode, patch } = decision else {
        return Ok(());
    };
    let patched = apply(doc, &patch).map_err(TestCaseError::fail)?;
    let again_pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(patched.clone())
        .map_err(|e| TestCaseError::fail(format!("the patched pod does not parse: {e}")))?;

    // Idempotent: a second pass changes nothing.
    match inject::review(&again_pod, namespace, scope, template) {
        Decision::Skip(_) => {}
        Decision::Inject { patch, .. } => {
            let twice = apply(&patched, &patch).map_err(TestCaseError::fail)?;
            prop_assert_eq!(&twice, &patched, "a second pass changed the pod");
        }
        Decision::Deny(why) => prop_assert!(false, "a second pass denied the pod: {}", why),
    }

    // The sidecar is there once, where the mode puts it; every app container points at it.
    let name = template.container.name.as_str();
    let (list, other) = match mode {
        inject::Mode::Native => ("initContainers", "containers"),
        inject::Mode::Container => ("containers", "initContainers"),
    };
    let count = |key: &str| {
        patched["spec"][key]
            .as_array()
            .map_or(0, |l| l.iter().filter(|c| c["name"] == name).count())
    };
    prop_assert_eq!((count(list), count(other)), (1, 0));
    let base_url = template.base_url();
    let apps = doc["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (i, app) in apps.iter().enumerate() {
        let now = &patched["spec"]["containers"][i];
        prop_assert_eq!(&now["name"], &app["name"]);
        let url = effective_env(now, inject::BASE_URL_ENV);
        prop_assert!(
            url.is_some_and(|u| u["value"] == base_url.as_str() && u.get("valueFrom").is_none()),
            "container {} still has {:?}",
            i,
            url
        );
        let has_key = effective_env(now, inject::API_KEY_ENV).is_some()
            || now["envFrom"].as_array().is_some_and(|f| !f.is_empty());
        prop_assert!(has_key, "container {} has no key", i);
    }
    prop_assert_eq!(
        &patched["metadata"]["annotations"][inject::STATUS],
        "injected"
    );
    for key in ["labels", "annotations"] {
        if let Some(before) = doc["metadata"][key].as_object() {
            for (k, v) in before {
                prop_assert_eq!(&patched["metadata"][key][k], v, "{}.{} changed", key, k);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn any_pod_is_injected_once_with_a_patch_that_applies(
        pod in pod_json(),
        namespace in prop_oneof![8 => select(vec!["apps", "default"]), 1 => Just("kube-system")],
        scope in prop_oneof![2 => Just(Scope::Namespace), 1 => Just(Scope::Pod)],
        mode in select(vec!["native", "container"]),
    ) {
        check_injection(&pod, namespace, scope, &template(mode))?;
    }
}

/// Inputs the properties once found wrong, kept as plain tests.
#[test]
fn configs_the_properties_found() {
    // A top-level key that is a mapping: rejected at the document's root.
    for text in ["? a:", "? [1, 2]\n: x"] {
        let doc = serde_yaml::from_str::<Yaml>(text).ok();
        check_config_text(text, doc.as_ref()).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    }
}
