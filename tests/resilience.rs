//! Failover as a client sees it, one fault at a time, against the fake provider: what the client
//! got, how many attempts each target saw and when, and how long it took.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Relay `sheep`, official `deep`, and official `twin`, which the fake answers with the same
/// text as `sheep` so a continuation can pick up where a cut stream stopped.
fn resilient(fake: &FakeProvider, routes: &str, resilience: &str) -> String {
    format!(
        "timeouts:
  response_headers: 300ms
resilience:
  backoff_base: 10ms
  backoff_max: 1500ms
  first_token_timeout: 300ms
  stream_idle_timeout: 300ms
  breaker_cooldown: 500ms
  {resilience}
providers:
  sheep: {{ kind: relay, base_url: {sheep}, api_key: {{ env: TEST_RELAY_KEY }} }}
  deep: {{ kind: official, base_url: {deep}, api_key: {{ env: TEST_OFFICIAL_KEY }} }}
  twin: {{ kind: official, base_url: {sheep}, api_key: {{ env: TEST_OFFICIAL_KEY }} }}
routes:
{routes}",
        sheep = fake.base_url("sheep"),
        deep = fake.base_url("deep"),
    )
}

/// A route `chat` with the given relay model and a healthy official fallback.
fn relay_fault(fake: &FakeProvider, relay_model: &str) -> String {
    resilient(
        fake,
        &format!(
            "  chat:\n    relay: {{ provider: sheep, model: '{relay_model}' }}\n    official: {{ provider: deep, model: official-model }}\n"
        ),
        "",
    )
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("JSON body: {}", String::from_utf8_lossy(body)))
}

fn content(body: &[u8]) -> String {
    json(body)["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn full_answer(label: &str, words: usize) -> String {
    let mut text = format!("Hello from {label}.");
    for i in 1..=words {
        text.push_str(&format!(" w{i}"));
    }
    text
}

fn gap(requests: &[fake_provider::SeenRequest]) -> Duration {
    requests[1].at.duration_since(requests[0].at)
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_on_the_same_target() {
    let fake = fake().await;
    let sidecar = sidecar(&relay_fault(&fake, "fail-times=1+rate-limit=1")).await;
    let (status, headers, body) = ask(&sidecar, "chat", false).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-llm-sidecar-provider"), "sheep");
    assert_eq!(header(&headers, "x-llm-sidecar-attempts"), "2");
    assert!(content(&body).starts_with("Hello from sheep."));
    let relay = fake.requests_for("sheep");
    assert_eq!(relay.len(), 2);
    assert!(
        gap(&relay) >= Duration::from_millis(950),
        "Retry-After honoured: {:?}",
        gap(&relay)
    );
    // Waited out on the same target, not failed over.
    assert!(fake.requests_for("deep").is_empty());
}

#[tokio::test]
async fn a_persistent_429_fails_over_without_hammering() {
    let fake = fake().await;
    let sidecar = sidecar(&relay_fault(&fake, "rate-limit=1")).await;
    let (status, headers, _) = ask(&sidecar, "chat", false).await;
    assert_eq!(
        (status, header(&headers, "x-llm-sidecar-provider")),
        (200, "deep")
    );
    assert_eq!(header(&headers, "x-llm-sidecar-reason"), "fallback");
    let relay = fake.requests_for("sheep");
    assert_eq!(relay.len(), 2, "bounded attempts on a rate-limited target");
    assert!(gap(&relay) >= Duration::from_millis(950));
}

#[tokio::test]
async fn when_every_target_is_rate_limited_the_request_waits_once_then_reports_the_429() {
    let fake = fake().await;
    let routes = "  chat:\n    relay: { provider: sheep, model: 'rate-limit=1' }\n    official: { provider: deep, model: 'rate-limit=1' }\n";
    let sidecar = sidecar(&resilient(&fake, routes, "")).await;
    let (status, headers, body) = ask(&sidecar, "chat", false).await;
    assert_eq!(status, 429);
    assert_eq!(
        header(&headers, "x-llm-sidecar-error"),
        "all_targets_failed"
    );
    let body = json(&body);
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["attempts"].as_array().map(Vec::len), Some(5));
    let relay = fake.requests_for("sheep");
    assert_eq!(relay.len(), 3, "two tries, then one more after waiting");
    assert_eq!(fake.requests_for("deep").len(), 2);
    for pair in relay.windows(2) {
        assert!(
            gap(pair) >= Duration::from_millis(950),
            "Retry-After honoured between tries"
        );
    }
    // The one wait is for the soonest limit: the relay's, after the official tries.
    let last_official = fake.requests_for("deep").last().map(|r| r.at);
    assert!(last_official.is_some_and(|at| relay[2].at > at));
}

#[tokio::test]
async fn a_500_once_is_retried_on_the_same_target() {
    let fake = fake().await;
    let sidecar = sidecar(&relay_fault(&fake, "fail-times=1")).await;
    let (status, headers, body) = ask(&sidecar, "chat", false).await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "x-llm-sidecar-attempt-log"),
        "sheep/fail-times=1=server_error,sheep/fail-times=1=ok"
    );
    assert_eq!(header(&headers, "x-llm-sidecar-fallbacks"), "0");
    assert!(content(&body).starts_with("Hello from sheep."));
}

#[tokio::test]
async fn a_persistent_503_fails_over_after_one_retry_and_the_fallback_is_accounted() {
    let fake = fake().await;
    let sidecar = sidecar(&relay_fault(&fake, "error=503")).await;
    let (status, headers, body) = ask(&sidecar, "chat", false).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-llm-sidecar-provider"), "deep");
    assert_eq!(
        header(&headers, "x-llm-sidecar-upstream-model"),
        "official-model"
    );
    assert_eq!(header(&headers, "x-llm-sidecar-attempts"), "3");
    assert_eq!(header(&headers, "x-llm-sidecar-fallbacks"), "1");
    let body = json(&body);
    assert_eq!(body["model"], "official-model", "the model that answered");
    assert!(body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .starts_with("Hello from deep."));
    assert!(
        body["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0,
        "the fallback's usage"
    );
    assert_eq!(fake.requests_for("sheep").len(), 2);
}

#[tokio::test]
async fn a_reset_before_headers_is_retried_then_failed_over() {
    let fake = fake().await;
    let sidecar = sidecar(&relay_fault(&fake, "reset")).await;
    let (status, headers, _) = ask(&sidecar, "chat", false).await;
    assert_eq!(
        (status, header(&headers, "x-llm-sidecar-provider")),
        (200, "deep")
    );
    assert_eq!(fake.requests_for("sheep").len(), 2);
}

#[tokio::test]
async fn a_silent_target_is_abandoned_at_once_for_the_fallback() {
    let fake = fake().await;
    let sidecar = sidecar(&relay_fault(&fake, "silent")).await;
    let (status, headers, _) = ask(&sidecar, "chat", false).await;
    assert_eq!(
        (status, header(&headers, "x-llm-sidecar-provider")),
        (200, "deep")
    );
    assert_eq!(
        fake.requests_for("sheep").len(),
        1,
        "a silent target is not retried"
    );
    assert_eq!(
        header(&headers, "x-llm-sidecar-attempt-log"),
        "sheep/silent=timeout,deep/official-model=ok"
    );
}

#[tokio::test]
async fn a_slow_first_token_fails_over_within_the_deadline() {
    let fake = fake().await;
    let sidecar = sidecar(&relay_fault(&fake, "slow-first-token=3000")).await;
    let (status, headers, body) = ask(&sidecar, "chat", true).await;
    assert_eq!(
        (status, header(&headers, "x-llm-sidecar-provider")),
        (200, "deep")
    );
    let events = sse_data(&body);
    assert_eq!(stream_text(&events), full_answer("deep", 12));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    // Abandoned at its first-token deadline, once, not waited out.
    assert_eq!(
        header(&headers, "x-llm-sidecar-attempt-log"),
        "sheep/slow-first-token=3000=timeout,deep/official-model=ok"
    );
    assert_eq!(fake.requests_for("sheep").len(), 1);
}

fn cut_routes(fallback_model: &str, prefill: bool) -> String {
    format!(
        "  chat:\n    relay: {{ provider: sheep, model: 'tokens=60+cut=40' }}\n    official: {{ provider: twin, model: '{fallback_model}', supports_prefill: {prefill} }}\n"
    )
}

#[tokio::test]
async fn a_stream_cut_after_40_of_60_tokens_is_continued_on_a_prefill_target() {
    let fake = fake().await;
    let sidecar = sidecar(&resilient(&fake, &cut_routes("tokens=60", true), "")).await;
    let (status, _, body) = ask(&sidecar, "chat", true).await;
    assert_eq!(status, 200);
    let events = sse_data(&body);
    assert_eq!(
        stream_text(&events),
        full_answer("sheep", 60),
        "the whole answer, once"
    );
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let continuation = fake
        .requests()
        .into_iter()
        .find(|r| r.model == "tokens=60")
        .expect("continuation sent");
    let messages = continuation.body["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let last = messages.last().cloned().unwrap_or_default();
    assert_eq!(last["role"], "assistant");
    assert_eq!(
        last["content"],
        full_answer("sheep", 39),
        "the prefill is what the client already has"
    );
}

#[tokio::test]
async fn a_cut_stream_whose_fallback_rejects_prefill_ends_with_the_original_failure() {
    let fake = fake().await;
    let sidecar = sidecar(&resilient(
        &fake,
        &cut_routes("tokens=60+no-prefill", true),
        "",
    ))
    .await;
    let (status, _, body) = ask(&sidecar, "chat", true).await;
    assert_eq!(status, 200);
    let events = sse_data(&body);
    assert!(
        !events.iter().any(|e| e == "[DONE]"),
        "never a clean end on a truncated answer"
    );
    let last = json(events.last().map(String::as_bytes).unwrap_or_default());
    assert_eq!(last["error"]["code"], "stream_interrupted");
    let message = last["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("sheep/tokens=60+cut=40") && message.contains("broke"),
        "{message}"
    );
    assert!(
        !message.contains("prefill"),
        "the prefill rejection does not mask the cut: {message}"
    );
    assert_eq!(stream_text(&events), full_answer("sheep", 39));
}

#[tokio::test]
async fn a_stall_mid_stream_without_a_prefill_target_ends_with_an_error_event() {
    let fake = fake().await;
    let sidecar = sidecar(&relay_fault(&fake, "stall=5")).await;
    let (status, _, body) = ask(&sidecar, "chat", true).await;
    assert_eq!(status, 200);
    let events = sse_data(&body);
    assert!(!events.iter().any(|e| e == "[DONE]"));
    let last = json(events.last().map(String::as_bytes).unwrap_or_default());
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("stalled"),
        "{last}"
    );
}

#[tokio::test]
async fn a_malformed_chunk_is_dropped_and_counted() {
    let fake = fake().await;
    let sidecar = sidecar(&relay_fault(&fake, "malformed=3")).await;
    let (status, _, body) = ask(&sidecar, "chat", true).await;
    assert_eq!(status, 200);
    let events = sse_data(&body);
    assert!(events
        .iter()
        .all(|e| e == "[DONE]" || serde_json::from_str::<serde_json::Value>(e).is_ok()));
    assert_eq!(stream_text(&events), full_answer("sheep", 12));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let text = metrics_text(&client(), sidecar.admin_addr).await;
    assert_eq!(
        metric_value(&text, "llm_sidecar_stream_malformed_chunks_total"),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn a_complete_stream_missing_done_is_finalised() {
    let fake = fake().await;
    let sidecar = sidecar(&relay_fault(&fake, "no-done")).await;
    let (_, _, body) = ask(&sidecar, "chat", true).await;
    let events = sse_data(&body);
    assert_eq!(stream_text(&events), full_answer("sheep", 12));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn usage_is_always_requested_upstream_and_only_shown_when_asked() {
    let fake = fake().await;
    let sidecar = sidecar(&relay_fault(&fake, "healthy")).await;
    let (_, _, body) = ask(&sidecar, "chat", true).await;
    assert_eq!(
        fake.requests()[0].body["stream_options"]["include_usage"],
        true
    );
    assert!(
        !sse_data(&body).iter().any(|e| e.contains("\"usage\":{")),
        "usage chunk stripped"
    );

    let asked = serde_json::json!({
        "model": "chat", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}],
    });
    let (_, _, body) = call(
        &client(),
        post(sidecar.data_addr, "/v1/chat/completions", asked.to_string()),
    )
    .await;
    assert!(
        sse_data(&body)
            .iter()
            .any(|e| e.contains("\"completion_tokens\"")),
        "usage chunk kept when asked"
    );
}

#[tokio::test]
async fn context_length_exceeded_is_not_retried_and_a_larger_model_answers() {
    let fake = fake().await;
    let routes = "  small:\n    context_window: 1000\n    fallbacks: [big]\n    relay: { provider: sheep, model: 'context-length=5' }\n    official: { provider: deep, model: small-official }\n  big:\n    context_window: 100000\n    official: { provider: deep, model: big-model }\n";
    let sidecar = sidecar(&resilient(&fake, routes, "")).await;
    let body = serde_json::json!({"model": "small", "messages": [{"role": "user", "content": "x".repeat(100)}]});
    let (status, headers, _) = call(
        &client(),
        post(sidecar.data_addr, "/v1/chat/completions", body.to_string()),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "x-llm-sidecar-upstream-model"),
        "big-model"
    );
    let models: Vec<String> = fake.requests().iter().map(|r| r.model.clone()).collect();
    assert_eq!(
        models,
        ["context-length=5", "big-model"],
        "no same-model retry, no same-window target"
    );
}

#[tokio::test]
async fn a_content_filter_refusal_is_returned_as_is_without_retry() {
    let fake = fake().await;
    let sidecar = sidecar(&relay_fault(&fake, "content-filter")).await;
    let (status, headers, body) = ask(&sidecar, "chat", false).await;
    assert_eq!(status, 400);
    assert_eq!(
        header(&headers, "x-llm-sidecar-error"),
        "",
        "the provider's own error"
    );
    assert_eq!(json(&body)["error"]["code"], "content_policy_violation");
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn a_401_marks_the_target_misconfigured_fails_over_and_is_counted() {
    let fake = fake().await;
    let sidecar = sidecar(&relay_fault(&fake, "unauthorized")).await;
    let (status, headers, _) = ask(&sidecar, "chat", false).await;
    assert_eq!(
        (status, header(&headers, "x-llm-sidecar-provider")),
        (200, "deep")
    );
    let text = metrics_text(&client(), sidecar.admin_addr).await;
    assert_eq!(
        metric_value(
            &text,
            r#"llm_sidecar_upstream_attempts_total{provider="sheep",outcome="misconfigured"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn a_preference_header_starts_the_chain_at_another_route() {
    let fake = fake().await;
    let routes = "  chat:\n    fallbacks: [other]\n    relay: { provider: sheep, model: relay-model }\n  other:\n    official: { provider: deep, model: other-model }\n";
    let sidecar = sidecar(&resilient(&fake, routes, "")).await;
    let mut req = post(
        sidecar.data_addr,
        "/v1/chat/completions",
        chat_body("chat", false),
    );
    req.headers_mut()
        .insert("x-llm-sidecar-prefer", "other".parse().expect("header"));
    let (status, headers, _) = call(&client(), req).await;
    assert_eq!(
        (
            status.as_u16(),
            header(&headers, "x-llm-sidecar-upstream-model")
        ),
        (200, "other-model")
    );
    assert!(fake.requests_for("sheep").is_empty());
}

#[tokio::test]
async fn low_latency_requests_skip_a_target_known_to_be_slow() {
    let fake = fake().await;
    let sidecar = sidecar(&resilient(
        &fake,
        "  chat:\n    relay: { provider: sheep, model: 'latency=250' }\n    official: { provider: deep, model: official-model }\n",
        "low_latency_threshold: 100ms",
    ))
    .await;
    let (_, headers, _) = ask(&sidecar, "chat", false).await;
    assert_eq!(header(&headers, "x-llm-sidecar-provider"), "sheep");
    let mut req = post(
        sidecar.data_addr,
        "/v1/chat/completions",
        chat_body("chat", false),
    );
    req.headers_mut()
        .insert("x-llm-sidecar-low-latency", "true".parse().expect("header"));
    let (_, headers, _) = call(&client(), req).await;
    assert_eq!(header(&headers, "x-llm-sidecar-provider"), "deep");
    let (_, headers, _) = ask(&sidecar, "chat", false).await;
    assert_eq!(
        header(&headers, "x-llm-sidecar-provider"),
        "sheep",
        "others still use the relay"
    );
}

#[tokio::test]
async fn a_prompt_too_long_for_every_window_is_truncated_when_the_route_allows_it() {
    let fake = fake().await;
    let routes = "  chat:\n    context_window: 80\n    truncate_to_fit: true\n    relay: { provider: sheep, model: relay-model }\n";
    let sidecar = sidecar(&resilient(&fake, routes, "")).await;
    let long = "y".repeat(200);
    let body = serde_json::json!({"model": "chat", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": long},
        {"role": "assistant", "content": long},
        {"role": "user", "content": "and now?"},
    ]});
    let (status, headers, _) = call(
        &client(),
        post(sidecar.data_addr, "/v1/chat/completions", body.to_string()),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-llm-sidecar-truncated-messages"), "1");
    let sent = fake.requests()[0].body["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let roles: Vec<&str> = sent.iter().filter_map(|m| m["role"].as_str()).collect();
    assert_eq!(roles, ["system", "assistant", "user"]);
}

#[tokio::test]
async fn a_primary_down_for_a_while_is_routed_around_and_gets_traffic_back_after_recovery() {
    let fake = fake().await;
    let sidecar = sidecar(&relay_fault(&fake, "down-for=1500")).await;
    let client = client();
    let started = Instant::now();
    let mut saw_open = false;
    let mut back_at = None;
    // Bounded: one request every 100 ms for at most 6 s.
    for _ in 0..60 {
        let (status, headers, _) = ask(&sidecar, "chat", false).await;
        assert_eq!(status, 200, "every request is served during the outage");
        if header(&headers, "x-llm-sidecar-provider") == "sheep" {
            back_at = Some(started.elapsed());
            break;
        }
        if !saw_open {
            let text = metrics_text(&client, sidecar.admin_addr).await;
            saw_open = metric_value(
                &text,
                r#"llm_sidecar_breaker_state{target="sheep/down-for=1500"}"#,
            ) == Some(1.0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(saw_open, "the breaker opened during the outage");
    // How soon after the outage it comes back is shown on paused time (proxy::prober's
    // tests); here, that it does, and what it cost the target meanwhile.
    let back_at = back_at.expect("traffic returned to the primary");
    // The sidecar's own background probes (`GET /models`, which the fake answers even while
    // the model is down) are one per cooldown; each reachable one lets a single user request
    // through to confirm, so user traffic to the dead target stays at one request per cooldown
    // after the three that opened the breaker.
    let seen = fake.requests_for("sheep");
    let chats = seen
        .iter()
        .filter(|r| r.path == "/v1/chat/completions")
        .count();
    let probes = seen.iter().filter(|r| r.path == "/v1/models").count();
    let cooldowns = (back_at.as_millis() / 500) as usize + 1;
    assert!(probes <= cooldowns, "{probes} probes in {back_at:?}");
    assert!(
        chats <= 3 + cooldowns + 1,
        "no hammering while down: {chats} relay chat requests in {back_at:?}"
    );
}

#[tokio::test]
async fn a_target_that_cuts_every_stream_after_its_first_chunks_opens_its_breaker() {
    let fake = fake().await;
    let sidecar = sidecar(&relay_fault(&fake, "cut=2")).await;
    // A cut stream starts well: its start must not count as a success that clears the cuts
    // before it. Three cuts in a row open the breaker (breaker_failures defaults to 3).
    for round in 0..3 {
        let (status, headers, body) = ask(&sidecar, "chat", true).await;
        assert_eq!(status, 200);
        assert_eq!(
            header(&headers, "x-llm-sidecar-provider"),
            "sheep",
            "round {round}"
        );
        let events = sse_data(&body);
        assert!(!events.iter().any(|e| e == "[DONE]"), "round {round}");
    }
    let (status, headers, body) = ask(&sidecar, "chat", true).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-llm-sidecar-provider"), "deep");
    assert_eq!(sse_data(&body).last().map(String::as_str), Some("[DONE]"));
    let text = metrics_text(&client(), sidecar.admin_addr).await;
    assert_eq!(
        metric_value(&text, r#"llm_sidecar_breaker_state{target="sheep/cut=2"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(fake.requests_for("sheep").len(), 3);
}
