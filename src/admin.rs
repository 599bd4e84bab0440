//! The admin port: `/live`, `/ready`, `/metrics` (Prometheus text), `/config` (the effective
//! snapshot with secrets redacted, its generation, and the last rejected update) and `/stats`
//! (requests, failover, latency percentiles, tokens, cost and savings since start).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::body::{full, ProxyBody};
use crate::config::unix_seconds;
use crate::errors::SidecarError;
use crate::proxy::json_response;
use crate::routing::breaker::Phase;
use crate::store::configmap::WatchStatus;
use crate::store::ConfigStore;
use crate::telemetry::metrics::TargetLabels;

pub struct Admin {
    pub store: Arc<ConfigStore>,
    pub core: Arc<crate::proxy::execute::Core>,
    pub spend: Arc<crate::spend::Spend>,
    pub registry: Registry,
    /// True once the data port is serving; false again while draining.
    pub serving: AtomicBool,
    /// The ConfigMap watch, when there is one: ready waits for its first snapshot.
    pub configmap: Option<Arc<WatchStatus>>,
}

impl Admin {
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let response = match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" => self.ready(),
            "/metrics" => self.metrics(),
            "/config" => self.config(),
            "/stats" => self.stats(),
            other => SidecarError::NotFound(other.to_string())
                .into_response()
                .map(full),
        };
        Ok(response)
    }

    /// Ready once serving and, with a ConfigMap, once its first snapshot applied (or the
    /// start-up wait fell back). API server outages later never make the sidecar unready.
    fn ready(&self) -> Response<ProxyBody> {
        if !self.serving.load(Ordering::Acquire) {
            return text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n");
        }
        match &self.configmap {
            Some(watch) if !watch.is_ready() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: waiting for the routing ConfigMap\n",
            ),
            _ => text(StatusCode::OK, "ready\n"),
        }
    }

    fn stats(&self) -> Response<ProxyBody> {
        let mut view = self.core.metrics.stats.view();
        if let Some(map) = view.as_object_mut() {
            map.insert(
                "budgets".into(),
                self.spend.view(&self.store.load().budgets),
            );
            self.measure_cache();
            let mut cache = self.core.metrics.cache.view();
            if let Some(cache) = cache.as_object_mut() {
                let state = self.core.cache.tier_state();
                cache.insert("shared".into(), self.core.metrics.cache.shared_view(state));
            }
            map.insert("cache".into(), cache);
        }
        json_response(StatusCode::OK, &view)
    }

    /// The cache's size gauges, read when someone looks.
    fn measure_cache(&self) {
        let (bytes, entries) = self.core.cache.size();
        let gauges = &self.core.metrics.cache;
        gauges.bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        gauges
            .entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    fn metrics(&self) -> Response<ProxyBody> {
        self.spend.export_metrics(&self.store.load().budgets);
        self.measure_cache();
        let now = tokio::time::Instant::now();
        for (target, phase) in self.core.health.phases(now) {
            let value = match phase {
                Phase::Closed => 0,
                Phase::Open => 1,
                Phase::HalfOpen => 2,
            };
            self.core
                .metrics
                .breaker_state
                .get_or_create(&TargetLabels { target })
                .set(value);
        }
        let mut body = String::with_capacity(8 * 1024);
        if let Err(err) = prometheus_client::encoding::text::encode(&mut body, &self.registry) {
            tracing::error!(error = %err, "failed to encode metrics");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics encoding failed\n",
            );
        }
        let mut response = Response::new(full(body));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        response
    }

    fn config(&self) -> Response<ProxyBody> {
        let snapshot = self.store.load();
        let rejection = self.store.last_rejection().map(
            |r| json!({ "source": r.source, "reason": r.reason, "at_unix": unix_seconds(r.at) }),
        );
        json_response(
            StatusCode::OK,
            &json!({
                "generation": snapshot.generation,
                "last_rejection": rejection,
                "precedence": ["env HOLY_SHEEP_ENABLED", "configmap", "file", "embedded"],
                "configmap": self.configmap.as_ref().map(|w| w.view()),
                "guard": self.core.guard.view(&snapshot),
                "cache": {
                    "shared": match self.core.cache.tier() {
                        Some(tier) => tier.view(snapshot.cache_shared_max_entry_bytes),
                        None => json!({
                            "state": "off",
                            "note": "without LLM_SIDECAR_REDIS_URL the cache is per sidecar",
                        }),
                    },
                },
                "budgets": {
                    "store": self.spend.store_view(&snapshot.budgets),
                    "today": self.spend.view(&snapshot.budgets),
                },
                "config": snapshot.redacted_view(),
            }),
        )
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
