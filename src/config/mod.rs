//! Routing config: parse, validate (every error names its field path), and compile into one
//! immutable [`Snapshot`] that a request loads once and uses throughout.

pub mod budgets;
pub mod cache;
mod compile;
pub mod layers;
pub mod schema;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderName, HeaderValue};
use serde_json::json;

use crate::env::{parse_duration, Env};
use crate::providers::{KeySource, Provider, ProviderKind, Secret, SecretFile};
use schema::{FlagValue, RawConfig, RawKeySource, RawTarget};

pub(crate) use compile::compile_raw;
pub use compile::{compile, parse, parse_bool_flag, parse_percent_flag};

/// The routing config compiled into the binary; serves when nothing else is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.yaml");

const DEFAULT_RESPONSE_HEADERS_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a snapshot came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    Embedded,
    File(PathBuf),
    ConfigMap { namespace: String, name: String },
}

impl ConfigSource {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ConfigSource::Embedded => "embedded",
            ConfigSource::File(_) => "file",
            ConfigSource::ConfigMap { .. } => "configmap",
        }
    }
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::Embedded => f.write_str("embedded default"),
            ConfigSource::File(path) => write!(f, "file {}", path.display()),
            ConfigSource::ConfigMap { namespace, name } => {
                write!(f, "ConfigMap {namespace}/{name}")
            }
        }
    }
}

/// One problem in a config, at a field path such as `routes.kimi-k2.relay.provider`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a rejected config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(pub Vec<FieldError>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The operator's migration flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flags {
    pub holy_sheep_routing_enabled: bool,
    pub holy_sheep_fallback_only: bool,
    pub rollout_percent: u8,
    pub shadow_percent: u8,
}

impl Default for Flags {
    fn default() -> Self {
        Flags {
            holy_sheep_routing_enabled: true,
            holy_sheep_fallback_only: false,
            rollout_percent: 100,
            shadow_percent: 0,
        }
    }
}

/// A target's price in USD per million tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    /// Input tokens served from the provider's prompt cache, when it bills them apart.
    pub cached_input: Option<f64>,
}

/// Shadow traffic limits and comparison settings (`shadow_percent` says how much).
#[derive(Clone, Debug, PartialEq)]
pub struct ShadowConfig {
    pub max_concurrency: u32,
    pub daily_budget_usd: f64,
    pub equivalence_threshold: f64,
    pub timeout: Duration,
    pub log: Option<String>,
    pub log_content: bool,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        ShadowConfig {
            max_concurrency: 8,
            daily_budget_usd: 5.0,
            equivalence_threshold: 0.6,
            timeout: Duration::from_secs(120),
            log: None,
            log_content: false,
        }
    }
}

/// The automatic rollback guard: when the relay's error rate or p95 latency over `window`
/// passes a threshold (with at least `min_requests` relay attempts in the window), the sidecar
/// routes to the official providers until an operator changes the flags, or `hold` passes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuardConfig {
    pub enabled: bool,
    pub window: Duration,
    pub min_requests: u32,
    pub max_error_rate: f64,
    pub max_p95_latency: Duration,
    /// Zero: stay tripped until the flags change.
    pub hold: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            enabled: false,
            window: Duration::from_secs(60),
            min_requests: 20,
            max_error_rate: 0.25,
            max_p95_latency: Duration::from_secs(30),
            hold: Duration::ZERO,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub response_headers: Duration,
}

/// The circuit breaker of every target (`resilience.breaker_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    pub failures: u32,
    pub cooldown: Duration,
    /// Only for probing by user requests: the cooldown doubles up to this.
    pub max_cooldown: Duration,
    pub probe: ProbeMode,
}

/// Who tests a target whose breaker is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeMode {
    /// The sidecar, once per cooldown, with a cheap request of its own: however long the outage,
    /// the target is back within one cooldown of recovering, and no user request pays for a
    /// probe of a dead target.
    Background,
    /// The first user request after the cooldown; the cooldown doubles on each failed probe.
    Request,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 3,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(300),
            probe: ProbeMode::Background,
        }
    }
}

/// How hard the sidecar tries before giving up, and how it protects providers meanwhile.
#[derive(Clone, Copy, Debug)]
pub struct Resilience {
    /// Tries on one target before failing over (1 = no retry).
    pub attempts_per_target: u32,
    /// The whole request, until the answer is committed to the client.
    pub deadline: Duration,
    pub first_token_timeout: Duration,
    pub stream_idle_timeout: Duration,
    /// Added to the header timeout for every 10 000 prompt tokens.
    pub header_timeout_per_10k_tokens: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How many times one request may wait for a rate limit to clear when every target is limited.
    pub rate_limit_waits: u32,
    pub low_latency_threshold: Duration,
    pub breaker: BreakerConfig,
    pub retry_budget_ratio: f64,
    pub retry_budget_min_per_second: u32,
}

impl Default for Resilience {
    fn default() -> Self {
        Resilience {
            attempts_per_target: 2,
            deadline: Duration::from_secs(120),
            first_token_timeout: Duration::from_secs(10),
            stream_idle_timeout: Duration::from_secs(10),
            header_timeout_per_10k_tokens: Duration::from_secs(5),
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(5),
            rate_limit_waits: 1,
            low_latency_threshold: Duration::from_secs(2),
            breaker: Default::default(),
            retry_budget_ratio: 0.2,
            retry_budget_min_per_second: 5,
        }
    }
}

/// One place a route can be served: a provider and the model name it knows.
#[derive(Debug)]
pub struct Target {
    pub provider: Arc<Provider>,
    pub model: String,
    pub supports_prefill: bool,
    /// USD per million tokens, when known.
    pub price: Option<Price>,
    /// `provider/model`: the key of this target's health (breaker, latency), kept across reloads.
    pub health_key: Arc<str>,
    /// `route/provider/model/path`: the key of this target's metric handles.
    pub metrics_key: Arc<str>,
    pub tags: TargetTags,
}

pub const HEADER_ROUTE: HeaderName = HeaderName::from_static("x-llm-sidecar-route");
pub const HEADER_PROVIDER: HeaderName = HeaderName::from_static("x-llm-sidecar-provider");
pub const HEADER_UPSTREAM_MODEL: HeaderName =
    HeaderName::from_static("x-llm-sidecar-upstream-model");
pub const HEADER_PATH: HeaderName = HeaderName::from_static("x-llm-sidecar-path");

/// What every response from a target is labelled with, built once when the config compiles so
/// the request path only clones reference-counted values.
#[derive(Debug)]
pub struct TargetTags {
    pub route: Arc<str>,
    pub provider: Arc<str>,
    pub headers: [(HeaderName, HeaderValue); 4],
}

impl TargetTags {
    fn new(route: &str, provider: &Provider, model: &str) -> Option<TargetTags> {
        let value = |v: &str| HeaderValue::from_str(v).ok();
        Some(TargetTags {
            route: Arc::from(route),
            provider: Arc::from(provider.name.as_str()),
            headers: [
                (HEADER_ROUTE, value(route)?),
                (HEADER_PROVIDER, value(&provider.name)?),
                (HEADER_UPSTREAM_MODEL, value(model)?),
                (
                    HEADER_PATH,
                    HeaderValue::from_static(provider.kind.as_str()),
                ),
            ],
        })
    }
}

impl Target {
    pub fn path(&self) -> ProviderKind {
        self.provider.kind
    }
}

/// A model alias the app may ask for, and where it can be served.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub aliases: Vec<String>,
    pub context_window: Option<u64>,
    /// Names of the routes to fall back to, in order (validated to exist).
    pub fallbacks: Vec<String>,
    pub truncate_to_fit: bool,
    pub relay: Option<Target>,
    pub official: Option<Target>,
    /// The answer length a budget assumes for a request that sets no `max_tokens`.
    pub max_tokens: u64,
    /// How the route's answers are cached; `None`: they are not.
    pub cache: Option<crate::cache::Policy>,
    /// Served, marked `x-llm-sidecar-path: static`, only when every target failed and nothing
    /// is cached.
    pub static_fallback: Option<String>,
    /// The smallest context window of the route and its fallbacks, found on first use (a
    /// route belongs to one snapshot, whose fallbacks never change).
    smallest_window: std::sync::OnceLock<Option<u64>>,
}

impl Route {
    /// The smallest context window of this route and its fallbacks in `snapshot`, the one
    /// the route was compiled into.
    pub fn smallest_window(&self, snapshot: &Snapshot) -> Option<u64> {
        *self.smallest_window.get_or_init(|| {
            std::iter::once(self.context_window)
                .chain(
                    self.fallbacks
                        .iter()
                        .filter_map(|f| snapshot.route(f).map(|r| r.context_window)),
                )
                .flatten()
                .min()
        })
    }

    pub fn target(&self, side: ProviderKind) -> Option<&Target> {
        match side {
            ProviderKind::Relay => self.relay.as_ref(),
            ProviderKind::Official => self.official.as_ref(),
        }
    }
}

/// The answer length a budget assumes for a request without `max_tokens`, when its route
/// sets none.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The reason header when a route has only the other side.
pub const ONLY_TARGET: &str = "only_target";
/// The reason header when earlier targets failed and a later one of the plan answered.
pub const FALLBACK: &str = "fallback";

/// One validated, immutable routing config.
#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub source: ConfigSource,
    pub loaded_at: SystemTime,
    pub flags: Flags,
    /// Which layer set each flag (`embedded`, `file`, `configmap`, `env`).
    pub flag_origins: layers::FlagOrigins,
    pub timeouts: Timeouts,
    pub resilience: Resilience,
    pub guard: GuardConfig,
    pub shadow: ShadowConfig,
    /// The paths passed through to providers besides the model endpoints.
    pub passthrough: crate::path::Allowlist,
    /// The response cache's bound, in bytes of answers.
    pub cache_max_bytes: u64,
    /// The largest entry written to the cache's shared tier (Redis), in bytes as stored.
    pub cache_shared_max_entry_bytes: u64,
    pub providers: BTreeMap<String, Arc<Provider>>,
    pub routes: BTreeMap<String, Arc<Route>>,
    pub default_route: Option<Arc<Route>>,
    /// Daily spend caps; their counters live in `spend::Spend`, across reloads.
    pub budgets: budgets::Budgets,
    /// `generation` as a ready header value.
    pub generation_header: HeaderValue,
    /// Looked up on every request: a fast seeded hash (the keys are the config's own names).
    by_model: HashMap<String, Arc<Route>, foldhash::fast::RandomState>,
}

impl Snapshot {
    /// The route serving a model name (a route name or one of its aliases).
    pub fn route(&self, model: &str) -> Option<&Arc<Route>> {
        self.by_model.get(model)
    }

    /// Every model name the app may ask for, sorted.
    pub fn model_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.by_model.keys().cloned().collect();
        ids.sort();
        ids
    }

    pub fn key_files(&self) -> impl Iterator<Item = &Arc<SecretFile>> {
        self.providers.values().filter_map(|p| match &p.key {
            KeySource::File(file) => Some(file),
            _ => None,
        })
    }

    /// The effective config as JSON for `/config`: key sources are described, never shown.
    pub fn redacted_view(&self) -> serde_json::Value {
        let providers: serde_json::Map<String, serde_json::Value> = self
            .providers
            .values()
            .map(|p| {
                (
                    p.name.clone(),
                    json!({
                        "kind": p.kind.as_str(),
                        "base_url": p.base_url,
                        "api_key": p.key.describe(),
                        // What stops the sidecar from calling this provider, if anything.
                        "problem": match p.auth() {
                            crate::providers::Auth::Missing(hint) => Some(format!("no API key: {hint}")),
                            _ => None,
                        },
                    }),
                )
            })
            .collect();
        let target = |t: &Option<Target>| {
            t.as_ref().map(|t| {
                json!({
                    "provider": t.provider.name,
                    "model": t.model,
                    "price": t.price.map(|p| json!({
                        "input": p.input,
                        "output": p.output,
                        "cached_input": p.cached_input,
                    })),
                })
            })
        };
        let routes: serde_json::Map<String, serde_json::Value> = self
            .routes
            .values()
            .map(|r| {
                (
                    r.name.clone(),
                    json!({
                        "aliases": r.aliases,
                        "context_window": r.context_window,
                        "max_tokens": r.max_tokens,
                        "cache": r.cache.map(|c| json!({
                            "ttl_ms": c.ttl.as_millis() as u64,
                            "max_stale_ms": c.max_stale.as_millis() as u64,
                            "mode": c.mode.as_str(),
                        })),
                        "static_fallback": r.static_fallback.is_some(),
                        "relay": target(&r.relay),
                        "official": target(&r.official),
                    }),
                )
            })
            .collect();
        json!({
            "generation": self.generation,
            "source": self.source.to_string(),
            "loaded_at_unix": unix_seconds(self.loaded_at),
            "holy_sheep_routing_enabled": self.flags.holy_sheep_routing_enabled,
            "holy_sheep_fallback_only": self.flags.holy_sheep_fallback_only,
            "rollout_percent": self.flags.rollout_percent,
            "shadow_percent": self.flags.shadow_percent,
            "flag_origins": {
                "holy_sheep_routing_enabled": self.flag_origins.holy_sheep_routing_enabled,
                "holy_sheep_fallback_only": self.flag_origins.holy_sheep_fallback_only,
                "rollout_percent": self.flag_origins.rollout_percent,
                "shadow_percent": self.flag_origins.shadow_percent,
            },
            "timeouts": { "response_headers_ms": self.timeouts.response_headers.as_millis() as u64 },
            "default_route": self.default_route.as_ref().map(|r| r.name.clone()),
            "passthrough": { "paths": self.passthrough.describe() },
            "cache": {
                "max_bytes": self.cache_max_bytes,
                "shared_max_entry_bytes": self.cache_shared_max_entry_bytes,
            },
            "providers": providers,
            "routes": routes,
            "budgets": self.budgets.view(),
            "budget_store_down": self.budgets.store_down.as_str(),
        })
    }
}

pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> HashMap<String, String> {
        HashMap::new()
    }

    fn minimal(extra: &str) -> String {
        format!(
            "{extra}
providers:
  sheep: {{ kind: relay, base_url: 'http://127.0.0.1:1/sheep/v1' }}
  ds: {{ kind: official, base_url: 'http://127.0.0.1:1/ds/v1', api_key: {{ env: DS_KEY }} }}
routes:
  chat:
    aliases: [chat-latest]
    relay: {{ provider: sheep, model: up-relay }}
    official: {{ provider: ds, model: up-official }}
"
        )
    }

    #[test]
    fn embedded_default_compiles() {
        let snap = compile(EMBEDDED_DEFAULT, ConfigSource::Embedded, 1, &no_env()).unwrap();
        assert!(snap.flags.holy_sheep_routing_enabled);
        assert_eq!(snap.providers["holysheep"].kind, ProviderKind::Relay);
        for official in ["deepseek", "moonshot", "minimax", "gemini", "openai"] {
            assert_eq!(
                snap.providers[official].kind,
                ProviderKind::Official,
                "{official}"
            );
        }
        let route = snap.route("deepseek-chat").unwrap();
        assert_eq!(route.name, "deepseek-v3.2");
        // The migration playbook's chain.
        assert_eq!(route.fallbacks, ["kimi-k2", "gemini-2.5-flash"]);
        assert_eq!(snap.default_route.as_ref().unwrap().name, "deepseek-v3.2");
    }

    #[test]
    fn env_keys_are_read_through_the_env_trait() {
        let env: HashMap<String, String> = [("DS_KEY".to_string(), "sk-ds".to_string())].into();
        let snap = compile(&minimal(""), ConfigSource::Embedded, 1, &env).unwrap();
        match snap.providers["ds"].auth() {
            crate::providers::Auth::Bearer(s) => assert_eq!(s.header_value(), "Bearer sk-ds"),
            _ => panic!("expected a key"),
        }
        assert!(!snap.redacted_view().to_string().contains("sk-ds"));
    }

    #[test]
    fn flags_are_forgiving_only_where_safe() {
        for (text, expect) in [
            ("holy_sheep_routing_enabled: 'True'", true),
            ("holy_sheep_routing_enabled: '1'", true),
            ("holy_sheep_routing_enabled: 'false'", false),
            ("holy_sheep_routing_enabled: 0", false),
        ] {
            let snap = compile(&minimal(text), ConfigSource::Embedded, 1, &no_env()).unwrap();
            assert_eq!(snap.flags.holy_sheep_routing_enabled, expect, "{text}");
        }
        let snap = compile(
            &minimal("rollout_percent: '25'"),
            ConfigSource::Embedded,
            1,
            &no_env(),
        )
        .unwrap();
        assert_eq!(snap.flags.rollout_percent, 25);
        for bad in [
            "rollout_percent: 150",
            "rollout_percent: '150'",
            "rollout_percent: 12.5",
            "shadow_percent: -1",
            "holy_sheep_routing_enabled: maybe",
        ] {
            let err = compile(&minimal(bad), ConfigSource::Embedded, 1, &no_env()).unwrap_err();
            let field = bad.split(':').next().unwrap_or_default();
            assert_eq!(err.0[0].path, field, "{bad}: {err}");
        }
    }

    #[test]
    fn errors_name_the_field_path() {
        let text = "
resilience: { breaker_probe: sometimes }
passthrough: { paths: ['/v1/files*', '/files'] }
providers:
  sheep: { kind: relay, base_url: 'http://127.0.0.1:1/v1', probe_path: '/../admin' }
  ds: { kind: official, base_url: 'nope' }
routes:
  chat:
    relay: { provider: sheeep, model: m }
    official: { provider: sheep, model: m }
  empty: {}
default_route: missing
";
        let err = compile(text, ConfigSource::Embedded, 1, &no_env()).unwrap_err();
        let paths: Vec<&str> = err.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "resilience.breaker_probe",
                "passthrough.paths[1]",
                "providers.ds.base_url",
                "providers.sheep.probe_path",
                "routes.chat.relay.provider",
                "routes.chat.official.provider",
                "routes.empty",
                "default_route",
            ],
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("unknown provider `sheeep` (known: sheep)"),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("is relay, but the official target needs"),
            "{err}"
        );
    }

    #[test]
    fn type_errors_and_typos_name_the_field_path() {
        let err = compile(
            &minimal("timeouts: { response_header: 5s }"),
            ConfigSource::Embedded,
            1,
            &no_env(),
        )
        .unwrap_err();
        assert_eq!(err.0[0].path, "timeouts.response_header");
        assert!(
            err.0[0].message.contains("unknown field `response_header`"),
            "{err}"
        );
        let err = compile(
            "providers: { p: { kind: relai, base_url: x } }\nroutes: {}",
            ConfigSource::Embedded,
            1,
            &no_env(),
        )
        .unwrap_err();
        assert_eq!(err.0[0].path, "providers.p.kind", "{err}");
        assert!(
            err.0[0].message.starts_with("unknown variant `relai`"),
            "{err}"
        );
        let err = compile(
            &minimal("").replace("{ env: DS_KEY }", "{ env: DS_KEY, file: /k }"),
            ConfigSource::Embedded,
            1,
            &no_env(),
        )
        .unwrap_err();
        assert_eq!(err.0[0].path, "providers.ds.api_key", "{err}");
        let err = compile("routes: [", ConfigSource::Embedded, 1, &no_env()).unwrap_err();
        assert!(!err.to_string().is_empty());
        // A key named `.` is not the document's root.
        let err = compile(".: 1", ConfigSource::Embedded, 1, &no_env()).unwrap_err();
        assert_eq!(err.0[0].path, ".", "{err}");
        // Broken YAML is reported at the mapping it broke in, not at a `?` key.
        for (text, path) in [
            (
                "routes:\n  a:\n    relay: { provider: p,\n",
                "routes.a.relay",
            ),
            (": 0.2\n", ""),
        ] {
            let err = compile(text, ConfigSource::Embedded, 1, &no_env()).unwrap_err();
            assert_eq!(err.0[0].path, path, "{err}");
        }
        // An unknown field's message does not repeat the path of the mapping holding it.
        let err = compile(
            &minimal("resilience: { deadlin: 5s }"),
            ConfigSource::Embedded,
            1,
            &no_env(),
        )
        .unwrap_err();
        assert_eq!(err.0[0].path, "resilience.deadlin", "{err}");
        assert!(
            err.0[0].message.starts_with("unknown field `deadlin`"),
            "{err}"
        );
    }

    #[test]
    fn durations_that_would_overflow_a_deadline_are_refused_at_their_path() {
        // Accepted, these panicked every request (`Instant + deadline` overflows); in minutes
        // the parse itself overflowed.
        for (field, path) in [
            (
                "resilience: { deadline: 18446744073709551615s }",
                "resilience.deadline",
            ),
            (
                "resilience: { breaker_cooldown: 307445734561825861m }",
                "resilience.breaker_cooldown",
            ),
            (
                "timeouts: { response_headers: 525601m }",
                "timeouts.response_headers",
            ),
            ("guard: { hold: 99999999999s }", "guard.hold"),
        ] {
            let err = compile(&minimal(field), ConfigSource::Embedded, 1, &no_env()).unwrap_err();
            assert_eq!(err.0[0].path, path, "{err}");
            assert!(err.0[0].message.contains("at most 365 days"), "{err}");
        }
    }

    #[test]
    fn duplicate_model_names_are_rejected() {
        let text = "
providers:
  sheep: { kind: relay, base_url: 'http://127.0.0.1:1/v1' }
routes:
  a: { aliases: [shared], relay: { provider: sheep, model: m } }
  b: { aliases: [shared], relay: { provider: sheep, model: m } }
";
        let err = compile(text, ConfigSource::Embedded, 1, &no_env()).unwrap_err();
        assert_eq!(err.0[0].path, "routes.b");
        assert!(err.0[0]
            .message
            .contains("`shared` is already used by route `a`"));
    }
}
