//! The plan: which targets a request may try, in which order. A pure function of the config
//! snapshot, the request and a view of target health, so it is tested without any IO.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Route, Snapshot, Target};
use crate::providers::ProviderKind;
use crate::routing::rollout::SideOrder;

/// What planning needs to know about target health.
pub trait HealthLookup {
    /// What the target's breaker says about a request now: one question per target.
    fn standing(&self, target: &Target) -> Standing;
    fn last_failure(&self, target: &Target) -> Option<Instant>;
    /// Moving average of the target's latency, when known.
    fn latency(&self, target: &Target) -> Option<Duration>;
}

/// A target's breaker, as planning sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Closed: a first attempt needs no admission.
    Closed,
    /// Not closed, but a request now would be let through (half-open, or open and cooled down).
    Admitting,
    /// Turns requests away now.
    Blocking,
}

/// The request's wishes.
#[derive(Clone, Debug, Default)]
pub struct PlanRequest<'a> {
    /// `x-llm-sidecar-prefer`: start the chain at this route.
    pub prefer: Option<&'a str>,
    /// `x-llm-sidecar-low-latency: true`: skip targets slower than the threshold.
    pub low_latency: bool,
    pub prompt_tokens: u64,
    /// Which side each model of the chain starts on (flags, guard and rollout decide).
    pub order: SideOrder,
}

/// One target to try.
#[derive(Clone, Debug)]
pub struct Step {
    pub route: Arc<Route>,
    pub side: ProviderKind,
    /// Every target was open: this one (the least recently failed) is tried as a probe anyway.
    pub forced_probe: bool,
    /// The breaker was closed when the plan was made, so the first attempt goes ahead without
    /// asking it again.
    pub closed: bool,
}

impl Step {
    pub fn target(&self) -> &Target {
        planned_target(&self.route, self.side)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    BreakerOpen,
    TooSlow,
    ContextTooSmall,
}

impl SkipReason {
    pub fn label(self) -> &'static str {
        match self {
            SkipReason::BreakerOpen => "breaker_open",
            SkipReason::TooSlow => "too_slow",
            SkipReason::ContextTooSmall => "context_too_small",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Skipped {
    pub route: Arc<Route>,
    pub side: ProviderKind,
    pub reason: SkipReason,
}

impl Skipped {
    pub fn target(&self) -> &Target {
        planned_target(&self.route, self.side)
    }
}

/// Plans are built only from targets a route has.
fn planned_target(route: &Route, side: ProviderKind) -> &Target {
    route
        .target(side)
        .unwrap_or_else(|| unreachable!("plans only name targets that exist"))
}

#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub skipped: Vec<Skipped>,
}

/// The chain for a route: itself, then its fallbacks, rotated to start at `prefer` when the
/// preferred route is in the chain.
pub fn chain<'a>(
    snapshot: &'a Snapshot,
    route: &'a Arc<Route>,
    prefer: Option<&str>,
) -> Vec<&'a Arc<Route>> {
    let mut chain: Vec<&Arc<Route>> = std::iter::once(route)
        .chain(
            route
                .fallbacks
                .iter()
                .filter_map(|name| snapshot.route(name)),
        )
        .collect();
    if let Some(preferred) = prefer.and_then(|p| snapshot.route(p)) {
        if let Some(at) = chain.iter().position(|r| Arc::ptr_eq(r, preferred)) {
            chain.rotate_left(at);
        }
    }
    chain
}

/// Every target of the chain in the order the request's side order gives, before any filtering.
fn candidates<'a>(
    order: SideOrder,
    chain: &[&'a Arc<Route>],
) -> Vec<(&'a Arc<Route>, ProviderKind)> {
    let mut candidates = Vec::with_capacity(chain.len() * 2);
    let push_side = |c: &mut Vec<(&'a Arc<Route>, ProviderKind)>, side: ProviderKind| {
        for r in chain {
            if r.target(side).is_some() {
                c.push((r, side));
            }
        }
    };
    let per_model = |c: &mut Vec<(&'a Arc<Route>, ProviderKind)>, sides: [ProviderKind; 2]| {
        for r in chain {
            for side in sides {
                if r.target(side).is_some() {
                    c.push((r, side));
                }
            }
        }
    };
    match order {
        SideOrder::OfficialOnly => {
            // The kill switch: official only; the relay serves only a chain that has nothing else.
            push_side(&mut candidates, ProviderKind::Official);
            if candidates.is_empty() {
                push_side(&mut candidates, ProviderKind::Relay);
            }
        }
        SideOrder::FallbackOnly => {
            push_side(&mut candidates, ProviderKind::Official);
            push_side(&mut candidates, ProviderKind::Relay);
        }
        // Dual link per model: one side, then the same model on the other side, then the next
        // model of the chain.
        SideOrder::RelayFirst => per_model(
            &mut candidates,
            [ProviderKind::Relay, ProviderKind::Official],
        ),
        SideOrder::OfficialFirst => per_model(
            &mut candidates,
            [ProviderKind::Official, ProviderKind::Relay],
        ),
    }
    candidates
}

pub fn plan<'a>(
    snapshot: &'a Snapshot,
    route: &'a Arc<Route>,
    request: &PlanRequest<'_>,
    health: &dyn HealthLookup,
) -> Plan {
    let chain = chain(snapshot, route, request.prefer);
    let mut plan = Plan::default();
    let threshold = snapshot.resilience.low_latency_threshold;
    // Pass 1: drop what cannot serve this prompt; set aside what is too slow.
    let mut usable = candidates(request.order, &chain);
    let mut slow = Vec::new();
    usable.retain(|&(r, side)| {
        if r.context_window.is_some_and(|w| request.prompt_tokens > w) {
            plan.skipped.push(Skipped {
                route: r.clone(),
                side,
                reason: SkipReason::ContextTooSmall,
            });
            false
        } else if request.low_latency
            && r.target(side)
                .and_then(|t| health.latency(t))
                .is_some_and(|l| l > threshold)
        {
            slow.push((r, side));
            false
        } else {
            true
        }
    });
    // Better a slow answer than none: slow targets stay when nothing else is left.
    if usable.is_empty() {
        usable = slow;
    } else {
        plan.skipped
            .extend(slow.into_iter().map(|(route, side)| Skipped {
                route: route.clone(),
                side,
                reason: SkipReason::TooSlow,
            }));
    }
    // Pass 2: targets whose breaker is open are skipped.
    let mut open = Vec::new();
    plan.steps.reserve(usable.len());
    for (r, side) in usable {
        let standing = r.target(side).map(|t| health.standing(t));
        if standing == Some(Standing::Blocking) {
            open.push((r, side));
        } else {
            plan.steps.push(Step {
                route: r.clone(),
                side,
                forced_probe: false,
                closed: standing == Some(Standing::Closed),
            });
        }
    }
    if plan.steps.is_empty() && !open.is_empty() {
        // Every target is open: probe the one that failed longest ago instead of refusing.
        let at = open
            .iter()
            .enumerate()
            .min_by_key(|(_, (r, side))| r.target(*side).and_then(|t| health.last_failure(t)))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let (r, side) = open.remove(at);
        plan.steps.push(Step {
            route: r.clone(),
            side,
            forced_probe: true,
            closed: false,
        });
    }
    plan.skipped
        .extend(open.into_iter().map(|(route, side)| Skipped {
            route: route.clone(),
            side,
            reason: SkipReason::BreakerOpen,
        }));
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{compile, ConfigSource};
    use std::collections::{HashMap, HashSet};

    const CONFIG: &str = "
providers:
  sheep: { kind: relay, base_url: 'http://127.0.0.1:1/sheep/v1' }
  ds: { kind: official, base_url: 'http://127.0.0.1:1/ds/v1' }
  ms: { kind: official, base_url: 'http://127.0.0.1:1/ms/v1' }
  gm: { kind: official, base_url: 'http://127.0.0.1:1/gm/v1' }
routes:
  deepseek:
    context_window: 1000
    fallbacks: [kimi, gemini]
    relay: { provider: sheep, model: ds-relay }
    official: { provider: ds, model: ds-official }
  kimi:
    context_window: 5000
    relay: { provider: sheep, model: kimi-relay }
    official: { provider: ms, model: kimi-official }
  gemini:
    context_window: 100000
    official: { provider: gm, model: gemini-official }
";

    #[derive(Default)]
    struct FakeHealth {
        open: HashSet<&'static str>,
        failed_at: HashMap<&'static str, Instant>,
        latency: HashMap<&'static str, Duration>,
    }

    impl HealthLookup for FakeHealth {
        fn standing(&self, target: &Target) -> Standing {
            if self.open.contains(target.health_key.as_ref()) {
                Standing::Blocking
            } else {
                Standing::Closed
            }
        }
        fn last_failure(&self, target: &Target) -> Option<Instant> {
            self.failed_at.get(target.health_key.as_ref()).copied()
        }
        fn latency(&self, target: &Target) -> Option<Duration> {
            self.latency.get(target.health_key.as_ref()).copied()
        }
    }

    fn snapshot(extra: &str) -> Snapshot {
        compile(
            &format!("{extra}\n{CONFIG}"),
            ConfigSource::Embedded,
            1,
            &HashMap::<String, String>::new(),
        )
        .expect("config compiles")
    }

    /// The plan's targets, with the side order the snapshot's flags give.
    fn order(snapshot: &Snapshot, request: &PlanRequest<'_>, health: &FakeHealth) -> Vec<String> {
        let route = snapshot.route("deepseek").expect("route").clone();
        let mut request = request.clone();
        request.order = crate::routing::rollout::decide(&snapshot.flags, false, || 0).order;
        plan(snapshot, &route, &request, health)
            .steps
            .iter()
            .map(|s| {
                let probe = if s.forced_probe { " (probe)" } else { "" };
                format!("{}{probe}", s.target().health_key)
            })
            .collect()
    }

    #[test]
    fn the_chain_goes_relay_then_official_per_model() {
        let snap = snapshot("");
        assert_eq!(
            order(&snap, &PlanRequest::default(), &FakeHealth::default()),
            [
                "sheep/ds-relay",
                "ds/ds-official",
                "sheep/kimi-relay",
                "ms/kimi-official",
                "gm/gemini-official"
            ]
        );
    }

    #[test]
    fn a_preference_rotates_the_chain() {
        let snap = snapshot("");
        let request = PlanRequest {
            prefer: Some("gemini"),
            ..Default::default()
        };
        assert_eq!(
            order(&snap, &request, &FakeHealth::default()),
            [
                "gm/gemini-official",
                "sheep/ds-relay",
                "ds/ds-official",
                "sheep/kimi-relay",
                "ms/kimi-official"
            ]
        );
        let unknown = PlanRequest {
            prefer: Some("nope"),
            ..Default::default()
        };
        assert_eq!(
            order(&snap, &unknown, &FakeHealth::default())[0],
            "sheep/ds-relay"
        );
    }

    #[test]
    fn the_kill_switch_plans_official_targets_only() {
        let snap = snapshot("holy_sheep_routing_enabled: false");
        assert_eq!(
            order(&snap, &PlanRequest::default(), &FakeHealth::default()),
            ["ds/ds-official", "ms/kimi-official", "gm/gemini-official"]
        );
    }

    #[test]
    fn a_rollout_bucket_outside_the_percentage_starts_each_model_on_its_official_api() {
        let snap = snapshot("rollout_percent: 30");
        let route = snap.route("deepseek").unwrap().clone();
        let request = PlanRequest {
            order: SideOrder::OfficialFirst,
            ..Default::default()
        };
        let steps: Vec<String> = plan(&snap, &route, &request, &FakeHealth::default())
            .steps
            .iter()
            .map(|s| s.target().health_key.to_string())
            .collect();
        assert_eq!(
            steps,
            [
                "ds/ds-official",
                "sheep/ds-relay",
                "ms/kimi-official",
                "sheep/kimi-relay",
                "gm/gemini-official"
            ]
        );
    }

    #[test]
    fn fallback_only_tries_every_official_target_before_the_relay() {
        let snap = snapshot("holy_sheep_fallback_only: true");
        assert_eq!(
            order(&snap, &PlanRequest::default(), &FakeHealth::default()),
            [
                "ds/ds-official",
                "ms/kimi-official",
                "gm/gemini-official",
                "sheep/ds-relay",
                "sheep/kimi-relay"
            ]
        );
    }

    #[test]
    fn open_breakers_are_skipped_and_the_least_recently_failed_is_probed_when_all_are_open() {
        let snap = snapshot("");
        let mut health = FakeHealth::default();
        health.open.insert("sheep/ds-relay");
        let route = snap.route("deepseek").unwrap().clone();
        let p = plan(&snap, &route, &PlanRequest::default(), &health);
        assert_eq!(p.steps[0].target().health_key.as_ref(), "ds/ds-official");
        assert_eq!(p.skipped.len(), 1);
        assert_eq!(p.skipped[0].reason, SkipReason::BreakerOpen);

        let now = Instant::now();
        for (i, key) in [
            "sheep/ds-relay",
            "ds/ds-official",
            "sheep/kimi-relay",
            "ms/kimi-official",
            "gm/gemini-official",
        ]
        .into_iter()
        .enumerate()
        {
            health.open.insert(key);
            health
                .failed_at
                .insert(key, now + Duration::from_secs(10 - i as u64));
        }
        assert_eq!(
            order(&snap, &PlanRequest::default(), &health),
            ["gm/gemini-official (probe)"]
        );
    }

    #[test]
    fn targets_whose_window_is_too_small_are_skipped() {
        let snap = snapshot("");
        let request = PlanRequest {
            prompt_tokens: 3000,
            ..Default::default()
        };
        assert_eq!(
            order(&snap, &request, &FakeHealth::default()),
            ["sheep/kimi-relay", "ms/kimi-official", "gm/gemini-official"]
        );
        let huge = PlanRequest {
            prompt_tokens: 1_000_000,
            ..Default::default()
        };
        assert!(order(&snap, &huge, &FakeHealth::default()).is_empty());
    }

    #[test]
    fn low_latency_requests_skip_slow_targets_unless_nothing_else_is_left() {
        let snap = snapshot("resilience: { low_latency_threshold: 500ms }");
        let mut health = FakeHealth::default();
        health
            .latency
            .insert("sheep/ds-relay", Duration::from_secs(3));
        health
            .latency
            .insert("ds/ds-official", Duration::from_millis(100));
        let request = PlanRequest {
            low_latency: true,
            ..Default::default()
        };
        assert_eq!(order(&snap, &request, &health)[0], "ds/ds-official");
        assert_eq!(
            order(&snap, &PlanRequest::default(), &health)[0],
            "sheep/ds-relay"
        );
        for key in [
            "ds/ds-official",
            "sheep/kimi-relay",
            "ms/kimi-official",
            "gm/gemini-official",
        ] {
            health.latency.insert(key, Duration::from_secs(5));
        }
        assert_eq!(
            order(&snap, &request, &health).len(),
            5,
            "all slow: keep them all"
        );
    }

    #[test]
    fn bad_fallbacks_are_config_errors() {
        let text = CONFIG.replace(
            "fallbacks: [kimi, gemini]",
            "fallbacks: [kimi, gemni, deepseek]",
        );
        let err = compile(
            &text,
            ConfigSource::Embedded,
            1,
            &HashMap::<String, String>::new(),
        )
        .unwrap_err();
        let paths: Vec<&str> = err.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "routes.deepseek.fallbacks[1]",
                "routes.deepseek.fallbacks[2]"
            ],
            "{err}"
        );
    }
}
