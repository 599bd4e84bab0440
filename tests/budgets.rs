//! Daily budgets through the real sidecar over real sockets: 200 concurrent requests against a
//! cap that holds about 50 of them never take the capped target past it; the rest fall back
//! (or get 429 with `reject`); the settled spend is the provider's reported usage × price; a cut
//! stream settles on what it streamed; three sidecars sharing Redis stay under one cap.

mod support;

use std::time::Duration;

use futures_util::future::join_all;
use llm_sidecar::settings::Settings;
use serde_json::{json, Value};
use support::redis::RedisServer;
use support::*;

/// USD per token at the test's price: 1000 $ per million tokens.
const PER_TOKEN: f64 = 0.001;
/// The request's answer budget.
const MAX_TOKENS: u64 = 10;

/// Room for this many worst cases: the prompt estimate plus `MAX_TOKENS`, at `PER_TOKEN`.
fn cap_for(requests: u64) -> f64 {
    requests as f64 * worst_case()
}

/// The worst case the sidecar reserves for [`request`]: its messages' bytes / 4, plus max_tokens.
fn worst_case() -> f64 {
    let messages = json!([{"role": "user", "content": "Say hello."}]).to_string();
    (messages.len().div_ceil(4) as u64 + MAX_TOKENS) as f64 * PER_TOKEN
}

fn request(stream: bool) -> String {
    json!({
        "model": "chat",
        "stream": stream,
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": "Say hello."}],
    })
    .to_string()
}

/// The relay (`sheep`, priced, capped by the budget) answers three words once `gate` opens;
/// the official target (`deep`) answers at once.
fn config(fake: &FakeProvider, relay_model: &str, daily_usd: f64, on_exhausted: &str) -> String {
    config_down(fake, relay_model, daily_usd, on_exhausted, "local")
}

fn config_down(
    fake: &FakeProvider,
    relay_model: &str,
    daily_usd: f64,
    on_exhausted: &str,
    store_down: &str,
) -> String {
    format!(
        "holy_sheep_routing_enabled: true
budget_store_down: {store_down}
timeouts:
  response_headers: 30s
resilience:
  attempts_per_target: 1
budgets:
  - name: relay-chat
    match: {{ provider: sheep }}
    daily_usd: {daily_usd}
    on_exhausted: {on_exhausted}
    timezone: Asia/Shanghai
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
    relay: {{ provider: sheep, model: '{relay_model}', price: {{ input: 1000, output: 1000 }} }}
    official: {{ provider: deep, model: official-model+tokens=3 }}
",
        relay = fake.base_url("sheep"),
        official = fake.base_url("deep"),
    )
}

/// The budget as `/stats` shows it.
async fn budget(sidecar: &llm_sidecar::Sidecar) -> Value {
    let (_, _, stats) = call_json(&client(), get(sidecar.admin_addr, "/stats")).await;
    stats["budgets"][0].clone()
}

/// Sends 200 identical requests at once; returns each answer once the relay's gate opens after
/// every request has been sent or turned away.
async fn two_hundred(
    sidecar: &llm_sidecar::Sidecar,
    fake: &FakeProvider,
    capped: usize,
) -> Vec<(http::StatusCode, http::HeaderMap, bytes::Bytes)> {
    let client = client();
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let client = client.clone();
            let request = post(sidecar.data_addr, "/v1/chat/completions", request(false));
            tokio::spawn(async move { call(&client, request).await })
        })
        .collect();
    // Every request reaches a provider before any relay answer (and its settlement) is let
    // through: the capped ones wait at the relay, the others were sent on to the official one.
    eventually(
        Duration::from_secs(20),
        "every request reached a provider",
        || async { fake.requests_for("sheep").len() + fake.requests_for("deep").len() >= 200 },
    )
    .await;
    assert_eq!(
        fake.requests_for("sheep").len(),
        capped,
        "exactly the requests whose worst case fits reach the relay"
    );
    fake.release("budget");
    join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("the call task"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_never_take_the_capped_target_past_its_budget() {
    let fake = fake().await;
    let cap = cap_for(50);
    let text = config(&fake, "relay-model+tokens=3+gate=budget", cap, "fallback");
    let sidecar = sidecar(&text).await;

    let answers = two_hundred(&sidecar, &fake, 50).await;
    let mut relay_cost = 0.0;
    let mut relay = 0;
    for (status, headers, body) in &answers {
        assert_eq!(*status, 200, "{}", String::from_utf8_lossy(body));
        match header(headers, "x-llm-sidecar-provider") {
            "sheep" => {
                relay += 1;
                relay_cost += header(headers, "x-llm-sidecar-cost-usd")
                    .parse::<f64>()
                    .expect("a relay answer is priced");
            }
            "deep" => {
                assert_eq!(header(headers, "x-llm-sidecar-reason"), "budget_exhausted");
                assert_eq!(
                    header(headers, "x-llm-sidecar-attempt-log"),
                    "sheep/relay-model+tokens=3+gate=budget=budget_exhausted,deep/official-model+tokens=3=ok"
                );
            }
            other => panic!("answered by {other:?}"),
        }
    }
    assert_eq!(relay, 50);

    // Settled on what the provider reported, which is what the sidecar priced in each answer.
    eventually(
        Duration::from_secs(10),
        "every reservation settled",
        || async { budget(&sidecar).await["reserved_usd"] == 0.0 },
    )
    .await;
    let state = budget(&sidecar).await;
    let spent = state["spent_usd"].as_f64().unwrap();
    assert!(
        (spent - relay_cost).abs() < 1e-6,
        "spent {spent} vs priced {relay_cost}"
    );
    assert!(spent <= cap, "spent {spent} passed the cap {cap}");
    assert_eq!(state["limit_usd"], cap);
    // Only the unused worst cases were given back: 50 × (three words, not ten).
    assert!(spent < cap && spent > 0.0);

    // The room the settled answers left is used again.
    let (status, headers, _) = call(
        &client(),
        post(sidecar.data_addr, "/v1/chat/completions", request(false)),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-llm-sidecar-provider"), "sheep");

    let metrics = metrics_text(&client(), sidecar.admin_addr).await;
    assert_eq!(
        metric_value(
            &metrics,
            "llm_sidecar_budget_limit_usd{budget=\"relay-chat\"}"
        ),
        Some(cap)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_reject_the_requests_over_budget_get_429_budget_exceeded() {
    let fake = fake().await;
    let text = config(
        &fake,
        "relay-model+tokens=3+gate=budget",
        cap_for(50),
        "reject",
    );
    let sidecar = sidecar(&text).await;

    let client = client();
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let client = client.clone();
            let request = post(sidecar.data_addr, "/v1/chat/completions", request(false));
            tokio::spawn(async move { call_json(&client, request).await })
        })
        .collect();
    eventually(
        Duration::from_secs(20),
        "the relay holds the capped requests",
        || async { fake.requests_for("sheep").len() >= 50 },
    )
    .await;
    // The 150 refusals come back while the relay still holds the 50.
    eventually(
        Duration::from_secs(20),
        "the refusals came back",
        || async { calls.iter().filter(|c| c.is_finished()).count() >= 150 },
    )
    .await;
    assert_eq!(fake.requests_for("sheep").len(), 50);
    fake.release("budget");
    let (mut refused, mut answered) = (0, 0);
    for call in calls {
        let (status, headers, body) = call.await.unwrap();
        match status.as_u16() {
            200 => {
                answered += 1;
                assert_eq!(header(&headers, "x-llm-sidecar-provider"), "sheep");
            }
            429 => {
                refused += 1;
                assert_eq!(header(&headers, "x-llm-sidecar-error"), "budget_exceeded");
                assert_eq!(body["error"]["code"], "budget_exceeded");
                assert_eq!(body["error"]["budget"], "relay-chat");
                let retry_after: u64 = header(&headers, "retry-after").parse().unwrap();
                assert!(
                    (1..=86_400).contains(&retry_after),
                    "Retry-After up to the next midnight in Asia/Shanghai: {retry_after}"
                );
            }
            other => panic!("status {other}: {body}"),
        }
    }
    assert_eq!((answered, refused), (50, 150));
    assert!(
        fake.requests_for("deep").is_empty(),
        "reject never falls back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_stream_settles_on_what_it_streamed_and_a_failed_attempt_on_nothing() {
    let fake = fake().await;
    // The relay streams 40 words but cuts after 5 content chunks; no continuation, so the
    // client gets an error event. The official target is not priced nor budgeted.
    let text = config(
        &fake,
        "relay-model+tokens=40+cut=5",
        cap_for(1000),
        "fallback",
    );
    let sidecar = sidecar(&text).await;
    let (status, _, body) = call(
        &client(),
        post(sidecar.data_addr, "/v1/chat/completions", request(true)),
    )
    .await;
    assert_eq!(status, 200);
    let events = sse_data(&body);
    assert!(
        events.iter().any(|e| e.contains("stream_interrupted")),
        "{events:?}"
    );
    let streamed = stream_text(&events);
    assert!(!streamed.is_empty());
    let messages = json!([{"role": "user", "content": "Say hello."}]).to_string();
    let expected = (messages.len().div_ceil(4) as u64
        + llm_sidecar::routing::tokens::estimate_text(&streamed)) as f64
        * PER_TOKEN;
    eventually(
        Duration::from_secs(10),
        "the cut stream settled",
        || async { budget(&sidecar).await["reserved_usd"] == 0.0 },
    )
    .await;
    let spent = budget(&sidecar).await["spent_usd"].as_f64().unwrap();
    assert!(
        (spent - expected).abs() < 1e-6,
        "spent {spent}, the prompt and the streamed text cost {expected}"
    );

    // A relay that fails before answering costs nothing: the request falls back and the
    // budget's spend does not move.
    let failing = config(&fake, "relay-model+error=500", cap_for(1000), "fallback");
    let sidecar = support::sidecar(&failing).await;
    let (status, headers, _) = call(
        &client(),
        post(sidecar.data_addr, "/v1/chat/completions", request(false)),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-llm-sidecar-provider"), "deep");
    eventually(
        Duration::from_secs(10),
        "the failed attempt released",
        || async { budget(&sidecar).await["reserved_usd"] == 0.0 },
    )
    .await;
    assert_eq!(budget(&sidecar).await["spent_usd"], 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_sharing_redis_stay_under_one_cap_together() {
    let redis = RedisServer::start();
    let fake = fake().await;
    let cap = cap_for(30);
    let text = config(&fake, "relay-model+tokens=3+gate=shared", cap, "fallback");
    let settings = || Settings {
        redis: Some(llm_sidecar::spend::RedisSettings {
            url: redis.url(),
            password: None,
            timeout: Duration::from_millis(200),
        }),
        ..test_settings()
    };
    let sidecars = [
        sidecar_with(settings(), &text).await,
        sidecar_with(settings(), &text).await,
        sidecar_with(settings(), &text).await,
    ];
    let client = client();
    let calls: Vec<_> = sidecars
        .iter()
        .flat_map(|s| std::iter::repeat_n(s.data_addr, 40))
        .map(|addr| {
            let client = client.clone();
            let request = post(addr, "/v1/chat/completions", request(false));
            tokio::spawn(async move { call(&client, request).await })
        })
        .collect();
    eventually(
        Duration::from_secs(20),
        "every request reached a target",
        || async { fake.requests_for("sheep").len() + fake.requests_for("deep").len() >= 120 },
    )
    .await;
    assert_eq!(
        fake.requests_for("sheep").len(),
        30,
        "three sidecars together hold no more than the cap allows"
    );
    fake.release("shared");
    let mut relay_cost = 0.0;
    for call in calls {
        let (status, headers, _) = call.await.unwrap();
        assert_eq!(status, 200);
        if header(&headers, "x-llm-sidecar-provider") == "sheep" {
            relay_cost += header(&headers, "x-llm-sidecar-cost-usd")
                .parse::<f64>()
                .unwrap();
        }
    }
    let day = budget(&sidecars[0]).await["day"]
        .as_str()
        .unwrap()
        .to_string();
    let key = format!("llm-sidecar:budget:relay-chat:{day}");
    eventually(
        Duration::from_secs(10),
        "every reservation settled in Redis",
        || async { redis.counts(&key).1 == 0 },
    )
    .await;
    let (spent, _) = redis.counts(&key);
    let spent = spent as f64 / 1e9;
    assert!(
        (spent - relay_cost).abs() < 1e-6,
        "Redis has {spent}, the answers cost {relay_cost}"
    );
    assert!(spent <= cap);
}

/// One sidecar on Redis, then Redis killed: what `budget_store_down` says holds, for real
/// requests, and `/config` shows the store down.
async fn redis_down(mode: &str) -> Vec<(u16, String, String)> {
    let mut redis = RedisServer::start();
    let fake = fake().await;
    let text = config_down(
        &fake,
        "relay-model+tokens=3",
        cap_for(1000),
        "fallback",
        mode,
    );
    let settings = Settings {
        redis: Some(llm_sidecar::spend::RedisSettings {
            url: redis.url(),
            password: None,
            timeout: Duration::from_millis(50),
        }),
        ..test_settings()
    };
    let sidecar = sidecar_with(settings, &text).await;
    let (status, headers, _) = call(
        &client(),
        post(sidecar.data_addr, "/v1/chat/completions", request(false)),
    )
    .await;
    assert_eq!(
        (status.as_u16(), header(&headers, "x-llm-sidecar-provider")),
        (200, "sheep")
    );
    redis.kill();
    let mut answers = Vec::new();
    for _ in 0..5 {
        let (status, headers, _) = call(
            &client(),
            post(sidecar.data_addr, "/v1/chat/completions", request(false)),
        )
        .await;
        answers.push((
            status.as_u16(),
            header(&headers, "x-llm-sidecar-provider").to_string(),
            header(&headers, "x-llm-sidecar-reason").to_string(),
        ));
    }
    let (_, _, config) = call_json(&client(), get(sidecar.admin_addr, "/config")).await;
    assert_eq!(
        config["budgets"]["store"]["state"], "down",
        "{}",
        config["budgets"]
    );
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_local_keeps_serving_the_budgeted_target() {
    for (status, provider, _) in redis_down("local").await {
        assert_eq!((status, provider.as_str()), (200, "sheep"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_fail_closed_turns_the_budgeted_target_away() {
    for (status, provider, reason) in redis_down("fail_closed").await {
        assert_eq!(
            (status, provider.as_str(), reason.as_str()),
            (200, "deep", "budget_exhausted")
        );
    }
}
