//! The response cache through the real sidecar over real sockets: a hit after a miss (plain,
//! streamed, and a plain answer replayed as a stream), one upstream call for 50 identical
//! concurrent requests, what is never stored (errors, cut streams, content filters, requests
//! that are not deterministic), the client's controls, stale answers when every target failed
//! (inside `max_stale`, not beyond), the static fallback, and the size bound.

mod support;

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{json, Value};
use support::cache::{ask, config, content, request, stats, CACHED};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_after_a_miss_plain_streamed_and_replayed() {
    let fake = fake().await;
    let sidecar = sidecar(&config(&fake, "relay-model", "official-model", CACHED, "")).await;

    let (status, miss, first) = ask(&sidecar, request(false, "Say hello.", json!({})), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&miss, "x-llm-sidecar-cache"), "miss");
    assert_eq!(header(&miss, "x-llm-sidecar-provider"), "sheep");
    let (status, hit, second) = ask(
        &sidecar,
        request(false, "Say hello.", json!({"user": "bob"})),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(header(&hit, "x-llm-sidecar-cache"), "hit");
    assert_eq!(header(&hit, "x-llm-sidecar-path"), "cache");
    assert_eq!(header(&hit, "x-llm-sidecar-cost-usd"), "0");
    assert!(header(&hit, "age").parse::<u64>().is_ok());
    assert_eq!(first, second, "the same answer, byte for byte");
    assert_eq!(fake.requests_for("sheep").len(), 1);

    // A streaming client gets the stored plain answer as a valid stream.
    let (status, replayed, body) = ask(
        &sidecar,
        request(
            true,
            "Say hello.",
            json!({"stream_options": {"include_usage": true}}),
        ),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(header(&replayed, "x-llm-sidecar-cache"), "hit");
    assert_eq!(header(&replayed, "content-type"), "text/event-stream");
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(stream_text(&events), content(&first));
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(fake.requests_for("sheep").len(), 1);

    // A streamed answer is stored once it completed, and replayed to the next stream.
    let streamed = request(true, "Stream it.", json!({}));
    let (_, miss, live) = ask(&sidecar, streamed.clone(), &[]).await;
    assert_eq!(header(&miss, "x-llm-sidecar-cache"), "miss");
    let (_, hit, again) = ask(&sidecar, streamed, &[]).await;
    assert_eq!(header(&hit, "x-llm-sidecar-cache"), "hit");
    assert_eq!(
        stream_text(&sse_data(&again)),
        stream_text(&sse_data(&live))
    );
    assert!(
        !sse_data(&again).iter().any(|e| e.contains("\"usage\"")),
        "no usage chunk unless the client asked for it"
    );
    assert_eq!(fake.requests_for("sheep").len(), 2);

    let stats = stats(&sidecar).await;
    let route = &stats["cache"]["routes"]["chat"];
    assert_eq!(route["hits"], 3, "{stats}");
    assert_eq!(route["misses"], 2, "{stats}");
    assert!(route["savings_usd"].as_f64().unwrap() > 0.0, "{stats}");
    assert!(stats["cache"]["entries"].as_u64().unwrap() >= 1, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_identical_concurrent_requests_make_one_upstream_call() {
    let fake = fake().await;
    let text = config(
        &fake,
        "relay-model+gate=leader",
        "official-model",
        CACHED,
        "",
    );
    let sidecar = sidecar(&text).await;
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let addr = sidecar.data_addr;
            // Half of them stream: they wait for the same answer and get it replayed.
            let body = request(i % 2 == 0, "Say hello.", json!({}));
            tokio::spawn(async move {
                let (status, headers, body) =
                    call(&client(), post(addr, "/v1/chat/completions", body)).await;
                (status, headers, body)
            })
        })
        .collect();
    // All 50 are in the sidecar, one of them at the provider, before its answer is let out.
    eventually(Duration::from_secs(20), "50 requests in flight", || async {
        let text = metrics_text(&client(), sidecar.admin_addr).await;
        metric_value(&text, "llm_sidecar_in_flight_requests ") == Some(50.0)
    })
    .await;
    fake.release("leader");
    let answers: Vec<_> = join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(fake.requests_for("sheep").len(), 1, "one upstream call");
    let mut texts = Vec::new();
    for (status, headers, body) in &answers {
        assert_eq!(status.as_u16(), 200);
        let text = if header(headers, "content-type") == "text/event-stream" {
            stream_text(&sse_data(body))
        } else {
            content(body)
        };
        texts.push(text);
    }
    assert!(
        texts.iter().all(|t| t == &texts[0] && !t.is_empty()),
        "{texts:?}"
    );
    let hits = answers
        .iter()
        .filter(|(_, h, _)| header(h, "x-llm-sidecar-cache") == "hit")
        .count();
    assert_eq!(hits, 49);
    assert_eq!(
        stats(&sidecar).await["cache"]["routes"]["chat"]["coalesced"],
        49
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_cut_streams_content_filters_and_random_requests_are_never_stored() {
    let fake = fake().await;
    for (relay, official, stream) in [
        ("relay-model+error=500", "official-model+error=500", false),
        (
            "relay-model+tokens=20+cut=3",
            "official-model+no-prefill",
            true,
        ),
        (
            "relay-model+content-filter",
            "official-model+content-filter",
            false,
        ),
    ] {
        let sidecar = sidecar(&config(&fake, relay, official, CACHED, "")).await;
        let before = fake.requests().len();
        let (_, first, _) = ask(&sidecar, request(stream, "Say hello.", json!({})), &[]).await;
        let (_, second, _) = ask(&sidecar, request(stream, "Say hello.", json!({})), &[]).await;
        assert_eq!(header(&first, "x-llm-sidecar-cache"), "miss", "{relay}");
        assert_eq!(
            header(&second, "x-llm-sidecar-cache"),
            "miss",
            "{relay}: not stored"
        );
        assert!(
            fake.requests().len() >= before + 2,
            "{relay}: both asked a provider"
        );
    }
    // Not deterministic: bypass, both times.
    let sidecar = sidecar(&config(&fake, "relay-model", "official-model", CACHED, "")).await;
    for _ in 0..2 {
        let (status, headers, _) = ask(
            &sidecar,
            request(false, "Say hello.", json!({"temperature": 0.7})),
            &[],
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "x-llm-sidecar-cache"), "bypass");
    }
    let (_, headers, _) = ask(
        &sidecar,
        request(false, "Say hello.", json!({"temperature": 0.7, "seed": 7})),
        &[],
    )
    .await;
    assert_eq!(
        header(&headers, "x-llm-sidecar-cache"),
        "miss",
        "a seed makes it repeatable"
    );
    // A route without a cache says bypass too.
    let uncached = sidecar_for_uncached(&fake).await;
    let (_, headers, _) = ask(&uncached, request(false, "Say hello.", json!({})), &[]).await;
    assert_eq!(header(&headers, "x-llm-sidecar-cache"), "bypass");
}

async fn sidecar_for_uncached(fake: &FakeProvider) -> llm_sidecar::Sidecar {
    sidecar(&config(fake, "relay-model", "official-model", "", "")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_can_skip_refresh_or_refuse_storage() {
    let fake = fake().await;
    let sidecar = sidecar(&config(&fake, "relay-model", "official-model", CACHED, "")).await;
    let body = || request(false, "Say hello.", json!({}));
    let (_, h, _) = ask(&sidecar, body(), &[("cache-control", "no-store")]).await;
    assert_eq!(header(&h, "x-llm-sidecar-cache"), "bypass");
    let (_, h, _) = ask(&sidecar, body(), &[]).await;
    assert_eq!(
        header(&h, "x-llm-sidecar-cache"),
        "miss",
        "no-store stored nothing"
    );
    let (_, h, _) = ask(&sidecar, body(), &[("x-llm-sidecar-cache", "skip")]).await;
    assert_eq!(header(&h, "x-llm-sidecar-cache"), "bypass");
    let (_, h, _) = ask(&sidecar, body(), &[("x-llm-sidecar-cache", "refresh")]).await;
    assert_eq!(header(&h, "x-llm-sidecar-cache"), "miss");
    let (_, h, _) = ask(&sidecar, body(), &[]).await;
    assert_eq!(header(&h, "x-llm-sidecar-cache"), "hit");
    assert_eq!(
        fake.requests_for("sheep").len(),
        4,
        "no-store, the first miss, skip and refresh each asked the provider; the hit did not"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_target_down_serves_a_stale_answer_inside_max_stale_then_the_static_fallback() {
    let fake = fake().await;
    // Fresh for 1 ms, kept for a day: the next answer from it is stale.
    let cache = "cache: { ttl: 1ms, max_stale: 24h }\n    static_fallback: 'The assistant is unavailable; try again shortly.'";
    let running = file_sidecar(&config(&fake, "relay-model", "official-model", cache, "")).await;
    let sidecar = &running.sidecar;
    let (_, _, stored) = ask(sidecar, request(false, "Say hello.", json!({})), &[]).await;

    running
        .reload(&config(
            &fake,
            "relay-model+error=503",
            "official-model+error=500",
            cache,
            "",
        ))
        .await;
    let (status, headers, body) = ask(sidecar, request(false, "Say hello.", json!({})), &[]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&headers, "x-llm-sidecar-cache"), "stale");
    assert_eq!(body, stored, "the stored answer, not a new one");
    let (status, headers, body) = ask(sidecar, request(true, "Say hello.", json!({})), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-llm-sidecar-cache"), "stale");
    assert_eq!(stream_text(&sse_data(&body)), content(&stored));

    // Nothing stored for this one: the static fallback, marked as such.
    let other = request(false, "Other.", json!({}));
    let (status, headers, body) = ask(sidecar, other, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-llm-sidecar-path"), "static");
    assert_eq!(
        content(&body),
        "The assistant is unavailable; try again shortly."
    );

    let metrics = metrics_text(&client(), sidecar.admin_addr).await;
    assert_eq!(
        metric_value(
            &metrics,
            "llm_sidecar_cache_lookups_total{route=\"chat\",result=\"stale\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "llm_sidecar_cache_static_fallbacks_total{route=\"chat\"}"
        ),
        Some(1.0)
    );
    assert!(
        metrics.contains("outcome=\"stale\""),
        "counted as stale requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_stale_and_without_a_static_fallback_the_error_is_the_answer() {
    let fake = fake().await;
    let cache = "cache: { ttl: 1ms, max_stale: 200ms }";
    let running = file_sidecar(&config(&fake, "relay-model", "official-model", cache, "")).await;
    let sidecar = &running.sidecar;
    let (status, _, _) = ask(sidecar, request(false, "Say hello.", json!({})), &[]).await;
    assert_eq!(status, 200);
    running
        .reload(&config(
            &fake,
            "relay-model+error=503",
            "official-model+error=500",
            cache,
            "",
        ))
        .await;
    // Waiting for the stored answer to pass max_stale (a lower bound on time, not a race).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, headers, body) = ask(sidecar, request(false, "Say hello.", json!({})), &[]).await;
    assert!(
        status >= 500,
        "{status}: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(header(&headers, "x-llm-sidecar-cache"), "miss");
    assert_eq!(
        header(&headers, "x-llm-sidecar-error"),
        "all_targets_failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_size_bound_evicts_by_bytes() {
    let fake = fake().await;
    let text = config(
        &fake,
        "relay-model+tokens=200",
        "official-model",
        CACHED,
        "cache: { max_bytes: 8KiB }",
    );
    let sidecar = sidecar(&text).await;
    for i in 0..40 {
        let body = request(false, &format!("question {i}"), json!({}));
        let (status, _, _) = ask(&sidecar, body, &[]).await;
        assert_eq!(status, 200);
    }
    eventually(Duration::from_secs(10), "evictions counted", || async {
        let stats = stats(&sidecar).await;
        stats["cache"]["evictions"].as_u64().unwrap_or(0) > 0
    })
    .await;
    let stats = stats(&sidecar).await;
    assert!(
        stats["cache"]["bytes"].as_u64().unwrap() <= 8 * 1024,
        "{stats}"
    );
    assert!(stats["cache"]["entries"].as_u64().unwrap() < 40, "{stats}");
}
