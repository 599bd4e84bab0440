//! The cache's shared tier through real sidecars sharing one real redis-server: what one
//! sidecar stores the other serves (byte for byte, with one provider call between them), an
//! answer over the per-entry cap stays local, Redis killed only turns the tier off (every
//! request still answered, from the local cache or a provider), and a sidecar whose providers
//! all fail serves another sidecar's answer as stale.

mod support;

use std::time::Duration;

use llm_sidecar::settings::Settings;
use serde_json::json;
use support::cache::{ask, config, content, request, stats, CACHED};
use support::redis::RedisServer;
use support::*;

const PREFIX: &str = "llm-sidecar:cache:*";

fn settings(redis: &RedisServer) -> Settings {
    Settings {
        redis: Some(llm_sidecar::spend::RedisSettings {
            url: redis.url(),
            password: None,
            timeout: Duration::from_millis(200),
        }),
        ..test_settings()
    }
}

async fn metric(sidecar: &llm_sidecar::Sidecar, sample: &str) -> f64 {
    let text = metrics_text(&client(), sidecar.admin_addr).await;
    metric_value(&text, sample).unwrap_or(0.0)
}

/// Waits until Redis holds `n` cache entries (the spawned SETs have landed).
async fn entries_in_redis(redis: &RedisServer, n: usize) {
    eventually(Duration::from_secs(10), "the entries in Redis", || async {
        redis.keys(PREFIX).len() == n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_sidecar_stores_the_other_serves() {
    let redis = RedisServer::start();
    let fake = fake().await;
    let text = config(&fake, "relay-model", "official-model", CACHED, "");
    let first = sidecar_with(settings(&redis), &text).await;
    let second = sidecar_with(settings(&redis), &text).await;

    let (status, miss, bought) = ask(&first, request(false, "Say hello.", json!({})), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&miss, "x-llm-sidecar-cache"), "miss");
    entries_in_redis(&redis, 1).await;
    let key = &redis.keys(PREFIX)[0];
    let ttl = redis.pttl(key);
    assert!(
        ttl > 23 * 3_600_000 && ttl <= 24 * 3_600_000,
        "kept for max_stale: {ttl} ms"
    );

    let (status, hit, served) = ask(&second, request(false, "Say hello.", json!({})), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&hit, "x-llm-sidecar-cache"), "hit");
    assert_eq!(header(&hit, "x-llm-sidecar-path"), "cache");
    assert_eq!(header(&hit, "x-llm-sidecar-cost-usd"), "0");
    assert!(header(&hit, "age").parse::<u64>().is_ok());
    assert_eq!(served, bought, "the first sidecar's answer, byte for byte");
    assert_eq!(fake.requests_for("sheep").len(), 1, "one provider call");

    // The second sidecar keeps what it found: its next hits are its own, even as a stream
    // (the replay fields came through Redis too).
    let (_, again, _) = ask(&second, request(false, "Say hello.", json!({})), &[]).await;
    assert_eq!(header(&again, "x-llm-sidecar-cache"), "hit");
    let (status, streamed, body) = ask(&second, request(true, "Say hello.", json!({})), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&streamed, "x-llm-sidecar-cache"), "hit");
    assert_eq!(stream_text(&sse_data(&body)), content(&bought));
    assert_eq!(fake.requests_for("sheep").len(), 1);
    assert_eq!(
        metric(
            &second,
            "llm_sidecar_cache_shared_hits_total{route=\"chat\"}"
        )
        .await,
        1.0,
        "one answer came from Redis; the others from the second sidecar's own cache"
    );
    let shared = &stats(&second).await["cache"]["shared"];
    assert_eq!(shared["state"], "up", "{shared}");
    assert_eq!(shared["hits"], 1, "{shared}");
    eventually(Duration::from_secs(10), "the store counted", || async {
        stats(&first).await["cache"]["shared"]["stores"] == 1
    })
    .await;
    assert_eq!(metric(&first, "llm_sidecar_cache_shared_up ").await, 1.0);
    let config = call_json(&client(), get(second.admin_addr, "/config"))
        .await
        .2;
    assert_eq!(config["cache"]["shared"]["state"], "up", "{config}");
    assert_eq!(
        config["cache"]["shared"]["key_prefix"],
        "llm-sidecar:cache:"
    );
    assert_eq!(
        config["config"]["cache"]["shared_max_entry_bytes"],
        256 * 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_the_per_entry_cap_stays_in_its_sidecar() {
    let redis = RedisServer::start();
    let fake = fake().await;
    // About 400 words: well over 1 KiB. With max_tokens 3 the answer is a few hundred bytes.
    let text = config(
        &fake,
        "relay-model+tokens=400",
        "official-model",
        CACHED,
        "cache: { shared_max_entry_bytes: 1KiB }",
    );
    let first = sidecar_with(settings(&redis), &text).await;
    let second = sidecar_with(settings(&redis), &text).await;
    let large = || request(false, "Tell me everything.", json!({}));
    let small = || request(false, "Be brief.", json!({"max_tokens": 3}));

    let (status, _, body) = ask(&first, large(), &[]).await;
    assert_eq!(status, 200);
    assert!(body.len() > 1024, "{} bytes", body.len());
    let (status, _, _) = ask(&first, small(), &[]).await;
    assert_eq!(status, 200);
    eventually(Duration::from_secs(10), "both stores decided", || async {
        let shared = &stats(&first).await["cache"]["shared"];
        shared["stores"] == 1 && shared["skipped"]["too_large"] == 1
    })
    .await;
    assert_eq!(redis.keys(PREFIX).len(), 1, "only the small answer");

    let (_, headers, _) = ask(&second, large(), &[]).await;
    assert_eq!(
        header(&headers, "x-llm-sidecar-cache"),
        "miss",
        "not shared"
    );
    let (_, headers, _) = ask(&second, small(), &[]).await;
    assert_eq!(header(&headers, "x-llm-sidecar-cache"), "hit", "shared");
    assert_eq!(fake.requests_for("sheep").len(), 3);
    // The first sidecar still serves its large answer from its own cache.
    let (_, headers, _) = ask(&first, large(), &[]).await;
    assert_eq!(header(&headers, "x-llm-sidecar-cache"), "hit");
    assert_eq!(
        metric(
            &first,
            "llm_sidecar_cache_shared_skipped_total{reason=\"too_large\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_only_turns_the_shared_tier_off() {
    let mut redis = RedisServer::start();
    let fake = fake().await;
    let text = config(&fake, "relay-model", "official-model", CACHED, "");
    let sidecars = [
        sidecar_with(settings(&redis), &text).await,
        sidecar_with(settings(&redis), &text).await,
    ];
    let (_, headers, _) = ask(&sidecars[0], request(false, "Before.", json!({})), &[]).await;
    assert_eq!(header(&headers, "x-llm-sidecar-cache"), "miss");
    entries_in_redis(&redis, 1).await;
    let (_, headers, _) = ask(&sidecars[1], request(false, "Before.", json!({})), &[]).await;
    assert_eq!(header(&headers, "x-llm-sidecar-cache"), "hit");

    redis.kill();
    let mut statuses = Vec::new();
    for (i, sidecar) in sidecars.iter().enumerate() {
        for n in 0..5 {
            // New questions go to a provider, whether or not the tier has noticed yet.
            let question = format!("After {i} {n}.");
            let (status, headers, _) =
                ask(sidecar, request(false, &question, json!({})), &[]).await;
            statuses.push(status);
            assert_eq!(header(&headers, "x-llm-sidecar-cache"), "miss");
        }
        // What each sidecar has is still served from its own cache.
        let (status, headers, _) = ask(sidecar, request(false, "Before.", json!({})), &[]).await;
        statuses.push(status);
        assert_eq!(
            header(&headers, "x-llm-sidecar-cache"),
            "hit",
            "sidecar {i}"
        );
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(fake.requests_for("sheep").len(), 1 + 10);
    for sidecar in &sidecars {
        let shared = &stats(sidecar).await["cache"]["shared"];
        assert_eq!(shared["state"], "down", "{shared}");
        assert!(
            shared["skipped"]["down"].as_u64().unwrap() > 0,
            "skipped, not waited for: {shared}"
        );
        assert_eq!(metric(sidecar, "llm_sidecar_cache_shared_up ").await, 0.0);
        let config = call_json(&client(), get(sidecar.admin_addr, "/config"))
            .await
            .2;
        assert_eq!(config["cache"]["shared"]["state"], "down", "{config}");
        assert!(config["cache"]["shared"]["last_error"].is_string());
    }

    // Back on the same port: the tier comes back by itself and is shared again.
    let redis = RedisServer::on(redis.port);
    for sidecar in &sidecars {
        eventually(Duration::from_secs(10), "the tier back", || async {
            stats(sidecar).await["cache"]["shared"]["state"] == "up"
        })
        .await;
    }
    let (_, headers, _) = ask(&sidecars[0], request(false, "Later.", json!({})), &[]).await;
    assert_eq!(header(&headers, "x-llm-sidecar-cache"), "miss");
    entries_in_redis(&redis, 1).await;
    let (_, headers, _) = ask(&sidecars[1], request(false, "Later.", json!({})), &[]).await;
    assert_eq!(header(&headers, "x-llm-sidecar-cache"), "hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_whose_providers_all_fail_serves_another_sidecars_answer_as_stale() {
    let redis = RedisServer::start();
    let fake = fake().await;
    // Fresh for 1 ms, kept for a day: what the second sidecar finds is stale.
    let cache = "cache: { ttl: 1ms, max_stale: 24h }";
    let healthy = sidecar_with(
        settings(&redis),
        &config(&fake, "relay-model", "official-model", cache, ""),
    )
    .await;
    let failing = sidecar_with(
        settings(&redis),
        &config(
            &fake,
            "relay-model+error=503",
            "official-model+error=500",
            cache,
            "",
        ),
    )
    .await;
    let (_, _, one) = ask(&healthy, request(false, "One.", json!({})), &[]).await;
    let (_, _, two) = ask(&healthy, request(false, "Two.", json!({})), &[]).await;
    entries_in_redis(&redis, 2).await;

    // `refresh` skips every lookup before the providers: the last resort finds it in Redis.
    let (status, headers, body) = ask(
        &failing,
        request(false, "One.", json!({})),
        &[("x-llm-sidecar-cache", "refresh")],
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&headers, "x-llm-sidecar-cache"), "stale");
    assert_eq!(header(&headers, "x-llm-sidecar-path"), "cache");
    assert_eq!(body, one, "the healthy sidecar's answer");
    // A plain lookup finds the stale answer in Redis, asks the providers, then serves it.
    let (status, headers, body) = ask(&failing, request(true, "Two.", json!({})), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-llm-sidecar-cache"), "stale");
    assert_eq!(stream_text(&sse_data(&body)), content(&two));
    assert!(
        fake.requests_for("sheep").len() >= 4,
        "the failing sidecar asked its providers first"
    );
    assert_eq!(
        metric(
            &failing,
            "llm_sidecar_cache_shared_hits_total{route=\"chat\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        metric(
            &failing,
            "llm_sidecar_cache_lookups_total{route=\"chat\",result=\"stale\"}"
        )
        .await,
        2.0
    );
    // Nothing anywhere for a third question: the error is the answer.
    let (status, headers, _) = ask(&failing, request(false, "Three.", json!({})), &[]).await;
    assert!(status >= 500, "{status}");
    assert_eq!(header(&headers, "x-llm-sidecar-cache"), "miss");
}
