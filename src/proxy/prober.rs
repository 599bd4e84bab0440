//! Background probes of targets whose breaker is open: once per cooldown the sidecar sends the
//! provider a cheap request of its own (`GET <base_url>/models` unless configured otherwise),
//! so a recovered target gets its traffic back within one cooldown however long its outage
//! was, and no user request waits on a dead target to find out.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use tokio::time::Instant;

use crate::config::Snapshot;
use crate::providers::Provider;
use crate::routing::health::Health;
use crate::upstream::Upstream;

/// Probes the targets whose breakers ask for it until `shutdown` resolves. `snapshot` gives the
/// config in force; `probe` sends one probe and says whether the provider was reachable.
pub async fn run<P, F>(
    health: &Health,
    snapshot: impl Fn() -> Arc<Snapshot>,
    probe: P,
    shutdown: impl Future<Output = ()>,
) where
    P: Fn(Arc<Provider>, Duration) -> F,
    F: Future<Output = bool>,
{
    let mut in_flight = FuturesUnordered::new();
    tokio::pin!(shutdown);
    loop {
        let snapshot = snapshot();
        let config = snapshot.resilience.breaker;
        let timeout = snapshot.timeouts.response_headers.min(config.cooldown);
        for key in health.start_due_background_probes(Instant::now(), &config) {
            // A target dropped from the config is not probed; its breaker waits for its return.
            if let Some(provider) = provider_of(&snapshot, &key) {
                let sent = probe(provider, timeout);
                in_flight.push(async move { (key, sent.await) });
            }
        }
        let next = health.next_background_probe();
        tokio::select! {
            Some((key, reachable)) = in_flight.next(), if !in_flight.is_empty() => {
                if reachable {
                    tracing::info!(target = %key, "a background probe reached the target; the next request confirms it");
                } else {
                    tracing::debug!(target = %key, "a background probe found the target still failing");
                }
                health.record_background_probe(&key, reachable, Instant::now());
            }
            _ = sleep_until(next) => {}
            _ = health.background_probe_wanted() => {}
            _ = &mut shutdown => return,
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The provider of the target whose health key is `key`, in this config.
fn provider_of(snapshot: &Snapshot, key: &str) -> Option<Arc<Provider>> {
    snapshot
        .routes
        .values()
        .flat_map(|route| [&route.relay, &route.official])
        .flatten()
        .find(|target| &*target.health_key == key)
        .map(|target| target.provider.clone())
}

/// Sends `provider` its probe request. Any answer but a server error or a rate limit means the
/// provider is reachable again (a `404` from an API without the probe path still says it is
/// up); a missing key, a connection failure or no answer within `timeout` mean it is not.
pub async fn reachable(
    upstream: Arc<Upstream>,
    provider: Arc<Provider>,
    timeout: Duration,
) -> bool {
    let mut request = Request::new(Full::new(Bytes::new()));
    *request.method_mut() = Method::GET;
    *request.uri_mut() = provider.probe_uri.clone();
    if provider.authorize(request.headers_mut()).is_err() {
        return false;
    }
    match tokio::time::timeout(timeout, upstream.send(request)).await {
        // The answer's body is not read: its connection is closed rather than pooled.
        Ok(Ok((response, _lease))) => {
            let status = response.status();
            !status.is_server_error() && status != StatusCode::TOO_MANY_REQUESTS
        }
        Ok(Err(_)) | Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{compile, ConfigSource};
    use crate::routing::breaker::{Admission, Phase};
    use crate::routing::plan::{HealthLookup, Standing};
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    const COOLDOWN: Duration = Duration::from_secs(30);

    fn snapshot(probe: &str) -> Arc<Snapshot> {
        let text = format!(
            "resilience: {{ breaker_probe: {probe} }}\nproviders: {{ p: {{ kind: relay, base_url: 'http://127.0.0.1:1/v1' }} }}\nroutes: {{ r: {{ relay: {{ provider: p, model: m }} }} }}"
        );
        Arc::new(
            compile(
                &text,
                ConfigSource::Embedded,
                1,
                &HashMap::<String, String>::new(),
            )
            .expect("config"),
        )
    }

    /// What one outage looked like from the target's side.
    #[derive(Debug)]
    struct Seen {
        /// From the outage's end to the first user request the target answered.
        recovered_after: Duration,
        background_probes: u32,
        /// User requests sent to the target while it was down, the three that opened its
        /// breaker included.
        user_requests_while_down: u32,
    }

    /// A target that is down for `outage`, one user request a second, the real prober.
    async fn outage(probe: &str, outage: Duration) -> Seen {
        let snapshot = snapshot(probe);
        let target = snapshot.route("r").and_then(|r| r.relay.as_ref()).unwrap();
        let health = Health::default();
        let start = Instant::now();
        let down = |at: Instant| at < start + outage;
        let probes = Cell::new(0u32);
        let user_requests_while_down = Cell::new(0u32);
        let recovered = RefCell::new(None);
        let prober = run(
            &health,
            || snapshot.clone(),
            |provider, timeout| {
                assert_eq!(provider.probe_uri, "http://127.0.0.1:1/v1/models");
                assert_eq!(timeout, Duration::from_secs(15));
                probes.set(probes.get() + 1);
                let reachable = !down(Instant::now());
                async move {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    reachable
                }
            },
            std::future::pending(),
        );
        let users = async {
            let cfg = snapshot.resilience.breaker;
            loop {
                let now = Instant::now();
                match health.admit(target, now, false) {
                    Admission::Rejected => {}
                    Admission::Allowed | Admission::Probe if down(now) => {
                        user_requests_while_down.set(user_requests_while_down.get() + 1);
                        health.record_failure(target, now, &cfg);
                    }
                    Admission::Allowed | Admission::Probe => {
                        health.record_success(target, Duration::from_millis(5), None);
                        *recovered.borrow_mut() = Some(now - (start + outage));
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        tokio::select! {
            _ = prober => unreachable!("the prober runs until shutdown"),
            _ = users => {}
        }
        assert!(
            health.lookup(Instant::now()).standing(target) == Standing::Closed,
            "a confirmed target is closed"
        );
        let recovered_after = recovered.borrow().expect("recovered");
        Seen {
            recovered_after,
            background_probes: probes.get(),
            user_requests_while_down: user_requests_while_down.get(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_recovered_target_is_back_within_one_cooldown_however_long_it_was_down() {
        for minutes in [1, 5, 30] {
            let down = Duration::from_secs(60 * minutes);
            let seen = outage("background", down).await;
            // One user request a second: the first one after the probe is at most 1 s later.
            assert!(
                seen.recovered_after <= COOLDOWN + Duration::from_secs(1),
                "{minutes} min: {seen:?}"
            );
            // One probe per cooldown while it was down, and the one that found it back.
            let most = (down.as_secs() / COOLDOWN.as_secs()) as u32 + 1;
            assert!(
                seen.background_probes <= most && seen.background_probes >= most - 1,
                "{minutes} min: {seen:?}"
            );
            // The three failures that opened the breaker; no user request probed a dead target.
            assert_eq!(seen.user_requests_while_down, 3, "{minutes} min: {seen:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn probing_by_user_requests_keeps_the_growing_cooldown_it_chose() {
        // The operator's alternative: no background traffic, a user request probes, and a long
        // outage makes recovery wait for the grown cooldown.
        let seen = outage("request", Duration::from_secs(30 * 60)).await;
        assert_eq!(seen.background_probes, 0);
        assert!(seen.recovered_after > COOLDOWN, "{seen:?}");
        assert!(seen.recovered_after <= Duration::from_secs(301), "{seen:?}");
        // 3 to open, then one failed probe per (doubling, capped) cooldown.
        assert!(seen.user_requests_while_down <= 3 + 10, "{seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reachable_probe_half_opens_and_the_next_request_decides() {
        let snapshot = snapshot("background");
        let target = snapshot.route("r").and_then(|r| r.relay.as_ref()).unwrap();
        let cfg = snapshot.resilience.breaker;
        let health = Health::default();
        for _ in 0..3 {
            health.record_failure(target, Instant::now(), &cfg);
        }
        assert_eq!(health.phases(Instant::now())[0].1, Phase::Open);
        // Open under background probing: no user request gets through, even after the cooldown.
        tokio::time::advance(COOLDOWN * 3).await;
        assert_eq!(
            health.admit(target, Instant::now(), false),
            Admission::Rejected
        );
        assert_eq!(
            health.start_due_background_probes(Instant::now(), &cfg),
            vec![target.health_key.clone()]
        );
        assert!(health
            .start_due_background_probes(Instant::now(), &cfg)
            .is_empty());
        health.record_background_probe(&target.health_key, true, Instant::now());
        assert_eq!(health.phases(Instant::now())[0].1, Phase::HalfOpen);
        assert_eq!(
            health.admit(target, Instant::now(), false),
            Admission::Probe
        );
        assert_eq!(
            health.admit(target, Instant::now(), false),
            Admission::Rejected
        );
        // The confirming request failed: open again, the next probe a cooldown away.
        health.record_failure(target, Instant::now(), &cfg);
        assert_eq!(
            health.next_background_probe(),
            Some(Instant::now() + COOLDOWN)
        );
    }
}
