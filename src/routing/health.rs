//! Per-target health, shared by all requests and kept across config reloads (keyed by
//! provider and upstream model): the circuit breaker and moving averages of latency and
//! time to first token.
//!
//! The common case, a healthy target, touches no lock: each target has a cell of atomics (the
//! averages and a `troubled` flag), found in a lock-free copy of the registry, and while no
//! target is troubled at all a breaker's question needs no cell. The breaker's state machine
//! sits behind a mutex that is taken only for failures, probes and targets already in trouble.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::breaker::{Admission, Breaker, BreakerConfig, Phase};
use super::plan::{HealthLookup, Standing};
use crate::config::Target;

/// Weight of the newest sample in the moving averages.
const EWMA_ALPHA: f64 = 0.3;
const NO_SAMPLE: u64 = u64::MAX;

/// A moving average kept in an atomic (f64 bits).
#[derive(Debug)]
struct AtomicEwma(AtomicU64);

impl Default for AtomicEwma {
    fn default() -> Self {
        AtomicEwma(AtomicU64::new(NO_SAMPLE))
    }
}

impl AtomicEwma {
    fn observe(&self, sample: Duration) {
        let s = sample.as_secs_f64();
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
                let next = if bits == NO_SAMPLE {
                    s
                } else {
                    f64::from_bits(bits) * (1.0 - EWMA_ALPHA) + s * EWMA_ALPHA
                };
                Some(next.to_bits())
            });
    }

    fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Acquire) {
            NO_SAMPLE => None,
            bits => Some(Duration::from_secs_f64(f64::from_bits(bits).max(0.0))),
        }
    }
}

/// What a target's requests read and update without locking.
#[derive(Debug, Default)]
pub struct HealthCell {
    latency: AtomicEwma,
    ttft: AtomicEwma,
    /// The breaker is not closed with a clean record: consult it under the lock.
    troubled: AtomicBool,
}

impl HealthCell {
    fn observe(&self, latency: Duration, ttft: Option<Duration>) {
        self.latency.observe(latency);
        if let Some(ttft) = ttft {
            self.ttft.observe(ttft);
        }
    }
}

#[derive(Default)]
struct TargetHealth {
    breaker: Breaker,
    cell: Arc<HealthCell>,
}

/// Looked up several times per request: a fast seeded hash (the keys are the config's names).
type Cells = HashMap<Arc<str>, Arc<HealthCell>, foldhash::fast::RandomState>;

#[derive(Default)]
pub struct Health {
    targets: Mutex<HashMap<Arc<str>, TargetHealth>>,
    /// How many targets are troubled. Usually none: then no target's cell is looked up to
    /// learn that its breaker is closed.
    troubled_targets: AtomicUsize,
    /// Every target's cell, read without a lock; replaced whole when a target is added.
    cells: arc_swap::ArcSwap<Cells>,
    /// Woken when a breaker starts wanting background probes, so the prober can plan for it.
    probe_wanted: tokio::sync::Notify,
}

impl Health {
    fn locked(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, TargetHealth>> {
        self.targets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the target's cell: found without a lock in a copy of the registry's cells (a new
    /// target is added to the registry once), so health survives reloads and the hot path never
    /// waits.
    fn with_cell<T>(&self, target: &Target, read: impl FnOnce(&HealthCell) -> T) -> T {
        if let Some(cell) = self.cells.load().get(&target.health_key) {
            return read(cell);
        }
        let cell = self
            .locked()
            .entry(target.health_key.clone())
            .or_default()
            .cell
            .clone();
        self.cells.rcu(|cells| {
            let mut cells = Cells::clone(cells);
            cells.insert(target.health_key.clone(), cell.clone());
            cells
        });
        read(&cell)
    }

    fn troubled(&self, target: &Target) -> bool {
        self.any_troubled() && self.with_cell(target, |cell| cell.troubled.load(Ordering::Acquire))
    }

    fn any_troubled(&self) -> bool {
        self.troubled_targets.load(Ordering::Acquire) > 0
    }

    fn with_breaker<T>(&self, target: &Target, f: impl FnOnce(&mut Breaker) -> T) -> T {
        self.with_key(&target.health_key, f)
    }

    fn with_key<T>(&self, key: &Arc<str>, f: impl FnOnce(&mut Breaker) -> T) -> T {
        let mut targets = self.locked();
        let entry = targets.entry(key.clone()).or_default();
        let probing_before = entry.breaker.background_probe_due().is_some();
        let out = f(&mut entry.breaker);
        let troubled = !entry.breaker.is_clean();
        // Changed only under the lock, so the count follows the flags.
        if entry.cell.troubled.swap(troubled, Ordering::AcqRel) != troubled {
            if troubled {
                self.troubled_targets.fetch_add(1, Ordering::AcqRel);
            } else {
                self.troubled_targets.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if !probing_before && entry.breaker.background_probe_due().is_some() {
            self.probe_wanted.notify_one();
        }
        out
    }

    /// When the soonest background probe is due, if any breaker wants one.
    pub fn next_background_probe(&self) -> Option<Instant> {
        self.locked()
            .values()
            .filter_map(|t| t.breaker.background_probe_due())
            .min()
    }

    /// Resolves when a breaker has newly opened for background probing (or already had, since
    /// the last call): the prober's cue to plan again.
    pub async fn background_probe_wanted(&self) {
        self.probe_wanted.notified().await
    }

    /// Claims every background probe due now, each breaker's next a cooldown later.
    pub fn start_due_background_probes(
        &self,
        now: Instant,
        config: &BreakerConfig,
    ) -> Vec<Arc<str>> {
        self.locked()
            .iter_mut()
            .filter_map(|(key, t)| {
                t.breaker
                    .start_background_probe(now, config)
                    .then(|| key.clone())
            })
            .collect()
    }

    /// A background probe's result: reachable lets the next request through to confirm.
    pub fn record_background_probe(&self, key: &Arc<str>, reachable: bool, now: Instant) {
        self.with_key(key, |b| {
            if reachable {
                b.on_background_success()
            } else {
                b.note_failure(now)
            }
        })
    }

    pub fn admit(&self, target: &Target, now: Instant, forced: bool) -> Admission {
        if !forced && !self.troubled(target) {
            return Admission::Allowed;
        }
        self.with_breaker(target, |b| {
            if forced {
                b.force_probe()
            } else {
                b.admit(now)
            }
        })
    }

    /// A whole answer from the target: its latency counts, and its breaker closes.
    pub fn record_success(&self, target: &Target, latency: Duration, ttft: Option<Duration>) {
        let troubled = self.with_cell(target, |cell| {
            cell.observe(latency, ttft);
            cell.troubled.load(Ordering::Acquire)
        });
        if troubled {
            self.with_breaker(target, Breaker::on_success);
        }
    }

    /// How fast the target started answering. A stream's success is only known at its end
    /// ([`Health::record_answered`]): one cut after its first chunk must not clear the failures
    /// that came before.
    pub fn record_latency(&self, target: &Target, latency: Duration, ttft: Option<Duration>) {
        self.with_cell(target, |cell| cell.observe(latency, ttft));
    }

    /// The target's answer ended well: its breaker closes.
    pub fn record_answered(&self, target: &Target) {
        if self.troubled(target) {
            self.with_breaker(target, Breaker::on_success);
        }
    }

    pub fn record_failure(&self, target: &Target, now: Instant, config: &BreakerConfig) {
        self.with_breaker(target, |b| b.on_failure(now, config))
    }

    pub fn record_inconclusive(&self, target: &Target) {
        if self.troubled(target) {
            self.with_breaker(target, Breaker::on_inconclusive)
        }
    }

    /// Every known target with its breaker phase, for `/metrics`.
    pub fn phases(&self, now: Instant) -> Vec<(Arc<str>, Phase)> {
        let targets = self.locked();
        let mut out: Vec<_> = targets
            .iter()
            .map(|(k, t)| (k.clone(), t.breaker.phase(now)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// A point-in-time view for planning one request.
    pub fn lookup(&self, now: Instant) -> HealthNow<'_> {
        HealthNow {
            health: self,
            now,
            cells: self.any_troubled().then(|| self.cells.load()),
        }
    }
}

/// Planning asks about every target of a chain: the cells are loaded once for all of them.
pub struct HealthNow<'a> {
    health: &'a Health,
    now: Instant,
    /// Loaded only when some target was troubled as planning began: if none was, every
    /// breaker is closed.
    cells: Option<arc_swap::Guard<Arc<Cells>>>,
}

impl HealthNow<'_> {
    fn with_cell<T>(&self, target: &Target, read: impl FnOnce(&HealthCell) -> T) -> T {
        match self.cells.as_ref().and_then(|c| c.get(&target.health_key)) {
            Some(cell) => read(cell),
            None => self.health.with_cell(target, read),
        }
    }

    fn troubled(&self, target: &Target) -> bool {
        self.cells.is_some() && self.with_cell(target, |cell| cell.troubled.load(Ordering::Acquire))
    }

    fn breaker<T>(&self, target: &Target, f: impl FnOnce(&Breaker) -> T) -> Option<T> {
        self.health
            .locked()
            .get(target.health_key.as_ref())
            .map(|t| f(&t.breaker))
    }
}

impl HealthLookup for HealthNow<'_> {
    fn standing(&self, target: &Target) -> Standing {
        if !self.troubled(target) {
            return Standing::Closed;
        }
        self.breaker(target, |b| {
            if b.is_blocking(self.now) {
                Standing::Blocking
            } else if b.phase(self.now) == Phase::Closed {
                Standing::Closed
            } else {
                Standing::Admitting
            }
        })
        .unwrap_or(Standing::Closed)
    }

    fn last_failure(&self, target: &Target) -> Option<Instant> {
        self.breaker(target, Breaker::last_failure).flatten()
    }

    fn latency(&self, target: &Target) -> Option<Duration> {
        self.with_cell(target, |cell| cell.latency.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{compile, ConfigSource, Snapshot};
    use std::collections::HashMap;

    fn snapshot() -> Snapshot {
        compile(
            "providers: { p: { kind: relay, base_url: 'http://127.0.0.1:1/v1' } }\nroutes: { r: { relay: { provider: p, model: m } } }",
            ConfigSource::Embedded,
            1,
            &HashMap::<String, String>::new(),
        )
        .expect("config")
    }

    fn target(s: &Snapshot) -> &Target {
        s.route("r").and_then(|r| r.relay.as_ref()).expect("target")
    }

    #[tokio::test(start_paused = true)]
    async fn latency_is_a_moving_average() {
        let health = Health::default();
        let snap = snapshot();
        health.record_success(target(&snap), Duration::from_millis(100), None);
        health.record_success(target(&snap), Duration::from_millis(200), None);
        let latency = health
            .lookup(Instant::now())
            .latency(target(&snap))
            .unwrap();
        assert!((latency.as_secs_f64() - 0.13).abs() < 1e-9, "{latency:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_mark_a_target_troubled_until_it_recovers_and_survive_a_reload() {
        let health = Health::default();
        let cfg = BreakerConfig {
            probe: crate::routing::breaker::ProbeMode::Request,
            ..BreakerConfig::default()
        };
        let snap = snapshot();
        let t = target(&snap);
        assert_eq!(health.lookup(Instant::now()).standing(t), Standing::Closed);
        for _ in 0..3 {
            health.record_failure(t, Instant::now(), &cfg);
        }
        // A new snapshot's target finds the same health through the registry.
        let reloaded = snapshot();
        let t2 = target(&reloaded);
        assert_eq!(
            health.lookup(Instant::now()).standing(t2),
            Standing::Blocking
        );
        assert_eq!(health.admit(t2, Instant::now(), false), Admission::Rejected);
        tokio::time::advance(cfg.cooldown).await;
        assert_eq!(health.admit(t2, Instant::now(), false), Admission::Probe);
        health.record_success(t2, Duration::from_millis(10), None);
        assert_eq!(health.lookup(Instant::now()).standing(t), Standing::Closed);
        assert_eq!(health.admit(t, Instant::now(), false), Admission::Allowed);
        assert_eq!(
            health.phases(Instant::now()),
            vec![(Arc::from("p/m"), Phase::Closed)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_targets_recovery_leaves_another_troubled_target_blocking() {
        let snap = compile(
            "providers: { p: { kind: relay, base_url: 'http://127.0.0.1:1/v1' } }\nroutes: { a: { relay: { provider: p, model: a } }, b: { relay: { provider: p, model: b } } }",
            ConfigSource::Embedded,
            1,
            &HashMap::<String, String>::new(),
        )
        .expect("config");
        let of = |route: &str| snap.route(route).and_then(|r| r.relay.as_ref()).unwrap();
        let (a, b) = (of("a"), of("b"));
        let health = Health::default();
        let cfg = BreakerConfig {
            probe: crate::routing::breaker::ProbeMode::Request,
            ..BreakerConfig::default()
        };
        for _ in 0..3 {
            health.record_failure(a, Instant::now(), &cfg);
            health.record_failure(b, Instant::now(), &cfg);
        }
        tokio::time::advance(cfg.cooldown).await;
        assert_eq!(health.admit(a, Instant::now(), false), Admission::Probe);
        health.record_success(a, Duration::from_millis(10), None);
        // `b` has not recovered: planning still sees it troubled, and its breaker is asked.
        let now = health.lookup(Instant::now());
        assert_eq!(now.standing(a), Standing::Closed);
        assert_eq!(now.standing(b), Standing::Admitting);
        assert_eq!(health.admit(b, Instant::now(), false), Admission::Probe);
        health.record_success(b, Duration::from_millis(10), None);
        assert_eq!(health.lookup(Instant::now()).standing(b), Standing::Closed);
        assert_eq!(health.troubled_targets.load(Ordering::Acquire), 0);
    }
}
