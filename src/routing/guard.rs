//! The automatic rollback guard. When enabled, it watches the relay's attempts over a sliding
//! window; if their error rate or p95 latency passes the configured threshold (with a minimum
//! number of attempts), it trips: every request goes to the official providers, loudly (log,
//! metric, `/config`, a Kubernetes Event when permitted), until an operator changes any of the
//! four flags, or the configured hold time passes.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::time::Instant;

use crate::config::{unix_seconds, Flags, GuardConfig, Snapshot};
use crate::telemetry::metrics::Metrics;

/// p95 is recomputed at most every this many attempts (the error rate on every one).
const P95_EVERY: u32 = 16;
/// The window is counted in this many slots: an attempt leaves it within a slot's length of
/// the window's end.
const SLOTS: usize = 20;
/// Latency buckets: bucket `b` holds latencies up to `1 ms × GROWTH^b`, so a p95 read from them
/// is at most a fifth too high; the last one holds everything above about an hour.
const BUCKETS: usize = 84;
const GROWTH: f64 = 1.2;

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

/// The attempts of one slice of the window, counted in atomics: recording an attempt takes no
/// lock. A slot is reused for a later slice by the first attempt that finds it stale (an
/// attempt recorded at that same instant by another worker may be lost: the guard counts
/// rates, not every attempt).
struct Slot {
    /// The slice this slot counts, plus one (0: never used).
    slice: AtomicU64,
    attempts: AtomicU32,
    failures: AtomicU32,
    /// Successful attempts by latency bucket.
    latencies: [AtomicU32; BUCKETS],
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            slice: AtomicU64::new(0),
            attempts: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            latencies: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

impl Slot {
    fn clear(&self) {
        self.attempts.store(0, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        for bucket in &self.latencies {
            bucket.store(0, Ordering::Relaxed);
        }
    }
}

fn bucket_of(latency: Duration) -> usize {
    let ms = latency.as_secs_f64() * 1000.0;
    if ms <= 1.0 {
        return 0;
    }
    ((ms.ln() / GROWTH.ln()).ceil() as usize).min(BUCKETS - 1)
}

fn bucket_bound(bucket: usize) -> Duration {
    Duration::from_secs_f64(GROWTH.powi(bucket as i32) / 1000.0)
}

/// The window's totals, summed over its slots.
#[derive(Default)]
struct Totals {
    attempts: usize,
    failures: usize,
    latencies: Option<[u64; BUCKETS]>,
}

impl Totals {
    fn p95(&self) -> Option<Duration> {
        let latencies = self.latencies.as_ref()?;
        let ok: u64 = latencies.iter().sum();
        if ok == 0 {
            return None;
        }
        let rank = (ok * 95).div_ceil(100);
        let mut seen = 0;
        latencies
            .iter()
            .position(|n| {
                seen += n;
                seen >= rank
            })
            .map(bucket_bound)
    }
}

/// What only changes rarely: the trip itself.
#[derive(Default)]
struct TripState {
    trip: Option<Trip>,
    last_cleared: Option<(SystemTime, &'static str)>,
}

pub struct Guard {
    tripped: AtomicBool,
    slots: Box<[Slot]>,
    /// Slices are counted from here, `slice_nanos` long (a window change starts afresh).
    origin: Instant,
    slice_nanos: AtomicU64,
    /// The latest slice an attempt was recorded in.
    latest: AtomicU64,
    since_p95: AtomicU32,
    state: Mutex<TripState>,
    metrics: Arc<Metrics>,
    sink: OnceLock<Arc<dyn TripSink>>,
}

impl Guard {
    pub fn new(metrics: Arc<Metrics>) -> Guard {
        Guard {
            tripped: AtomicBool::new(false),
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            origin: Instant::now(),
            slice_nanos: AtomicU64::new(0),
            latest: AtomicU64::new(0),
            since_p95: AtomicU32::new(0),
            state: Mutex::new(TripState::default()),
            metrics,
            sink: OnceLock::new(),
        }
    }

    /// Where trips are also reported (set once, when the ConfigMap watch runs).
    pub fn set_sink(&self, sink: Arc<dyn TripSink>) {
        let _ = self.sink.set(sink);
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, TripState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn clear_window(&self) {
        for slot in self.slots.iter() {
            slot.slice.store(0, Ordering::Relaxed);
            slot.clear();
        }
    }

    /// The current slice under `window`, starting the count afresh when the window changed.
    fn slice(&self, now: Instant, window: Duration) -> u64 {
        let nanos = (window.as_nanos() / SLOTS as u128).clamp(1, u128::from(u64::MAX)) as u64;
        if self.slice_nanos.load(Ordering::Acquire) != nanos
            && self.slice_nanos.swap(nanos, Ordering::AcqRel) != nanos
        {
            self.clear_window();
        }
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        (elapsed / u128::from(nanos)).min(u128::from(u64::MAX - 1)) as u64
    }

    /// Sums the slots of the window ending in `slice`; the latency buckets only on request.
    fn totals(&self, slice: u64, with_latencies: bool) -> Totals {
        let mut totals = Totals {
            latencies: with_latencies.then_some([0; BUCKETS]),
            ..Totals::default()
        };
        let oldest = (slice + 1).saturating_sub(SLOTS as u64 - 1);
        for slot in self.slots.iter() {
            let held = slot.slice.load(Ordering::Acquire);
            if held == 0 || held - 1 < oldest || held - 1 > slice {
                continue;
            }
            totals.attempts += slot.attempts.load(Ordering::Relaxed) as usize;
            totals.failures += slot.failures.load(Ordering::Relaxed) as usize;
            if let Some(latencies) = &mut totals.latencies {
                for (sum, bucket) in latencies.iter_mut().zip(&slot.latencies) {
                    *sum += u64::from(bucket.load(Ordering::Relaxed));
                }
            }
        }
        totals
    }

    /// Whether requests under `snapshot` must avoid the relay. One atomic load when not tripped.
    pub fn is_tripped(&self, snapshot: &Snapshot, now: Instant) -> bool {
        if !self.tripped.load(Ordering::Acquire) {
            return false;
        }
        let mut state = self.locked();
        let Some(trip) = &state.trip else {
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
                state.trip = None;
                // A fresh start: the attempts that tripped it must not trip it again at once.
                self.clear_window();
                state.last_cleared = Some((SystemTime::now(), why));
                self.tripped.store(false, Ordering::Release);
                self.metrics.guard_tripped.set(0);
                false
            }
        }
    }

    /// Records one relay attempt of primary traffic (never shadows). `failed`: the attempt
    /// failed in a way that is the relay's fault (not a client error). Takes no lock unless
    /// the attempt trips the guard.
    pub fn record(&self, snapshot: &Snapshot, failed: bool, latency: Duration, now: Instant) {
        let cfg: &GuardConfig = &snapshot.guard;
        if !cfg.enabled || self.tripped.load(Ordering::Acquire) {
            return;
        }
        let slice = self.slice(now, cfg.window);
        if self.latest.load(Ordering::Relaxed) < slice {
            self.latest.fetch_max(slice, Ordering::Relaxed);
        }
        let slot = &self.slots[(slice % SLOTS as u64) as usize];
        let held = slot.slice.load(Ordering::Acquire);
        if held < slice + 1
            && slot
                .slice
                .compare_exchange(held, slice + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.clear();
        }
        slot.attempts.fetch_add(1, Ordering::Relaxed);
        if failed {
            slot.failures.fetch_add(1, Ordering::Relaxed);
        } else {
            slot.latencies[bucket_of(latency)].fetch_add(1, Ordering::Relaxed);
        }

        let totals = self.totals(slice, false);
        let attempts = totals.attempts;
        if attempts < cfg.min_requests as usize {
            return;
        }
        let error_rate = totals.failures as f64 / attempts as f64;
        let mut reason = None;
        if error_rate > cfg.max_error_rate {
            reason = Some(format!(
                "relay error rate {:.0}% over the last {:?} ({} of {attempts} attempts) is above {:.0}%",
                error_rate * 100.0,
                cfg.window,
                totals.failures,
                cfg.max_error_rate * 100.0
            ));
        }
        let mut p95 = None;
        if reason.is_none() && self.since_p95.fetch_add(1, Ordering::Relaxed) % P95_EVERY == 0 {
            p95 = self.totals(slice, true).p95();
            if let Some(p) = p95.filter(|p| *p > cfg.max_p95_latency) {
                reason = Some(format!(
                    "relay p95 latency {p:?} over the last {:?} ({attempts} attempts) is above {:?}",
                    cfg.window, cfg.max_p95_latency
                ));
            }
        }
        let Some(reason) = reason else { return };
        let mut state = self.locked();
        if state.trip.is_some() {
            return;
        }
        state.trip = Some(Trip {
            at: SystemTime::now(),
            at_instant: now,
            flags: snapshot.flags,
            reason: reason.clone(),
            error_rate,
            p95: p95.or_else(|| self.totals(slice, true).p95()),
            attempts,
        });
        drop(state);
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
        let cfg = &snapshot.guard;
        let slice = self
            .slice(Instant::now(), cfg.window)
            .max(self.latest.load(Ordering::Relaxed));
        let totals = self.totals(slice, false);
        let w = self.locked();
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
            "window_attempts": totals.attempts,
            "window_failures": totals.failures,
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
    fn attempts_recorded_from_many_threads_at_once_are_all_counted() {
        let snap = Arc::new(snapshot(
            "{ enabled: true, min_requests: 1000000, window: 60s }",
        ));
        let g = Arc::new(guard());
        let now = Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (g, snap) = (g.clone(), snap.clone());
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        g.record(&snap, (i + t) % 4 == 0, Duration::from_millis(5), now);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let view = g.view(&snap);
        assert_eq!(view["window_attempts"], 20_000);
        assert_eq!(view["window_failures"], 5_000);
    }

    #[test]
    fn the_p95_read_from_buckets_is_at_most_a_fifth_high() {
        let snap = snapshot("{ enabled: true, min_requests: 1000000 }");
        let g = guard();
        let now = Instant::now();
        for ms in 1..=1000 {
            g.record(&snap, false, Duration::from_millis(ms), now);
        }
        let slice = g.slice(now, snap.guard.window);
        let p95 = g.totals(slice, true).p95().unwrap();
        assert!(
            p95 >= Duration::from_millis(950) && p95 <= Duration::from_millis(1140),
            "{p95:?}"
        );
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
