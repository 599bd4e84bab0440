//! From YAML to a [`Snapshot`]: parse with the path of each field that fails, validate every
//! section (each error names its field path), and compile providers, targets and routes.

use super::*;

pub(super) fn compile_shadow(raw: &schema::RawShadow, errors: &mut Errors) -> ShadowConfig {
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

/// A duration field of a config section (`resilience.deadline`): the default when unset, an
/// error at its path when it does not parse or is zero where zero makes no sense.
pub(super) fn section_duration(
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

pub(super) fn compile_guard(raw: &schema::RawGuard, errors: &mut Errors) -> GuardConfig {
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
pub(super) fn field_path(path: &serde_path_to_error::Path) -> String {
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

pub(crate) struct Errors(Vec<FieldError>);

impl Errors {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Provider and route names end up in metric labels and headers: keep them plain.
pub(super) fn valid_name(name: &str) -> bool {
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
    let cache_max_bytes = super::cache::compile_max_bytes(&raw.cache, &mut errors);
    let cache_shared_max_entry_bytes =
        super::cache::compile_shared_max_entry_bytes(&raw.cache, &mut errors);
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
                metrics_key: Arc::from(format!(
                    "{name}/{}/{}/{}",
                    provider.name,
                    t.model,
                    provider.kind.as_str()
                )),
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
        if r.max_tokens == Some(0) {
            errors.push(format!("{path}.max_tokens"), "must be greater than 0");
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
            max_tokens: r.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            relay,
            official,
            cache: super::cache::compile_route(&path, r.cache, &mut errors),
            static_fallback: super::cache::compile_static_fallback(
                &path,
                r.static_fallback,
                &mut errors,
            ),
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

    let budgets = budgets::compile_budgets(
        raw.budgets,
        raw.budget_store_down,
        &routes,
        &providers,
        &mut errors,
    );

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
        cache_max_bytes,
        cache_shared_max_entry_bytes,
        providers,
        routes,
        default_route,
        budgets,
        generation_header: HeaderValue::from(generation),
        by_model,
    })
}

pub(super) fn compile_resilience(raw: &schema::RawResilience, errors: &mut Errors) -> Resilience {
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
        breaker: BreakerConfig {
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

pub(super) fn flag<T: Copy>(
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
