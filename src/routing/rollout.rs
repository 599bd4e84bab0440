//! Which side a request starts on, and why: the kill switch, fallback-only mode, the automatic
//! rollback guard and the percentage rollout, decided in one place.
//!
//! Rollout is sticky: a request's key (`x-llm-sidecar-rollout-key`, else the OpenAI `user`
//! field) is hashed into one of 10 000 buckets, and buckets below `rollout_percent × 100` start
//! on the relay. The same key lands on the same side for the same percentage, and raising the
//! percentage only moves buckets from official to relay. Requests without a key get a random
//! bucket.

use crate::config::{Flags, Route, Target, ONLY_TARGET};

/// Buckets a key hashes into.
pub const BUCKETS: u16 = 10_000;

/// The order of sides a request's plan follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SideOrder {
    /// Per model: the relay, then the same model's official API (rollout bucket on the relay).
    #[default]
    RelayFirst,
    /// Per model: the official API, then the relay (rollout bucket on the official side).
    OfficialFirst,
    /// Every official target of the chain, then the relay as the last resort.
    FallbackOnly,
    /// Official targets only (the relay only for a chain with nothing else).
    OfficialOnly,
}

impl SideOrder {
    /// The side a route's plan starts on.
    pub fn first_side(self) -> crate::providers::ProviderKind {
        match self {
            SideOrder::RelayFirst => crate::providers::ProviderKind::Relay,
            _ => crate::providers::ProviderKind::Official,
        }
    }
}

/// Why a request starts on the side it starts on (the `x-llm-sidecar-reason` header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// `holy_sheep_routing_enabled: true` and `rollout_percent: 100`.
    RoutingEnabled,
    /// The rollout bucket is inside `rollout_percent`.
    RolloutRelay,
    /// The rollout bucket is outside `rollout_percent`.
    RolloutOfficial,
    /// `holy_sheep_fallback_only: true`.
    FallbackOnly,
    /// `holy_sheep_routing_enabled: false` (the rollback flag).
    RoutingDisabled,
    /// The automatic rollback guard tripped.
    GuardTripped,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::RoutingEnabled => "routing_enabled",
            Why::RolloutRelay => "rollout_relay",
            Why::RolloutOfficial => "rollout_official",
            Why::FallbackOnly => "fallback_only",
            Why::RoutingDisabled => "routing_disabled",
            Why::GuardTripped => "guard_tripped",
        }
    }
}

/// The decision for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub order: SideOrder,
    pub why: Why,
    /// The rollout bucket, when the rollout decided.
    pub bucket: Option<u16>,
}

/// Decides the side order. `bucket` is only computed when the rollout has a say.
pub fn decide(flags: &Flags, guard_tripped: bool, bucket: impl FnOnce() -> u16) -> Decision {
    let (order, why, bucket) = if !flags.holy_sheep_routing_enabled {
        (SideOrder::OfficialOnly, Why::RoutingDisabled, None)
    } else if guard_tripped {
        (SideOrder::OfficialOnly, Why::GuardTripped, None)
    } else if flags.holy_sheep_fallback_only {
        (SideOrder::FallbackOnly, Why::FallbackOnly, None)
    } else if flags.rollout_percent >= 100 {
        (SideOrder::RelayFirst, Why::RoutingEnabled, None)
    } else {
        let b = bucket();
        if on_relay(flags.rollout_percent, b) {
            (SideOrder::RelayFirst, Why::RolloutRelay, Some(b))
        } else {
            (SideOrder::OfficialFirst, Why::RolloutOfficial, Some(b))
        }
    };
    Decision { order, why, bucket }
}

/// Buckets below `percent × 100` are on the relay: raising the percentage only adds buckets.
pub fn on_relay(percent: u8, bucket: u16) -> bool {
    u32::from(bucket) < u32::from(percent.min(100)) * u32::from(BUCKETS) / 100
}

/// A key's bucket: FNV-1a over the bytes, then a 64-bit finaliser so that similar keys
/// (`user-1`, `user-2`) spread evenly. Stable across processes, versions and machines.
pub fn bucket_for_key(key: &str) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h % u64::from(BUCKETS)) as u16
}

/// A uniformly random bucket, for requests without a key.
pub fn random_bucket() -> u16 {
    fastrand::u16(..BUCKETS)
}

/// The target a request starts on under `decision`, and the reason header's value: the
/// decision's reason, or `only_target` when the route lacks the side it asks for.
pub fn choose<'r>(route: &'r Route, decision: &Decision) -> (&'r Target, &'static str) {
    let first = decision.order.first_side();
    match (route.target(first), route.target(first.other())) {
        (Some(t), _) => (t, decision.why.as_str()),
        (None, Some(t)) => (t, ONLY_TARGET),
        // Compilation guarantees every route has at least one target.
        (None, None) => unreachable!("route without targets passed validation"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{compile, ConfigSource};
    use std::collections::HashMap;

    fn flags(enabled: bool, fallback_only: bool, rollout: u8) -> Flags {
        Flags {
            holy_sheep_routing_enabled: enabled,
            holy_sheep_fallback_only: fallback_only,
            rollout_percent: rollout,
            shadow_percent: 0,
        }
    }

    #[test]
    fn same_key_same_side_for_the_same_percentage() {
        for key in ["user-1", "tenant:acme", "", "ünïcode-ключ"] {
            let first = bucket_for_key(key);
            for _ in 0..3 {
                assert_eq!(bucket_for_key(key), first);
            }
            let d1 = decide(&flags(true, false, 40), false, || bucket_for_key(key));
            let d2 = decide(&flags(true, false, 40), false, || bucket_for_key(key));
            assert_eq!(d1, d2);
        }
        // Pinned values: the hash must not change between releases (or between sidecars of
        // different versions during an upgrade), or users would switch sides.
        assert_eq!(bucket_for_key("user-1"), 7624);
        assert_eq!(bucket_for_key("user-2"), 8795);
        assert_eq!(bucket_for_key("tenant:acme"), 1461);
    }

    #[test]
    fn raising_the_percentage_only_moves_keys_from_official_to_relay() {
        let keys: Vec<String> = (0..5_000).map(|i| format!("user-{i}")).collect();
        let mut previous: Vec<bool> = vec![false; keys.len()];
        for percent in [0u8, 5, 10, 25, 50, 75, 99, 100] {
            let now: Vec<bool> = keys
                .iter()
                .map(|k| on_relay(percent, bucket_for_key(k)))
                .collect();
            for (i, (was, is)) in previous.iter().zip(&now).enumerate() {
                assert!(
                    !was || *is,
                    "key {} went back to official at {percent}%",
                    keys[i]
                );
            }
            previous = now;
        }
        assert!(
            previous.iter().all(|r| *r),
            "100% puts every key on the relay"
        );
        assert!(!on_relay(0, 0), "0% puts no key on the relay");
    }

    #[test]
    fn a_quarter_of_random_keys_land_on_the_relay_at_25_percent() {
        let n = 100_000;
        let relay = (0..n)
            .filter(|_| {
                let key = format!("{:016x}", fastrand::u64(..));
                on_relay(25, bucket_for_key(&key))
            })
            .count();
        let share = relay as f64 / n as f64;
        assert!((0.24..=0.26).contains(&share), "share {share}");
        // Sequential keys (user ids) spread as well as random ones.
        let sequential = (0..n)
            .filter(|i| on_relay(25, bucket_for_key(&format!("user-{i}"))))
            .count() as f64
            / n as f64;
        assert!((0.24..=0.26).contains(&sequential), "share {sequential}");
        // And requests without a key.
        let random = (0..n).filter(|_| on_relay(25, random_bucket())).count() as f64 / n as f64;
        assert!((0.24..=0.26).contains(&random), "share {random}");
    }

    #[test]
    fn precedence_kill_switch_then_guard_then_fallback_only_then_rollout() {
        let never = || -> u16 { panic!("no bucket needed") };
        assert_eq!(
            decide(&flags(false, true, 50), true, never).why,
            Why::RoutingDisabled
        );
        assert_eq!(
            decide(&flags(true, true, 50), true, never).why,
            Why::GuardTripped
        );
        let d = decide(&flags(true, true, 50), false, never);
        assert_eq!(
            (d.order, d.why),
            (SideOrder::FallbackOnly, Why::FallbackOnly)
        );
        let d = decide(&flags(true, false, 100), false, never);
        assert_eq!(
            (d.order, d.why),
            (SideOrder::RelayFirst, Why::RoutingEnabled)
        );
        let d = decide(&flags(true, false, 50), false, || 4_999);
        assert_eq!(
            (d.order, d.why, d.bucket),
            (SideOrder::RelayFirst, Why::RolloutRelay, Some(4_999))
        );
        let d = decide(&flags(true, false, 50), false, || 5_000);
        assert_eq!(
            (d.order, d.why, d.bucket),
            (SideOrder::OfficialFirst, Why::RolloutOfficial, Some(5_000))
        );
    }

    fn chat_config() -> String {
        "providers:
  sheep: { kind: relay, base_url: 'http://127.0.0.1:1/sheep/v1' }
  ds: { kind: official, base_url: 'http://127.0.0.1:1/ds/v1' }
routes:
  chat:
    aliases: [chat-latest]
    relay: { provider: sheep, model: up-relay }
    official: { provider: ds, model: up-official }
"
        .to_string()
    }

    #[test]
    fn routing_flag_picks_the_side() {
        let mut snap = compile(
            &chat_config(),
            ConfigSource::Embedded,
            1,
            &HashMap::<String, String>::new(),
        )
        .unwrap();
        let route = snap.route("chat-latest").unwrap().clone();
        let (t, why) = choose(&route, &decide(&snap.flags, false, || 0));
        assert_eq!((t.model.as_str(), why), ("up-relay", "routing_enabled"));
        snap.flags.holy_sheep_routing_enabled = false;
        let (t, why) = choose(&route, &decide(&snap.flags, false, || 0));
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
        let snap = compile(
            text,
            ConfigSource::Embedded,
            1,
            &HashMap::<String, String>::new(),
        )
        .unwrap();
        let decision = decide(&snap.flags, false, || 0);
        let (t, why) = choose(snap.route("only-relay").unwrap(), &decision);
        assert_eq!((t.model.as_str(), why), ("m", ONLY_TARGET));
    }
}
