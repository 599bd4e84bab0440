//! The routing config as written in YAML (file, ConfigMap or the embedded default), before
//! validation. Unknown fields are errors so a typo never silently does nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::providers::ProviderKind;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub holy_sheep_routing_enabled: Option<FlagValue>,
    #[serde(default)]
    pub holy_sheep_fallback_only: Option<FlagValue>,
    #[serde(default)]
    pub rollout_percent: Option<FlagValue>,
    #[serde(default)]
    pub shadow_percent: Option<FlagValue>,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub default_route: Option<String>,
    #[serde(default)]
    pub resilience: RawResilience,
    #[serde(default)]
    pub guard: RawGuard,
    #[serde(default)]
    pub shadow: RawShadow,
    #[serde(default)]
    pub passthrough: RawPassthrough,
    /// The response cache's sidecar-wide bounds.
    #[serde(default)]
    pub cache: RawCache,
    /// Daily spend caps (see `docs/configuration.md`, "Budgets").
    #[serde(default)]
    pub budgets: Vec<RawBudget>,
    /// What the budgets do while the shared store (Redis) cannot be reached.
    #[serde(default)]
    pub budget_store_down: Option<StoreDownMode>,
    pub providers: BTreeMap<String, RawProvider>,
    pub routes: BTreeMap<String, RawRoute>,
}

/// A flag as an operator may write it: `true`, `"True"`, `1`, `"25"`. How forgiving each flag is
/// is decided when it is compiled.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum FlagValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    /// How long to wait for an upstream's response headers, e.g. `15s`.
    #[serde(default)]
    pub response_headers: Option<String>,
}

/// Retries, failover, breakers and stream deadlines. Durations are strings like `10s`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResilience {
    #[serde(default)]
    pub attempts_per_target: Option<u32>,
    #[serde(default)]
    pub deadline: Option<String>,
    #[serde(default)]
    pub first_token_timeout: Option<String>,
    #[serde(default)]
    pub stream_idle_timeout: Option<String>,
    #[serde(default)]
    pub header_timeout_per_10k_tokens: Option<String>,
    #[serde(default)]
    pub backoff_base: Option<String>,
    #[serde(default)]
    pub backoff_max: Option<String>,
    #[serde(default)]
    pub rate_limit_waits: Option<u32>,
    #[serde(default)]
    pub low_latency_threshold: Option<String>,
    #[serde(default)]
    pub breaker_failures: Option<u32>,
    #[serde(default)]
    pub breaker_cooldown: Option<String>,
    #[serde(default)]
    pub breaker_max_cooldown: Option<String>,
    /// `background` (the sidecar tests an open target itself) or `request` (a user request does).
    #[serde(default)]
    pub breaker_probe: Option<String>,
    #[serde(default)]
    pub retry_budget_ratio: Option<f64>,
    #[serde(default)]
    pub retry_budget_min_per_second: Option<u32>,
}

/// The automatic rollback guard. Off unless `enabled: true`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGuard {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub window: Option<String>,
    #[serde(default)]
    pub min_requests: Option<u32>,
    #[serde(default)]
    pub max_error_rate: Option<f64>,
    #[serde(default)]
    pub max_p95_latency: Option<String>,
    #[serde(default)]
    pub hold: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub kind: ProviderKind,
    pub base_url: String,
    #[serde(default)]
    pub api_key: Option<RawKeySource>,
    /// The path, under `base_url`, of the `GET` that tests the provider while a breaker is open.
    #[serde(default)]
    pub probe_path: Option<String>,
}

/// `{ env: NAME }` or `{ file: PATH }`; exactly one of the two.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeySource {
    #[serde(default)]
    pub env: Option<String>,
    #[serde(default)]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub context_window: Option<u64>,
    /// Other routes to fall back to, in order.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// When no target's window fits the prompt, drop the oldest non-system messages.
    #[serde(default)]
    pub truncate_to_fit: bool,
    #[serde(default)]
    pub relay: Option<RawTarget>,
    #[serde(default)]
    pub official: Option<RawTarget>,
    /// The answer length assumed for a request that sets no `max_tokens`, when a budget
    /// reserves its worst case (default 4096).
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Answers of this route kept and served again; absent: not cached.
    #[serde(default)]
    pub cache: Option<RawRouteCache>,
    /// Text served, marked as such, only when every target failed and nothing is cached.
    #[serde(default)]
    pub static_fallback: Option<String>,
}

/// The response cache's bounds, for the whole sidecar.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// `64MiB`, `512KiB`, `1GiB`, or a number of bytes.
    #[serde(default)]
    pub max_bytes: Option<FlagValue>,
    /// The largest entry written to the shared tier in Redis, in the same units.
    #[serde(default)]
    pub shared_max_entry_bytes: Option<FlagValue>,
}

/// How a route caches its answers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteCache {
    /// Fresh for this long (`10m`).
    pub ttl: String,
    /// Kept, and served marked stale when every target failed, until this old (default: `ttl`).
    #[serde(default)]
    pub max_stale: Option<String>,
    /// `deterministic` (temperature 0 or a seed only, the default) or `always`.
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub provider: String,
    pub model: String,
    /// The target continues an answer from a trailing assistant message (prefill).
    #[serde(default)]
    pub supports_prefill: bool,
    /// USD per million tokens, for the cost of each call.
    #[serde(default)]
    pub price: Option<RawPrice>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    /// USD per million prompt tokens.
    pub input: f64,
    /// USD per million completion tokens.
    pub output: f64,
    /// USD per million input tokens served from the provider's prompt cache (default: `input`).
    #[serde(default)]
    pub cached_input: Option<f64>,
}

/// Which `/v1/*` paths other than the model endpoints reach a provider.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassthrough {
    /// `/v1/files` (that path) or `/v1/files*` (a prefix); absent: every path.
    #[serde(default)]
    pub paths: Option<Vec<String>>,
}

/// Shadow traffic: how the mirrored calls are bounded, compared and logged.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShadow {
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    #[serde(default)]
    pub daily_budget_usd: Option<f64>,
    #[serde(default)]
    pub equivalence_threshold: Option<f64>,
    #[serde(default)]
    pub timeout: Option<String>,
    /// `-` for stdout, or a file path: one JSON line per compared pair.
    #[serde(default)]
    pub log: Option<String>,
    /// Put prompts and answers in the log lines (off: only numbers and labels).
    #[serde(default)]
    pub log_content: bool,
}

/// A daily spend cap on the targets it matches.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub name: String,
    /// `{ route, provider, model }`, each optional; `{}` matches every target.
    #[serde(default, rename = "match")]
    pub matches: RawBudgetMatch,
    pub daily_usd: f64,
    #[serde(default)]
    pub on_exhausted: Option<OnExhausted>,
    /// Fractions of `daily_usd` that raise an alert the first time they are reached in a day.
    #[serde(default)]
    pub alert_at: Option<Vec<f64>>,
    /// IANA name; the day resets at local midnight. Default `UTC`.
    #[serde(default)]
    pub timezone: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudgetMatch {
    #[serde(default)]
    pub route: Option<String>,
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
}

/// What a request does when a budget it needs is spent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExhausted {
    /// Skip the targets the budget matches and go on down the fallback chain.
    #[default]
    Fallback,
    /// Answer 429 `budget_exceeded`.
    Reject,
}

impl OnExhausted {
    pub fn as_str(self) -> &'static str {
        match self {
            OnExhausted::Fallback => "fallback",
            OnExhausted::Reject => "reject",
        }
    }
}

/// What budgets do while the shared store cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreDownMode {
    /// Keep enforcing with what this sidecar has seen: the last count the store returned plus
    /// this sidecar's own reservations since.
    #[default]
    Local,
    /// Allow every request (spend is still counted locally).
    FailOpen,
    /// Refuse every request a budget matches.
    FailClosed,
}

impl StoreDownMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreDownMode::Local => "local",
            StoreDownMode::FailOpen => "fail_open",
            StoreDownMode::FailClosed => "fail_closed",
        }
    }
}
