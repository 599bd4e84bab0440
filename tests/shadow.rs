//! Shadow traffic over real sockets: the client never waits for the shadow, pairs are compared
//! into metrics and a JSON log, and the concurrency and spend caps drop shadows and count them.

mod support;

use std::time::Duration;

use fake_provider::FakeProvider;
use support::*;

/// A config whose `shadowed` route has a fast relay and the given official model; every
/// request is shadowed. `shadow` is the body of the `shadow:` block.
fn shadow_config(fake: &FakeProvider, official_model: &str, shadow: &str, price: &str) -> String {
    let extra = format!(
        "  shadowed:
    relay: {{ provider: sheep, model: relay-ok }}
    official: {{ provider: deep, model: \"{official_model}\"{price} }}
"
    );
    format!(
        "shadow_percent: 100\nshadow: {{ {shadow} }}\n{}",
        config_with(fake, true, &extra)
    )
}

async fn metrics(sidecar: &llm_sidecar::Sidecar) -> String {
    metrics_text(&client(), sidecar.admin_addr).await
}

fn outcome(text: &str, outcome: &str) -> f64 {
    metric_value(
        text,
        &format!("llm_sidecar_shadow_requests_total{{outcome=\"{outcome}\"}} "),
    )
    .unwrap_or(0.0)
}

async fn wait_for_outcome(sidecar: &llm_sidecar::Sidecar, name: &str, count: f64) {
    eventually(Duration::from_secs(10), name, || async move {
        outcome(&metrics(sidecar).await, name) == count
    })
    .await;
}

/// The one pair the shadow log holds, once its writer (off the request path) has written it.
async fn logged_pair(log: &std::path::Path) -> serde_json::Value {
    eventually(Duration::from_secs(5), "the shadow log line", || {
        let written = std::fs::read_to_string(log).is_ok_and(|t| t.ends_with('\n'));
        async move { written }
    })
    .await;
    let line = std::fs::read_to_string(log).expect("log written");
    serde_json::from_str(line.trim()).expect("one JSON line")
}

#[tokio::test]
async fn the_client_never_waits_for_the_shadow_and_the_pair_is_compared_after() {
    let fake = fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("shadow.jsonl");
    let text = shadow_config(
        &fake,
        "gate=slow-shadow",
        &format!("log: \"{}\"", log.display()),
        "",
    );
    let sidecar = sidecar(&text).await;

    // The shadow target holds its answer until the gate opens; the client is done before that.
    let (status, headers, body) = ask(&sidecar, "shadowed", false).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&headers, "x-llm-sidecar-path"), "relay");
    let text = metrics(&sidecar).await;
    assert_eq!(
        metric_value(&text, "llm_sidecar_shadow_in_flight "),
        Some(1.0)
    );
    assert_eq!(
        outcome(&text, "equivalent") + outcome(&text, "different"),
        0.0
    );
    // The shadow request did reach the official side.
    eventually(Duration::from_secs(5), "the shadow request", || {
        let n = fake.requests_for("deep").len();
        async move { n == 1 }
    })
    .await;

    fake.release("slow-shadow");
    wait_for_outcome(&sidecar, "equivalent", 1.0).await;
    let text = metrics(&sidecar).await;
    assert_eq!(
        metric_value(&text, "llm_sidecar_shadow_latency_delta_seconds_count "),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&text, "llm_sidecar_shadow_equivalence_score_count "),
        Some(1.0)
    );
    // The shadow's task ends just after it counted its outcome.
    eventually(Duration::from_secs(5), "no shadow in flight", || async {
        metric_value(&metrics(&sidecar).await, "llm_sidecar_shadow_in_flight ") == Some(0.0)
    })
    .await;
    // Shadows are not requests of the app: not in the request counters, not in attempts.
    assert!(
        !text.contains("upstream_attempts_total{provider=\"deep\""),
        "{text}"
    );

    // One JSON line per pair, without any text unless asked for.
    let entry = logged_pair(&log).await;
    assert_eq!(entry["outcome"], "equivalent");
    assert_eq!(entry["primary"]["side"], "relay");
    assert_eq!(entry["shadow"]["side"], "official");
    assert_eq!(entry["shadow"]["model"], "gate=slow-shadow");
    assert!(entry["shadow"]["latency_ms"].as_u64().is_some());
    assert!(entry["primary"]["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(entry["primary"]["finish_reason"], "stop");
    assert!(entry["equivalence"].as_f64().unwrap() > 0.6);
    assert!(entry["primary"].get("text").is_none(), "{entry}");
    assert!(entry.get("request").is_none(), "{entry}");
    let line = entry.to_string();
    assert!(!line.contains("Say hello"), "no prompt in the log: {line}");
}

#[tokio::test]
async fn streams_are_shadowed_and_read_to_the_end_with_content_logged_only_when_enabled() {
    let fake = fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("shadow.jsonl");
    let text = shadow_config(
        &fake,
        "official-ok",
        &format!(
            "log: \"{}\", log_content: true, equivalence_threshold: 0.99",
            log.display()
        ),
        "",
    );
    let sidecar = sidecar(&text).await;
    let (status, _, body) = ask(&sidecar, "shadowed", true).await;
    assert_eq!(status, 200);
    assert!(stream_text(&sse_data(&body)).starts_with("Hello from sheep."));

    // "Hello from sheep." and "Hello from deep." differ in one word: not equivalent at 0.99.
    wait_for_outcome(&sidecar, "different", 1.0).await;
    assert_eq!(
        metric_value(
            &metrics(&sidecar).await,
            "llm_sidecar_shadow_equivalence_rate "
        ),
        Some(0.0)
    );
    let entry = logged_pair(&log).await;
    assert_eq!(entry["stream"], true);
    assert!(entry["primary"]["text"]
        .as_str()
        .unwrap()
        .starts_with("Hello from sheep."));
    assert!(entry["shadow"]["text"]
        .as_str()
        .unwrap()
        .starts_with("Hello from deep."));
    assert!(entry["shadow"]["first_byte_ms"].as_u64().is_some());
    assert_eq!(entry["shadow"]["finish_reason"], "stop");
    assert!(entry["shadow"]["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(entry["request"]["messages"][0]["content"], "Say hello.");
}

#[tokio::test]
async fn excess_shadows_are_dropped_and_counted_never_queued() {
    let fake = fake().await;
    let text = shadow_config(&fake, "gate=held", "max_concurrency: 2", "");
    let sidecar = sidecar(&text).await;
    for _ in 0..5 {
        let (status, _, _) = ask(&sidecar, "shadowed", false).await;
        assert_eq!(status, 200);
    }
    let text = metrics(&sidecar).await;
    assert_eq!(outcome(&text, "dropped_concurrency"), 3.0);
    assert_eq!(
        metric_value(&text, "llm_sidecar_shadow_in_flight "),
        Some(2.0)
    );
    fake.release("held");
    wait_for_outcome(&sidecar, "equivalent", 2.0).await;
    assert_eq!(fake.requests_for("deep").len(), 2);
}

#[tokio::test]
async fn the_daily_spend_cap_stops_shadows() {
    let fake = fake().await;
    // A price so high that the first shadow alone spends the day's budget.
    let text = shadow_config(
        &fake,
        "official-ok",
        "daily_budget_usd: 0.01",
        ", price: { input: 1000000, output: 1000000 }",
    );
    let sidecar = sidecar(&text).await;
    let (status, _, _) = ask(&sidecar, "shadowed", false).await;
    assert_eq!(status, 200);
    wait_for_outcome(&sidecar, "equivalent", 1.0).await;
    let spent = metric_value(
        &metrics(&sidecar).await,
        "llm_sidecar_shadow_spend_usd_total ",
    )
    .expect("spend metric");
    assert!(spent > 0.01, "spent {spent}");

    for _ in 0..3 {
        let (status, _, _) = ask(&sidecar, "shadowed", false).await;
        assert_eq!(status, 200, "the client is never affected by the cap");
    }
    assert_eq!(outcome(&metrics(&sidecar).await, "dropped_budget"), 3.0);
    assert_eq!(fake.requests_for("deep").len(), 1);
}

#[tokio::test]
async fn a_failing_shadow_is_not_retried_and_does_not_touch_the_primarys_health() {
    let fake = fake().await;
    let text = shadow_config(&fake, "error=503", "", "");
    let sidecar = sidecar(&text).await;
    for _ in 0..4 {
        let (status, headers, _) = ask(&sidecar, "shadowed", false).await;
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "x-llm-sidecar-path"), "relay");
    }
    wait_for_outcome(&sidecar, "shadow_error", 4.0).await;
    // One call per shadow: no retries.
    assert_eq!(fake.requests_for("deep").len(), 4);
    // The official target's breaker never saw those failures: with the kill switch on, the
    // next real request goes to it at once and succeeds.
    let text = metrics(&sidecar).await;
    assert!(
        !text.contains("upstream_attempts_total{provider=\"deep\""),
        "{text}"
    );
    assert!(
        !text.contains("breaker_state{target=\"deep/error=503\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn no_shadow_without_shadow_percent() {
    let fake = fake().await;
    let text = shadow_config(&fake, "official-ok", "", "")
        .replace("shadow_percent: 100", "shadow_percent: 0");
    let sidecar = sidecar(&text).await;
    for _ in 0..5 {
        assert_eq!(ask(&sidecar, "shadowed", false).await.0, 200);
    }
    assert_eq!(fake.requests_for("deep").len(), 0);
    assert!(!metrics(&sidecar).await.contains("shadow_requests_total{"));
}
