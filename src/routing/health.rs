//! Per-target health, shared by all requests and kept across config reloads (keyed by
//! provider and upstream model): the circuit breaker and moving averages of latency and
//! time to first token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::breaker::{Admission, Breaker, BreakerConfig, Phase};
use super::plan::HealthLookup;

/// Weight of the newest sample in the moving averages.
const EWMA_ALPHA: f64 = 0.3;

#[derive(Clone, Copy, Debug, Default)]
struct Ewma(Option<f64>);

impl Ewma {
    fn observe(&mut self, sample: Duration) {
        let s = sample.as_secs_f64();
        self.0 = Some(match self.0 {
            None => s,
            Some(avg) => avg * (1.0 - EWMA_ALPHA) + s * EWMA_ALPHA,
        });
    }

    fn get(self) -> Option<Duration> {
        self.0.map(Duration::from_secs_f64)
    }
}

#[derive(Clone, Debug, Default)]
struct TargetHealth {
    breaker: Breaker,
    latency: Ewma,
    ttft: Ewma,
}

#[derive(Default)]
pub struct Health {
    targets: Mutex<HashMap<Arc<str>, TargetHealth>>,
}

impl Health {
    fn with<T>(&self, key: &Arc<str>, f: impl FnOnce(&mut TargetHealth) -> T) -> T {
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        // Look up by reference first: cloning the shared key on every request costs more than
        // the lookup itself.
        if let Some(target) = targets.get_mut(key.as_ref()) {
            return f(target);
        }
        f(targets.entry(key.clone()).or_default())
    }

    fn read<T>(&self, key: &str, f: impl FnOnce(&TargetHealth) -> T) -> Option<T> {
        let targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        targets.get(key).map(f)
    }

    pub fn admit(&self, key: &Arc<str>, now: Instant, forced: bool) -> Admission {
        self.with(key, |t| {
            if forced {
                t.breaker.force_probe()
            } else {
                t.breaker.admit(now)
            }
        })
    }

    pub fn record_success(&self, key: &Arc<str>, latency: Duration, ttft: Option<Duration>) {
        self.with(key, |t| {
            t.breaker.on_success();
            t.latency.observe(latency);
            if let Some(ttft) = ttft {
                t.ttft.observe(ttft);
            }
        })
    }

    pub fn record_failure(&self, key: &Arc<str>, now: Instant, config: &BreakerConfig) {
        self.with(key, |t| t.breaker.on_failure(now, config))
    }

    pub fn record_inconclusive(&self, key: &Arc<str>) {
        self.with(key, |t| t.breaker.on_inconclusive())
    }

    pub fn phase(&self, key: &str, now: Instant) -> Phase {
        self.read(key, |t| t.breaker.phase(now))
            .unwrap_or(Phase::Closed)
    }

    /// Every known target with its breaker phase, for `/metrics`.
    pub fn phases(&self, now: Instant) -> Vec<(Arc<str>, Phase)> {
        let targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = targets
            .iter()
            .map(|(k, t)| (k.clone(), t.breaker.phase(now)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// A point-in-time view for planning one request: one lock for the whole plan. Planning
    /// is synchronous, so the lock is never held across an await.
    pub fn lookup(&self, now: Instant) -> HealthNow<'_> {
        HealthNow {
            targets: self.targets.lock().unwrap_or_else(|p| p.into_inner()),
            now,
        }
    }
}

pub struct HealthNow<'a> {
    targets: std::sync::MutexGuard<'a, HashMap<Arc<str>, TargetHealth>>,
    now: Instant,
}

impl HealthLookup for HealthNow<'_> {
    fn blocking(&self, key: &str) -> bool {
        self.targets
            .get(key)
            .is_some_and(|t| t.breaker.is_blocking(self.now))
    }

    fn last_failure(&self, key: &str) -> Option<Instant> {
        self.targets.get(key).and_then(|t| t.breaker.last_failure())
    }

    fn latency(&self, key: &str) -> Option<Duration> {
        self.targets.get(key).and_then(|t| t.latency.get())
    }

    fn closed(&self, key: &str) -> bool {
        self.targets
            .get(key)
            .is_none_or(|t| t.breaker.phase(self.now) == Phase::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn latency_is_a_moving_average() {
        let health = Health::default();
        let key: Arc<str> = Arc::from("p/m");
        health.record_success(&key, Duration::from_millis(100), None);
        health.record_success(&key, Duration::from_millis(200), None);
        let latency = health.lookup(Instant::now()).latency("p/m").unwrap();
        assert!((latency.as_secs_f64() - 0.13).abs() < 1e-9, "{latency:?}");
        assert_eq!(health.lookup(Instant::now()).latency("other"), None);
    }
}
