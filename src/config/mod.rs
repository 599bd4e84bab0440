//! Routing config: parse, validate (every error names its field path), and compile into one
//! immutable [`Snapshot`] that a request loads once and uses throughout.

pub mod configmap;
pub mod layers;
pub mod reload;
pub mod schema;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderName, HeaderValue};
use serde_json::json;

use crate::providers::{KeySource, Provider, ProviderKind, Secret, SecretFile};
use crate::routing::rollout::Decision;
use crate::settings::{parse_duration, Env};
use schema::{FlagValue, RawConfig, RawKeySource, RawTarget};

pub use store::ConfigStore;

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

fn compile_shadow(raw: &schema::RawShadow, errors: &mut Errors) -> ShadowConfig {
    let d = ShadowConfig::default();
    let timeout = section_duration(errors, "shadow", "timeout", &raw.timeout, d.timeout, false);
    let s = ShadowConfig {
        max_concurrency: raw.max_concurrency.unwrap_or(d.max_concurrency),
        daily_budget_usd: raw.daily_budget_usd.unwrap_or(d.daily_budget_usd),
        equivalence_threshold: raw.equivalence_threshold.unwrap_or(d.equivalence_threshold),
        timeout,
        log: raw.log.clone().filter(|l| !l.trim().is_empty()),
        log_content: raw.log_content,
    };
    if s.max_concurrency == 0 || s.max_concurrency > 1024 {
        errors.push("shadow.max_concurrency", "must be from 1 to 1024");
    }
    if !(s.daily_budget_usd.is_finite() && s.daily_budget_usd > 0.0) {
        errors.push(
            "shadow.daily_budget_usd",
            "must be more than 0 (USD per UTC day)",
        );
    }
    if !(0.0..=1.0).contains(&s.equivalence_threshold) {
        errors.push("shadow.equivalence_threshold", "must be from 0 to 1");
    }
    s
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

/// A duration field of a config section (`resilience.deadline`): the default when unset, an
/// error at its path when it does not parse or is zero where zero makes no sense.
fn section_duration(
    errors: &mut Errors,
    section: &str,
    field: &str,
    value: &Option<String>,
    default: Duration,
    allow_zero: bool,
) -> Duration {
    match value.as_deref().map(|v| parse_duration(v.trim())) {
        None => default,
        Some(Ok(v)) if v.is_zero() && !allow_zero => {
            errors.push(format!("{section}.{field}"), "must be greater than 0");
            default
        }
        Some(Ok(v)) => v,
        Some(Err(why)) => {
            errors.push(format!("{section}.{field}"), why);
            default
        }
    }
}

fn compile_guard(raw: &schema::RawGuard, errors: &mut Errors) -> GuardConfig {
    let d = GuardConfig::default();
    let mut duration =
        |field: &str, value: &Option<String>, default: Duration, allow_zero: bool| {
            section_duration(errors, "guard", field, value, default, allow_zero)
        };
    let g = GuardConfig {
        enabled: raw.enabled,
        window: duration("window", &raw.window, d.window, false),
        min_requests: raw.min_requests.unwrap_or(d.min_requests),
        max_error_rate: raw.max_error_rate.unwrap_or(d.max_error_rate),
        max_p95_latency: duration(
            "max_p95_latency",
            &raw.max_p95_latency,
            d.max_p95_latency,
            false,
        ),
        hold: duration("hold", &raw.hold, d.hold, true),
    };
    if g.min_requests == 0 {
        errors.push("guard.min_requests", "must be at least 1");
    }
    if !(g.max_error_rate > 0.0 && g.max_error_rate <= 1.0) {
        errors.push(
            "guard.max_error_rate",
            "must be a share above 0 and at most 1",
        );
    }
    g
}

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub response_headers: Duration,
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
    pub breaker: crate::routing::breaker::BreakerConfig,
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
    /// This target's health cell, looked up once per config generation.
    pub health_cell: std::sync::OnceLock<Arc<crate::routing::health::HealthCell>>,
    /// This target's metric handles, looked up once per config generation.
    pub metrics_cell: std::sync::OnceLock<Arc<crate::telemetry::metrics::TargetMetrics>>,
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

    pub fn metrics(
        &self,
        metrics: &crate::telemetry::metrics::Metrics,
    ) -> &Arc<crate::telemetry::metrics::TargetMetrics> {
        self.metrics_cell.get_or_init(|| {
            Arc::new(metrics.for_target(
                &self.tags.route,
                &self.tags.provider,
                &Arc::from(self.model.as_str()),
                self.path().as_str(),
            ))
        })
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

    /// The target a request starts on under `decision`, and the reason header's value: the
    /// decision's reason, or `only_target` when the route lacks the side it asks for.
    pub fn choose(&self, decision: &Decision) -> (&Target, &'static str) {
        let (preferred, other) = match decision.order.first_side() {
            ProviderKind::Relay => (&self.relay, &self.official),
            ProviderKind::Official => (&self.official, &self.relay),
        };
        match (preferred, other) {
            (Some(t), _) => (t, decision.why.as_str()),
            (None, Some(t)) => (t, ONLY_TARGET),
            // Compilation guarantees every route has at least one target.
            (None, None) => unreachable!("route without targets passed validation"),
        }
    }
}

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
    pub providers: BTreeMap<String, Arc<Provider>>,
    pub routes: BTreeMap<String, Arc<Route>>,
    pub default_route: Option<Arc<Route>>,
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
            "providers": providers,
            "routes": routes,
        })
    }
}

pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses and validates YAML text; `generation` is stamped on the result.
pub fn compile(
    text: &str,
    source: ConfigSource,
    generation: u64,
    env: &dyn Env,
) -> Result<Snapshot, ConfigError> {
    let raw = parse(text)?;
    compile_raw(raw, source, generation, env)
}

/// YAML → [`RawConfig`], with the path of the field that failed to parse.
pub fn parse(text: &str) -> Result<RawConfig, ConfigError> {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = field_path(e.path());
        let message = e.into_inner().to_string();
        // serde_yaml puts its own path in front of its message: the field's, or for an unknown
        // field the mapping's that holds it.
        let message = std::iter::successors(Some(path.as_str()), |p| {
            p.rfind(['.', '[']).map(|i| &p[..i])
        })
        .find_map(|p| message.strip_prefix(&format!("{p}: ")))
        .map(str::to_string)
        .unwrap_or(message);
        ConfigError(vec![FieldError { path, message }])
    })
}

/// A parse error's path, like `routes.chat.aliases[0]`: empty at the document's root (which
/// serde_path_to_error writes `.`, as it writes a top-level key named `.`), and without the
/// trailing `?` of a key the YAML broke off before (the error is at the mapping holding it).
fn field_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let segments: Vec<&Segment> = path.iter().collect();
    let known = segments
        .iter()
        .rposition(|s| !matches!(s, Segment::Unknown))
        .map_or(0, |i| i + 1);
    let mut out = String::new();
    for (i, segment) in segments[..known].iter().enumerate() {
        if i > 0 && !matches!(segment, Segment::Seq { .. }) {
            out.push('.');
        }
        out.push_str(&segment.to_string());
    }
    out
}

struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Provider and route names end up in metric labels and headers: keep them plain.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'))
}

pub(crate) fn compile_raw(
    raw: RawConfig,
    source: ConfigSource,
    generation: u64,
    env: &dyn Env,
) -> Result<Snapshot, ConfigError> {
    let mut errors = Errors(Vec::new());
    let defaults = Flags::default();
    let flags = Flags {
        holy_sheep_routing_enabled: flag(
            &mut errors,
            "holy_sheep_routing_enabled",
            raw.holy_sheep_routing_enabled.as_ref(),
            defaults.holy_sheep_routing_enabled,
            parse_bool_flag,
        ),
        holy_sheep_fallback_only: flag(
            &mut errors,
            "holy_sheep_fallback_only",
            raw.holy_sheep_fallback_only.as_ref(),
            defaults.holy_sheep_fallback_only,
            parse_bool_flag,
        ),
        rollout_percent: flag(
            &mut errors,
            "rollout_percent",
            raw.rollout_percent.as_ref(),
            defaults.rollout_percent,
            parse_percent_flag,
        ),
        shadow_percent: flag(
            &mut errors,
            "shadow_percent",
            raw.shadow_percent.as_ref(),
            defaults.shadow_percent,
            parse_percent_flag,
        ),
    };

    let response_headers = match raw.timeouts.response_headers.as_deref() {
        None => DEFAULT_RESPONSE_HEADERS_TIMEOUT,
        Some(text) => match parse_duration(text.trim()) {
            Ok(d) if d.is_zero() => {
                errors.push("timeouts.response_headers", "must be greater than 0");
                DEFAULT_RESPONSE_HEADERS_TIMEOUT
            }
            Ok(d) => d,
            Err(why) => {
                errors.push("timeouts.response_headers", why);
                DEFAULT_RESPONSE_HEADERS_TIMEOUT
            }
        },
    };

    let resilience = compile_resilience(&raw.resilience, &mut errors);
    let guard = compile_guard(&raw.guard, &mut errors);
    let shadow = compile_shadow(&raw.shadow, &mut errors);
    let passthrough = match &raw.passthrough.paths {
        None => crate::path::Allowlist::default(),
        Some(paths) => crate::path::Allowlist::new(paths).unwrap_or_else(|problems| {
            for (i, message) in problems {
                errors.push(format!("passthrough.paths[{i}]"), message);
            }
            crate::path::Allowlist::default()
        }),
    };

    if raw.providers.is_empty() {
        errors.push("providers", "at least one provider is required");
    }
    let mut providers = BTreeMap::new();
    for (name, p) in raw.providers {
        let path = format!("providers.{name}");
        if !valid_name(&name) {
            errors.push(
                &path,
                "provider names may use letters, digits and - _ . : / only",
            );
            continue;
        }
        let key = match p.api_key {
            None => KeySource::None,
            Some(RawKeySource {
                env: Some(var),
                file: None,
            }) => {
                if var.trim().is_empty() {
                    errors.push(
                        format!("{path}.api_key.env"),
                        "must name an environment variable",
                    );
                }
                let value = env.get(&var).and_then(|v| Secret::bearer(&v)).map(Arc::new);
                if value.is_none() {
                    tracing::warn!(provider = %name, env = %var, "provider key variable is not set; requests to this provider will fail until it is");
                }
                KeySource::Env { var, value }
            }
            Some(RawKeySource {
                env: None,
                file: Some(file),
            }) => {
                if file.as_os_str().is_empty() {
                    errors.push(format!("{path}.api_key.file"), "must name a file");
                }
                KeySource::File(Arc::new(SecretFile::load(&file)))
            }
            Some(_) => {
                errors.push(
                    format!("{path}.api_key"),
                    "give exactly one of `env: VAR` or `file: PATH` (or leave api_key out for no key)",
                );
                KeySource::None
            }
        };
        match Provider::new(name.clone(), p.kind, p.base_url.trim(), key) {
            Ok(mut provider) => {
                if let Some(probe) = &p.probe_path {
                    if let Err(why) = provider.set_probe_path(probe.trim()) {
                        errors.push(format!("{path}.probe_path"), why);
                    }
                }
                providers.insert(name, Arc::new(provider));
            }
            Err(why) => errors.push(format!("{path}.base_url"), why),
        }
    }

    if raw.routes.is_empty() {
        errors.push("routes", "at least one route is required");
    }
    let mut routes = BTreeMap::new();
    let mut by_model: HashMap<String, Arc<Route>, foldhash::fast::RandomState> = HashMap::default();
    let mut owner: HashMap<String, String> = HashMap::new();
    for (name, r) in raw.routes {
        let path = format!("routes.{name}");
        if !valid_name(&name) {
            errors.push(
                &path,
                "route names may use letters, digits and - _ . : / only",
            );
            continue;
        }
        let mut target = |side: &str, kind: ProviderKind, t: Option<RawTarget>| {
            let t = t?;
            let tpath = format!("{path}.{side}");
            if t.model.trim().is_empty() {
                errors.push(format!("{tpath}.model"), "must be a non-empty model name");
            }
            let Some(provider) = providers.get(&t.provider) else {
                let known: Vec<&str> = providers.keys().map(String::as_str).collect();
                errors.push(
                    format!("{tpath}.provider"),
                    format!(
                        "unknown provider `{}` (known: {})",
                        t.provider,
                        known.join(", ")
                    ),
                );
                return None;
            };
            if provider.kind != kind {
                errors.push(
                    format!("{tpath}.provider"),
                    format!(
                        "provider `{}` is {}, but the {side} target needs a {} provider",
                        t.provider,
                        provider.kind.as_str(),
                        kind.as_str()
                    ),
                );
                return None;
            }
            let price = t.price.map(|p| Price {
                input: p.input,
                output: p.output,
                cached_input: p.cached_input,
            });
            if let Some(p) = price {
                let valid = |v: f64| v.is_finite() && v >= 0.0;
                if !(valid(p.input) && valid(p.output) && p.cached_input.is_none_or(valid)) {
                    errors.push(
                        format!("{tpath}.price"),
                        "input, output and cached_input must be USD per million tokens, 0 or more",
                    );
                }
            }
            let Some(tags) = TargetTags::new(&name, provider, &t.model) else {
                errors.push(format!("{tpath}.model"), "must be printable ASCII");
                return None;
            };
            Some(Target {
                health_key: Arc::from(format!("{}/{}", provider.name, t.model)),
                health_cell: std::sync::OnceLock::new(),
                metrics_cell: std::sync::OnceLock::new(),
                provider: provider.clone(),
                model: t.model,
                supports_prefill: t.supports_prefill,
                price,
                tags,
            })
        };
        let has_any = r.relay.is_some() || r.official.is_some();
        let relay = target("relay", ProviderKind::Relay, r.relay);
        let official = target("official", ProviderKind::Official, r.official);
        if !has_any {
            errors.push(
                &path,
                "a route needs a relay target, an official target, or both",
            );
        }
        if r.context_window == Some(0) {
            errors.push(format!("{path}.context_window"), "must be greater than 0");
        }
        for (i, alias) in r.aliases.iter().enumerate() {
            if !valid_name(alias) {
                errors.push(
                    format!("{path}.aliases[{i}]"),
                    "aliases may use letters, digits and - _ . : / only",
                );
            }
        }
        if relay.is_none() && official.is_none() {
            continue;
        }
        let route = Arc::new(Route {
            name: name.clone(),
            aliases: r.aliases,
            context_window: r.context_window,
            fallbacks: r.fallbacks,
            truncate_to_fit: r.truncate_to_fit,
            relay,
            official,
            smallest_window: std::sync::OnceLock::new(),
        });
        for model in std::iter::once(&route.name).chain(route.aliases.iter()) {
            if let Some(first) = owner.get(model) {
                errors.push(
                    &path,
                    format!("model name `{model}` is already used by route `{first}`"),
                );
                continue;
            }
            owner.insert(model.clone(), name.clone());
            by_model.insert(model.clone(), route.clone());
        }
        routes.insert(name, route);
    }

    for route in routes.values() {
        for (i, fallback) in route.fallbacks.iter().enumerate() {
            let path = format!("routes.{}.fallbacks[{i}]", route.name);
            match by_model.get(fallback) {
                None => errors.push(
                    path,
                    format!("`{fallback}` is not a route or alias of this config"),
                ),
                Some(target) if Arc::ptr_eq(target, route) => {
                    errors.push(path, "a route cannot fall back to itself")
                }
                Some(_) => {}
            }
        }
    }

    let default_route = match raw.default_route {
        None => None,
        Some(name) => match by_model.get(&name) {
            Some(route) => Some(route.clone()),
            None => {
                errors.push(
                    "default_route",
                    format!("`{name}` is not a route or alias of this config"),
                );
                None
            }
        },
    };

    if !errors.0.is_empty() {
        return Err(ConfigError(errors.0));
    }
    let flag_origins = layers::FlagOrigins::all(source.kind());
    Ok(Snapshot {
        generation,
        source,
        loaded_at: SystemTime::now(),
        flags,
        flag_origins,
        timeouts: Timeouts { response_headers },
        resilience,
        guard,
        shadow,
        passthrough,
        providers,
        routes,
        default_route,
        generation_header: HeaderValue::from(generation),
        by_model,
    })
}

fn compile_resilience(raw: &schema::RawResilience, errors: &mut Errors) -> Resilience {
    use crate::routing::breaker::ProbeMode;
    let d = Resilience::default();
    let mut duration =
        |field: &str, value: &Option<String>, default: Duration, allow_zero: bool| {
            section_duration(errors, "resilience", field, value, default, allow_zero)
        };
    let mut r = Resilience {
        deadline: duration("deadline", &raw.deadline, d.deadline, false),
        first_token_timeout: duration(
            "first_token_timeout",
            &raw.first_token_timeout,
            d.first_token_timeout,
            false,
        ),
        stream_idle_timeout: duration(
            "stream_idle_timeout",
            &raw.stream_idle_timeout,
            d.stream_idle_timeout,
            false,
        ),
        header_timeout_per_10k_tokens: duration(
            "header_timeout_per_10k_tokens",
            &raw.header_timeout_per_10k_tokens,
            d.header_timeout_per_10k_tokens,
            true,
        ),
        backoff_base: duration("backoff_base", &raw.backoff_base, d.backoff_base, true),
        backoff_max: duration("backoff_max", &raw.backoff_max, d.backoff_max, true),
        low_latency_threshold: duration(
            "low_latency_threshold",
            &raw.low_latency_threshold,
            d.low_latency_threshold,
            false,
        ),
        breaker: crate::routing::breaker::BreakerConfig {
            failures: raw.breaker_failures.unwrap_or(d.breaker.failures),
            cooldown: duration(
                "breaker_cooldown",
                &raw.breaker_cooldown,
                d.breaker.cooldown,
                false,
            ),
            max_cooldown: duration(
                "breaker_max_cooldown",
                &raw.breaker_max_cooldown,
                d.breaker.max_cooldown,
                false,
            ),
            probe: match raw.breaker_probe.as_deref().map(str::trim) {
                None => d.breaker.probe,
                Some("background") => ProbeMode::Background,
                Some("request") => ProbeMode::Request,
                Some(other) => {
                    errors.push(
                        "resilience.breaker_probe",
                        format!("`{other}` is not `background` or `request`"),
                    );
                    d.breaker.probe
                }
            },
        },
        attempts_per_target: raw.attempts_per_target.unwrap_or(d.attempts_per_target),
        rate_limit_waits: raw.rate_limit_waits.unwrap_or(d.rate_limit_waits),
        retry_budget_ratio: raw.retry_budget_ratio.unwrap_or(d.retry_budget_ratio),
        retry_budget_min_per_second: raw
            .retry_budget_min_per_second
            .unwrap_or(d.retry_budget_min_per_second),
    };
    if !(1..=10).contains(&r.attempts_per_target) {
        errors.push("resilience.attempts_per_target", "must be from 1 to 10");
        r.attempts_per_target = d.attempts_per_target;
    }
    if r.breaker.failures == 0 {
        errors.push("resilience.breaker_failures", "must be at least 1");
    }
    if r.breaker.max_cooldown < r.breaker.cooldown {
        errors.push(
            "resilience.breaker_max_cooldown",
            "must not be shorter than breaker_cooldown",
        );
    }
    if !(0.0..=10.0).contains(&r.retry_budget_ratio) || r.retry_budget_ratio.is_nan() {
        errors.push(
            "resilience.retry_budget_ratio",
            "must be from 0 to 10 (0.2 = 20 % of recent requests)",
        );
    }
    if r.rate_limit_waits > 10 {
        errors.push("resilience.rate_limit_waits", "must be at most 10");
    }
    r
}

fn flag<T: Copy>(
    errors: &mut Errors,
    path: &str,
    value: Option<&FlagValue>,
    default: T,
    parse: fn(&FlagValue) -> Result<T, String>,
) -> T {
    match value.map(parse) {
        None => default,
        Some(Ok(v)) => v,
        Some(Err(why)) => {
            errors.push(path, why);
            default
        }
    }
}

/// Booleans are forgiving where it is safe: `true`, `"True"`, `"1"`, `"yes"`, `"on"`.
pub fn parse_bool_flag(value: &FlagValue) -> Result<bool, String> {
    match value {
        FlagValue::Bool(b) => Ok(*b),
        FlagValue::Int(1) => Ok(true),
        FlagValue::Int(0) => Ok(false),
        FlagValue::Text(t) => match t.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(format!("`{t}` is not a boolean (use true or false)")),
        },
        other => Err(format!("{other:?} is not a boolean (use true or false)")),
    }
}

/// Percentages are strict: a whole number from 0 to 100, as a number or a string.
pub fn parse_percent_flag(value: &FlagValue) -> Result<u8, String> {
    let n = match value {
        FlagValue::Int(n) => *n,
        FlagValue::Text(t) => t
            .trim()
            .trim_end_matches('%')
            .parse::<i64>()
            .map_err(|_| format!("`{t}` is not a whole number from 0 to 100"))?,
        other => return Err(format!("{other:?} is not a whole number from 0 to 100")),
    };
    u8::try_from(n)
        .ok()
        .filter(|n| *n <= 100)
        .ok_or_else(|| format!("{n} is out of range: use a whole number from 0 to 100"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::rollout::decide;

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
    fn routing_flag_picks_the_side() {
        let mut snap = compile(&minimal(""), ConfigSource::Embedded, 1, &no_env()).unwrap();
        let route = snap.route("chat-latest").unwrap().clone();
        let (t, why) = route.choose(&decide(&snap.flags, false, || 0));
        assert_eq!((t.model.as_str(), why), ("up-relay", "routing_enabled"));
        snap.flags.holy_sheep_routing_enabled = false;
        let (t, why) = route.choose(&decide(&snap.flags, false, || 0));
        assert_eq!((t.model.as_str(), why), ("up-official", "routing_disabled"));
    }

    #[test]
    fn a_route_with_one_side_serves_from_it() {
        let text = "
holy_sheep_routing_enabled: false
providers:
  sheep: { kind: relay, base_url: 'http://127.0.0.1:1/v1' }
routes:
  only-relay: { relay: { provider: sheep, model: m } }
";
        let snap = compile(text, ConfigSource::Embedded, 1, &no_env()).unwrap();
        let decision = decide(&snap.flags, false, || 0);
        let (t, why) = snap.route("only-relay").unwrap().choose(&decision);
        assert_eq!((t.model.as_str(), why), ("m", ONLY_TARGET));
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
