//! Config hot-swap and shutdown as a user sees them: a file edit flips routing under load with
//! no failed or split request, an invalid edit is rejected while the last good config serves, and
//! SIGTERM-style shutdown lets an in-flight stream finish.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipping_the_routing_flag_under_load_fails_no_request_and_splits_none() {
    let fake = fake().await;
    let running = file_sidecar(&config(&fake, true)).await;
    let addr = running.sidecar.data_addr;
    let stop = Arc::new(AtomicBool::new(false));

    let mut workers = Vec::new();
    for worker in 0..8 {
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let client = client();
            let (mut relay, mut official, mut failures) = (0u32, 0u32, Vec::new());
            let mut seen_official = false;
            // Bounded: the flip is seen long before this many requests.
            for i in 0..5_000u32 {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let stream = i % 2 == 0;
                let response = client
                    .request(post(
                        addr,
                        "/v1/chat/completions",
                        chat_body("chat", stream),
                    ))
                    .await;
                let response = match response {
                    Ok(r) => r,
                    Err(e) => {
                        failures.push(format!("worker {worker} request {i}: {e}"));
                        continue;
                    }
                };
                let status = response.status();
                let provider = header(response.headers(), "x-llm-sidecar-provider").to_string();
                let body = match response.into_body().collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => {
                        failures.push(format!("worker {worker} request {i}: body {e}"));
                        continue;
                    }
                };
                let text = if stream {
                    let events = sse_data(&body);
                    if events.last().map(String::as_str) != Some("[DONE]") {
                        failures.push(format!(
                            "worker {worker} request {i}: stream without [DONE]"
                        ));
                    }
                    stream_text(&events)
                } else {
                    serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| {
                            v["choices"][0]["message"]["content"]
                                .as_str()
                                .map(str::to_string)
                        })
                        .unwrap_or_default()
                };
                if status != 200 {
                    failures.push(format!("worker {worker} request {i}: status {status}"));
                }
                // The headers and the answer must come from the same side.
                if !text.starts_with(&format!("Hello from {provider}.")) {
                    failures.push(format!(
                        "worker {worker} request {i}: header {provider} but answer {text:?}"
                    ));
                }
                match provider.as_str() {
                    "sheep" if seen_official => failures.push(format!(
                        "worker {worker} request {i}: back on the relay after the flip"
                    )),
                    "sheep" => relay += 1,
                    "deep" => {
                        seen_official = true;
                        official += 1
                    }
                    other => {
                        failures.push(format!("worker {worker} request {i}: provider {other:?}"))
                    }
                }
            }
            (relay, official, failures)
        }));
    }

    eventually(
        Duration::from_secs(10),
        "traffic flows through the relay",
        || async { fake.requests_for("sheep").len() >= 40 },
    )
    .await;
    write_atomically(&running.path, &config(&fake, false));
    eventually(
        Duration::from_secs(10),
        "traffic moves to the official provider",
        || async { fake.requests_for("deep").len() >= 80 },
    )
    .await;
    stop.store(true, Ordering::Release);

    let (mut relay, mut official) = (0, 0);
    for worker in workers {
        let (r, o, failures) = worker.await.expect("worker finishes");
        assert!(failures.is_empty(), "{failures:#?}");
        relay += r;
        official += o;
    }
    assert!(
        relay >= 40 && official >= 80,
        "relay {relay}, official {official}"
    );
    assert_eq!(running.sidecar.store.load().generation, 2);
}

#[tokio::test]
async fn an_invalid_edit_is_rejected_and_the_last_good_config_keeps_serving() {
    let fake = fake().await;
    let running = file_sidecar(&config(&fake, true)).await;
    let (data, admin) = (running.sidecar.data_addr, running.sidecar.admin_addr);
    let client = client();

    let broken = config(&fake, false).replace("provider: deep", "provider: deeep");
    write_atomically(&running.path, &broken);
    eventually(
        Duration::from_secs(5),
        "the rejection shows in /metrics",
        || async {
            metric_value(
                &metrics_text(&client, admin).await,
                r#"llm_sidecar_config_rejections_total{source="file"}"#,
            ) == Some(1.0)
        },
    )
    .await;

    let (_, _, shown) = call_json(&client, get(admin, "/config")).await;
    assert_eq!(shown["generation"], 1);
    let reason = shown["last_rejection"]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(
        reason.contains("routes.chat.official.provider: unknown provider `deeep`"),
        "{reason}"
    );
    // Still the old config: routing enabled, so the relay answers.
    let (status, headers, _) = call(
        &client,
        post(data, "/v1/chat/completions", chat_body("chat", false)),
    )
    .await;
    assert_eq!(
        (status.as_u16(), header(&headers, "x-llm-sidecar-provider")),
        (200, "sheep")
    );
    assert_eq!(header(&headers, "x-llm-sidecar-config-generation"), "1");

    // A later valid edit is applied as usual.
    write_atomically(&running.path, &config(&fake, false));
    eventually(
        Duration::from_secs(5),
        "the fixed config is applied",
        || async { running.sidecar.store.load().generation == 2 },
    )
    .await;
    let (_, headers, _) = call(
        &client,
        post(data, "/v1/chat/completions", chat_body("chat", false)),
    )
    .await;
    assert_eq!(header(&headers, "x-llm-sidecar-provider"), "deep");
    let text = metrics_text(&client, admin).await;
    assert_eq!(
        metric_value(&text, "llm_sidecar_config_generation "),
        Some(2.0),
        "{text}"
    );
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_stream_finish_and_refuses_new_connections() {
    let fake = fake().await;
    let extra = "  gated:\n    relay: { provider: sheep, model: gate=drain }\n";
    let sidecar = sidecar(&config_with(&fake, true, extra)).await;
    let (data, admin) = (sidecar.data_addr, sidecar.admin_addr);
    let client = client();

    let response = send(
        &client,
        post(data, "/v1/chat/completions", chat_body("gated", true)),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.expect("first frame").expect("frame ok");
    assert!(first.is_data());

    sidecar.shutdown();
    eventually(
        Duration::from_secs(5),
        "new connections are refused",
        || async { tokio::net::TcpStream::connect(data).await.is_err() },
    )
    .await;
    let (status, _, _) = call(&client, get(admin, "/ready")).await;
    assert_eq!(status, 503, "not ready while draining");

    fake.release("drain");
    let rest = body
        .collect()
        .await
        .expect("the stream completes")
        .to_bytes();
    assert_eq!(sse_data(&rest).last().map(String::as_str), Some("[DONE]"));
    assert!(sidecar.wait().await, "drained within the grace period");
}
