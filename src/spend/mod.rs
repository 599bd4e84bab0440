//! Daily spend budgets: before an attempt on a target a budget matches, reserve its worst-case
//! cost on every matching budget (all or none); settle on the real cost when the answer ends;
//! a reservation dropped unsettled (a failed attempt) is released. Reservations count as spent
//! until they settle, so concurrent requests never take a day past its cap. The counts live in
//! memory (per sidecar) or in Redis (shared by every sidecar using it). Not `routing::budget`,
//! which is the retry budget.

pub mod clock;
pub mod ledger;
pub mod redis;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use jiff::civil::Date;
use serde_json::json;

use crate::config::budgets::{Budget, Budgets, OnExhausted, StoreDownMode, TargetRef};
use crate::config::Price;
use crate::telemetry::cost::Usage;
use crate::telemetry::metrics::{BudgetLabels, Metrics};
pub use clock::Clock;
use ledger::{nanos_ceil, nanos_round, usd, Ledger, Nanos};
pub use redis::{RedisSettings, RedisStore};

/// The most a call can cost: the prompt at the input price plus `max_tokens` (the request's, or
/// the route's default) at the output price.
pub fn worst_case_usd(price: &Price, prompt_tokens: u64, max_tokens: u64) -> f64 {
    price.cost(Usage {
        input: prompt_tokens,
        output: max_tokens,
        cached_input: 0,
    })
}

/// Somewhere to say a budget reached an alert level besides the log (a Kubernetes Event).
pub trait AlertSink: Send + Sync {
    fn budget_alert(&self, budget: &str, message: &str);
}

/// The reason header of an answer that came after a budget turned a target away.
pub const BUDGET_EXHAUSTED: &str = "budget_exhausted";

/// Why a target may not be used now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exhausted {
    pub budget: Arc<str>,
    pub on_exhausted: OnExhausted,
    /// Until the budget's next local midnight.
    pub retry_after: Duration,
    pub reason: ExhaustedReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExhaustedReason {
    /// The day's spend and reservations leave no room for this one.
    Spent,
    /// The shared store is down and `budget_store_down: fail_closed`.
    StoreDown,
}

impl ExhaustedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ExhaustedReason::Spent => "budget_exhausted",
            ExhaustedReason::StoreDown => "budget_store_down",
        }
    }
}

impl Exhausted {
    /// The answer when a budget refuses: 429 `budget_exceeded`, naming the budget, with
    /// `Retry-After` up to its reset.
    pub fn error(&self) -> crate::errors::SidecarError {
        crate::errors::SidecarError::BudgetExceeded {
            budget: self.budget.to_string(),
            message: self.to_string(),
            retry_after: self.retry_after,
        }
    }
}

impl std::fmt::Display for Exhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.reason {
            ExhaustedReason::Spent => write!(
                f,
                "daily budget `{}` is spent; it resets in {} s",
                self.budget,
                self.retry_after.as_secs()
            ),
            ExhaustedReason::StoreDown => write!(
                f,
                "daily budget `{}` cannot be checked (its store is down, budget_store_down: fail_closed)",
                self.budget
            ),
        }
    }
}

/// Where the counts are kept.
pub enum Store {
    /// In this process: each sidecar has its own budgets.
    Memory,
    /// In Redis, shared by every sidecar pointed at it.
    Redis(Arc<RedisStore>),
}

impl Store {
    /// A Redis store, with one connection attempt made (it keeps trying in the background).
    pub async fn redis(settings: &RedisSettings, metrics: Arc<Metrics>) -> Result<Store, String> {
        let store = RedisStore::new(settings, metrics)?;
        store.start().await;
        Ok(Store::Redis(store))
    }

    /// A Redis store on the sidecar's link (shared with the cache's tier; the caller starts it).
    pub fn redis_on(link: Arc<crate::redis_link::RedisLink>, metrics: Arc<Metrics>) -> Store {
        Store::Redis(RedisStore::on(link, metrics))
    }

    fn kind(&self) -> &'static str {
        match self {
            Store::Memory => "memory",
            Store::Redis(_) => "redis",
        }
    }
}

/// The budgets' counts, one per process, kept across config reloads (by budget name).
pub struct Spend {
    store: Store,
    ledgers: RwLock<HashMap<Arc<str>, Arc<Ledger>, foldhash::fast::RandomState>>,
    clock: Clock,
    metrics: Arc<Metrics>,
    sink: OnceLock<Arc<dyn AlertSink>>,
}

/// One budget a reservation holds.
struct Part {
    budget: Arc<Budget>,
    ledger: Arc<Ledger>,
    date: Date,
    key: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Memory,
    /// Reserved in Redis.
    Shared,
    /// Reserved locally while Redis was down: its spend is sent to Redis once it is back.
    Unshared,
}

/// The worst case of one attempt, held on every budget matching its target. Settle it with
/// the real cost; dropped unsettled, it is released (a failed attempt costs nothing).
#[must_use = "dropping a reservation releases it"]
pub struct Reservation {
    spend: Option<Arc<Spend>>,
    parts: Vec<Part>,
    amount: Nanos,
    via: Via,
}

impl Spend {
    pub fn new(store: Store, metrics: Arc<Metrics>) -> Arc<Spend> {
        Spend::with_clock(store, metrics, Clock::System)
    }

    pub fn with_clock(store: Store, metrics: Arc<Metrics>, clock: Clock) -> Arc<Spend> {
        if matches!(store, Store::Memory) {
            metrics.budgets.store_up.set(1);
        }
        Arc::new(Spend {
            store,
            ledgers: Default::default(),
            clock,
            metrics,
            sink: OnceLock::new(),
        })
    }

    /// Where alerts go besides the log; set once (the first one stays).
    pub fn set_sink(&self, sink: Arc<dyn AlertSink>) {
        let _ = self.sink.set(sink);
    }

    /// Whether the shared store answers (always true in memory).
    pub fn store_up(&self) -> bool {
        match &self.store {
            Store::Memory => true,
            Store::Redis(r) => r.is_up(),
        }
    }

    fn ledger(&self, name: &Arc<str>) -> Arc<Ledger> {
        if let Some(l) = self
            .ledgers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return l.clone();
        }
        self.ledgers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.clone())
            .or_default()
            .clone()
    }

    fn exhausted_by(&self, budget: &Budget, reason: ExhaustedReason) -> Exhausted {
        self.metrics
            .budgets
            .refusals
            .get_or_create(&BudgetLabels {
                budget: budget.name.clone(),
            })
            .inc();
        Exhausted {
            budget: budget.name.clone(),
            on_exhausted: budget.on_exhausted,
            retry_after: clock::until_reset(&budget.timezone, self.clock.now()),
            reason,
        }
    }

    /// The planner's check, without IO: the first budget matching `target` that has nothing
    /// left today (as this sidecar last saw it), or whose store is down with `fail_closed`.
    /// A reservation can still be refused when this says nothing.
    pub fn exhausted(&self, budgets: &Budgets, target: TargetRef<'_>) -> Option<Exhausted> {
        let now = self.clock.now();
        let closed = budgets.store_down == StoreDownMode::FailClosed && !self.store_up();
        budgets.matching(target).find_map(|b| {
            let reason = if closed {
                ExhaustedReason::StoreDown
            } else {
                let state = self.ledger(&b.name).state(clock::day(&b.timezone, now));
                if state.counts.used() < nanos_ceil(b.daily_usd) {
                    return None;
                }
                ExhaustedReason::Spent
            };
            Some(Exhausted {
                budget: b.name.clone(),
                on_exhausted: b.on_exhausted,
                retry_after: clock::until_reset(&b.timezone, now),
                reason,
            })
        })
    }

    /// Reserves `worst_case_usd` on every budget matching `target`, or on none. With no
    /// matching budget this is immediate and holds nothing. With Redis it waits at most the
    /// store's timeout, and not at all while the store is down.
    pub async fn reserve(
        self: &Arc<Self>,
        budgets: &Budgets,
        target: TargetRef<'_>,
        worst_case_usd: f64,
    ) -> Result<Reservation, Exhausted> {
        let now = self.clock.now();
        let parts: Vec<Part> = budgets
            .matching(target)
            .map(|b| {
                let date = clock::day(&b.timezone, now);
                Part {
                    budget: b.clone(),
                    ledger: self.ledger(&b.name),
                    key: format!("llm-sidecar:budget:{}:{date}", b.name),
                    date,
                }
            })
            .collect();
        let amount = nanos_ceil(worst_case_usd);
        if parts.is_empty() {
            return Ok(Reservation {
                spend: None,
                parts,
                amount: 0,
                via: Via::Memory,
            });
        }
        let via = match &self.store {
            Store::Memory => {
                self.reserve_local(&parts, amount, false)?;
                Via::Memory
            }
            Store::Redis(redis) => {
                let keys: Vec<String> = parts.iter().map(|p| p.key.clone()).collect();
                let caps: Vec<Nanos> = parts
                    .iter()
                    .map(|p| nanos_ceil(p.budget.daily_usd))
                    .collect();
                match redis.reserve(&keys, &caps, amount).await {
                    Some((ok, counts)) => {
                        for (part, c) in parts.iter().zip(&counts) {
                            part.ledger.observe(part.date, *c);
                        }
                        if !ok {
                            let refused = parts
                                .iter()
                                .zip(&counts)
                                .find(|(p, c)| {
                                    c.used().saturating_add(amount) > nanos_ceil(p.budget.daily_usd)
                                })
                                .map_or(&parts[0], |(p, _)| p);
                            refused.ledger.mark_refusing(refused.date);
                            self.check_alerts(&parts);
                            return Err(self.exhausted_by(&refused.budget, ExhaustedReason::Spent));
                        }
                        Via::Shared
                    }
                    None => match budgets.store_down {
                        StoreDownMode::Local => {
                            self.reserve_local(&parts, amount, false)?;
                            Via::Unshared
                        }
                        StoreDownMode::FailOpen => {
                            self.reserve_local(&parts, amount, true)?;
                            Via::Unshared
                        }
                        StoreDownMode::FailClosed => {
                            return Err(
                                self.exhausted_by(&parts[0].budget, ExhaustedReason::StoreDown)
                            )
                        }
                    },
                }
            }
        };
        self.check_alerts(&parts);
        Ok(Reservation {
            spend: Some(self.clone()),
            parts,
            amount,
            via,
        })
    }

    /// Reserves on each ledger in turn; on a refusal the ones before are released.
    fn reserve_local(&self, parts: &[Part], amount: Nanos, force: bool) -> Result<(), Exhausted> {
        for (i, part) in parts.iter().enumerate() {
            let cap = nanos_ceil(part.budget.daily_usd);
            if part
                .ledger
                .try_reserve(part.date, amount, cap, force)
                .is_err()
            {
                for earlier in &parts[..i] {
                    earlier.ledger.settle(earlier.date, amount, 0);
                }
                self.check_alerts(&parts[i..=i]);
                return Err(self.exhausted_by(&part.budget, ExhaustedReason::Spent));
            }
        }
        Ok(())
    }

    fn check_alerts(&self, parts: &[Part]) {
        for part in parts {
            let cap = nanos_ceil(part.budget.daily_usd);
            for level in part
                .ledger
                .new_alerts(part.date, cap, &part.budget.alert_at)
            {
                self.alert(part, level);
            }
        }
    }

    fn alert(&self, part: &Part, level: f64) {
        let state = part.ledger.state(part.date);
        let name = &part.budget.name;
        let message = format!(
            "llm-sidecar: daily budget `{name}` reached {:.0} % of {} USD on {} ({}): {} USD spent, {} USD reserved{}",
            level * 100.0,
            part.budget.daily_usd,
            part.date,
            part.budget.timezone_name,
            crate::telemetry::cost::format_usd(usd(state.counts.spent)),
            crate::telemetry::cost::format_usd(usd(state.counts.reserved)),
            if state.refusing { "; requests are being refused" } else { "" },
        );
        tracing::warn!(budget = %name, level, day = %part.date, "{message}");
        self.metrics
            .budgets
            .alerts
            .get_or_create(&BudgetLabels {
                budget: name.clone(),
            })
            .inc();
        let Some(sink) = self.sink.get().cloned() else {
            return;
        };
        match &self.store {
            // One Event per deployment: the first sidecar to claim the level posts it.
            Store::Redis(redis) if redis.is_up() => {
                let (redis, key, name) = (redis.clone(), part.key.clone(), name.clone());
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        if redis.claim_alert(&key, level).await {
                            sink.budget_alert(&name, &message);
                        }
                    });
                }
            }
            _ => sink.budget_alert(name, &message),
        }
    }

    /// Each budget's day as `/stats` and `/config` show it.
    pub fn view(&self, budgets: &Budgets) -> serde_json::Value {
        let now = self.clock.now();
        let store_state = match &self.store {
            Store::Memory => "memory",
            Store::Redis(r) if r.is_up() => "up",
            Store::Redis(_) => "down",
        };
        let list: Vec<serde_json::Value> = budgets
            .list
            .iter()
            .map(|b| {
                let date = clock::day(&b.timezone, now);
                let state = self.ledger(&b.name).state(date);
                let limit = nanos_ceil(b.daily_usd);
                json!({
                    "name": &*b.name,
                    "day": date.to_string(),
                    "timezone": b.timezone_name,
                    "limit_usd": b.daily_usd,
                    "spent_usd": usd(state.counts.spent),
                    "reserved_usd": usd(state.counts.reserved),
                    "remaining_usd": usd((limit - state.counts.used()).max(0)),
                    "exhausted": state.refusing || state.counts.used() >= limit,
                    "on_exhausted": b.on_exhausted.as_str(),
                    "resets_in_seconds": clock::until_reset(&b.timezone, now).as_secs(),
                    "store": self.store.kind(),
                    "store_state": store_state,
                })
            })
            .collect();
        json!(list)
    }

    /// The store as `/config` shows it: kind, state, the store-down mode; never credentials.
    pub fn store_view(&self, budgets: &Budgets) -> serde_json::Value {
        let mut view = match &self.store {
            Store::Memory => json!({
                "kind": "memory",
                "state": "up",
                "shared": false,
                "note": "budgets are per sidecar: each replica enforces its own daily_usd",
            }),
            Store::Redis(r) => r.view(),
        };
        if let Some(map) = view.as_object_mut() {
            map.insert("on_down".into(), json!(budgets.store_down.as_str()));
        }
        view
    }

    /// Sets the budget gauges from the counts (on each `/metrics` scrape); budgets no longer
    /// in the config lose their series.
    pub fn export_metrics(&self, budgets: &Budgets) {
        let m = &self.metrics.budgets;
        let now = self.clock.now();
        let mut known = Vec::with_capacity(budgets.list.len());
        for b in &budgets.list {
            let labels = BudgetLabels {
                budget: b.name.clone(),
            };
            let state = self.ledger(&b.name).state(clock::day(&b.timezone, now));
            let limit = nanos_ceil(b.daily_usd);
            m.spent.get_or_create(&labels).set(usd(state.counts.spent));
            m.reserved
                .get_or_create(&labels)
                .set(usd(state.counts.reserved));
            m.limit.get_or_create(&labels).set(b.daily_usd);
            m.exhausted
                .get_or_create(&labels)
                .set(i64::from(state.refusing || state.counts.used() >= limit));
            known.push(labels);
        }
        let stale: Vec<Arc<str>> = self
            .ledgers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .filter(|name| !known.iter().any(|l| &l.budget == *name))
            .cloned()
            .collect();
        for name in stale {
            let labels = BudgetLabels { budget: name };
            m.spent.remove(&labels);
            m.reserved.remove(&labels);
            m.limit.remove(&labels);
            m.exhausted.remove(&labels);
        }
    }
}

impl Reservation {
    /// True when no budget matched: settling or dropping it does nothing.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The worst case held, USD.
    pub fn reserved_usd(&self) -> f64 {
        usd(self.amount)
    }

    /// The budgets held, by name.
    pub fn budgets(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().map(|p| &*p.budget.name)
    }

    /// Counts `actual_usd` (what the answer cost, more or less than the worst case; for a cut
    /// stream, what was streamed) and frees the rest. With Redis this waits at most the store's
    /// timeout; a settle the store did not take is sent when it is back.
    pub async fn settle(mut self, actual_usd: f64) {
        self.finish(nanos_round(actual_usd)).await;
    }

    async fn finish(&mut self, actual: Nanos) {
        let Some(spend) = self.spend.take() else {
            return;
        };
        let parts = std::mem::take(&mut self.parts);
        for part in &parts {
            part.ledger.settle(part.date, self.amount, actual);
        }
        if let Store::Redis(redis) = &spend.store {
            let reserved = match self.via {
                Via::Shared => self.amount,
                Via::Unshared | Via::Memory => 0,
            };
            if self.via != Via::Unshared || actual > 0 {
                let pending = redis::Pending {
                    keys: parts.iter().map(|p| p.key.clone()).collect(),
                    reserved,
                    actual,
                };
                if let Some(counts) = redis.settle(pending).await {
                    for (part, c) in parts.iter().zip(counts) {
                        part.ledger.observe(part.date, c);
                    }
                }
            }
        }
        spend.check_alerts(&parts);
    }
}

impl Drop for Reservation {
    /// An attempt that failed (or was dropped for any reason) releases what it held.
    fn drop(&mut self) {
        let Some(spend) = self.spend.take() else {
            return;
        };
        let parts = std::mem::take(&mut self.parts);
        for part in &parts {
            part.ledger.settle(part.date, self.amount, 0);
        }
        if let (Via::Shared, Store::Redis(redis)) = (self.via, &spend.store) {
            let pending = redis::Pending {
                keys: parts.iter().map(|p| p.key.clone()).collect(),
                reserved: self.amount,
                actual: 0,
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    let redis = redis.clone();
                    rt.spawn(async move { redis.settle(pending).await });
                }
                Err(_) => redis.queue(pending),
            }
        }
    }
}

#[cfg(test)]
mod tests;
