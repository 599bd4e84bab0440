//! Logs, OpenTelemetry traces, Prometheus metrics and the `/stats` totals.

pub mod cache;
pub mod cost;
pub mod metrics;
pub mod otel;
pub mod stats;
pub mod trace;

use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt, Targets};
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Registry;

/// The target of the one log line per request.
pub const ACCESS_TARGET: &str = "llm_sidecar::access";

/// How log lines are written (`LLM_SIDECAR_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

fn log_layer(format: LogFormat) -> Box<dyn Layer<Registry> + Send + Sync> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs are events only: spans are for the trace exporter, and keeping them out of the log
    // layer means a span nobody exports is never even created.
    let events_only = filter.and(filter_fn(|meta| !meta.is_span()));
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_filter(events_only)
            .boxed(),
        LogFormat::Text => layer.with_filter(events_only).boxed(),
    }
}

/// Installs the global log subscriber: `RUST_LOG`-style filter (default `info`), text or JSON.
pub fn init_logging(format: LogFormat) {
    let _ = tracing_subscriber::registry()
        .with(log_layer(format))
        .try_init();
}

/// Installs logging and, when `otel` is set, trace export. Must run inside the runtime.
pub fn init(
    format: LogFormat,
    otel: Option<&otel::OtelSettings>,
    connect_timeout: std::time::Duration,
    extra_ca: Option<&std::path::Path>,
) -> Result<Option<otel::Tracing>, String> {
    let Some(settings) = otel else {
        init_logging(format);
        return Ok(None);
    };
    let (tracing, tracer) = otel::start(settings, connect_timeout, extra_ca)?;
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_level(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_filter(Targets::new().with_target(otel::SPAN_TARGET, tracing::Level::TRACE))
        .boxed();
    tracing_subscriber::registry()
        .with(vec![log_layer(format), spans])
        .try_init()
        .map_err(|e| format!("cannot install the trace subscriber: {e}"))?;
    otel::set_enabled();
    Ok(Some(tracing))
}

/// The GenAI operation of a model endpoint (`gen_ai.operation.name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Chat = 0,
    TextCompletion = 1,
    Embeddings = 2,
}

impl Operation {
    pub fn from_path(path: &str) -> Operation {
        if path.starts_with("/v1/embeddings") {
            Operation::Embeddings
        } else if path.starts_with("/v1/completions") {
            Operation::TextCompletion
        } else {
            Operation::Chat
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Operation::Chat => "chat",
            Operation::TextCompletion => "text_completion",
            Operation::Embeddings => "embeddings",
        }
    }
}

/// `gen_ai.provider.name`: the semantic conventions' name where one exists, else the
/// provider's name in the routing config.
pub fn gen_ai_provider_name(config_name: &str) -> &str {
    match config_name {
        "gemini" | "google" => "gcp.gemini",
        other => other,
    }
}
