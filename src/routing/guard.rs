//! The automatic rollback guard. When enabled, it watches the relay's attempts over a sliding
//! window; if their error rate or p95 latency passes the configured threshold (with a minimum
//! number of attempts), it trips: every request goes to the official providers, loudly (log,
//! metric, `/config`, a Kubernetes Event when permitted), until an operator changes any of the
//! four flags, or the configured hold time passes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::time::Instant;

use crate::config::{unix_seconds, Flags, GuardConfig, Snapshot};
use crate::telemetry::metrics::Metrics;

/// At most this many attempts are kept in the window (the oldest are dropped first).
const MAX_SAMPLES: usize = 20_000;
/// p95 is recomputed at most every this many attempts (the error rate on every one).
const P95_EVERY: u32 = 16;

/// Somewhere to say the guard tripped besides the log and metrics (a Kubernetes Event).
pub trait TripSink: Send + Sync {
    fn tripped(&self, message: &str);
}

/// Why and when the guard tripped.
#[derive(Clone, Debug)]
pub struct Trip {
    pub at: SystemTime,
    at_instant: Instant,
    /// The flags in force when it tripped: any change to them clears the trip.
    pub flags: Flags,
    pub reason: String,
    pub error_rate: f64,
    pub p95: Option<Duration>,
    pub attempts: usize,
}

#[derive(Default)]
struct Window {
    /// (when, failed, latency)
    samples: VecDeque<(Instant, bool, Duration)>,
    failures: usize,
    trip: Option<Trip>,
    last_cleared: Option<(SystemTime, &'static str)>,
}

impl Window {
    fn prune(&mut self, now: Instant, window: Duration) {
        while let Some((at, failed, _)) = self.samples.front() {
            if now.duration_since(*at) <= window && self.samples.len() <= MAX_SAMPLES {
                break;
            }
            if *failed {
                self.failures -= 1;
            }
            self.samples.pop_front();
        }
    }

    fn p95(&self) -> Option<Duration> {
        let mut latencies: Vec<Duration> = self
            .samples
            .iter()
            .filter(|(_, failed, _)| !failed)
            .map(|(_, _, l)| *l)
            .collect();
        if latencies.is_empty() {
            return None;
        }
        let k = (latencies.len() * 95).div_ceil(100).saturating_sub(1);
        let (_, nth, _) = latencies.select_nth_unstable(k);
        Some(*nth)
    }
}

pub struct Guard {
    tripped: AtomicBool,
    window: Mutex<Window>,
    since_p95: AtomicU32,
    metrics: Arc<Metrics>,
    sink: OnceLock<Arc<dyn TripSink>>,
}

impl Guard {
    pub fn new(metrics: Arc<Metrics>) -> Guard {
        Guard {
            tripped: AtomicBool::new(false),
            window: Mutex::new(Window::default()),
            since_p95: AtomicU32::new(0),
            metrics,
            sink: OnceLock::new(),
        }
    }

    /// Where trips are also reported (set once, when the ConfigMap watch runs).
    pub fn set_sink(&self, sink: Arc<dyn TripSink>) {
        let _ = self.sink.set(sink);
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether requests under `snapshot` must avoid the relay. One atomic load when not tripped.
    pub fn is_tripped(&self, snapshot: &Snapshot, now: Instant) -> bool {
        if !self.tripped.load(Ordering::Acquire) {
            return false;
        }
        let mut w = self.locked();
        let Some(trip) = &w.trip else {
            return false;
        };
        let cleared = if trip.flags != snapshot.flags {
            Some("an operator changed the flags")
        } else if !snapshot.guard.enabled {
            Some("the guard was disabled")
        } else if !snapshot.guard.hold.is_zero()
            && now.duration_since(trip.at_instant) >= snapshot.guard.hold
        {
            Some("the hold time passed")
        } else {
            None
        };
        match cleared {
            None => true,
            Some(why) => {
                tracing::warn!(
                    why,
                    "rollback guard cleared: routing follows the flags again"
                );
                w.trip = None;
                // A fresh start: the samples that tripped it must not trip it again at once.
                w.samples.clear();
                w.failures = 0;
                w.last_cleared = Some((SystemTime::now(), why));
                self.tripped.store(false, Ordering::Release);
                self.metrics.guard_tripped.set(0);
                false
            }
        }
    }

    /// Records one relay attempt of primary traffic (never shadows). `failed`: the attempt
    /// failed in a way that is the relay's fault (not a client error).
    pub fn record(&self, snapshot: &Snapshot, failed: bool, latency: Duration, now: Instant) {
        let cfg: &GuardConfig = &snapshot.guard;
        if !cfg.enabled {
            return;
        }
        let mut w = self.locked();
        if w.trip.is_some() {
            return;
        }
        w.samples.push_back((now, failed, latency));
        if failed {
            w.failures += 1;
        }
        w.prune(now, cfg.window);
        let attempts = w.samples.len();
        if attempts < cfg.min_requests as usize {
            return;
        }
        let error_rate = w.failures as f64 / attempts as f64;
        let mut reason = None;
        if error_rate > cfg.max_error_rate {
            reason = Some(format!(
                "relay error rate {:.0}% over the last {:?} ({} of {attempts} attempts) is above {:.0}%",
                error_rate * 100.0,
                cfg.window,
                w.failures,
                cfg.max_error_rate * 100.0
            ));
        }
        let mut p95 = None;
        if reason.is_none() && self.since_p95.fetch_add(1, Ordering::Relaxed) % P95_EVERY == 0 {
            p95 = w.p95();
            if let Some(p) = p95.filter(|p| *p > cfg.max_p95_latency) {
                reason = Some(format!(
                    "relay p95 latency {p:?} over the last {:?} ({attempts} attempts) is above {:?}",
                    cfg.window, cfg.max_p95_latency
                ));
            }
        }
        let Some(reason) = reason else { return };
        let trip = Trip {
            at: SystemTime::now(),
            at_instant: now,
            flags: snapshot.flags,
            reason: reason.clone(),
            error_rate,
            p95: p95.or_else(|| w.p95()),
            attempts,
        };
        w.trip = Some(trip);
        drop(w);
        self.tripped.store(true, Ordering::Release);
        self.metrics.guard_tripped.set(1);
        self.metrics.guard_trips.inc();
        tracing::error!(
            %reason,
            "ROLLBACK GUARD TRIPPED: every request now goes to the official providers until an operator changes the flags{}",
            if cfg.hold.is_zero() { String::new() } else { format!(" or {:?} pass", cfg.hold) }
        );
        if let Some(sink) = self.sink.get() {
            sink.tripped(&format!(
                "llm-sidecar rollback guard tripped, routing to the official providers: {reason}"
            ));
        }
    }

    /// The guard as `/config` shows it.
    pub fn view(&self, snapshot: &Snapshot) -> serde_json::Value {
        let w = self.locked();
        let cfg = &snapshot.guard;
        json!({
            "enabled": cfg.enabled,
            "tripped": w.trip.is_some(),
            "trip": w.trip.as_ref().map(|t| json!({
                "at_unix": unix_seconds(t.at),
                "reason": t.reason,
                "error_rate": t.error_rate,
                "p95_ms": t.p95.map(|p| p.as_millis() as u64),
                "attempts": t.attempts,
            })),
            "last_cleared": w.last_cleared.map(|(at, why)| json!({ "at_unix": unix_seconds(at), "why": why })),
            "window_attempts": w.samples.len(),
            "window_failures": w.failures,
            "thresholds": {
                "window_ms": cfg.window.as_millis() as u64,
                "min_requests": cfg.min_requests,
                "max_error_rate": cfg.max_error_rate,
                "max_p95_latency_ms": cfg.max_p95_latency.as_millis() as u64,
                "hold_ms": cfg.hold.as_millis() as u64,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{compile, ConfigSource, EMBEDDED_DEFAULT};
    use prometheus_client::registry::Registry;
    use std::collections::HashMap;

    /// The embedded default with its `guard:` block replaced by `guard: <guard>`.
    fn snapshot(guard: &str) -> Snapshot {
        let start = EMBEDDED_DEFAULT
            .find("\nguard:\n")
            .expect("the default has a guard block");
        let end = start
            + 1
            + EMBEDDED_DEFAULT[start + 1..]
                .find("\n\n")
                .expect("the guard block ends");
        let text = format!(
            "{}\nguard: {guard}\n{}",
            &EMBEDDED_DEFAULT[..start],
            &EMBEDDED_DEFAULT[end..]
        );
        compile(
            &text,
            ConfigSource::Embedded,
            1,
            &HashMap::<String, String>::new(),
        )
        .unwrap()
    }

    fn guard() -> Guard {
        Guard::new(Arc::new(Metrics::register(&mut Registry::default())))
    }

    #[test]
    fn off_by_default() {
        let snap = snapshot("{}");
        let g = guard();
        let now = Instant::now();
        for _ in 0..100 {
            g.record(&snap, true, Duration::from_millis(5), now);
        }
        assert!(!g.is_tripped(&snap, now));
    }

    #[test]
    fn an_error_burst_trips_it_only_past_the_minimum_and_it_stays_tripped() {
        let snap = snapshot("{ enabled: true, min_requests: 10, max_error_rate: 0.5 }");
        let g = guard();
        let now = Instant::now();
        for _ in 0..9 {
            g.record(&snap, true, Duration::from_millis(5), now);
        }
        assert!(!g.is_tripped(&snap, now), "below min_requests");
        g.record(&snap, true, Duration::from_millis(5), now);
        assert!(g.is_tripped(&snap, now));
        assert_eq!(g.metrics.guard_tripped.get(), 1);
        // It stays tripped: no hold time, same flags.
        assert!(g.is_tripped(&snap, now + Duration::from_secs(3600)));
        assert_eq!(g.view(&snap)["tripped"], true);
    }

    #[test]
    fn healthy_traffic_does_not_trip_and_old_failures_leave_the_window() {
        let snap =
            snapshot("{ enabled: true, min_requests: 10, max_error_rate: 0.5, window: 10s }");
        let g = guard();
        let start = Instant::now();
        for _ in 0..8 {
            g.record(&snap, true, Duration::from_millis(5), start);
        }
        let later = start + Duration::from_secs(11);
        for _ in 0..10 {
            g.record(&snap, false, Duration::from_millis(5), later);
        }
        assert!(!g.is_tripped(&snap, later));
        assert_eq!(g.view(&snap)["window_failures"], 0);
    }

    #[test]
    fn slow_relay_trips_it_on_p95() {
        let snap = snapshot("{ enabled: true, min_requests: 20, max_p95_latency: 1s }");
        let g = guard();
        let now = Instant::now();
        for _ in 0..40 {
            g.record(&snap, false, Duration::from_secs(3), now);
        }
        assert!(g.is_tripped(&snap, now));
        assert!(g.view(&snap)["trip"]["reason"]
            .as_str()
            .unwrap()
            .contains("p95"));
    }

    #[test]
    fn changed_flags_or_the_hold_time_clear_it() {
        let snap = snapshot("{ enabled: true, min_requests: 5, hold: 30s }");
        let g = guard();
        let now = Instant::now();
        for _ in 0..5 {
            g.record(&snap, true, Duration::from_millis(5), now);
        }
        assert!(g.is_tripped(&snap, now + Duration::from_secs(29)));
        assert!(!g.is_tripped(&snap, now + Duration::from_secs(30)));

        for _ in 0..5 {
            g.record(&snap, true, Duration::from_millis(5), now);
        }
        assert!(g.is_tripped(&snap, now));
        let mut changed = snapshot("{ enabled: true, min_requests: 5, hold: 30s }");
        changed.flags.rollout_percent = 50;
        assert!(!g.is_tripped(&changed, now));
        assert_eq!(
            g.view(&changed)["last_cleared"]["why"],
            "an operator changed the flags"
        );
        assert_eq!(g.metrics.guard_tripped.get(), 0);
    }
}
