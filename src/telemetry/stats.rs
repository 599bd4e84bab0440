//! `/stats`: per target and in total since start, requests, successes, fallbacks, failures,
//! latency percentiles, tokens, cost and savings (the migration playbook's `get_stats()`).
//! Everything is a lock-free atomic; latency percentiles come from a log-bucketed sketch with
//! about 2 % relative error, so memory stays fixed however long the sidecar runs.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use super::cost::{Bill, Usage};

/// Bucket growth factor: a value is reported within about 2 % of what was measured.
const GAMMA: f64 = 1.04;
/// From 1 µs to over an hour.
const BUCKETS: usize = 570;

/// A fixed-size latency sketch: bucket `i` counts values in `[GAMMA^i, GAMMA^(i+1))` µs.
pub struct Sketch {
    counts: Box<[AtomicU64]>,
    total: AtomicU64,
}

impl Default for Sketch {
    fn default() -> Self {
        Sketch {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(0),
        }
    }
}

impl Sketch {
    pub fn record(&self, d: Duration) {
        let micros = d.as_micros().max(1) as f64;
        let index = ((micros.ln() / GAMMA.ln()) as usize).min(BUCKETS - 1);
        self.counts[index].fetch_add(1, Relaxed);
        self.total.fetch_add(1, Relaxed);
    }

    /// The `q` quantile (0..=1) in milliseconds, `None` before any value.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.total.load(Relaxed);
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c.load(Relaxed);
            if seen >= rank {
                // The bucket's geometric middle.
                let micros = GAMMA.powf(i as f64 + 0.5);
                return Some((micros / 1000.0 * 100.0).round() / 100.0);
            }
        }
        None
    }
}

/// Counters shared by the per-target and the total view.
#[derive(Default)]
pub struct Tally {
    pub requests: AtomicU64,
    pub successes: AtomicU64,
    pub fallbacks: AtomicU64,
    pub failures: AtomicU64,
    pub latency: Sketch,
    input_tokens: AtomicU64,
    output_tokens: AtomicU64,
    cached_input_tokens: AtomicU64,
    /// USD in nano-dollars, so an atomic integer can hold it.
    cost_nano: AtomicU64,
    savings_nano: AtomicI64,
    /// Answers with a price: savings are counted over these only.
    priced: AtomicU64,
    /// Answers without reported usage.
    usage_missing: AtomicU64,
}

fn nano(usd: f64) -> i64 {
    (usd * 1e9).round() as i64
}

impl Tally {
    /// A request (or attempt) sent.
    pub fn sent(&self) {
        self.requests.fetch_add(1, Relaxed);
    }

    /// An answer given: first-hand, or after another target failed.
    pub fn answered(&self, fell_back: bool) {
        let counter = if fell_back {
            &self.fallbacks
        } else {
            &self.successes
        };
        counter.fetch_add(1, Relaxed);
    }

    pub fn failed(&self) {
        self.failures.fetch_add(1, Relaxed);
    }

    pub fn add_usage(&self, usage: Option<Usage>, bill: Bill) {
        let Some(usage) = usage else {
            self.usage_missing.fetch_add(1, Relaxed);
            return;
        };
        self.input_tokens.fetch_add(usage.input, Relaxed);
        self.output_tokens.fetch_add(usage.output, Relaxed);
        self.cached_input_tokens
            .fetch_add(usage.cached_input, Relaxed);
        if let Some(cost) = bill.cost {
            self.cost_nano.fetch_add(nano(cost).max(0) as u64, Relaxed);
            self.priced.fetch_add(1, Relaxed);
        }
        if let Some(savings) = bill.savings() {
            self.savings_nano.fetch_add(nano(savings), Relaxed);
        }
    }

    fn view(&self) -> serde_json::Map<String, Value> {
        let q = |q| self.latency.quantile_ms(q);
        let cost = self.cost_nano.load(Relaxed) as f64 / 1e9;
        let savings = self.savings_nano.load(Relaxed) as f64 / 1e9;
        let json = json!({
            "requests": self.requests.load(Relaxed),
            "successes": self.successes.load(Relaxed),
            "fallbacks": self.fallbacks.load(Relaxed),
            "failures": self.failures.load(Relaxed),
            "latency_ms": { "p50": q(0.50), "p95": q(0.95), "p99": q(0.99) },
            "tokens": {
                "input": self.input_tokens.load(Relaxed),
                "output": self.output_tokens.load(Relaxed),
                "cached_input": self.cached_input_tokens.load(Relaxed),
            },
            "cost_usd": cost,
            "savings_usd": savings,
            "usage_missing": self.usage_missing.load(Relaxed),
        });
        match json {
            Value::Object(map) => map,
            _ => serde_json::Map::new(),
        }
    }
}

/// One target's totals: who it is, and its tally.
pub struct TargetStats {
    pub route: Arc<str>,
    pub provider: Arc<str>,
    pub model: Arc<str>,
    pub path: &'static str,
    pub tally: Tally,
}

/// Everything `/stats` shows. Targets are kept by route and `provider/model`, across reloads.
pub struct Stats {
    started: SystemTime,
    pub total: Tally,
    targets: Mutex<Vec<Arc<TargetStats>>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: SystemTime::now(),
            total: Tally::default(),
            targets: Mutex::new(Vec::new()),
        }
    }
}

impl Stats {
    /// The totals of one target, created on first use (once per target and config generation).
    pub fn target(
        &self,
        route: &Arc<str>,
        provider: &Arc<str>,
        model: &Arc<str>,
        path: &'static str,
    ) -> Arc<TargetStats> {
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = targets.iter().find(|t| {
            t.route == *route && t.provider == *provider && t.model == *model && t.path == path
        }) {
            return t.clone();
        }
        let t = Arc::new(TargetStats {
            route: route.clone(),
            provider: provider.clone(),
            model: model.clone(),
            path,
            tally: Tally::default(),
        });
        targets.push(t.clone());
        t
    }

    pub fn view(&self) -> Value {
        let targets: Vec<Value> = self
            .targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|t| {
                let mut map = serde_json::Map::new();
                map.insert("route".into(), json!(t.route.as_ref()));
                map.insert("provider".into(), json!(t.provider.as_ref()));
                map.insert("model".into(), json!(t.model.as_ref()));
                map.insert("path".into(), json!(t.path));
                map.extend(t.tally.view());
                Value::Object(map)
            })
            .collect();
        let since = self
            .started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        json!({
            "since_unix": since,
            "total": Value::Object(self.total.view()),
            "targets": targets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_within_two_percent() {
        let sketch = Sketch::default();
        for ms in 1..=1000u64 {
            sketch.record(Duration::from_millis(ms));
        }
        for (q, expected) in [(0.5, 500.0), (0.95, 950.0), (0.99, 990.0)] {
            let got = sketch.quantile_ms(q).unwrap();
            assert!(
                (got - expected).abs() / expected < 0.025,
                "p{q}: {got} vs {expected}"
            );
        }
        assert_eq!(Sketch::default().quantile_ms(0.5), None);
    }

    #[test]
    fn extremes_stay_in_range() {
        let sketch = Sketch::default();
        sketch.record(Duration::ZERO);
        sketch.record(Duration::from_secs(100_000));
        assert!(sketch.quantile_ms(0.0).unwrap() < 0.01);
        assert!(sketch.quantile_ms(1.0).unwrap() > 3_600_000.0);
    }

    #[test]
    fn totals_and_savings() {
        let stats = Stats::default();
        let route: Arc<str> = Arc::from("deepseek-v3.2");
        let provider: Arc<str> = Arc::from("holysheep");
        let model: Arc<str> = Arc::from("deepseek-v3.2");
        let t = stats.target(&route, &provider, &model, "relay");
        assert!(Arc::ptr_eq(
            &t,
            &stats.target(&route, &provider, &model, "relay")
        ));
        let usage = Usage {
            input: 1_000_000,
            output: 1_000_000,
            cached_input: 0,
        };
        let bill = Bill {
            cost: Some(0.63),
            official: Some(2.0),
        };
        t.tally.add_usage(Some(usage), bill);
        t.tally.add_usage(None, Bill::default());
        let view = stats.view();
        let target = &view["targets"][0];
        assert_eq!(target["tokens"]["input"], 1_000_000);
        assert_eq!(target["cost_usd"], 0.63);
        assert_eq!(target["savings_usd"], 1.37);
        assert_eq!(target["usage_missing"], 1);
    }
}
