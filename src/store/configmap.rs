//! The ConfigMap source: one named ConfigMap watched with `kube::runtime::watcher` (a field
//! selector on its name, the default backoff), each update applied through the same
//! validate → compile → swap path as the file.
//!
//! The proxy never waits on the API server: a failing watch keeps the last good snapshot serving
//! and retries with backoff, and its state is in `/metrics` and `/config`. A rejected update is
//! logged, counted, shown in `/config` and recorded as a Kubernetes Event on the ConfigMap (best
//! effort). A deleted ConfigMap keeps the last good snapshot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Event as KubeEvent, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, PostParams};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use serde_json::json;
use tokio::sync::{watch, Notify};

use super::{Applied, ConfigStore};
use crate::config::layers::ConfigMapLayer;
use crate::config::{unix_seconds, ConfigError};
use crate::telemetry::metrics::{Metrics, ReasonLabels};

/// Which ConfigMap to watch and how to reach the API server.
#[derive(Clone, Debug)]
pub struct ConfigMapRef {
    pub namespace: String,
    pub name: String,
}

/// The watch as `/config` shows it.
pub struct WatchStatus {
    pub target: ConfigMapRef,
    inner: Mutex<StatusInner>,
    metrics: Arc<Metrics>,
    /// Set once the first ConfigMap snapshot is serving (or the start-up wait gave up).
    ready: AtomicBool,
    ready_changed: Notify,
}

#[derive(Debug, Default)]
struct StatusInner {
    /// `starting`, `watching` or `retrying`.
    state: &'static str,
    /// None until the first list answered.
    present: Option<bool>,
    deleted_at: Option<SystemTime>,
    seen_resource_version: Option<String>,
    applied_resource_version: Option<String>,
    rejected_resource_version: Option<String>,
    last_error: Option<(&'static str, String, SystemTime)>,
    errors: u64,
    fallback: bool,
}

impl WatchStatus {
    pub fn new(target: ConfigMapRef, metrics: Arc<Metrics>) -> Arc<WatchStatus> {
        Arc::new(WatchStatus {
            target,
            inner: Mutex::new(StatusInner {
                state: "starting",
                ..Default::default()
            }),
            metrics,
            ready: AtomicBool::new(false),
            ready_changed: Notify::new(),
        })
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True once a snapshot from the ConfigMap serves, or the start-up wait fell back.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn mark_ready(&self) {
        if !self.ready.swap(true, Ordering::AcqRel) {
            self.ready_changed.notify_waiters();
        }
    }

    /// Waits up to `timeout` for the first ConfigMap snapshot; after that the file or
    /// embedded config serves and the sidecar reports ready anyway (with a warning), so an
    /// unreachable API server never keeps a pod out of service.
    pub async fn wait_ready_or_fall_back(&self, timeout: Duration) {
        let notified = self.ready_changed.notified();
        if self.is_ready() {
            return;
        }
        if tokio::time::timeout(timeout, notified).await.is_err() && !self.is_ready() {
            self.locked().fallback = true;
            tracing::warn!(
                configmap = %self.name(),
                waited = ?timeout,
                "no snapshot from the ConfigMap yet: serving the file or embedded config and reporting ready; the watch keeps retrying"
            );
            self.mark_ready();
        }
    }

    fn name(&self) -> String {
        format!("{}/{}", self.target.namespace, self.target.name)
    }

    fn watching(&self) {
        let mut s = self.locked();
        if s.state != "watching" {
            if s.state == "retrying" {
                tracing::info!(configmap = %self.name(), "ConfigMap watch re-established");
            }
            s.state = "watching";
        }
        self.metrics.configmap_watch_up.set(1);
    }

    fn failed(&self, reason: &'static str, message: String) {
        let mut s = self.locked();
        let repeated =
            s.state == "retrying" && s.last_error.as_ref().is_some_and(|e| e.0 == reason);
        if repeated {
            tracing::debug!(configmap = %self.name(), reason, error = %message, "ConfigMap watch still failing");
        } else {
            tracing::warn!(configmap = %self.name(), reason, error = %message, "ConfigMap watch failed; retrying with backoff, the last good config keeps serving");
        }
        s.state = "retrying";
        s.errors += 1;
        s.last_error = Some((reason, message, SystemTime::now()));
        self.metrics.configmap_watch_up.set(0);
        self.metrics
            .configmap_watch_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    fn present(&self, resource_version: Option<String>) {
        let mut s = self.locked();
        s.present = Some(true);
        s.deleted_at = None;
        s.seen_resource_version = resource_version;
        self.metrics.configmap_present.set(1);
    }

    fn absent(&self) {
        let mut s = self.locked();
        let before = s.present;
        s.present = Some(false);
        self.metrics.configmap_present.set(0);
        match before {
            Some(true) => {
                s.deleted_at = Some(SystemTime::now());
                tracing::warn!(configmap = %self.name(), "the ConfigMap was deleted: the last good config keeps serving until it is recreated");
            }
            None => {
                tracing::warn!(configmap = %self.name(), "the ConfigMap does not exist: serving the file or embedded config until it is created");
            }
            // Still absent (a relist after a reconnect): already said.
            Some(false) => {}
        }
        drop(s);
        // Nothing to wait for: the API server answered that there is no ConfigMap.
        if !self.is_ready() {
            self.locked().fallback = true;
            self.mark_ready();
        }
    }

    /// The watch state for `/config`.
    pub fn view(&self) -> serde_json::Value {
        let s = self.locked();
        json!({
            "namespace": self.target.namespace,
            "name": self.target.name,
            "state": s.state,
            "present": s.present,
            "deleted_at_unix": s.deleted_at.map(unix_seconds),
            "resource_version": s.seen_resource_version,
            "applied_resource_version": s.applied_resource_version,
            "rejected_resource_version": s.rejected_resource_version,
            "serving_fallback": s.fallback && s.applied_resource_version.is_none(),
            "errors": s.errors,
            "last_error": s.last_error.as_ref().map(|(reason, message, at)| json!({
                "reason": reason,
                "message": message,
                "at_unix": unix_seconds(*at),
            })),
        })
    }
}

/// Classifies a watcher error for the metric label and `/config`.
pub fn error_reason(err: &watcher::Error) -> &'static str {
    let api_code = match err {
        watcher::Error::WatchError(status) => Some(status.code),
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => match e {
            kube::Error::Api(status) => Some(status.code),
            _ => None,
        },
        watcher::Error::NoResourceVersion => return "other",
    };
    match api_code {
        Some(401) => "unauthorized",
        Some(403) => "forbidden",
        Some(404) => "not_found",
        Some(410) => "gone",
        Some(code) if code >= 500 => "server_error",
        Some(_) => "other",
        None => "unreachable",
    }
}

/// Where rejections are recorded besides the log, metrics and `/config`.
pub trait RejectionSink: Send + Sync {
    fn rejected(&self, configmap: &ConfigMap, reason: &str);
}

/// Applies what the watcher reports. Generic over the stream so the apply path is tested with
/// plain streams of events.
pub struct Follower {
    pub store: Arc<ConfigStore>,
    pub status: Arc<WatchStatus>,
    pub events: Arc<dyn RejectionSink>,
}

impl Follower {
    /// Runs until the stream ends or `shutdown` flips.
    pub async fn follow<S>(&self, stream: S, mut shutdown: watch::Receiver<bool>)
    where
        S: Stream<Item = Result<Event<ConfigMap>, watcher::Error>>,
    {
        let mut stream = std::pin::pin!(stream);
        // During a (re)list: whether our ConfigMap was among the listed objects.
        let mut listed = false;
        loop {
            let item = tokio::select! {
                item = stream.next() => item,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            let Some(item) = item else { return };
            match item {
                Ok(Event::Init) => listed = false,
                Ok(Event::InitApply(cm)) => {
                    if self.ours(&cm) {
                        listed = true;
                        self.apply(&cm);
                    }
                }
                Ok(Event::InitDone) => {
                    self.status.watching();
                    if !listed {
                        self.status.absent();
                    }
                }
                Ok(Event::Apply(cm)) => {
                    self.status.watching();
                    if self.ours(&cm) {
                        self.apply(&cm);
                    }
                }
                Ok(Event::Delete(cm)) => {
                    self.status.watching();
                    if self.ours(&cm) {
                        self.status.absent();
                    }
                }
                Err(err) => self.status.failed(error_reason(&err), err.to_string()),
            }
        }
    }

    /// The field selector already filters by name; this guards against an API server (or a
    /// proxy in front of it) that ignores it.
    fn ours(&self, cm: &ConfigMap) -> bool {
        cm.metadata.name.as_deref() == Some(self.status.target.name.as_str())
    }

    fn apply(&self, cm: &ConfigMap) {
        let resource_version = cm.metadata.resource_version.clone();
        self.status.present(resource_version.clone());
        let data = cm.data.clone().unwrap_or_default();
        let target = &self.status.target;
        let result = ConfigMapLayer::from_data(
            &target.namespace,
            &target.name,
            resource_version.clone(),
            &data,
        )
        .inspect_err(|err| {
            // Key-level problems never reach the store's compile step: record them the same way.
            self.store.reject(
                &crate::config::ConfigSource::ConfigMap {
                    namespace: target.namespace.clone(),
                    name: target.name.clone(),
                },
                err,
            );
        })
        .and_then(|layer| self.store.apply_configmap(layer));
        match result {
            Ok(applied) => {
                let mut s = self.status.locked();
                s.applied_resource_version = resource_version;
                s.rejected_resource_version = None;
                drop(s);
                if let Applied::Swapped(generation) = applied {
                    tracing::info!(configmap = %self.status.name(), generation, "ConfigMap applied");
                }
                self.status.mark_ready();
            }
            Err(err) => self.rejected(cm, resource_version, &err),
        }
    }

    fn rejected(&self, cm: &ConfigMap, resource_version: Option<String>, err: &ConfigError) {
        let mut s = self.status.locked();
        // A relist replays the same bad version: record its Event once.
        let again = resource_version.is_some() && s.rejected_resource_version == resource_version;
        s.rejected_resource_version = resource_version;
        drop(s);
        if !again {
            self.events.rejected(cm, &err.to_string());
        }
    }
}

/// Records rejections as Warning Events on the ConfigMap. Needs `create` on `events`; without it
/// the failure is logged once and nothing else changes.
pub struct KubeEvents {
    api: Api<KubeEvent>,
    target: ConfigMapRef,
    instance: String,
    /// Whether a failure to create an Event was already logged at warn level.
    failure_reported: Arc<AtomicBool>,
}

impl KubeEvents {
    pub fn new(client: Client, target: ConfigMapRef, instance: String) -> KubeEvents {
        KubeEvents {
            api: Api::namespaced(client, &target.namespace),
            target,
            instance,
            failure_reported: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A Warning Event on the ConfigMap (`cm` when the object is at hand, for its uid and
    /// version; else by name).
    fn warning(
        &self,
        cm: Option<&ConfigMap>,
        reason: &str,
        action: &str,
        message: String,
    ) -> KubeEvent {
        let now = timestamp_now();
        let name = self.target.name.clone();
        let namespace = Some(self.target.namespace.clone());
        KubeEvent {
            metadata: ObjectMeta {
                generate_name: Some(format!("{name}.llm-sidecar.")),
                namespace: namespace.clone(),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("ConfigMap".into()),
                name: Some(name),
                namespace,
                uid: cm.and_then(|c| c.metadata.uid.clone()),
                resource_version: cm.and_then(|c| c.metadata.resource_version.clone()),
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(truncate(&message, 1000)),
            type_: Some("Warning".into()),
            action: Some(action.into()),
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            reporting_component: Some("llm-sidecar".into()),
            reporting_instance: Some(self.instance.clone()),
            source: Some(EventSource {
                component: Some("llm-sidecar".into()),
                host: None,
            }),
            ..Default::default()
        }
    }

    /// Creates the Event in the background; failures are logged (once at warn), never fatal.
    fn post(&self, event: KubeEvent) {
        let api = self.api.clone();
        let failure_reported = self.failure_reported.clone();
        tokio::spawn(async move {
            match api.create(&PostParams::default(), &event).await {
                Ok(_) => tracing::debug!("recorded a Kubernetes Event"),
                Err(err) if !failure_reported.swap(true, Ordering::Relaxed) => {
                    tracing::warn!(error = %err, "cannot record a Kubernetes Event (is `create` on events granted?); carrying on")
                }
                Err(err) => tracing::debug!(error = %err, "cannot record a Kubernetes Event"),
            }
        });
    }
}

fn timestamp_now() -> k8s_openapi::jiff::Timestamp {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    k8s_openapi::jiff::Timestamp::new(now.as_secs() as i64, now.subsec_nanos() as i32)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl RejectionSink for KubeEvents {
    fn rejected(&self, cm: &ConfigMap, reason: &str) {
        let event = self.warning(
            Some(cm),
            "InvalidRoutingConfig",
            "Reject",
            format!(
                "llm-sidecar rejected this ConfigMap; the last good config keeps serving: {reason}"
            ),
        );
        self.post(event);
    }
}

impl crate::routing::guard::TripSink for KubeEvents {
    fn tripped(&self, message: &str) {
        let event = self.warning(
            None,
            "RollbackGuardTripped",
            "RouteOfficial",
            message.to_string(),
        );
        self.post(event);
    }
}

impl crate::spend::AlertSink for KubeEvents {
    fn budget_alert(&self, _budget: &str, message: &str) {
        let event = self.warning(None, "BudgetAlert", "Alert", message.to_string());
        self.post(event);
    }
}

/// Starts the watch on `target`: runs until `shutdown` flips.
pub fn spawn(
    client: Client,
    store: Arc<ConfigStore>,
    status: Arc<WatchStatus>,
    events: Arc<KubeEvents>,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let target = status.target.clone();
    let api: Api<ConfigMap> = Api::namespaced(client, &target.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", target.name));
    let stream = watcher(api, config).default_backoff();
    let follower = Follower {
        store,
        status,
        events,
    };
    tokio::spawn(async move { follower.follow(stream, shutdown).await })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigSource, EMBEDDED_DEFAULT};
    use futures_util::stream;
    use prometheus_client::registry::Registry;
    use std::collections::{BTreeMap, HashMap};

    #[derive(Default)]
    struct RecordedEvents(Mutex<Vec<String>>);

    impl RejectionSink for RecordedEvents {
        fn rejected(&self, _: &ConfigMap, reason: &str) {
            self.0.lock().unwrap().push(reason.to_string());
        }
    }

    struct Harness {
        follower: Follower,
        events: Arc<RecordedEvents>,
        metrics: Arc<Metrics>,
        _stop: watch::Sender<bool>,
        stop_rx: watch::Receiver<bool>,
    }

    impl Harness {
        fn new() -> Harness {
            let metrics = Arc::new(Metrics::register(&mut Registry::default()));
            let store = Arc::new(
                ConfigStore::new(
                    EMBEDDED_DEFAULT,
                    ConfigSource::Embedded,
                    Arc::new(HashMap::<String, String>::new()),
                    metrics.clone(),
                )
                .unwrap(),
            );
            let status = WatchStatus::new(
                ConfigMapRef {
                    namespace: "apps".into(),
                    name: "llm-sidecar".into(),
                },
                metrics.clone(),
            );
            let events = Arc::new(RecordedEvents::default());
            let (stop, stop_rx) = watch::channel(false);
            Harness {
                follower: Follower {
                    store,
                    status,
                    events: events.clone(),
                },
                events,
                metrics,
                _stop: stop,
                stop_rx,
            }
        }

        async fn feed(&self, items: Vec<Result<Event<ConfigMap>, watcher::Error>>) {
            self.follower
                .follow(stream::iter(items), self.stop_rx.clone())
                .await;
        }

        fn generation(&self) -> u64 {
            self.follower.store.load().generation
        }

        fn routing_enabled(&self) -> bool {
            self.follower.store.load().flags.holy_sheep_routing_enabled
        }

        fn view(&self) -> serde_json::Value {
            self.follower.status.view()
        }
    }

    fn cm(name: &str, rv: &str, data: &[(&str, &str)]) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("apps".into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    fn gone() -> watcher::Error {
        watcher::Error::WatchError(
            kube::core::Status::failure("too old resource version", "Expired")
                .with_code(410)
                .boxed(),
        )
    }

    #[tokio::test]
    async fn flags_only_configmap_applies_on_top_of_the_embedded_routing_and_makes_ready() {
        let h = Harness::new();
        assert!(!h.follower.status.is_ready());
        h.feed(vec![
            Ok(Event::Init),
            Ok(Event::InitApply(cm(
                "llm-sidecar",
                "7",
                &[("holy_sheep_routing_enabled", "False")],
            ))),
            Ok(Event::InitDone),
        ])
        .await;
        assert!(!h.routing_enabled());
        assert_eq!(h.generation(), 2);
        assert!(h.follower.status.is_ready());
        let snap = h.follower.store.load();
        assert_eq!(
            snap.source,
            ConfigSource::Embedded,
            "routing stays embedded"
        );
        assert_eq!(snap.flag_origins.holy_sheep_routing_enabled, "configmap");
        assert_eq!(h.view()["state"], "watching");
        assert_eq!(h.view()["applied_resource_version"], "7");
        assert_eq!(h.metrics.configmap_present.get(), 1);
        assert_eq!(h.metrics.configmap_watch_up.get(), 1);
    }

    #[tokio::test]
    async fn yaml_only_update_replaces_the_routing_and_a_relist_of_it_changes_nothing() {
        let h = Harness::new();
        let yaml = EMBEDDED_DEFAULT.replace("rollout_percent: 100", "rollout_percent: 30");
        let update = cm("llm-sidecar", "8", &[("config.yaml", &yaml)]);
        h.feed(vec![Ok(Event::Apply(update.clone()))]).await;
        let snap = h.follower.store.load();
        assert_eq!(snap.flags.rollout_percent, 30);
        assert_eq!(
            snap.source,
            ConfigSource::ConfigMap {
                namespace: "apps".into(),
                name: "llm-sidecar".into()
            }
        );
        assert_eq!(snap.generation, 2);
        // The watcher relists after every reconnect: the same content is not a new generation.
        h.feed(vec![
            Ok(Event::Init),
            Ok(Event::InitApply(update)),
            Ok(Event::InitDone),
        ])
        .await;
        assert_eq!(h.generation(), 2);
    }

    #[tokio::test]
    async fn invalid_update_is_rejected_once_and_the_last_good_snapshot_keeps_serving() {
        let h = Harness::new();
        h.feed(vec![Ok(Event::Apply(cm(
            "llm-sidecar",
            "9",
            &[("holy_sheep_routing_enabled", "false")],
        )))])
        .await;
        let bad = cm(
            "llm-sidecar",
            "10",
            &[
                ("holy_sheep_routing_enabled", "true"),
                ("rollout_percent", "150"),
            ],
        );
        h.feed(vec![Ok(Event::Apply(bad.clone()))]).await;
        assert_eq!(h.generation(), 2, "the bad update did not swap");
        assert!(!h.routing_enabled(), "the last good flags stay");
        let rejection = h.follower.store.last_rejection().unwrap();
        assert!(
            rejection
                .reason
                .contains("data.rollout_percent: 150 is out of range"),
            "{}",
            rejection.reason
        );
        assert_eq!(rejection.source, "ConfigMap apps/llm-sidecar");
        assert_eq!(h.view()["rejected_resource_version"], "10");
        // A relist replays the bad version: counted as seen, but one Event only.
        h.feed(vec![
            Ok(Event::Init),
            Ok(Event::InitApply(bad)),
            Ok(Event::InitDone),
        ])
        .await;
        let events = h.events.0.lock().unwrap().clone();
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].contains("rollout_percent"));

        // Invalid routing YAML is rejected the same way, with its key in the path.
        h.feed(vec![Ok(Event::Apply(cm(
            "llm-sidecar",
            "11",
            &[("config.yaml", "providers: [")],
        )))])
        .await;
        assert_eq!(h.generation(), 2);
        assert!(h
            .follower
            .store
            .last_rejection()
            .unwrap()
            .reason
            .starts_with("data.config.yaml"));
        assert_eq!(h.events.0.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn deleted_configmap_keeps_the_last_good_snapshot_and_says_so() {
        let h = Harness::new();
        let current = cm(
            "llm-sidecar",
            "12",
            &[("holy_sheep_routing_enabled", "false")],
        );
        h.feed(vec![
            Ok(Event::Apply(current.clone())),
            Ok(Event::Delete(current)),
        ])
        .await;
        assert!(!h.routing_enabled());
        assert_eq!(h.generation(), 2);
        assert_eq!(h.view()["present"], false);
        assert!(h.view()["deleted_at_unix"].as_u64().is_some());
        assert_eq!(h.metrics.configmap_present.get(), 0);
        // A relist that finds nothing is the same as a delete.
        h.feed(vec![Ok(Event::Init), Ok(Event::InitDone)]).await;
        assert!(!h.routing_enabled());
    }

    #[tokio::test]
    async fn other_configmaps_are_ignored_and_watch_errors_are_visible() {
        let h = Harness::new();
        h.feed(vec![
            Ok(Event::Apply(cm(
                "someone-else",
                "3",
                &[("holy_sheep_routing_enabled", "false")],
            ))),
            Err(gone()),
        ])
        .await;
        assert!(h.routing_enabled());
        assert_eq!(h.generation(), 1);
        assert_eq!(h.view()["state"], "retrying");
        assert_eq!(h.view()["last_error"]["reason"], "gone");
        assert_eq!(h.metrics.configmap_watch_up.get(), 0);
        assert_eq!(
            h.metrics
                .configmap_watch_errors
                .get_or_create(&ReasonLabels { reason: "gone" })
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn absent_configmap_at_start_falls_back_at_once_and_the_wait_times_out_otherwise() {
        let h = Harness::new();
        h.feed(vec![Ok(Event::Init), Ok(Event::InitDone)]).await;
        assert!(h.follower.status.is_ready());
        assert_eq!(h.view()["serving_fallback"], true);

        let silent = Harness::new();
        silent
            .follower
            .status
            .wait_ready_or_fall_back(Duration::from_millis(1))
            .await;
        assert!(silent.follower.status.is_ready());
        assert_eq!(silent.view()["state"], "starting");
    }
}
