//! A request's trace without the cost of spans: its ids are chosen when it arrives (so the
//! `traceparent` sent upstream names the right parent), what happens is recorded in plain
//! values while it runs, and spans are built, with their real start and end times, only once
//! the request has ended and is known to be exported: it was sampled at the head, or it is one
//! an operator will look for (a retry, a failover, a continued stream, an error, a stale
//! answer, a slow request).

use std::borrow::Cow;
use std::time::SystemTime;

use http::header::{HeaderMap, HeaderValue};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use super::otel;

/// A request's trace identity, known from its first moment.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceIds {
    pub trace_id: TraceId,
    /// The SERVER span's id: the parent of every attempt span.
    pub span_id: SpanId,
    /// The app's span, when the request carried W3C trace context.
    pub parent: Option<SpanContext>,
    /// The head sampler's decision (`OTEL_TRACES_SAMPLER`): exported whatever happens.
    pub sampled: bool,
}

impl TraceIds {
    /// The ids of a request with these headers; `None` while tracing is off.
    pub fn start(headers: &HeaderMap) -> Option<TraceIds> {
        if !otel::enabled() {
            return None;
        }
        let parent = otel::remote_parent(headers);
        let sampled = otel::sampled(headers);
        Some(TraceIds {
            trace_id: parent
                .as_ref()
                .map_or_else(new_trace_id, SpanContext::trace_id),
            span_id: new_span_id(),
            parent,
            sampled,
        })
    }

    /// The W3C `traceparent` naming `span` (an attempt) as the parent of what the provider
    /// does; flagged sampled as the head decided.
    pub fn traceparent(&self, span: SpanId) -> HeaderValue {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let context = SpanContext::new(self.trace_id, span, flags, false, TraceState::NONE);
        HeaderValue::from_bytes(&otel::traceparent_bytes(&context))
            .unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// The SERVER span as a parent or a link target.
    pub fn context(&self) -> SpanContext {
        SpanContext::new(
            self.trace_id,
            self.span_id,
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        )
    }

    /// The trace id as 32 hex digits, for the log line and the response header.
    pub fn trace_id_hex(&self) -> String {
        self.trace_id.to_string()
    }
}

/// A fresh, valid span id.
pub fn new_span_id() -> SpanId {
    SpanId::from(fastrand::u64(1..))
}

fn new_trace_id() -> TraceId {
    TraceId::from(fastrand::u128(1..))
}

/// One span, described once the request has ended.
pub struct Draft {
    pub name: Cow<'static, str>,
    pub kind: SpanKind,
    pub span_id: SpanId,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    /// An error class (`error.type`), never provider text.
    pub error: Option<&'static str>,
    pub links: Vec<SpanContext>,
}

/// Exports the SERVER span `server` and its children `children` (attempts) under `ids`.
pub fn export(ids: &TraceIds, server: Draft, children: impl IntoIterator<Item = Draft>) {
    let scope = InstrumentationScope::builder("llm-sidecar").build();
    let (parent_span_id, parent_remote) = match &ids.parent {
        Some(parent) => (parent.span_id(), true),
        None => (SpanId::INVALID, false),
    };
    let server = span_data(
        ids,
        ids.span_id,
        server,
        parent_span_id,
        parent_remote,
        &scope,
    );
    otel::queue(server);
    for child in children {
        let child = span_data(ids, child.span_id, child, ids.span_id, false, &scope);
        otel::queue(child);
    }
}

fn span_data(
    ids: &TraceIds,
    span_id: SpanId,
    draft: Draft,
    parent_span_id: SpanId,
    parent_span_is_remote: bool,
    scope: &InstrumentationScope,
) -> SpanData {
    let trace_state = ids
        .parent
        .as_ref()
        .map(|p| p.trace_state().clone())
        .unwrap_or_default();
    let mut attributes = draft.attributes;
    let status = match draft.error {
        Some(class) => {
            attributes.push(KeyValue::new("error.type", class));
            Status::error(class)
        }
        None => Status::Unset,
    };
    let mut links = SpanLinks::default();
    links.links = draft
        .links
        .into_iter()
        .map(opentelemetry::trace::Link::with_context)
        .collect();
    SpanData {
        span_context: SpanContext::new(
            ids.trace_id,
            span_id,
            TraceFlags::SAMPLED,
            false,
            trace_state,
        ),
        parent_span_id,
        parent_span_is_remote,
        span_kind: draft.kind,
        name: draft.name,
        start_time: draft.start,
        end_time: draft.end.max(draft.start),
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links,
        status,
        instrumentation_scope: scope.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traceparent_names_the_attempt_in_the_requests_trace() {
        let ids = TraceIds {
            trace_id: TraceId::from(0x0af7651916cd43dd8448eb211c80319c_u128),
            span_id: SpanId::from(0x00f067aa0ba902b7_u64),
            parent: None,
            sampled: false,
        };
        let attempt = SpanId::from(0xb7ad6b7169203331_u64);
        assert_eq!(
            ids.traceparent(attempt),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
        );
        let sampled = TraceIds {
            sampled: true,
            ..ids.clone()
        };
        assert!(sampled
            .traceparent(attempt)
            .to_str()
            .unwrap()
            .ends_with("-01"));
        assert_eq!(ids.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
    }

    #[test]
    fn span_ids_are_valid_and_differ() {
        let a = new_span_id();
        let b = new_span_id();
        assert_ne!(a, SpanId::INVALID);
        assert_ne!(a, b);
    }
}
