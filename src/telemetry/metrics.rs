//! Prometheus metrics, registered by the components that own them.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Arc<str>,
    pub provider: Arc<str>,
    pub path: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub route: Arc<str>,
    pub provider: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub provider: Arc<str>,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub target: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

/// LLM calls take from milliseconds to minutes.
const DURATION_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// Shadow minus primary latency, seconds: negative when the shadow side was faster.
const LATENCY_DELTA_BUCKETS: [f64; 15] = [
    -10.0, -5.0, -2.0, -1.0, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// One target's metric handles for successful requests, looked up once per config generation so
/// a request increments them directly instead of searching the label families.
#[derive(Debug)]
pub struct TargetMetrics {
    pub route: Arc<str>,
    pub provider: Arc<str>,
    pub path: &'static str,
    pub ok_attempts: Counter,
    pub requests_ok: Counter,
    pub duration: Histogram,
}

pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<DurationLabels, Histogram>,
    pub in_flight: Gauge,
    pub config_generation: Gauge,
    pub config_reloads: Family<SourceLabels, Counter>,
    pub config_rejections: Family<SourceLabels, Counter>,
    pub attempts: Family<AttemptLabels, Counter>,
    pub breaker_state: Family<TargetLabels, Gauge>,
    pub retry_budget_exhausted: Counter,
    pub malformed_chunks: Counter,
    pub stream_interruptions: Family<OutcomeLabels, Counter>,
    /// 1 while the ConfigMap list/watch works, 0 from an error until it works again.
    pub configmap_watch_up: Gauge,
    pub configmap_watch_errors: Family<ReasonLabels, Counter>,
    /// 1 when the watched ConfigMap exists, 0 when it is absent or deleted.
    pub configmap_present: Gauge,
    /// 1 while the automatic rollback guard holds every request on the official providers.
    pub guard_tripped: Gauge,
    pub guard_trips: Counter,
    pub shadow_requests: Family<OutcomeLabels, Counter>,
    pub shadow_latency_delta: Histogram,
    pub shadow_equivalence: Histogram,
    pub shadow_spend: Counter<f64, std::sync::atomic::AtomicU64>,
    pub shadow_in_flight: Gauge,
    /// Equivalent pairs over compared pairs since start.
    pub shadow_equivalence_rate: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// The label for requests the sidecar answered itself.
    pub none_label: Arc<str>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Metrics {
        let registry = registry.sub_registry_with_prefix("llm_sidecar");
        let metrics = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(|| {
                Histogram::new(DURATION_BUCKETS.iter().copied())
            }),
            in_flight: Gauge::default(),
            config_generation: Gauge::default(),
            config_reloads: Family::default(),
            config_rejections: Family::default(),
            attempts: Family::default(),
            breaker_state: Family::default(),
            retry_budget_exhausted: Counter::default(),
            malformed_chunks: Counter::default(),
            stream_interruptions: Family::default(),
            configmap_watch_up: Gauge::default(),
            configmap_watch_errors: Family::default(),
            configmap_present: Gauge::default(),
            guard_tripped: Gauge::default(),
            guard_trips: Counter::default(),
            shadow_requests: Family::default(),
            shadow_latency_delta: Histogram::new(LATENCY_DELTA_BUCKETS.iter().copied()),
            shadow_equivalence: Histogram::new([
                0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99,
            ]),
            shadow_spend: Counter::default(),
            shadow_in_flight: Gauge::default(),
            shadow_equivalence_rate: Gauge::default(),
            none_label: Arc::from("none"),
        };
        registry.register(
            "requests",
            "Requests answered, by route, provider, path (relay/official) and HTTP status",
            metrics.requests.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "Time from request received to the last response byte sent",
            Unit::Seconds,
            metrics.request_duration.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Requests being served now",
            metrics.in_flight.clone(),
        );
        registry.register(
            "config_generation",
            "Generation of the routing config serving now",
            metrics.config_generation.clone(),
        );
        registry.register(
            "config_reloads",
            "Routing configs applied, by source",
            metrics.config_reloads.clone(),
        );
        registry.register(
            "config_rejections",
            "Routing config updates rejected as invalid, by source",
            metrics.config_rejections.clone(),
        );
        registry.register(
            "configmap_watch_up",
            "1 while the watch on the routing ConfigMap works, 0 while it is failing and retrying",
            metrics.configmap_watch_up.clone(),
        );
        registry.register(
            "configmap_watch_errors",
            "Errors of the ConfigMap watch, by reason (unreachable, forbidden, gone, server_error, other)",
            metrics.configmap_watch_errors.clone(),
        );
        registry.register(
            "configmap_present",
            "1 when the watched ConfigMap exists, 0 when it is absent or was deleted (the last good config keeps serving)",
            metrics.configmap_present.clone(),
        );
        registry.register(
            "guard_tripped",
            "1 while the automatic rollback guard sends every request to the official providers",
            metrics.guard_tripped.clone(),
        );
        registry.register(
            "guard_trips",
            "Times the automatic rollback guard tripped",
            metrics.guard_trips.clone(),
        );
        registry.register(
            "shadow_requests",
            "Shadow calls by outcome: equivalent, different, shadow_error, primary_incomplete, no_target, dropped_concurrency, dropped_budget",
            metrics.shadow_requests.clone(),
        );
        registry.register_with_unit(
            "shadow_latency_delta",
            "Shadow minus primary total latency of each compared pair (negative: the shadow side was faster)",
            Unit::Seconds,
            metrics.shadow_latency_delta.clone(),
        );
        registry.register(
            "shadow_equivalence_score",
            "Equivalence score (normalised token overlap, 0 to 1) of each compared pair's answers",
            metrics.shadow_equivalence.clone(),
        );
        registry.register(
            "shadow_spend_usd",
            "Spend of shadow calls in USD (priced targets only)",
            metrics.shadow_spend.clone(),
        );
        registry.register(
            "shadow_equivalence_rate",
            "Share of compared shadow pairs that were equivalent, since start",
            metrics.shadow_equivalence_rate.clone(),
        );
        registry.register(
            "shadow_in_flight",
            "Shadow calls running now",
            metrics.shadow_in_flight.clone(),
        );
        registry.register(
            "upstream_attempts",
            "Upstream attempts by provider and outcome (ok, rate_limited, server_error, timeout, ...)",
            metrics.attempts.clone(),
        );
        registry.register(
            "breaker_state",
            "Circuit breaker per target (provider/model): 0 closed, 1 open, 2 half-open",
            metrics.breaker_state.clone(),
        );
        registry.register(
            "retry_budget_exhausted",
            "Retries not made because the retry budget was spent",
            metrics.retry_budget_exhausted.clone(),
        );
        registry.register(
            "stream_malformed_chunks",
            "Malformed SSE chunks from providers, dropped instead of forwarded",
            metrics.malformed_chunks.clone(),
        );
        registry.register(
            "stream_interruptions",
            "Committed streams that broke, by what the client got: continued or error_event",
            metrics.stream_interruptions.clone(),
        );
        metrics
    }

    pub fn for_target(
        &self,
        route: &Arc<str>,
        provider: &Arc<str>,
        path: &'static str,
    ) -> TargetMetrics {
        TargetMetrics {
            ok_attempts: self
                .attempts
                .get_or_create(&AttemptLabels {
                    provider: provider.clone(),
                    outcome: "ok",
                })
                .clone(),
            requests_ok: self
                .requests
                .get_or_create(&RequestLabels {
                    route: route.clone(),
                    provider: provider.clone(),
                    path,
                    status: 200,
                })
                .clone(),
            duration: self
                .request_duration
                .get_or_create(&DurationLabels {
                    route: route.clone(),
                    provider: provider.clone(),
                })
                .clone(),
            route: route.clone(),
            provider: provider.clone(),
            path,
        }
    }

    pub fn record_attempt(&self, provider: &Arc<str>, outcome: &'static str) {
        self.attempts
            .get_or_create(&AttemptLabels {
                provider: provider.clone(),
                outcome,
            })
            .inc();
    }

    pub fn record_stream_interruption(&self, outcome: &'static str) {
        self.stream_interruptions
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn record_reload(&self, source: &'static str) {
        self.config_reloads
            .get_or_create(&SourceLabels { source })
            .inc();
    }

    pub fn record_rejection(&self, source: &'static str) {
        self.config_rejections
            .get_or_create(&SourceLabels { source })
            .inc();
    }
}
