//! OpenTelemetry traces over OTLP, configured by the standard `OTEL_*` variables.
//!
//! Spans are `tracing` spans with the target [`SPAN_TARGET`], turned into OpenTelemetry spans by
//! `tracing-opentelemetry` and exported by a bounded queue of our own: a request only ever does a
//! non-blocking push; a full queue drops the span and counts it; exports run on the runtime with
//! a timeout, so a slow or unreachable collector never slows or breaks a request. With no OTLP
//! endpoint set, no span is ever created (the request path checks [`enabled`] first).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::env::{Env, ENV_POD_NAME, ENV_POD_NAMESPACE};

/// The target of every span the sidecar exports; nothing else is exported.
pub const SPAN_TARGET: &str = "llm_sidecar::otel";
/// The Downward API variable with the node name (`fieldRef: spec.nodeName`).
pub const ENV_NODE_NAME: &str = "NODE_NAME";
/// `true` records message content (prompts and answers) on attempt spans; off by default.
pub const ENV_TRACE_CONTENT: &str = "LLM_SIDECAR_TRACE_CONTENT";

/// Requests slower than this are exported whatever the head sampler said (default 5 s).
pub const ENV_TRACE_SLOW: &str = "LLM_SIDECAR_TRACE_SLOW";
const DEFAULT_TRACE_SLOW: Duration = Duration::from_secs(5);

static ENABLED: AtomicBool = AtomicBool::new(false);
static SLOW_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(5_000);
/// Where finished spans go: the export loop's queue.
static QUEUE: std::sync::OnceLock<mpsc::Sender<SpanData>> = std::sync::OnceLock::new();

/// Requests slower than this are exported in full.
pub fn slow_threshold() -> Duration {
    Duration::from_millis(SLOW_MS.load(Ordering::Relaxed))
}

/// Queues a finished span for export; counted as dropped when the queue is full.
pub fn queue(span: SpanData) {
    if let Some(tx) = QUEUE.get() {
        if tx.try_send(span).is_err() {
            EXPORT.dropped.inc();
        }
    }
}

/// The W3C trace context header. Looked up by this name rather than by a `&str`, which would
/// be parsed into a header name on every request.
pub const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// The app's span, when the request carries valid W3C trace context.
pub fn remote_parent(headers: &HeaderMap) -> Option<opentelemetry::trace::SpanContext> {
    if !headers.contains_key(TRACEPARENT) {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}
static RECORD_CONTENT: AtomicBool = AtomicBool::new(false);

/// True when `LLM_SIDECAR_TRACE_CONTENT=true` asked for message content on attempt spans.
pub fn record_content() -> bool {
    RECORD_CONTENT.load(Ordering::Relaxed)
}

/// True once trace export is set up: the request path builds spans only then.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Span export counters, registered on `/metrics` by [`crate::telemetry::metrics::Metrics`].
pub struct ExportCounters {
    pub exported: Counter,
    pub dropped: Counter,
    pub failed: Counter,
}

pub static EXPORT: LazyLock<ExportCounters> = LazyLock::new(|| ExportCounters {
    exported: Counter::default(),
    dropped: Counter::default(),
    failed: Counter::default(),
});

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// What the `OTEL_*` variables ask for; `None` from [`from_env`] means tracing is off.
#[derive(Clone, Debug, PartialEq)]
pub struct OtelSettings {
    pub protocol: Protocol,
    /// For the start-up log line; the exporter reads the variables itself.
    pub endpoint: String,
    pub timeout: Duration,
    pub max_queue_size: usize,
    pub max_export_batch_size: usize,
    pub schedule_delay: Duration,
    /// Resource attributes from the Downward API: `k8s.pod.name`, `k8s.namespace.name`, ...
    pub k8s_attributes: Vec<(&'static str, String)>,
    pub record_content: bool,
    pub sampler: Sampler,
    /// `LLM_SIDECAR_TRACE_SLOW`: requests slower than this are exported whatever was sampled.
    pub slow: Duration,
}

/// `OTEL_TRACES_SAMPLER(_ARG)`, decided by the sidecar before any span exists: a request that
/// is not sampled costs no span at all (the SDK then samples every span it is given).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampler {
    /// Follow the app's `traceparent` sampled flag when there is one.
    pub parent_based: bool,
    /// For requests without a parent (or every request when not parent-based): the share of
    /// trace ids sampled, from 0 to 1.
    pub ratio: f64,
}

impl Default for Sampler {
    /// The specification's default, `parentbased_always_on`.
    fn default() -> Self {
        Sampler {
            parent_based: true,
            ratio: 1.0,
        }
    }
}

impl Sampler {
    /// Whether a request with these headers is traced.
    pub fn sample(&self, headers: &HeaderMap) -> bool {
        let parent = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        if let (true, Some((_, sampled))) = (self.parent_based, parent) {
            return sampled;
        }
        if self.ratio >= 1.0 {
            return true;
        }
        if self.ratio <= 0.0 {
            return false;
        }
        // The SDK's rule: the low 8 bytes of the trace id, shifted, below ratio × 2^63. A
        // request without a parent gets its trace id later, so a random draw stands in for it.
        let low = match parent {
            Some((trace_id, _)) => {
                u64::from_be_bytes(trace_id[8..16].try_into().unwrap_or_default())
            }
            None => fastrand::u64(..),
        };
        (low >> 1) < (self.ratio * (1u64 << 63) as f64) as u64
    }
}

static SAMPLER: std::sync::OnceLock<Sampler> = std::sync::OnceLock::new();

/// W3C `traceparent`: the trace id and the sampled flag of a valid header.
fn parse_traceparent(value: &str) -> Option<([u8; 16], bool)> {
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2
        || version == "ff"
        || trace.len() != 32
        || parent.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let hex = |s: &str| u8::from_str_radix(s, 16).ok();
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = hex(trace.get(2 * i..2 * i + 2)?)?;
    }
    u64::from_str_radix(parent, 16).ok().filter(|p| *p != 0)?;
    if id == [0; 16] {
        return None;
    }
    Some((id, hex(flags)? & 1 == 1))
}

/// Whether this request gets spans: tracing is on and the sampler says so.
#[inline]
pub fn sampled(headers: &HeaderMap) -> bool {
    enabled() && SAMPLER.get().is_some_and(|s| s.sample(headers))
}

fn nonempty(env: &dyn Env, key: &str) -> Option<String> {
    env.get(key)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Reads the standard variables. Tracing is on when an OTLP endpoint is set
/// (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`), unless
/// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
pub fn from_env(env: &dyn Env, errors: &mut Vec<String>) -> Option<OtelSettings> {
    if nonempty(env, "OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    match nonempty(env, "OTEL_TRACES_EXPORTER").as_deref() {
        None | Some("otlp") => {}
        Some("none") => return None,
        Some(other) => {
            errors.push(format!(
                "OTEL_TRACES_EXPORTER={other:?}: only `otlp` and `none` are supported"
            ));
            return None;
        }
    }
    let endpoint = nonempty(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| nonempty(env, "OTEL_EXPORTER_OTLP_ENDPOINT"))?;
    let protocol_var = if env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").is_some() {
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
    } else {
        "OTEL_EXPORTER_OTLP_PROTOCOL"
    };
    let protocol = match nonempty(env, protocol_var).as_deref() {
        None | Some("http/protobuf") => Protocol::HttpProtobuf,
        Some("grpc") => Protocol::Grpc,
        Some(other) => {
            errors.push(format!(
                "{protocol_var}={other:?}: expected `grpc` or `http/protobuf`"
            ));
            Protocol::HttpProtobuf
        }
    };
    match endpoint.parse::<http::Uri>() {
        Ok(uri) if matches!(uri.scheme_str(), Some("http") | Some("https")) => {
            if protocol == Protocol::Grpc && uri.scheme_str() == Some("https") {
                errors.push(format!(
                    "OTLP endpoint {endpoint:?}: gRPC export is plaintext only; use an http:// endpoint (a node-local collector) or OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf for https"
                ));
            }
        }
        _ => errors.push(format!(
            "OTLP endpoint {endpoint:?}: expected an http:// or https:// URL"
        )),
    }
    let millis = |key: &str, default: u64, errors: &mut Vec<String>| -> u64 {
        match nonempty(env, key).map(|v| v.parse::<u64>()) {
            None => default,
            Some(Ok(v)) => v,
            Some(Err(_)) => {
                errors.push(format!("{key}: expected a whole number"));
                default
            }
        }
    };
    let timeout_key = if env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT").is_some() {
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"
    } else {
        "OTEL_EXPORTER_OTLP_TIMEOUT"
    };
    let timeout = Duration::from_millis(millis(timeout_key, 10_000, errors).max(1));
    let max_queue_size = millis("OTEL_BSP_MAX_QUEUE_SIZE", 2048, errors).max(1) as usize;
    let max_export_batch_size =
        (millis("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, errors).max(1) as usize).min(max_queue_size);
    let schedule_delay = Duration::from_millis(millis("OTEL_BSP_SCHEDULE_DELAY", 5000, errors));
    let sampler = read_sampler(env, errors);
    let k8s_attributes = [
        ("k8s.pod.name", ENV_POD_NAME),
        ("k8s.namespace.name", ENV_POD_NAMESPACE),
        ("k8s.node.name", ENV_NODE_NAME),
    ]
    .into_iter()
    .filter_map(|(key, var)| nonempty(env, var).map(|v| (key, v)))
    .collect();
    let record_content = match nonempty(env, ENV_TRACE_CONTENT).as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => {
            errors.push(format!(
                "{ENV_TRACE_CONTENT}={other:?}: expected true or false"
            ));
            false
        }
    };
    let slow = match nonempty(env, ENV_TRACE_SLOW) {
        None => DEFAULT_TRACE_SLOW,
        Some(text) => crate::env::parse_duration(text.trim()).unwrap_or_else(|why| {
            errors.push(format!("{ENV_TRACE_SLOW}={text:?}: {why}"));
            DEFAULT_TRACE_SLOW
        }),
    };
    Some(OtelSettings {
        protocol,
        endpoint,
        timeout,
        max_queue_size,
        max_export_batch_size,
        schedule_delay,
        k8s_attributes,
        record_content,
        sampler,
        slow,
    })
}

/// Reads `OTEL_TRACES_SAMPLER(_ARG)`; a typo stops the start instead of silently sampling
/// everything.
fn read_sampler(env: &dyn Env, errors: &mut Vec<String>) -> Sampler {
    let Some(name) = nonempty(env, "OTEL_TRACES_SAMPLER") else {
        return Sampler::default();
    };
    let parent_based = name.starts_with("parentbased_");
    let ratio = match name.trim_start_matches("parentbased_") {
        "always_on" => 1.0,
        "always_off" => 0.0,
        "traceidratio" => {
            match nonempty(env, "OTEL_TRACES_SAMPLER_ARG").map(|v| v.parse::<f64>()) {
                None => 1.0,
                Some(Ok(r)) if (0.0..=1.0).contains(&r) => r,
                Some(_) => {
                    errors
                        .push("OTEL_TRACES_SAMPLER_ARG: expected a ratio from 0 to 1".to_string());
                    1.0
                }
            }
        }
        _ => {
            errors.push(format!(
                "OTEL_TRACES_SAMPLER={name:?}: expected one of always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
            ));
            1.0
        }
    };
    Sampler {
        parent_based,
        ratio,
    }
}

/// The running export pipeline; [`Tracing::shutdown`] flushes what is queued.
pub struct Tracing {
    provider: SdkTracerProvider,
    stop: mpsc::Sender<oneshot::Sender<()>>,
}

/// Builds the exporter, the queue and the tracer provider. Must run inside the runtime.
pub fn start(
    settings: &OtelSettings,
    connect_timeout: Duration,
    extra_ca: Option<&std::path::Path>,
) -> Result<(Tracing, opentelemetry_sdk::trace::Tracer), String> {
    let mut exporter = match settings.protocol {
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_timeout(settings.timeout)
            .build(),
        Protocol::HttpProtobuf => {
            let upstream = crate::upstream::Upstream::new(connect_timeout, extra_ca)
                .map_err(|e| format!("OTLP HTTP client: {e}"))?;
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_http_client(OtlpHttpClient {
                    upstream,
                    timeout: settings.timeout,
                })
                .with_timeout(settings.timeout)
                .build()
        }
    }
    .map_err(|e| format!("OTLP exporter: {e}"))?;

    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err()
        && !std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="))
    {
        resource = resource.with_service_name("llm-sidecar");
    }
    let resource = resource
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_attributes(
            settings
                .k8s_attributes
                .iter()
                .map(|(k, v)| KeyValue::new(*k, v.clone())),
        )
        .build();
    exporter.set_resource(&resource);

    let (tx, rx) = mpsc::channel(settings.max_queue_size);
    let (stop, stop_rx) = mpsc::channel(1);
    tokio::spawn(export_loop(
        exporter,
        rx,
        stop_rx,
        settings.max_export_batch_size,
        settings.schedule_delay,
        settings.timeout,
    ));
    let _ = SAMPLER.set(settings.sampler);
    let _ = QUEUE.set(tx.clone());
    SLOW_MS.store(
        u64::try_from(settings.slow.as_millis()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
    let provider = SdkTracerProvider::builder()
        // The sampling decision is taken before a span is made (`sampled`): every span the
        // SDK sees is kept.
        .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
        .with_span_processor(ExportQueue { tx })
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("llm-sidecar");
    RECORD_CONTENT.store(settings.record_content, Ordering::Relaxed);
    Ok((Tracing { provider, stop }, tracer))
}

/// Marks the request path as traced; called once the subscriber with the layer is installed.
pub(crate) fn set_enabled() {
    ENABLED.store(true, Ordering::Relaxed);
}

impl Tracing {
    /// Exports what is queued, waiting at most `timeout`.
    pub async fn shutdown(self, timeout: Duration) {
        ENABLED.store(false, Ordering::Relaxed);
        let (ack, done) = oneshot::channel();
        if self.stop.send(ack).await.is_ok() {
            let _ = tokio::time::timeout(timeout, done).await;
        }
        // The queue is drained; the provider's own shutdown has nothing left to do.
        drop(self.provider);
    }
}

/// The span processor: a non-blocking push into a bounded queue.
#[derive(Debug)]
struct ExportQueue {
    tx: mpsc::Sender<SpanData>,
}

impl SpanProcessor for ExportQueue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            EXPORT.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    mut stop: mpsc::Receiver<oneshot::Sender<()>>,
    batch_size: usize,
    delay: Duration,
    timeout: Duration,
) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(batch_size);
    let mut tick = tokio::time::interval(delay.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        let room = batch_size - batch.len();
        tokio::select! {
            received = rx.recv_many(&mut batch, room) => {
                if received == 0 {
                    break;
                }
                if batch.len() >= batch_size {
                    export(&exporter, &mut batch, timeout, &mut last_warning).await;
                }
            }
            _ = tick.tick() => {
                if !batch.is_empty() {
                    export(&exporter, &mut batch, timeout, &mut last_warning).await;
                }
            }
            ack = stop.recv() => {
                loop {
                    while batch.len() < batch_size {
                        match rx.try_recv() {
                            Ok(span) => batch.push(span),
                            Err(_) => break,
                        }
                    }
                    if batch.is_empty() {
                        break;
                    }
                    export(&exporter, &mut batch, timeout, &mut last_warning).await;
                }
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
                return;
            }
        }
    }
    if !batch.is_empty() {
        export(&exporter, &mut batch, timeout, &mut last_warning).await;
    }
}

async fn export(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: &mut Vec<SpanData>,
    timeout: Duration,
    last_warning: &mut Option<tokio::time::Instant>,
) {
    let spans = std::mem::take(batch);
    let count = spans.len() as u64;
    let failure = match tokio::time::timeout(timeout, exporter.export(spans)).await {
        Ok(Ok(())) => {
            EXPORT.exported.inc_by(count);
            return;
        }
        Ok(Err(err)) => err.to_string(),
        Err(_) => format!("no answer within {timeout:?}"),
    };
    EXPORT.failed.inc_by(count);
    // One warning a minute at most: a down collector must not flood the log.
    let now = tokio::time::Instant::now();
    if last_warning.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60)) {
        *last_warning = Some(now);
        tracing::warn!(spans = count, error = %failure, "trace export failed; spans dropped (counted in llm_sidecar_trace_spans_failed_total)");
    }
}

/// OTLP/HTTP through the sidecar's own client: TLS with the bundled roots and the extra CA.
#[derive(Debug)]
struct OtlpHttpClient {
    upstream: Arc<crate::upstream::Upstream>,
    timeout: Duration,
}

type HttpResult = Result<http::Response<Bytes>, opentelemetry_http::HttpError>;

impl opentelemetry_http::HttpClient for OtlpHttpClient {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: http::Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = HttpResult> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            if let Some(authority) = parts.uri.authority() {
                if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                    parts.headers.insert(http::header::HOST, host);
                }
            }
            let request = http::Request::from_parts(parts, Full::new(body));
            let exchange = async {
                let (response, lease) = self.upstream.send(request).await?;
                let (parts, body) = response.into_parts();
                let bytes = Limited::new(body, 1 << 20)
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                if let Some(lease) = lease {
                    lease.release();
                }
                Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, bytes))
            };
            tokio::time::timeout(self.timeout, exchange)
                .await
                .map_err(|_| "OTLP export timed out".to_string())?
        })
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The `traceparent` naming `span` (a span of the tracing bridge: the shadow call's).
pub fn traceparent(span: &tracing::Span) -> Option<HeaderValue> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let otel_span = cx.span();
    let sc = otel_span.span_context();
    sc.is_valid()
        .then(|| HeaderValue::from_bytes(&traceparent_bytes(sc)).ok())
        .flatten()
}

/// The W3C `traceparent` of `sc`, as the propagator writes it, without its trip through
/// `format!` on every attempt.
pub(crate) fn traceparent_bytes(sc: &opentelemetry::trace::SpanContext) -> [u8; 55] {
    let mut out = [b'-'; 55];
    out[..2].copy_from_slice(b"00");
    hex_into(&mut out[3..35], &sc.trace_id().to_bytes());
    hex_into(&mut out[36..52], &sc.span_id().to_bytes());
    let flags = sc.trace_flags() & opentelemetry::trace::TraceFlags::SAMPLED;
    hex_into(&mut out[53..55], &[flags.to_u8()]);
    out
}

/// Lower-case hex digits of `bytes` into `out` (twice as long).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
}

/// Links `span` to `other` (the shadow call to the request it mirrors).
pub fn link(span: &tracing::Span, other: opentelemetry::trace::SpanContext) {
    if other.is_valid() {
        span.add_link(other);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::env_of as env;

    /// The propagator's own way of writing headers, to compare with.
    struct HeaderInjector<'a>(&'a mut HeaderMap);

    impl opentelemetry::propagation::Injector for HeaderInjector<'_> {
        fn set(&mut self, key: &str, value: String) {
            self.0.insert(
                http::HeaderName::from_bytes(key.as_bytes()).unwrap(),
                HeaderValue::from_str(&value).unwrap(),
            );
        }
    }

    #[test]
    fn trace_context_is_written_as_the_w3c_propagator_writes_it() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..200 {
            let trace = TraceId::from(u128::from(next()) << 64 | u128::from(next()));
            let span = SpanId::from(next());
            let flags = if i % 2 == 0 {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::new(0x02)
            };
            let state = if i % 3 == 0 {
                TraceState::from_key_value([("vendor", "v1")]).unwrap()
            } else {
                TraceState::default()
            };
            let sc = SpanContext::new(trace, span, flags, true, state);
            let cx = opentelemetry::Context::new().with_remote_span_context(sc.clone());
            let mut expected = HeaderMap::new();
            TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(&mut expected));
            assert_eq!(
                &super::traceparent_bytes(&sc)[..],
                expected["traceparent"].as_bytes(),
                "{sc:?}"
            );
            let mut hex = [0u8; 32];
            hex_into(&mut hex, &trace.to_bytes());
            assert_eq!(&hex[..], trace.to_string().as_bytes());
        }
    }

    #[test]
    fn off_without_an_endpoint_or_when_disabled() {
        let mut errors = Vec::new();
        assert!(from_env(&env(&[]), &mut errors).is_none());
        let on = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")];
        assert!(from_env(&env(&on), &mut errors).is_some());
        let mut disabled = on.to_vec();
        disabled.push(("OTEL_SDK_DISABLED", "true"));
        assert!(from_env(&env(&disabled), &mut errors).is_none());
        let mut none = on.to_vec();
        none.push(("OTEL_TRACES_EXPORTER", "none"));
        assert!(from_env(&env(&none), &mut errors).is_none());
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn protocol_sampler_and_downward_api() {
        let mut errors = Vec::new();
        let s = from_env(
            &env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
                ("POD_NAME", "app-7d9"),
                ("POD_NAMESPACE", "shop"),
                ("NODE_NAME", "node-1"),
            ]),
            &mut errors,
        )
        .expect("on");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(s.protocol, Protocol::Grpc);
        assert_eq!(
            s.k8s_attributes,
            vec![
                ("k8s.pod.name", "app-7d9".to_string()),
                ("k8s.namespace.name", "shop".to_string()),
                ("k8s.node.name", "node-1".to_string()),
            ]
        );
        assert!(!s.record_content);
        assert_eq!(
            s.sampler,
            Sampler {
                parent_based: true,
                ratio: 0.25
            }
        );
    }

    fn traceparent(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn the_sampler_follows_the_parent_flag_then_the_ratio() {
        let sampled = traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let unsampled = traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        let none = HeaderMap::new();
        let parent_based_off = Sampler {
            parent_based: true,
            ratio: 0.0,
        };
        assert!(parent_based_off.sample(&sampled));
        assert!(!parent_based_off.sample(&unsampled));
        assert!(!parent_based_off.sample(&none));
        let always = Sampler::default();
        assert!(always.sample(&none) && !always.sample(&unsampled));
        // A malformed parent is ignored: the root rule decides.
        assert!(always.sample(&traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-00"
        )));
        assert!(always.sample(&traceparent("garbage")));

        // Not parent-based: the ratio on the incoming trace id, the same answer every time.
        let tenth = Sampler {
            parent_based: false,
            ratio: 0.1,
        };
        let low = traceparent("00-4bf92f3577b34da60000000000000001-00f067aa0ba902b7-00");
        let high = traceparent("00-4bf92f3577b34da6ffffffffffffffff-00f067aa0ba902b7-01");
        assert!(tenth.sample(&low) && tenth.sample(&low));
        assert!(!tenth.sample(&high));
        // Without a parent, about a tenth of requests.
        let hits = (0..20_000).filter(|_| tenth.sample(&none)).count();
        assert!((1_700..2_300).contains(&hits), "{hits}");
    }

    #[test]
    fn bad_values_are_reported() {
        let mut errors = Vec::new();
        from_env(
            &env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
                ("OTEL_TRACES_SAMPLER", "sometimes"),
                ("OTEL_BSP_MAX_QUEUE_SIZE", "lots"),
            ]),
            &mut errors,
        );
        assert_eq!(errors.len(), 4, "{errors:?}");
        let mut errors = Vec::new();
        from_env(
            &env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "2"),
            ]),
            &mut errors,
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
    }
}
