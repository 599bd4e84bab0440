//! What the response cache did: per route, how each answer was found (hit, miss, stale,
//! bypass), the requests that waited for an identical one, and what hits saved; for the whole
//! sidecar, its bytes, entries and evictions, and what the shared tier in Redis did (hits,
//! stores, skips, errors, up or down). Prometheus and `/stats` read the same counts.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};

/// How an answer was found, the `x-llm-sidecar-cache` header's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheStatus {
    /// Served from the cache, fresh (or from an identical request's answer).
    Hit,
    /// Not in the cache: a provider answered.
    Miss,
    /// Every target failed; an older answer was served, marked so.
    Stale,
    /// The cache was not used: the route does not cache, the request is not deterministic,
    /// or the client said `skip` or `no-store`.
    Bypass,
}

impl CacheStatus {
    pub const ALL: [CacheStatus; 4] = [
        CacheStatus::Hit,
        CacheStatus::Miss,
        CacheStatus::Stale,
        CacheStatus::Bypass,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Stale => "stale",
            CacheStatus::Bypass => "bypass",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub route: Arc<str>,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Arc<str>,
}

type F64Counter = Counter<f64, AtomicU64>;

/// One route's cache counts for `/stats`, and its `cache_lookups` series, fetched from the
/// family once (a family lookup takes a lock and hashes the labels: every model request counts
/// one).
struct RouteTally {
    /// By [`CacheStatus`], in [`CacheStatus::ALL`]'s order.
    lookups: [Counter; 4],
    coalesced: AtomicU64,
    static_fallbacks: AtomicU64,
    /// Answers served from an entry found in the shared tier.
    shared_hits: AtomicU64,
    /// What the hits would have cost, in nano-USD.
    savings_nano: AtomicU64,
}

#[derive(Default)]
pub struct CacheMetrics {
    pub lookups: Family<CacheLabels, Counter>,
    pub coalesced: Family<RouteLabels, Counter>,
    pub static_fallbacks: Family<RouteLabels, Counter>,
    pub savings: Family<RouteLabels, F64Counter>,
    pub evictions: Counter,
    pub bytes: Gauge,
    pub entries: Gauge,
    /// 1 while the shared tier's Redis answers; 0 while it is down or there is none.
    pub shared_up: Gauge,
    pub shared_hits: Family<RouteLabels, Counter>,
    pub shared_stores: Counter,
    pub shared_skipped: Family<super::metrics::ReasonLabels, Counter>,
    pub shared_errors: Family<super::metrics::ReasonLabels, Counter>,
    routes: Mutex<Vec<(Arc<str>, Arc<RouteTally>)>>,
}

impl CacheMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "cache_lookups",
            "Model requests by how their answer was found: hit, miss, stale (served after every target failed) or bypass",
            self.lookups.clone(),
        );
        registry.register(
            "cache_coalesced",
            "Requests served the answer of an identical request in flight instead of calling a provider",
            self.coalesced.clone(),
        );
        registry.register(
            "cache_static_fallbacks",
            "Requests answered with the route's static_fallback text after every target failed",
            self.static_fallbacks.clone(),
        );
        registry.register(
            "cache_savings_usd",
            "What the answers served from the cache cost when they were bought, in USD",
            self.savings.clone(),
        );
        registry.register(
            "cache_evictions",
            "Cached answers dropped for room or for age",
            self.evictions.clone(),
        );
        registry.register(
            "cache_bytes",
            "Bytes of answers the cache holds",
            self.bytes.clone(),
        );
        registry.register(
            "cache_entries",
            "Answers the cache holds",
            self.entries.clone(),
        );
        registry.register(
            "cache_shared_up",
            "1 while the cache's shared tier (Redis) answers; 0 while it is down or not configured",
            self.shared_up.clone(),
        );
        registry.register(
            "cache_shared_hits",
            "Answers served (fresh or stale) from an entry another sidecar, or this one, put in the shared tier",
            self.shared_hits.clone(),
        );
        registry.register(
            "cache_shared_stores",
            "Answers written to the shared tier",
            self.shared_stores.clone(),
        );
        registry.register(
            "cache_shared_skipped",
            "Shared-tier lookups or writes not made, by reason: down (Redis down) or too_large (over cache.shared_max_entry_bytes)",
            self.shared_skipped.clone(),
        );
        registry.register(
            "cache_shared_errors",
            "Shared-tier calls that failed, by reason: timeout, error, or malformed (an entry this build cannot read)",
            self.shared_errors.clone(),
        );
    }

    fn route(&self, route: &str) -> Arc<RouteTally> {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, tally)) = routes.iter().find(|(name, _)| name.as_ref() == route) {
            return tally.clone();
        }
        let tally = Arc::new(RouteTally {
            lookups: CacheStatus::ALL.map(|status| {
                self.lookups
                    .get_or_create(&CacheLabels {
                        route: Arc::from(route),
                        result: status.as_str(),
                    })
                    .clone()
            }),
            coalesced: AtomicU64::default(),
            static_fallbacks: AtomicU64::default(),
            shared_hits: AtomicU64::default(),
            savings_nano: AtomicU64::default(),
        });
        routes.push((Arc::from(route), tally.clone()));
        tally
    }

    /// Counts how a model request's answer was found.
    pub fn looked_up(&self, route: &str, status: CacheStatus) {
        self.route(route).lookups[status as usize].inc();
    }

    /// A hit saved what its answer cost when it was bought.
    pub fn saved(&self, route: &str, usd: f64) {
        if usd.is_finite() && usd > 0.0 {
            let labels = RouteLabels {
                route: Arc::from(route),
            };
            self.savings.get_or_create(&labels).inc_by(usd);
            self.route(route)
                .savings_nano
                .fetch_add((usd * 1e9).round() as u64, Relaxed);
        }
    }

    pub fn waited(&self, route: &str) {
        let labels = RouteLabels {
            route: Arc::from(route),
        };
        self.coalesced.get_or_create(&labels).inc();
        self.route(route).coalesced.fetch_add(1, Relaxed);
    }

    /// An answer served from an entry found in the shared tier.
    pub fn shared_hit(&self, route: &str) {
        let labels = RouteLabels {
            route: Arc::from(route),
        };
        self.shared_hits.get_or_create(&labels).inc();
        self.route(route).shared_hits.fetch_add(1, Relaxed);
    }

    /// `/stats`' `cache.shared`: the tier's state (`up`, `down` or `off`) and its counts.
    pub fn shared_view(&self, state: &'static str) -> Value {
        let count = |family: &Family<super::metrics::ReasonLabels, Counter>, reason| {
            family
                .get_or_create(&super::metrics::ReasonLabels { reason })
                .get()
        };
        let hits: u64 = self
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(_, t)| t.shared_hits.load(Relaxed))
            .sum();
        json!({
            "state": state,
            "hits": hits,
            "stores": self.shared_stores.get(),
            "skipped": {
                "down": count(&self.shared_skipped, "down"),
                "too_large": count(&self.shared_skipped, "too_large"),
            },
            "errors": {
                "timeout": count(&self.shared_errors, "timeout"),
                "error": count(&self.shared_errors, "error"),
                "malformed": count(&self.shared_errors, "malformed"),
            },
        })
    }

    pub fn static_fallback(&self, route: &str) {
        let labels = RouteLabels {
            route: Arc::from(route),
        };
        self.static_fallbacks.get_or_create(&labels).inc();
        self.route(route).static_fallbacks.fetch_add(1, Relaxed);
    }

    /// `/stats`' `cache` section: per route, and the store's size.
    pub fn view(&self) -> Value {
        let routes: serde_json::Map<String, Value> = self
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, t)| {
                (
                    name.to_string(),
                    json!({
                        "hits": t.lookups[CacheStatus::Hit as usize].get(),
                        "misses": t.lookups[CacheStatus::Miss as usize].get(),
                        "stale": t.lookups[CacheStatus::Stale as usize].get(),
                        "bypass": t.lookups[CacheStatus::Bypass as usize].get(),
                        "coalesced": t.coalesced.load(Relaxed),
                        "static_fallbacks": t.static_fallbacks.load(Relaxed),
                        "shared_hits": t.shared_hits.load(Relaxed),
                        "savings_usd": t.savings_nano.load(Relaxed) as f64 / 1e9,
                    }),
                )
            })
            .collect();
        json!({
            "bytes": self.bytes.get(),
            "entries": self.entries.get(),
            "evictions": self.evictions.get(),
            "routes": routes,
        })
    }
}
