//! What an app or a provider may send that must not get past the sidecar: paths that leave
//! `/v1/`, duplicate JSON keys, an upstream's HTTP version, and a client that stops reading a
//! stream. Requests go raw over a socket so no client library normalises them first.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::*;

/// A raw HTTP/1.1 exchange: the request as written, the answer as read to the connection's end.
async fn raw(addr: std::net::SocketAddr, head: &str, body: &str) -> RawAnswer {
    let mut socket = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{head}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    socket.read_to_end(&mut answer).await.expect("read");
    RawAnswer::parse(&answer)
}

struct RawAnswer {
    status_line: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl RawAnswer {
    fn parse(bytes: &[u8]) -> RawAnswer {
        let text = String::from_utf8_lossy(bytes);
        let (head, body) = text.split_once("\r\n\r\n").expect("a whole response head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default().to_string();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        RawAnswer {
            status_line,
            headers,
            body: body.to_string(),
        }
    }

    /// Fails the test unless the answer is HTTP/1.1 with `status`; `what` says which request.
    fn expect_status(&self, status: u16, what: &str) {
        assert!(
            self.status_line.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {}",
            self.status_line
        );
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }

    /// The OpenAI error JSON of a sidecar-made error; the body is not chunked (its length is known).
    fn error(&self) -> serde_json::Value {
        let json: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("error body is JSON ({e}): {}", self.body));
        assert!(json["error"]["message"].is_string(), "{json}");
        assert!(json["error"]["type"].is_string(), "{json}");
        json
    }
}

#[tokio::test]
async fn paths_that_leave_v1_are_refused_before_anything_goes_upstream() {
    let fake = fake().await;
    let sidecar = sidecar(&config(&fake, true)).await;
    for path in [
        "/v1/../../etc/passwd",
        "/v1/%2e%2e/%2e%2e/x",
        "/v1/%2E%2E/%2e%2E/x",
        "/v1/files/..%2f..%2fx",
        "/v1/./../secret",
        "/v1/files/%5c..%5c..%5csecret",
        "/v1/files/a%00b",
        "/v1/files/a%0d%0aX-Injected:%201",
        "/v1/../v1/../../admin",
        "/v1/files/%zz",
    ] {
        for method in ["GET", "POST"] {
            let answer = raw(
                sidecar.data_addr,
                &format!("{method} {path} HTTP/1.1"),
                "{}",
            )
            .await;
            answer.expect_status(400, &format!("{method} {path}"));
            assert_eq!(
                answer.header("x-llm-sidecar-error"),
                "invalid_path",
                "{path}"
            );
            assert_eq!(answer.error()["error"]["code"], "invalid_path", "{path}");
            assert_eq!(answer.header("x-injected"), "", "{path}");
        }
    }
    assert!(
        fake.requests().is_empty(),
        "the upstream saw {:?}",
        fake.requests()
            .iter()
            .map(|r| r.path.clone())
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn dot_segments_inside_v1_are_resolved_before_the_path_is_forwarded() {
    let fake = fake().await;
    let sidecar = sidecar(&config(&fake, true)).await;
    let answer = raw(
        sidecar.data_addr,
        "GET /v1/files/./tmp/../file-1/%63ontent?purpose=x HTTP/1.1",
        "",
    )
    .await;
    answer.expect_status(200, "");
    let seen = fake.requests_for("sheep");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/files/file-1/content");
    // The model endpoints are found by their normalised path too.
    let answer = raw(
        sidecar.data_addr,
        "POST /v1/./chat/completions HTTP/1.1",
        &chat_body("chat", false),
    )
    .await;
    answer.expect_status(200, "");
    assert_eq!(answer.header("x-llm-sidecar-route"), "chat");
}

#[tokio::test]
async fn a_passthrough_allowlist_refuses_the_other_paths() {
    let fake = fake().await;
    let config = format!(
        "{}passthrough:\n  paths: [\"/v1/files*\", \"/v1/batches\"]\n",
        config(&fake, true)
    );
    let sidecar = sidecar(&config).await;
    for (path, status) in [
        ("/v1/files", 200),
        ("/v1/files/file-1/content", 200),
        ("/v1/batches", 200),
        ("/v1/batches/b-1", 403),
        ("/v1/assistants", 403),
    ] {
        let answer = raw(sidecar.data_addr, &format!("GET {path} HTTP/1.1"), "").await;
        answer.expect_status(status, path);
        if status == 403 {
            assert_eq!(answer.header("x-llm-sidecar-error"), "path_not_allowed");
            let message = answer.error()["error"]["message"].to_string();
            assert!(message.contains("/v1/files*"), "{message}");
        }
    }
    // The model endpoints are not pass-through: the allowlist does not apply to them.
    let (status, _, _) = ask(&sidecar, "chat", false).await;
    assert_eq!(status, 200);
    let forwarded: Vec<String> = fake.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        forwarded,
        [
            "/v1/files",
            "/v1/files/file-1/content",
            "/v1/batches",
            "/v1/chat/completions"
        ]
    );
}

#[tokio::test]
async fn a_duplicate_top_level_key_is_a_400_naming_it_in_both_orders() {
    let fake = fake().await;
    let sidecar = sidecar(&config(&fake, true)).await;
    for (path, body, key) in [
        (
            "/v1/chat/completions",
            r#"{"model":"chat","model":"embed","messages":[{"role":"user","content":"hi"}]}"#,
            "model",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"embed","messages":[{"role":"user","content":"hi"}],"model":"chat"}"#,
            "model",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"chat","stream":false,"messages":[],"stream":true}"#,
            "stream",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"chat","max_tokens":1,"messages":[],"max_tokens":900000}"#,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"chat","user":"a","messages":[],"user":"b"}"#,
            "user",
        ),
        // A pass-through call with a JSON body is held to the same rule.
        (
            "/v1/responses",
            r#"{"model":"chat","input":"x","model":"embed"}"#,
            "model",
        ),
    ] {
        let answer = raw(sidecar.data_addr, &format!("POST {path} HTTP/1.1"), body).await;
        answer.expect_status(400, body);
        assert_eq!(answer.header("x-llm-sidecar-error"), "invalid_request");
        let message = answer.error()["error"]["message"].to_string();
        assert!(
            message.contains(&format!("`{key}` more than once")),
            "{message}"
        );
    }
    assert!(fake.requests().is_empty());
}

/// A provider on a raw socket: for each connection, reads the request and lets `answer` write
/// whatever bytes it likes.
async fn raw_upstream<F, Fut>(answer: F) -> std::net::SocketAddr
where
    F: Fn(TcpStream) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                read_request(&mut socket).await;
                answer(socket).await
            });
        }
    });
    addr
}

/// A provider that answers every request with an HTTP/1.0 response and closes the connection.
async fn http10_upstream() -> std::net::SocketAddr {
    raw_upstream(|mut socket| async move {
        let body = r#"{"id":"c1","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"old"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let answer = format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{body}");
        let _ = socket.write_all(answer.as_bytes()).await;
    })
    .await
}

/// Reads one request (head and a `Content-Length` body) off a raw connection.
async fn read_request(socket: &mut TcpStream) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let Ok(n) = socket.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= length {
                return;
            }
        }
    }
}

fn one_provider_config(addr: std::net::SocketAddr) -> String {
    format!(
        "providers:\n  raw: {{ kind: relay, base_url: 'http://{addr}/v1' }}\nroutes:\n  chat:\n    relay: {{ provider: raw, model: m }}\n"
    )
}

#[tokio::test]
async fn an_http10_upstream_is_answered_to_an_http11_client_in_http11() {
    let upstream = http10_upstream().await;
    let sidecar = sidecar(&one_provider_config(upstream)).await;
    let answer = raw(
        sidecar.data_addr,
        "POST /v1/chat/completions HTTP/1.1",
        &chat_body("chat", false),
    )
    .await;
    answer.expect_status(200, "");
    assert!(answer.body.contains("\"old\""), "{}", answer.body);
    // The same through a client library, which exposes the version it parsed.
    let response = send(
        &client(),
        post(
            sidecar.data_addr,
            "/v1/chat/completions",
            chat_body("chat", false),
        ),
    )
    .await;
    assert_eq!(response.version(), http::Version::HTTP_11);
    assert_eq!(response.status(), 200);
}

/// A provider that streams an endless answer as fast as its socket takes it, counting what it
/// wrote and noting when its peer went away.
struct Firehose {
    addr: std::net::SocketAddr,
    written: Arc<AtomicU64>,
    closed: Arc<AtomicBool>,
}

async fn firehose() -> Firehose {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let written = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicBool::new(false));
    let (w, c) = (written.clone(), closed.clone());
    tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        read_request(&mut socket).await;
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
        if socket.write_all(head.as_bytes()).await.is_err() {
            c.store(true, Ordering::SeqCst);
            return;
        }
        let word = "x".repeat(1000);
        let event = format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}}}}]}}\n\n"
        );
        let chunk = format!("{:x}\r\n{event}\r\n", event.len());
        // Far more than any buffer on the way: 1 GiB unless someone holds it back.
        for _ in 0..(1u64 << 30) / chunk.len() as u64 {
            if socket.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
            w.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        c.store(true, Ordering::SeqCst);
    });
    Firehose {
        addr,
        written,
        closed,
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_holds_back_the_provider_and_releases_it_on_leaving() {
    let upstream = firehose().await;
    let sidecar = sidecar(&one_provider_config(upstream.addr)).await;
    let mut socket = TcpStream::connect(sidecar.data_addr)
        .await
        .expect("connect");
    let body = chat_body("chat", true);
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.expect("write");
    // Read until the first token arrived, then stop reading.
    let mut first = vec![0u8; 64 * 1024];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("data: ") {
        let n = socket.read(&mut first).await.expect("read");
        assert!(n > 0, "the stream ended before its first event");
        got.extend_from_slice(&first[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));

    // The provider is held back by the sidecar: its writes stop growing well short of the answer.
    let mut last = u64::MAX;
    let mut steady = 0;
    while steady < 5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = upstream.written.load(Ordering::SeqCst);
        steady = if now == last { steady + 1 } else { 0 };
        last = now;
        assert!(
            now < 64 << 20,
            "the sidecar took {now} bytes from the provider for a client that reads nothing"
        );
    }
    assert!(!upstream.closed.load(Ordering::SeqCst));

    // The client goes away: the sidecar drops the provider's connection instead of pooling a
    // half-read answer.
    drop(socket);
    eventually(
        Duration::from_secs(10),
        "the provider's connection closed",
        || async { upstream.closed.load(Ordering::SeqCst) },
    )
    .await;
}

/// A provider that can be taken down and brought back: while down, every request (the
/// sidecar's probes included) gets a 503. Counts the chat requests and the probes it saw.
struct Switchable {
    addr: std::net::SocketAddr,
    down: Arc<AtomicBool>,
    chats: Arc<AtomicU64>,
    probes: Arc<AtomicU64>,
}

async fn switchable() -> Switchable {
    use http_body_util::Full;
    use hyper::service::service_fn;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let down = Arc::new(AtomicBool::new(true));
    let chats = Arc::new(AtomicU64::new(0));
    let probes = Arc::new(AtomicU64::new(0));
    let state = (down.clone(), chats.clone(), probes.clone());
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (down, chats, probes) = state.clone();
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let counter = if req.uri().path().ends_with("/models") {
                    &probes
                } else {
                    &chats
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let (status, body) = if down.load(Ordering::SeqCst) {
                    (503, r#"{"error":{"message":"down","type":"server_error"}}"#)
                } else {
                    (
                        200,
                        r#"{"id":"c1","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"back"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#,
                    )
                };
                let response = http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Full::new(bytes::Bytes::from_static(body.as_bytes())));
                async move { response }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(socket), service),
            );
        }
    });
    Switchable {
        addr,
        down,
        chats,
        probes,
    }
}

#[tokio::test]
async fn a_primary_that_recovers_gets_its_traffic_back_from_the_background_probe() {
    let primary = switchable().await;
    let fake = fake().await;
    let config = format!(
        "resilience: {{ attempts_per_target: 1, breaker_failures: 3, breaker_cooldown: 200ms }}
providers:
  sheep: {{ kind: relay, base_url: 'http://{}/v1' }}
  deep: {{ kind: official, base_url: {}, api_key: {{ env: TEST_OFFICIAL_KEY }} }}
routes:
  chat:
    relay: {{ provider: sheep, model: m }}
    official: {{ provider: deep, model: official-model }}
",
        primary.addr,
        fake.base_url("deep")
    );
    let sidecar = sidecar(&config).await;
    let served_by =
        |headers: &http::HeaderMap| header(headers, "x-llm-sidecar-provider").to_string();

    // Down: every answer comes from the fallback while the sidecar probes in the background.
    eventually(
        Duration::from_secs(20),
        "three background probes failed",
        || async {
            let (status, headers, _) = ask(&sidecar, "chat", false).await;
            assert_eq!((status, served_by(&headers).as_str()), (200, "deep"));
            primary.probes.load(Ordering::SeqCst) >= 3
        },
    )
    .await;
    // The three requests that opened the breaker; no user request paid for a probe since.
    assert_eq!(primary.chats.load(Ordering::SeqCst), 3);

    primary.down.store(false, Ordering::SeqCst);
    eventually(
        Duration::from_secs(20),
        "the primary answers again",
        || async {
            let (status, headers, _) = ask(&sidecar, "chat", false).await;
            assert_eq!(status, 200);
            served_by(&headers) == "sheep"
        },
    )
    .await;
    let text = metrics_text(&client(), sidecar.admin_addr).await;
    assert_eq!(
        metric_value(&text, r#"llm_sidecar_breaker_state{target="sheep/m"}"#),
        Some(0.0),
        "{text}"
    );
}

#[tokio::test]
async fn an_oversized_request_head_is_refused_before_it_reaches_a_provider() {
    let fake = fake().await;
    let sidecar = sidecar(&config(&fake, true)).await;
    let big = "a".repeat(80 * 1024);
    let answer = raw(
        sidecar.data_addr,
        &format!("POST /v1/chat/completions HTTP/1.1\r\nX-Big: {big}"),
        &chat_body("chat", false),
    )
    .await;
    answer.expect_status(431, "");
    let many: String = (0..150).map(|i| format!("\r\nX-H{i}: v")).collect();
    let answer = raw(
        sidecar.data_addr,
        &format!("POST /v1/chat/completions HTTP/1.1{many}"),
        &chat_body("chat", false),
    )
    .await;
    answer.expect_status(431, "");
    assert!(fake.requests().is_empty());
}

/// A provider whose stream starts an event and never ends it.
async fn endless_event_upstream() -> std::net::SocketAddr {
    raw_upstream(|mut socket| async move {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
        if socket.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let piece = format!("data: {}", "x".repeat(64 * 1024));
        let chunk = format!("{:x}\r\n{piece}\r\n", piece.len());
        // 64 MiB at most, if nobody stops reading.
        for _ in 0..1024 {
            if socket.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_stream_event_that_never_ends_is_a_broken_stream_not_an_unbounded_buffer() {
    let endless = endless_event_upstream().await;
    let fake = fake().await;
    let config = format!(
        "providers:
  sheep: {{ kind: relay, base_url: 'http://{endless}/v1' }}
  deep: {{ kind: official, base_url: {}, api_key: {{ env: TEST_OFFICIAL_KEY }} }}
routes:
  chat:
    relay: {{ provider: sheep, model: m }}
    official: {{ provider: deep, model: official-model }}
",
        fake.base_url("deep")
    );
    let sidecar = sidecar(&config).await;
    let (status, headers, body) = ask(&sidecar, "chat", true).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-llm-sidecar-provider"), "deep");
    assert_eq!(
        header(&headers, "x-llm-sidecar-attempt-log"),
        "sheep/m=connection_error,sheep/m=connection_error,deep/official-model=ok",
        "cut off at the cap (a transient failure, retried once), not waited on until a timeout"
    );
    assert_eq!(sse_data(&body).last().map(String::as_str), Some("[DONE]"));
}
