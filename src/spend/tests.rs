//! The spend module on the in-memory store: arithmetic, release, all-or-nothing, the local
//! day on paused time, the cap under concurrency, and alerts.

use std::collections::HashMap;
use std::sync::Mutex;

use super::*;
use crate::config::{compile, ConfigSource, Snapshot};

fn snapshot(budgets: &str) -> Snapshot {
    let text = format!(
        "{budgets}
providers:
  holysheep: {{ kind: relay, base_url: 'http://127.0.0.1:1/sheep/v1' }}
  deepseek: {{ kind: official, base_url: 'http://127.0.0.1:1/ds/v1' }}
routes:
  deepseek-v3.2:
    relay: {{ provider: holysheep, model: deepseek-v3.2, price: {{ input: 0.21, output: 0.42 }} }}
    official: {{ provider: deepseek, model: deepseek-chat }}
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

fn relay(snap: &Snapshot) -> TargetRef<'_> {
    TargetRef::of(snap.route("deepseek-v3.2").unwrap().relay.as_ref().unwrap())
}

fn official(snap: &Snapshot) -> TargetRef<'_> {
    TargetRef::of(
        snap.route("deepseek-v3.2")
            .unwrap()
            .official
            .as_ref()
            .unwrap(),
    )
}

fn metrics() -> Arc<Metrics> {
    let mut registry = prometheus_client::registry::Registry::default();
    Arc::new(Metrics::register(&mut registry))
}

fn memory() -> Arc<Spend> {
    Spend::new(Store::Memory, metrics())
}

fn spent(spend: &Spend, snap: &Snapshot, i: usize) -> (f64, f64) {
    let view = spend.view(&snap.budgets);
    (
        view[i]["spent_usd"].as_f64().unwrap(),
        view[i]["reserved_usd"].as_f64().unwrap(),
    )
}

#[test]
fn the_worst_case_is_the_prompt_plus_max_tokens_at_their_prices() {
    let price = Price {
        input: 0.21,
        output: 0.42,
        cached_input: Some(0.02),
    };
    // 1 M prompt tokens at 0.21 + 500 k completion tokens at 0.42; the cache is not assumed.
    let usd = worst_case_usd(&price, 1_000_000, 500_000);
    assert!((usd - 0.42).abs() < 1e-12, "{usd}");
}

#[tokio::test]
async fn reserve_then_settle_counts_the_actual_cost_and_frees_the_rest() {
    let snap = snapshot("budgets: [{ name: relay, match: { provider: holysheep }, daily_usd: 1 }]");
    let spend = memory();
    let first = spend
        .reserve(&snap.budgets, relay(&snap), 0.6)
        .await
        .unwrap();
    assert_eq!(first.budgets().collect::<Vec<_>>(), ["relay"]);
    assert_eq!(spent(&spend, &snap, 0), (0.0, 0.6));
    // Reservations count as spent: 0.6 + 0.5 would pass 1.
    let refused = spend
        .reserve(&snap.budgets, relay(&snap), 0.5)
        .await
        .err()
        .unwrap();
    assert_eq!(&*refused.budget, "relay");
    assert_eq!(refused.on_exhausted, OnExhausted::Fallback);
    assert_eq!(refused.reason, ExhaustedReason::Spent);
    assert!(
        refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_secs(86_400)
    );
    first.settle(0.25).await;
    assert_eq!(spent(&spend, &snap, 0), (0.25, 0.0));
    // Now 0.25 + 0.5 fits; an answer longer than its worst case still counts what it cost.
    let second = spend
        .reserve(&snap.budgets, relay(&snap), 0.5)
        .await
        .unwrap();
    second.settle(0.8).await;
    assert_eq!(spent(&spend, &snap, 0), (1.05, 0.0));
    let view = spend.view(&snap.budgets);
    assert_eq!(view[0]["exhausted"], true);
    assert_eq!(view[0]["store"], "memory");
    let cheap = spend.exhausted(&snap.budgets, relay(&snap)).unwrap();
    assert_eq!(&*cheap.budget, "relay");
    // The official target is not matched: no budget, nothing held.
    assert!(spend.exhausted(&snap.budgets, official(&snap)).is_none());
    let free = spend
        .reserve(&snap.budgets, official(&snap), 100.0)
        .await
        .unwrap();
    assert!(free.is_empty());
}

#[tokio::test]
async fn a_failed_attempt_releases_everything_it_reserved() {
    let snap = snapshot(
        "budgets: [{ name: relay, match: { provider: holysheep }, daily_usd: 1 }, { name: all, daily_usd: 5 }]",
    );
    let spend = memory();
    let held = spend
        .reserve(&snap.budgets, relay(&snap), 0.9)
        .await
        .unwrap();
    assert_eq!(spent(&spend, &snap, 1), (0.0, 0.9));
    drop(held);
    assert_eq!(spent(&spend, &snap, 0), (0.0, 0.0));
    assert_eq!(spent(&spend, &snap, 1), (0.0, 0.0));
    assert!(spend
        .reserve(&snap.budgets, relay(&snap), 1.0)
        .await
        .is_ok());
}

#[tokio::test]
async fn a_reservation_is_all_or_nothing_across_matching_budgets() {
    let snap = snapshot(
        "budgets: [{ name: all, daily_usd: 10 }, { name: relay, match: { provider: holysheep }, daily_usd: 1, on_exhausted: reject }]",
    );
    let spend = memory();
    let refused = spend
        .reserve(&snap.budgets, relay(&snap), 2.0)
        .await
        .err()
        .unwrap();
    assert_eq!(&*refused.budget, "relay");
    assert_eq!(refused.on_exhausted, OnExhausted::Reject);
    // The first budget, which had room, holds nothing of it.
    assert_eq!(spent(&spend, &snap, 0), (0.0, 0.0));
}

#[tokio::test(start_paused = true)]
async fn the_day_resets_at_local_midnight_in_the_budgets_time_zone() {
    let snap = snapshot(
        "budgets:
  - { name: shanghai, match: { provider: holysheep }, daily_usd: 1, timezone: Asia/Shanghai }
  - { name: utc, match: { provider: holysheep }, daily_usd: 100 }",
    );
    // 15:00 UTC: 23:00 in Shanghai.
    let clock = Clock::starting_at("2025-03-01T15:00:00Z".parse().unwrap());
    let spend = Spend::with_clock(Store::Memory, metrics(), clock);
    spend
        .reserve(&snap.budgets, relay(&snap), 1.0)
        .await
        .unwrap()
        .settle(1.0)
        .await;
    let spent = spend.exhausted(&snap.budgets, relay(&snap)).unwrap();
    assert_eq!(&*spent.budget, "shanghai");
    assert_eq!(spent.retry_after, Duration::from_secs(3600));
    tokio::time::advance(Duration::from_secs(59 * 60)).await;
    assert!(spend
        .reserve(&snap.budgets, relay(&snap), 0.5)
        .await
        .is_err());
    // 00:01 in Shanghai, 16:01 UTC: a new day there, the same day in UTC.
    tokio::time::advance(Duration::from_secs(2 * 60)).await;
    assert!(spend.exhausted(&snap.budgets, relay(&snap)).is_none());
    let view = spend.view(&snap.budgets);
    assert_eq!(view[0]["day"], "2025-03-02");
    assert_eq!(view[0]["spent_usd"], 0.0);
    assert_eq!(view[1]["day"], "2025-03-01");
    assert_eq!(view[1]["spent_usd"], 1.0);
    spend
        .reserve(&snap.budgets, relay(&snap), 0.9)
        .await
        .unwrap()
        .settle(0.9)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_reservations_never_pass_the_cap() {
    let snap = Arc::new(snapshot(
        "budgets: [{ name: relay, match: { provider: holysheep }, daily_usd: 3 }]",
    ));
    let spend = memory();
    let mut tasks = Vec::new();
    for t in 0..200u64 {
        let (spend, snap) = (spend.clone(), snap.clone());
        tasks.push(tokio::spawn(async move {
            let mut settled = 0.0;
            for i in 0..20u64 {
                let worst = 0.01 + ((t * 7 + i * 13) % 10) as f64 * 0.01;
                let Ok(held) = spend.reserve(&snap.budgets, relay(&snap), worst).await else {
                    continue;
                };
                let (spent, reserved) = spent(&spend, &snap, 0);
                assert!(spent + reserved <= 3.0 + 1e-9, "{spent} + {reserved}");
                tokio::task::yield_now().await;
                match i % 3 {
                    // A failed attempt.
                    0 => drop(held),
                    _ => {
                        let actual = worst / 2.0;
                        held.settle(actual).await;
                        settled += actual;
                    }
                }
            }
            settled
        }));
    }
    let mut total = 0.0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let (spent, reserved) = spent(&spend, &snap, 0);
    assert_eq!(reserved, 0.0);
    assert!(spent <= 3.0, "{spent}");
    assert!((spent - total).abs() < 1e-6, "{spent} vs {total}");
    assert!(spent > 2.5, "the cap was reached: {spent}");
}

#[derive(Default)]
struct Alerts(Mutex<Vec<String>>);

impl AlertSink for Alerts {
    fn budget_alert(&self, budget: &str, message: &str) {
        self.0.lock().unwrap().push(format!("{budget}: {message}"));
    }
}

#[tokio::test]
async fn each_alert_level_reaches_the_sink_once_a_day() {
    let snap = snapshot(
        "budgets: [{ name: relay, match: { provider: holysheep }, daily_usd: 10, alert_at: [0.5, 0.8, 1.0] }]",
    );
    let spend = memory();
    let alerts = Arc::new(Alerts::default());
    spend.set_sink(alerts.clone());
    spend
        .reserve(&snap.budgets, relay(&snap), 6.0)
        .await
        .unwrap()
        .settle(6.0)
        .await;
    spend
        .reserve(&snap.budgets, relay(&snap), 1.0)
        .await
        .unwrap()
        .settle(1.0)
        .await;
    assert_eq!(alerts.0.lock().unwrap().len(), 1);
    spend
        .reserve(&snap.budgets, relay(&snap), 1.5)
        .await
        .unwrap()
        .settle(1.5)
        .await;
    assert!(spend
        .reserve(&snap.budgets, relay(&snap), 5.0)
        .await
        .is_err());
    let got = alerts.0.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got[0].contains("reached 50 % of 10 USD"), "{got:?}");
    assert!(got[1].contains("reached 80 %"), "{got:?}");
    assert!(
        got[2].contains("reached 100 %") && got[2].contains("refused"),
        "{got:?}"
    );
}

#[tokio::test]
async fn the_metrics_show_each_budget_and_forget_removed_ones() {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let spend = Spend::new(Store::Memory, metrics);
    let snap = snapshot("budgets: [{ name: relay, match: { provider: holysheep }, daily_usd: 2 }]");
    let held = spend
        .reserve(&snap.budgets, relay(&snap), 0.5)
        .await
        .unwrap();
    spend.export_metrics(&snap.budgets);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        "llm_sidecar_budget_limit_usd{budget=\"relay\"} 2.0",
        "llm_sidecar_budget_reserved_usd{budget=\"relay\"} 0.5",
        "llm_sidecar_budget_spent_usd{budget=\"relay\"} 0.0",
        "llm_sidecar_budget_exhausted{budget=\"relay\"} 0",
        "llm_sidecar_budget_store_up 1",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    drop(held);
    spend.export_metrics(&snapshot("").budgets);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(!text.contains("budget_limit_usd{"), "{text}");
}
