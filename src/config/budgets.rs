//! Daily spend budgets in the routing config: what each caps, when its day resets, and the
//! validation of `budgets:` and `budget_store_down` (each error at its field path).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;

use super::compile::Errors;
pub use super::schema::{OnExhausted, StoreDownMode};
use super::schema::{RawBudget, RawBudgetMatch};
use super::Route;

/// The budgets of one snapshot, in the order written.
#[derive(Debug, Default)]
pub struct Budgets {
    pub list: Vec<Arc<Budget>>,
    /// What every budget does while the shared store cannot be reached.
    pub store_down: StoreDownMode,
}

/// One daily cap on the targets it matches.
#[derive(Debug)]
pub struct Budget {
    /// Plain (letters, digits, `-`, `_`, `.`): a metric label and part of a Redis key.
    pub name: Arc<str>,
    pub matches: BudgetMatch,
    pub daily_usd: f64,
    pub on_exhausted: OnExhausted,
    /// Ascending fractions in (0, 1].
    pub alert_at: Vec<f64>,
    pub timezone: jiff::tz::TimeZone,
    /// The IANA name as written (`UTC` by default).
    pub timezone_name: String,
}

/// A budget matches a target when every field it sets equals the target's; `{}` matches all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BudgetMatch {
    pub route: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
}

/// What a budget is matched against: the route a target belongs to, its provider's name, and
/// the model name the provider knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetRef<'a> {
    pub route: &'a str,
    pub provider: &'a str,
    pub model: &'a str,
}

impl<'a> TargetRef<'a> {
    pub fn of(target: &'a super::Target) -> TargetRef<'a> {
        TargetRef {
            route: &target.tags.route,
            provider: &target.tags.provider,
            model: &target.model,
        }
    }
}

impl BudgetMatch {
    pub fn matches(&self, target: TargetRef<'_>) -> bool {
        let field = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        field(&self.route, target.route)
            && field(&self.provider, target.provider)
            && field(&self.model, target.model)
    }
}

impl Budget {
    pub fn matches(&self, target: TargetRef<'_>) -> bool {
        self.matches.matches(target)
    }

    pub fn view(&self) -> serde_json::Value {
        json!({
            "name": &*self.name,
            "match": {
                "route": self.matches.route,
                "provider": self.matches.provider,
                "model": self.matches.model,
            },
            "daily_usd": self.daily_usd,
            "on_exhausted": self.on_exhausted.as_str(),
            "alert_at": self.alert_at,
            "timezone": self.timezone_name,
        })
    }
}

impl Budgets {
    /// The budgets that match `target`.
    pub fn matching<'s>(&'s self, target: TargetRef<'s>) -> impl Iterator<Item = &'s Arc<Budget>> {
        self.list.iter().filter(move |b| b.matches(target))
    }

    pub fn view(&self) -> serde_json::Value {
        json!(self.list.iter().map(|b| b.view()).collect::<Vec<_>>())
    }
}

/// The alert thresholds when `alert_at` is not given.
pub const DEFAULT_ALERT_AT: [f64; 2] = [0.8, 1.0];

/// Budget names become metric labels and Redis keys (`llm-sidecar:budget:<name>:<day>`).
fn valid_budget_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

pub(super) fn compile_budgets(
    raw: Vec<RawBudget>,
    store_down: Option<StoreDownMode>,
    routes: &BTreeMap<String, Arc<Route>>,
    providers: &BTreeMap<String, Arc<crate::providers::Provider>>,
    errors: &mut Errors,
) -> Budgets {
    let mut list: Vec<Arc<Budget>> = Vec::with_capacity(raw.len());
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, b) in raw.into_iter().enumerate() {
        let path = format!("budgets[{i}]");
        let mut ok = true;
        let name = b.name.trim().to_string();
        if !valid_budget_name(&name) {
            errors.push(
                format!("{path}.name"),
                "must be 1 to 64 letters, digits, - _ or . (it is a metric label and a Redis key)",
            );
            ok = false;
        } else if let Some(first) = seen.get(&name) {
            errors.push(
                format!("{path}.name"),
                format!("`{name}` is already the name of budgets[{first}]"),
            );
            ok = false;
        } else {
            seen.insert(name.clone(), i);
        }
        if !(b.daily_usd.is_finite() && b.daily_usd > 0.0) {
            errors.push(
                format!("{path}.daily_usd"),
                "must be a number of USD above 0",
            );
            ok = false;
        }
        let alert_at = b.alert_at.unwrap_or_else(|| DEFAULT_ALERT_AT.to_vec());
        for (j, level) in alert_at.iter().enumerate() {
            if !(*level > 0.0 && *level <= 1.0) {
                errors.push(
                    format!("{path}.alert_at[{j}]"),
                    "must be a fraction of daily_usd above 0 and at most 1",
                );
                ok = false;
            } else if j > 0 && *level <= alert_at[j - 1] {
                errors.push(
                    format!("{path}.alert_at[{j}]"),
                    "must be above the one before it (ascending, no repeats)",
                );
                ok = false;
            }
        }
        let timezone_name = b
            .timezone
            .as_deref()
            .map(str::trim)
            .unwrap_or("UTC")
            .to_string();
        let timezone = match jiff::tz::TimeZone::get(&timezone_name) {
            Ok(tz) => tz,
            Err(_) => {
                errors.push(
                    format!("{path}.timezone"),
                    format!(
                        "`{timezone_name}` is not an IANA time zone (like UTC or Asia/Shanghai)"
                    ),
                );
                ok = false;
                jiff::tz::TimeZone::UTC
            }
        };
        let matches = match check_match(&b.matches, &path, routes, providers, errors) {
            Some(m) => m,
            None => {
                ok = false;
                BudgetMatch::default()
            }
        };
        if ok {
            list.push(Arc::new(Budget {
                name: Arc::from(name),
                matches,
                daily_usd: b.daily_usd,
                on_exhausted: b.on_exhausted.unwrap_or_default(),
                alert_at,
                timezone,
                timezone_name,
            }));
        }
    }
    Budgets {
        list,
        store_down: store_down.unwrap_or_default(),
    }
}

/// A match names a route and provider of this config, and a model some target of theirs
/// serves; a match that could never apply is an error, not a budget that silently caps nothing.
fn check_match(
    raw: &RawBudgetMatch,
    path: &str,
    routes: &BTreeMap<String, Arc<Route>>,
    providers: &BTreeMap<String, Arc<crate::providers::Provider>>,
    errors: &mut Errors,
) -> Option<BudgetMatch> {
    let clean = |v: &Option<String>| v.as_deref().map(|v| v.trim().to_string());
    let m = BudgetMatch {
        route: clean(&raw.route),
        provider: clean(&raw.provider),
        model: clean(&raw.model),
    };
    let mut ok = true;
    if let Some(route) = &m.route {
        if !routes.contains_key(route) {
            let alias_of = routes
                .values()
                .find(|r| r.aliases.iter().any(|a| a == route));
            let hint = match alias_of {
                Some(r) => format!("; it is an alias of route `{}`: use that name", r.name),
                None => String::new(),
            };
            errors.push(
                format!("{path}.match.route"),
                format!("unknown route `{route}`{hint}"),
            );
            ok = false;
        }
    }
    if let Some(provider) = &m.provider {
        if !providers.contains_key(provider) {
            let known: Vec<&str> = providers.keys().map(String::as_str).collect();
            errors.push(
                format!("{path}.match.provider"),
                format!(
                    "unknown provider `{provider}` (known: {})",
                    known.join(", ")
                ),
            );
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    let matches_some_target = routes.values().any(|r| {
        [&r.relay, &r.official]
            .into_iter()
            .flatten()
            .any(|t| m.matches(TargetRef::of(t)))
    });
    if !matches_some_target {
        let field = if m.model.is_some() {
            "model"
        } else {
            "provider"
        };
        errors.push(
            format!("{path}.match.{field}"),
            "matches no target of this config (route, provider and model must all fit one target)",
        );
        return None;
    }
    Some(m)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::{compile, ConfigError, ConfigSource, Snapshot};

    fn config(budgets: &str) -> String {
        format!(
            "{budgets}
providers:
  holysheep: {{ kind: relay, base_url: 'http://127.0.0.1:1/sheep/v1' }}
  deepseek: {{ kind: official, base_url: 'http://127.0.0.1:1/ds/v1' }}
routes:
  deepseek-v3.2:
    aliases: [deepseek-chat]
    relay: {{ provider: holysheep, model: deepseek-v3.2 }}
    official: {{ provider: deepseek, model: deepseek-chat }}
  kimi-k2:
    relay: {{ provider: holysheep, model: kimi-k2 }}
"
        )
    }

    fn ok(budgets: &str) -> Snapshot {
        compile(
            &config(budgets),
            ConfigSource::Embedded,
            1,
            &HashMap::<String, String>::new(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(budgets: &str) -> ConfigError {
        compile(
            &config(budgets),
            ConfigSource::Embedded,
            1,
            &HashMap::<String, String>::new(),
        )
        .expect_err(budgets)
    }

    fn paths(e: &ConfigError) -> Vec<&str> {
        e.0.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn the_issue_example_compiles_with_its_fields() {
        let snap = ok("
budgets:
  - name: relay-deepseek
    match: { provider: holysheep, model: deepseek-v3.2 }
    daily_usd: 50
    on_exhausted: fallback
    alert_at: [0.5, 0.8, 1.0]
    timezone: Asia/Shanghai
  - name: all
    match: {}
    daily_usd: 200.5
    on_exhausted: reject
budget_store_down: fail_closed
");
        let b = &snap.budgets;
        assert_eq!(b.store_down, StoreDownMode::FailClosed);
        assert_eq!(b.list.len(), 2);
        assert_eq!(&*b.list[0].name, "relay-deepseek");
        assert_eq!(b.list[0].daily_usd, 50.0);
        assert_eq!(b.list[0].alert_at, [0.5, 0.8, 1.0]);
        assert_eq!(b.list[0].timezone_name, "Asia/Shanghai");
        assert_eq!(b.list[1].on_exhausted, OnExhausted::Reject);
        assert_eq!(b.list[1].alert_at, DEFAULT_ALERT_AT);
        assert_eq!(b.list[1].timezone_name, "UTC");
        let view = snap.redacted_view();
        assert_eq!(view["budgets"][0]["name"], "relay-deepseek");
        assert_eq!(view["budget_store_down"], "fail_closed");
        // Without budgets: none, and the default store-down mode.
        let none = ok("");
        assert!(none.budgets.list.is_empty());
        assert_eq!(none.budgets.store_down, StoreDownMode::Local);
    }

    #[test]
    fn a_budget_matches_when_every_field_it_sets_equals_the_targets() {
        let snap = ok("
budgets:
  - { name: relay-ds, match: { provider: holysheep, model: deepseek-v3.2 }, daily_usd: 1 }
  - { name: kimi, match: { route: kimi-k2 }, daily_usd: 1 }
  - { name: sheep, match: { provider: holysheep }, daily_usd: 1 }
  - { name: all, match: {}, daily_usd: 1 }
");
        let route = snap.route("deepseek-chat").unwrap();
        let names = |t: &crate::config::Target| {
            snap.budgets
                .matching(TargetRef::of(t))
                .map(|b| b.name.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(route.relay.as_ref().unwrap()),
            ["relay-ds", "sheep", "all"]
        );
        assert_eq!(names(route.official.as_ref().unwrap()), ["all"]);
        let kimi = snap.route("kimi-k2").unwrap();
        assert_eq!(
            names(kimi.relay.as_ref().unwrap()),
            ["kimi", "sheep", "all"]
        );
    }

    #[test]
    fn each_invalid_field_is_an_error_at_its_path() {
        for (budgets, path, says) in [
            ("budgets: [{ name: '', daily_usd: 1 }]", "budgets[0].name", "1 to 64"),
            ("budgets: [{ name: 'a:b', daily_usd: 1 }]", "budgets[0].name", "Redis key"),
            (
                "budgets: [{ name: a, daily_usd: 1 }, { name: a, daily_usd: 2 }]",
                "budgets[1].name",
                "already the name of budgets[0]",
            ),
            ("budgets: [{ name: a, daily_usd: 0 }]", "budgets[0].daily_usd", "above 0"),
            ("budgets: [{ name: a, daily_usd: -5 }]", "budgets[0].daily_usd", "above 0"),
            ("budgets: [{ name: a, daily_usd: .inf }]", "budgets[0].daily_usd", "above 0"),
            ("budgets: [{ name: a, daily_usd: .nan }]", "budgets[0].daily_usd", "above 0"),
            (
                "budgets: [{ name: a, daily_usd: 1, alert_at: [0.5, 1.5] }]",
                "budgets[0].alert_at[1]",
                "at most 1",
            ),
            (
                "budgets: [{ name: a, daily_usd: 1, alert_at: [0] }]",
                "budgets[0].alert_at[0]",
                "above 0",
            ),
            (
                "budgets: [{ name: a, daily_usd: 1, alert_at: [0.8, 0.5] }]",
                "budgets[0].alert_at[1]",
                "ascending",
            ),
            (
                "budgets: [{ name: a, daily_usd: 1, timezone: Mars/Olympus }]",
                "budgets[0].timezone",
                "not an IANA time zone",
            ),
            (
                "budgets: [{ name: a, daily_usd: 1, match: { provider: holysheeep } }]",
                "budgets[0].match.provider",
                "unknown provider `holysheeep` (known: deepseek, holysheep)",
            ),
            (
                "budgets: [{ name: a, daily_usd: 1, match: { route: deepseek-chat } }]",
                "budgets[0].match.route",
                "alias of route `deepseek-v3.2`",
            ),
            (
                "budgets: [{ name: a, daily_usd: 1, match: { route: nope } }]",
                "budgets[0].match.route",
                "unknown route `nope`",
            ),
            (
                "budgets: [{ name: a, daily_usd: 1, match: { provider: deepseek, model: kimi-k2 } }]",
                "budgets[0].match.model",
                "matches no target",
            ),
            (
                "budgets: [{ name: a, daily_usd: 1, on_exhausted: block }]",
                "budgets[0].on_exhausted",
                "unknown variant `block`",
            ),
            (
                "budgets: [{ name: a, daily_usd: '50' }]",
                "budgets[0].daily_usd",
                "",
            ),
            ("budgets: [{ name: a }]", "budgets[0]", "missing field `daily_usd`"),
            (
                "budgets: [{ name: a, daily_usd: 1, match: { modle: x } }]",
                "budgets[0].match.modle",
                "unknown field",
            ),
            ("budget_store_down: open", "budget_store_down", "unknown variant `open`"),
        ] {
            let e = err(budgets);
            assert_eq!(paths(&e), [path], "{budgets}: {e}");
            assert!(e.0[0].message.contains(says), "{budgets}: {e}");
        }
    }

    #[test]
    fn an_invalid_budget_is_rejected_and_the_last_good_config_stays() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(crate::telemetry::metrics::Metrics::register(&mut registry));
        let store = crate::store::ConfigStore::new(
            &config("budgets: [{ name: a, daily_usd: 5 }]"),
            ConfigSource::Embedded,
            Arc::new(HashMap::<String, String>::new()),
            metrics,
        )
        .unwrap();
        let e = store
            .apply(
                &config("budgets: [{ name: a, daily_usd: -1 }]"),
                ConfigSource::Embedded,
            )
            .unwrap_err();
        assert_eq!(paths(&e), ["budgets[0].daily_usd"]);
        let serving = store.load();
        assert_eq!(serving.budgets.list[0].daily_usd, 5.0);
    }
}
