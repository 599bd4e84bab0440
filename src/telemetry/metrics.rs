//! Prometheus metrics, registered by the components that own them.

use std::collections::HashMap;
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
    pub model: Arc<str>,
    pub path: &'static str,
    pub status: u16,
    /// success, fallback, upstream_error, interrupted, rejected.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub route: Arc<str>,
    pub provider: Arc<str>,
    pub model: Arc<str>,
}

/// A target's labels on token and cost counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UsageLabels {
    pub route: Arc<str>,
    pub provider: Arc<str>,
    pub model: Arc<str>,
    pub path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub route: Arc<str>,
    pub provider: Arc<str>,
    pub model: Arc<str>,
    pub path: &'static str,
    /// input, output, cached_input.
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    /// The provider and model left behind.
    pub provider: Arc<str>,
    pub model: Arc<str>,
    pub reason: &'static str,
}

/// The OpenTelemetry GenAI client metric attributes, in Prometheus spelling.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenAiLabels {
    pub gen_ai_operation_name: &'static str,
    pub gen_ai_provider_name: Arc<str>,
    pub gen_ai_request_model: Arc<str>,
    pub error_type: Option<&'static str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenAiTokenLabels {
    pub gen_ai_operation_name: &'static str,
    pub gen_ai_provider_name: Arc<str>,
    pub gen_ai_request_model: Arc<str>,
    pub gen_ai_token_type: &'static str,
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
pub struct BudgetLabels {
    pub budget: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

type F64Gauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// The daily spend budgets (`spend::Spend`): the day's counts per budget, set when `/metrics`
/// is scraped, and the shared store's health, set as it changes.
#[derive(Default)]
pub struct BudgetMetrics {
    pub spent: Family<BudgetLabels, F64Gauge>,
    pub reserved: Family<BudgetLabels, F64Gauge>,
    pub limit: Family<BudgetLabels, F64Gauge>,
    pub exhausted: Family<BudgetLabels, Gauge>,
    pub refusals: Family<BudgetLabels, Counter>,
    pub alerts: Family<BudgetLabels, Counter>,
    pub store_up: Gauge,
    pub store_errors: Family<ReasonLabels, Counter>,
    pub store_transitions: Family<StateLabels, Counter>,
    pub settles_dropped: Counter,
}

impl BudgetMetrics {
    fn register(&self, registry: &mut Registry) {
        let budget = registry.sub_registry_with_prefix("budget");
        budget.register(
            "spent_usd",
            "USD spent today (the budget's local day), settled answers only",
            self.spent.clone(),
        );
        budget.register(
            "reserved_usd",
            "USD reserved today by attempts still under way (their worst case)",
            self.reserved.clone(),
        );
        budget.register("limit_usd", "The budget's daily_usd", self.limit.clone());
        budget.register(
            "exhausted",
            "1 while the budget is spent or refusing reservations, else 0",
            self.exhausted.clone(),
        );
        budget.register(
            "refusals",
            "Reservations refused: the budget was spent, or its store down with fail_closed",
            self.refusals.clone(),
        );
        budget.register(
            "alerts",
            "alert_at levels reached (once per level per day)",
            self.alerts.clone(),
        );
        budget.register(
            "store_up",
            "1 while the shared budget store (Redis) answers; always 1 without one",
            self.store_up.clone(),
        );
        budget.register(
            "store_errors",
            "Budget store calls that failed, by reason: timeout or error",
            self.store_errors.clone(),
        );
        budget.register(
            "store_transitions",
            "Budget store state changes, by the state entered: down or up",
            self.store_transitions.clone(),
        );
        budget.register(
            "settles_dropped",
            "Settles lost because too many were waiting for a store that was down",
            self.settles_dropped.clone(),
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

/// LLM calls take from milliseconds to minutes.
const DURATION_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// The GenAI semantic conventions' token buckets.
const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];

type F64Counter = Counter<f64, std::sync::atomic::AtomicU64>;

/// Shadow minus primary latency, seconds: negative when the shadow side was faster.
const LATENCY_DELTA_BUCKETS: [f64; 15] = [
    -10.0, -5.0, -2.0, -1.0, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// One target's metric handles, looked up once per config generation so a request increments
/// them directly instead of searching the label families.
pub struct TargetMetrics {
    pub route: Arc<str>,
    pub provider: Arc<str>,
    pub model: Arc<str>,
    pub path: &'static str,
    pub ok_attempts: Counter,
    pub requests_ok: Counter,
    pub requests_fallback: Counter,
    pub duration: Histogram,
    pub ttft: Histogram,
    pub input_tokens: Counter,
    pub output_tokens: Counter,
    pub cached_input_tokens: Counter,
    pub cost: F64Counter,
    pub official_cost: F64Counter,
    pub savings: F64Counter,
    /// GenAI client metrics, by operation (chat, text_completion, embeddings).
    pub gen_ai: [std::sync::OnceLock<GenAiHandles>; 3],
    pub stats: Arc<super::stats::TargetStats>,
    /// `gen_ai.provider.name`.
    pub gen_ai_provider: Arc<str>,
}

/// A target's GenAI client metric handles for one operation.
pub struct GenAiHandles {
    pub duration: Histogram,
    pub input_tokens: Histogram,
    pub output_tokens: Histogram,
}

impl std::fmt::Debug for TargetMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetMetrics")
            .field("route", &self.route)
            .field("provider", &self.provider)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
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
    pub ttft: Family<DurationLabels, Histogram>,
    pub tokens: Family<TokenLabels, Counter>,
    pub cost: Family<UsageLabels, F64Counter>,
    pub official_cost: Family<UsageLabels, F64Counter>,
    pub savings: Family<UsageLabels, F64Counter>,
    pub fallbacks: Family<FallbackLabels, Counter>,
    pub usage_missing: Counter,
    pub gen_ai_duration: Family<GenAiLabels, Histogram>,
    pub gen_ai_tokens: Family<GenAiTokenLabels, Histogram>,
    /// `/stats`: totals since start.
    pub stats: super::stats::Stats,
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
    /// Shadow log lines dropped because the writer was behind.
    pub shadow_log_dropped: Counter,
    /// Equivalent pairs over compared pairs since start.
    pub shadow_equivalence_rate: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// The response cache's counts.
    pub cache: super::cache::CacheMetrics,
    pub budgets: BudgetMetrics,
    /// The label for requests the sidecar answered itself.
    pub none_label: Arc<str>,
    /// Every target's handles by `Target::metrics_key`, read without a lock; replaced whole
    /// when a target is first seen. Kept across reloads, like the families they point into.
    targets: arc_swap::ArcSwap<HashMap<Arc<str>, Arc<TargetMetrics>, foldhash::fast::RandomState>>,
}

impl Metrics {
    pub fn register(root: &mut Registry) -> Metrics {
        let metrics = Metrics {
            ttft: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS.iter().copied())),
            tokens: Family::default(),
            cost: Family::default(),
            official_cost: Family::default(),
            savings: Family::default(),
            fallbacks: Family::default(),
            usage_missing: Counter::default(),
            gen_ai_duration: Family::new_with_constructor(|| {
                Histogram::new(DURATION_BUCKETS.iter().copied())
            }),
            gen_ai_tokens: Family::new_with_constructor(|| {
                Histogram::new(TOKEN_BUCKETS.iter().copied())
            }),
            stats: Default::default(),
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
            shadow_log_dropped: Counter::default(),
            shadow_equivalence_rate: Gauge::default(),
            cache: Default::default(),
            budgets: BudgetMetrics::default(),
            none_label: Arc::from("none"),
            targets: Default::default(),
        };
        // The OpenTelemetry GenAI client metrics keep their own names, without our prefix.
        root.register_with_unit(
            "gen_ai_client_operation_duration",
            "GenAI operation duration (gen_ai.client.operation.duration): each upstream call that answered or failed",
            Unit::Seconds,
            metrics.gen_ai_duration.clone(),
        );
        root.register(
            "gen_ai_client_token_usage",
            "Tokens used per GenAI operation (gen_ai.client.token.usage), by gen_ai_token_type input or output",
            metrics.gen_ai_tokens.clone(),
        );
        let registry = root.sub_registry_with_prefix("llm_sidecar");
        metrics.budgets.register(registry);
        registry.register_with_unit(
            "time_to_first_token",
            "Streams: time from the request to the first content chunk of the answer",
            Unit::Seconds,
            metrics.ttft.clone(),
        );
        registry.register(
            "tokens",
            "Tokens the providers reported, by target and type (input, output, cached_input)",
            metrics.tokens.clone(),
        );
        registry.register(
            "cost_usd",
            "What the answers cost in USD at their target's price (priced targets only)",
            metrics.cost.clone(),
        );
        registry.register(
            "official_cost_usd",
            "What the same answers would have cost in USD at their route's official price",
            metrics.official_cost.clone(),
        );
        registry.register(
            "savings_usd",
            "Official price minus price paid, in USD, for answers where both prices are known",
            metrics.savings.clone(),
        );
        registry.register(
            "fallbacks",
            "Moves from a failed target to the next one, by the target left and the reason",
            metrics.fallbacks.clone(),
        );
        registry.register(
            "usage_missing",
            "Answers whose provider reported no token usage (no tokens or cost counted)",
            metrics.usage_missing.clone(),
        );
        let export = &*super::otel::EXPORT;
        registry.register(
            "trace_spans_exported",
            "Spans exported to the OTLP collector",
            export.exported.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans dropped because the export queue was full (the collector is slow or down)",
            export.dropped.clone(),
        );
        registry.register(
            "trace_spans_failed",
            "Spans lost because their export failed or timed out",
            export.failed.clone(),
        );
        registry.register(
            "requests",
            "Requests answered, by route, provider, model, path (relay/official), HTTP status and outcome (success, fallback, upstream_error, interrupted, rejected)",
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
            "shadow_log_dropped",
            "Shadow log lines dropped because the log writer was behind",
            metrics.shadow_log_dropped.clone(),
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
        metrics.cache.register(registry);
        metrics
    }

    /// The metric handles of `target`: built once, then found without a lock.
    pub fn target(&self, target: &crate::config::Target) -> Arc<TargetMetrics> {
        if let Some(handles) = self.targets.load().get(&target.metrics_key) {
            return handles.clone();
        }
        let handles = Arc::new(self.for_target(
            &target.tags.route,
            &target.tags.provider,
            &Arc::from(target.model.as_str()),
            target.path().as_str(),
        ));
        self.targets.rcu(|targets| {
            let mut targets = HashMap::clone(targets);
            targets
                .entry(target.metrics_key.clone())
                .or_insert_with(|| handles.clone());
            targets
        });
        handles
    }

    pub fn for_target(
        &self,
        route: &Arc<str>,
        provider: &Arc<str>,
        model: &Arc<str>,
        path: &'static str,
    ) -> TargetMetrics {
        let usage = UsageLabels {
            route: route.clone(),
            provider: provider.clone(),
            model: model.clone(),
            path,
        };
        let request = |outcome| RequestLabels {
            route: route.clone(),
            provider: provider.clone(),
            model: model.clone(),
            path,
            status: 200,
            outcome,
        };
        let duration = DurationLabels {
            route: route.clone(),
            provider: provider.clone(),
            model: model.clone(),
        };
        let tokens = |r#type| {
            self.tokens
                .get_or_create(&TokenLabels {
                    route: route.clone(),
                    provider: provider.clone(),
                    model: model.clone(),
                    path,
                    r#type,
                })
                .clone()
        };
        // One statement per handle: a family's read guard lives to the end of its statement, and
        // two lookups of one family in one statement would wait on each other.
        let ok_attempts = self
            .attempts
            .get_or_create(&AttemptLabels {
                provider: provider.clone(),
                outcome: "ok",
            })
            .clone();
        let requests_ok = self.requests.get_or_create(&request("success")).clone();
        let requests_fallback = self.requests.get_or_create(&request("fallback")).clone();
        let input_tokens = tokens("input");
        let output_tokens = tokens("output");
        let cached_input_tokens = tokens("cached_input");
        let request_duration = self.request_duration.get_or_create(&duration).clone();
        let ttft = self.ttft.get_or_create(&duration).clone();
        let cost = self.cost.get_or_create(&usage).clone();
        let official_cost = self.official_cost.get_or_create(&usage).clone();
        let savings = self.savings.get_or_create(&usage).clone();
        TargetMetrics {
            ok_attempts,
            requests_ok,
            requests_fallback,
            duration: request_duration,
            ttft,
            input_tokens,
            output_tokens,
            cached_input_tokens,
            cost,
            official_cost,
            savings,
            gen_ai: Default::default(),
            stats: self.stats.target(route, provider, model, path),
            gen_ai_provider: Arc::from(super::gen_ai_provider_name(provider)),
            route: route.clone(),
            provider: provider.clone(),
            model: model.clone(),
            path,
        }
    }

    /// A target's GenAI handles for `operation`, created on first use.
    pub fn gen_ai<'a>(
        &self,
        target: &'a TargetMetrics,
        operation: super::Operation,
    ) -> &'a GenAiHandles {
        let provider_name = &target.gen_ai_provider;
        target.gen_ai[operation as usize].get_or_init(|| {
            let token = |gen_ai_token_type| {
                self.gen_ai_tokens
                    .get_or_create(&GenAiTokenLabels {
                        gen_ai_operation_name: operation.name(),
                        gen_ai_provider_name: provider_name.clone(),
                        gen_ai_request_model: target.model.clone(),
                        gen_ai_token_type,
                    })
                    .clone()
            };
            GenAiHandles {
                duration: self
                    .gen_ai_duration
                    .get_or_create(&GenAiLabels {
                        gen_ai_operation_name: operation.name(),
                        gen_ai_provider_name: provider_name.clone(),
                        gen_ai_request_model: target.model.clone(),
                        error_type: None,
                    })
                    .clone(),
                input_tokens: token("input"),
                output_tokens: token("output"),
            }
        })
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
