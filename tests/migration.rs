//! Migration flags over real requests: the percentage rollout (split, stickiness, one-way
//! moves when the percentage rises), fallback-only order, and the per-request side/reason
//! headers, with flags changed through the file source.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::*;

/// One request to the `chat` route with a rollout key header (or none).
async fn side_for(sidecar: &llm_sidecar::Sidecar, key: Option<&str>) -> (String, String, String) {
    side_for_model(sidecar, "chat", key).await
}

/// One chat request with a rollout key header (or none); returns (path, reason, bucket).
async fn side_for_model(
    sidecar: &llm_sidecar::Sidecar,
    model: &str,
    key: Option<&str>,
) -> (String, String, String) {
    let mut req = post(
        sidecar.data_addr,
        "/v1/chat/completions",
        chat_body(model, false),
    );
    if let Some(key) = key {
        req.headers_mut().insert(
            "x-llm-sidecar-rollout-key",
            key.parse().expect("header value"),
        );
    }
    let (status, headers, body) = call(&client(), req).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    (
        header(&headers, "x-llm-sidecar-path").to_string(),
        header(&headers, "x-llm-sidecar-reason").to_string(),
        header(&headers, "x-llm-sidecar-rollout-bucket").to_string(),
    )
}

/// The same, with the key in the OpenAI `user` field of the body instead.
async fn side_for_user(sidecar: &llm_sidecar::Sidecar, user: &str) -> String {
    let body = serde_json::json!({
        "model": "chat",
        "user": user,
        "messages": [{"role": "user", "content": "hi"}],
    })
    .to_string();
    let (status, headers, _) = call(
        &client(),
        post(sidecar.data_addr, "/v1/chat/completions", body),
    )
    .await;
    assert_eq!(status, 200);
    header(&headers, "x-llm-sidecar-path").to_string()
}

fn with_flags(fake: &fake_provider::FakeProvider, flags: &str) -> String {
    format!("{flags}\n{}", config(fake, true))
}

#[tokio::test]
async fn rollout_splits_by_key_and_each_key_sticks_to_its_side() {
    let fake = fake().await;
    let sidecar = sidecar(&with_flags(&fake, "rollout_percent: 30")).await;
    let mut relay = 0;
    for i in 0..300 {
        let key = format!("user-{i}");
        let (path, reason, bucket) = side_for(&sidecar, Some(&key)).await;
        let bucket: u16 = bucket.parse().expect("a bucket header");
        match path.as_str() {
            "relay" => {
                relay += 1;
                assert_eq!(reason, "rollout_relay");
                assert!(bucket < 3_000, "bucket {bucket} on the relay at 30%");
            }
            "official" => {
                assert_eq!(reason, "rollout_official");
                assert!(bucket >= 3_000, "bucket {bucket} on official at 30%");
            }
            other => panic!("path {other}"),
        }
        // Sticky: the same key again, and as the OpenAI `user` field, lands on the same side.
        assert_eq!(side_for(&sidecar, Some(&key)).await.0, path);
        assert_eq!(side_for_user(&sidecar, &key).await, path);
    }
    assert!(
        (60..=120).contains(&relay),
        "{relay} of 300 keys on the relay at 30%"
    );

    // Requests without a key are spread at random, so both sides get some.
    let mut sides = HashMap::new();
    for _ in 0..100 {
        *sides.entry(side_for(&sidecar, None).await.0).or_insert(0) += 1;
    }
    assert!(sides.get("relay").copied().unwrap_or(0) >= 10, "{sides:?}");
    assert!(
        sides.get("official").copied().unwrap_or(0) >= 40,
        "{sides:?}"
    );
}

#[tokio::test]
async fn raising_the_rollout_moves_keys_to_the_relay_only_and_applies_on_the_next_request() {
    let fake = fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("routing.yaml");
    write_atomically(&path, &with_flags(&fake, "rollout_percent: 25"));
    let mut settings = test_settings();
    settings.config_path = Some(path.clone());
    let sidecar = sidecar_with(settings, &with_flags(&fake, "rollout_percent: 25")).await;

    let keys: Vec<String> = (0..200).map(|i| format!("tenant-{i}")).collect();
    let mut before = Vec::new();
    for key in &keys {
        before.push(side_for(&sidecar, Some(key)).await.0);
    }
    let generation = sidecar.store.load().generation;

    for percent in [50, 75] {
        write_atomically(
            &path,
            &with_flags(&fake, &format!("rollout_percent: {percent}")),
        );
        let store = sidecar.store.clone();
        eventually(Duration::from_secs(5), "the file edit to apply", || {
            let store = store.clone();
            async move { store.load().flags.rollout_percent == percent }
        })
        .await;
        let mut now = Vec::new();
        for key in &keys {
            now.push(side_for(&sidecar, Some(key)).await.0);
        }
        let moved = before
            .iter()
            .zip(&now)
            .filter(|(b, n)| b != n)
            .inspect(|(b, n)| {
                assert_eq!(
                    (b.as_str(), n.as_str()),
                    ("official", "relay"),
                    "a key went back"
                )
            })
            .count();
        assert!(moved > 20, "raising to {percent}% moved only {moved} keys");
        before = now;
    }
    assert!(sidecar.store.load().generation > generation);

    // Rollout 0: nobody starts on the relay.
    write_atomically(&path, &with_flags(&fake, "rollout_percent: 0"));
    let store = sidecar.store.clone();
    eventually(Duration::from_secs(5), "the file edit to apply", || {
        let store = store.clone();
        async move { store.load().flags.rollout_percent == 0 }
    })
    .await;
    for key in keys.iter().take(50) {
        assert_eq!(side_for(&sidecar, Some(key)).await.0, "official");
    }
}

#[tokio::test]
async fn fallback_only_tries_official_first_and_the_relay_only_after_it_failed() {
    let fake = fake().await;
    let extra = "  flaky:
    relay: { provider: sheep, model: relay-ok }
    official: { provider: deep, model: error=503 }
";
    let text = format!(
        "holy_sheep_fallback_only: true\nresilience: {{ attempts_per_target: 1 }}\n{}",
        config_with(&fake, true, extra)
    );
    let sidecar = sidecar(&text).await;

    // The official side answers: the relay is never touched.
    let (path, reason, _) = side_for(&sidecar, Some("anyone")).await;
    assert_eq!(
        (path.as_str(), reason.as_str()),
        ("official", "fallback_only")
    );
    assert_eq!(fake.requests_for("sheep").len(), 0);

    // The official side fails: the relay is the last resort.
    let (status, headers, body) = ask(&sidecar, "flaky", false).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&headers, "x-llm-sidecar-path"), "relay");
    assert_eq!(header(&headers, "x-llm-sidecar-reason"), "fallback");
    let log = header(&headers, "x-llm-sidecar-attempt-log");
    assert!(log.starts_with("deep/error=503="), "{log}");
    assert!(log.ends_with("sheep/relay-ok=ok"), "{log}");
}

#[tokio::test]
async fn the_kill_switch_beats_the_rollout_and_says_so() {
    let fake = fake().await;
    let text = format!("rollout_percent: 100\n{}", config(&fake, false));
    let sidecar = sidecar(&text).await;
    let (path, reason, bucket) = side_for(&sidecar, Some("user-1")).await;
    assert_eq!(
        (path.as_str(), reason.as_str(), bucket.as_str()),
        ("official", "routing_disabled", "")
    );
}

fn guarded(fake: &fake_provider::FakeProvider, flags: &str, relay_model: &str) -> String {
    let extra = format!(
        "  guarded:
    relay: {{ provider: sheep, model: \"{relay_model}\" }}
    official: {{ provider: deep, model: official-ok }}
"
    );
    format!(
        "{flags}
guard: {{ enabled: true, min_requests: 5, max_error_rate: 0.5, window: 60s }}
# The breaker would take the relay out after 3 failures: keep it out of the way.
resilience: {{ attempts_per_target: 1, breaker_failures: 10 }}
{}",
        config_with(fake, true, &extra)
    )
}

#[tokio::test]
async fn the_guard_trips_on_an_error_burst_stays_tripped_and_clears_when_the_flags_change() {
    let fake = fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("routing.yaml");
    let text = guarded(&fake, "rollout_percent: 100", "error=503");
    write_atomically(&path, &text);
    let mut settings = test_settings();
    settings.config_path = Some(path.clone());
    let sidecar = sidecar_with(settings, &text).await;
    let client = client();

    // The relay fails every time; each request still succeeds on the official side.
    for _ in 0..5 {
        let (status, headers, _) = ask(&sidecar, "guarded", false).await;
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "x-llm-sidecar-reason"), "fallback");
    }
    let relay_calls = fake.requests_for("sheep").len();
    assert_eq!(relay_calls, 5);

    // Tripped: official at once, the relay left alone, and it stays that way.
    for _ in 0..10 {
        let (status, headers, _) = ask(&sidecar, "guarded", false).await;
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "x-llm-sidecar-path"), "official");
        assert_eq!(header(&headers, "x-llm-sidecar-reason"), "guard_tripped");
        assert_eq!(header(&headers, "x-llm-sidecar-attempts"), "1");
    }
    assert_eq!(fake.requests_for("sheep").len(), relay_calls);
    let metrics = metrics_text(&client, sidecar.admin_addr).await;
    assert_eq!(
        metric_value(&metrics, "llm_sidecar_guard_tripped "),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, "llm_sidecar_guard_trips_total "),
        Some(1.0)
    );
    let (_, _, view) = call_json(&client, get(sidecar.admin_addr, "/config")).await;
    assert_eq!(view["guard"]["tripped"], true);
    assert!(view["guard"]["trip"]["reason"]
        .as_str()
        .unwrap()
        .contains("error rate 100%"));

    // A config edit that leaves the flags alone does not clear it.
    write_atomically(&path, &guarded(&fake, "rollout_percent: 100", "relay-ok"));
    let store = sidecar.store.clone();
    let generation = store.load().generation;
    eventually(Duration::from_secs(5), "the edit to apply", || {
        let store = store.clone();
        async move { store.load().generation > generation }
    })
    .await;
    let (_, headers, _) = ask(&sidecar, "guarded", false).await;
    assert_eq!(header(&headers, "x-llm-sidecar-reason"), "guard_tripped");

    // An operator changes a flag: routing follows the flags again, from the next request.
    write_atomically(&path, &guarded(&fake, "rollout_percent: 99", "relay-ok"));
    eventually(Duration::from_secs(5), "the flag change to apply", || {
        let store = store.clone();
        async move { store.load().flags.rollout_percent == 99 }
    })
    .await;
    let (path_taken, reason, _) = side_for_model(&sidecar, "guarded", Some("user-1")).await;
    assert_eq!(
        (path_taken.as_str(), reason.as_str()),
        ("relay", "rollout_relay")
    );
    let metrics = metrics_text(&client, sidecar.admin_addr).await;
    assert_eq!(
        metric_value(&metrics, "llm_sidecar_guard_tripped "),
        Some(0.0)
    );
}
