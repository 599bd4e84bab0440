//! Daily budgets against a real redis-server on a loopback port: three sidecars share one
//! budget and never pass it together; Redis killed mid-run, each `budget_store_down` mode
//! holds and no reservation waits more than 100 ms longer; Redis back, the settles made
//! meanwhile reach it. Needs `redis-server` (Debian package; .ci/run installs it).

use std::collections::HashMap;

use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;

use llm_sidecar::config::budgets::TargetRef;
use llm_sidecar::config::{compile, ConfigSource, Snapshot};
use llm_sidecar::spend::ledger::{nanos_ceil, nanos_round};
use llm_sidecar::spend::{ExhaustedReason, RedisSettings, Spend, Store};
use llm_sidecar::telemetry::metrics::Metrics;
use prometheus_client::registry::Registry;
use support::redis::RedisServer;

fn snapshot(budgets: &str) -> Snapshot {
    let text = format!(
        "{budgets}
providers:
  holysheep: {{ kind: relay, base_url: 'http://127.0.0.1:1/sheep/v1' }}
routes:
  deepseek-v3.2:
    relay: {{ provider: holysheep, model: deepseek-v3.2 }}
"
    );
    compile(
        &text,
        ConfigSource::Embedded,
        1,
        &HashMap::<String, String>::new(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn target(snap: &Snapshot) -> TargetRef<'_> {
    TargetRef::of(snap.route("deepseek-v3.2").unwrap().relay.as_ref().unwrap())
}

async fn sidecar(redis: &RedisServer, timeout: Duration) -> (Arc<Spend>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::register(&mut Registry::default()));
    let settings = RedisSettings {
        url: redis.url(),
        password: None,
        timeout,
    };
    let store = Store::redis(&settings, metrics.clone()).await.unwrap();
    let spend = Spend::new(store, metrics.clone());
    assert!(spend.store_up(), "connected at start");
    (spend, metrics)
}

fn key(snap: &Snapshot) -> String {
    let day = jiff::Timestamp::now()
        .to_zoned(snap.budgets.list[0].timezone.clone())
        .date();
    format!("llm-sidecar:budget:{}:{day}", snap.budgets.list[0].name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_sidecars_share_one_budget_and_never_pass_it_together() {
    let redis = RedisServer::start();
    // fail_closed: even a store that seemed down under this machine's load cannot overspend.
    let snap = Arc::new(snapshot(
        "budget_store_down: fail_closed
budgets: [{ name: shared, match: { provider: holysheep }, daily_usd: 2, timezone: Europe/Berlin }]",
    ));
    let mut sidecars = Vec::new();
    for _ in 0..3 {
        sidecars.push(sidecar(&redis, Duration::from_secs(2)).await.0);
    }
    let mut tasks = Vec::new();
    for (s, spend) in sidecars.iter().enumerate() {
        for t in 0..60u64 {
            let (spend, snap) = (spend.clone(), snap.clone());
            tasks.push(tokio::spawn(async move {
                let mut settled: i64 = 0;
                for i in 0..8u64 {
                    let worst = 0.01 + ((s as u64 * 31 + t * 7 + i * 13) % 10) as f64 * 0.005;
                    let Ok(held) = spend.reserve(&snap.budgets, target(&snap), worst).await else {
                        continue;
                    };
                    tokio::task::yield_now().await;
                    if i % 4 == 0 {
                        drop(held); // a failed attempt
                    } else {
                        let actual = worst * 0.9;
                        held.settle(actual).await;
                        settled += nanos_round(actual);
                    }
                }
                settled
            }));
        }
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    // Releases of dropped reservations are sent in the background: wait for them to land.
    let key = key(&snap);
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.counts(&key).1 != 0 {
        assert!(
            Instant::now() < deadline,
            "reservations still held: {:?}",
            redis.counts(&key)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (spent, reserved) = redis.counts(&key);
    assert_eq!(reserved, 0);
    assert!(spent <= nanos_ceil(2.0), "{spent} nano-USD spent of 2 USD");
    assert_eq!(
        spent, total,
        "Redis counts exactly what the sidecars settled"
    );
    assert!(spent > nanos_ceil(1.5), "the cap was reached: {spent}");
    for spend in &sidecars {
        assert!(spend.store_up());
    }
}

/// Kills Redis after a first settle, then checks what `mode` does and how long reserves wait.
async fn redis_killed_mid_run(mode: &str) {
    let mut redis = RedisServer::start();
    let timeout = Duration::from_millis(50);
    let snap = snapshot(&format!(
        "budget_store_down: {mode}
budgets: [{{ name: capped, match: {{ provider: holysheep }}, daily_usd: 1 }}]"
    ));
    let (spend, metrics) = sidecar(&redis, timeout).await;
    let mut baseline = Duration::ZERO;
    for _ in 0..5 {
        let started = Instant::now();
        let held = spend
            .reserve(&snap.budgets, target(&snap), 0.1)
            .await
            .unwrap();
        baseline = baseline.max(started.elapsed());
        held.settle(0.1).await;
    }
    assert_eq!(redis.counts(&key(&snap)), (nanos_ceil(0.5), 0));

    redis.kill();
    let mut worst = Duration::ZERO;
    let mut outcomes = Vec::new();
    for amount in [0.3, 0.3, 5.0, 0.01] {
        let started = Instant::now();
        let result = spend.reserve(&snap.budgets, target(&snap), amount).await;
        worst = worst.max(started.elapsed());
        outcomes.push(match result {
            Ok(held) => {
                held.settle(amount).await;
                "ok".to_string()
            }
            Err(e) => e.reason.as_str().to_string(),
        });
    }
    assert!(
        worst < baseline + Duration::from_millis(100),
        "{mode}: a reserve waited {worst:?} with Redis down (baseline {baseline:?}, timeout {timeout:?})"
    );
    assert!(!spend.store_up(), "{mode}");
    assert_eq!(metrics.budgets.store_up.get(), 0, "{mode}");
    let view = spend.store_view(&snap.budgets);
    assert_eq!(view["state"], "down", "{mode}: {view}");
    assert_eq!(view["on_down"], mode);
    match mode {
        // What this sidecar saw (0.5) plus its own since: 0.8, then 0.3 and 5 do not fit.
        "local" => assert_eq!(
            outcomes,
            ["ok", "budget_exhausted", "budget_exhausted", "ok"],
            "{mode}"
        ),
        "fail_open" => assert_eq!(outcomes, ["ok", "ok", "ok", "ok"], "{mode}"),
        "fail_closed" => {
            assert_eq!(outcomes, ["budget_store_down"; 4], "{mode}");
            let cheap = spend.exhausted(&snap.budgets, target(&snap)).unwrap();
            assert_eq!(cheap.reason, ExhaustedReason::StoreDown);
        }
        _ => unreachable!(),
    }

    // Redis back on the same port: the store comes back by itself, and what was spent
    // meanwhile is counted there.
    let redis = RedisServer::on(redis.port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !spend.store_up() {
        assert!(
            Instant::now() < deadline,
            "{mode}: the store did not come back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let expected = match mode {
        "local" => 0.3 + 0.01,
        "fail_open" => 0.3 + 0.3 + 5.0 + 0.01,
        _ => 0.0,
    };
    // The restarted server has no data: it holds what was settled while it was away.
    assert_eq!(
        redis.counts(&key(&snap)),
        (nanos_round(expected), 0),
        "{mode}"
    );
    assert_eq!(metrics.budgets.store_up.get(), 1);
}

#[tokio::test]
async fn redis_killed_mid_run_local_keeps_enforcing_what_this_sidecar_saw() {
    redis_killed_mid_run("local").await;
}

#[tokio::test]
async fn redis_killed_mid_run_fail_open_allows() {
    redis_killed_mid_run("fail_open").await;
}

#[tokio::test]
async fn redis_killed_mid_run_fail_closed_refuses() {
    redis_killed_mid_run("fail_closed").await;
}

/// `make bench-budget`: the cost of a budget check (reserve + settle) per request, in memory
/// and with Redis on loopback. Run in release: `cargo test --release --test spend -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: make bench-budget"]
async fn bench_budget_checks() {
    let snap = Arc::new(snapshot(
        "budgets: [{ name: bench, match: { provider: holysheep }, daily_usd: 1000000 }]",
    ));
    let redis = RedisServer::start();
    let memory = Spend::new(
        Store::Memory,
        Arc::new(Metrics::register(&mut Registry::default())),
    );
    let shared = sidecar(&redis, Duration::from_millis(50)).await.0;
    for (name, spend) in [("memory", memory), ("redis", shared)] {
        for concurrency in [1usize, 64] {
            let per_task = if name == "memory" { 20_000 } else { 2_000 };
            let started = Instant::now();
            let tasks: Vec<_> = (0..concurrency)
                .map(|_| {
                    let (spend, snap) = (spend.clone(), snap.clone());
                    tokio::spawn(async move {
                        for _ in 0..per_task {
                            let held = spend
                                .reserve(&snap.budgets, target(&snap), 0.001)
                                .await
                                .unwrap();
                            held.settle(0.0005).await;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            let n = (concurrency * per_task) as f64;
            let elapsed = started.elapsed().as_secs_f64();
            println!(
                "budget check ({name}, {concurrency} concurrent): {:.1} µs per request (reserve + settle), {:.0} req/s",
                elapsed / n * 1e6 * concurrency as f64,
                n / elapsed
            );
        }
    }
}
