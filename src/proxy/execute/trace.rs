//! What an attempt's CLIENT span will show, recorded in plain values while the attempt runs:
//! its target, why it was made, when it started and ended, how it ended, and what the answer
//! reported. It becomes a span only if the request is exported (`observe`).

use std::borrow::Cow;
use std::time::SystemTime;

use opentelemetry::trace::{SpanId, SpanKind};

use super::*;
use crate::telemetry::trace::{new_span_id, Draft};

/// The request fields every attempt span shows, read once per traced request.
#[derive(Default)]
pub struct RequestTrace {
    pub(super) operation: Option<Operation>,
    pub(super) stream: bool,
    pub(super) max_tokens: Option<i64>,
    pub(super) temperature: Option<f64>,
    /// The request's messages (or prompt/input), only when content recording is on.
    pub(super) content: Option<String>,
}

impl RequestTrace {
    pub(super) fn read(parsed: &RequestBody<'_>, operation: Operation) -> RequestTrace {
        let number = |key: &str| parsed.field(key).and_then(|v| v.get().parse::<f64>().ok());
        RequestTrace {
            operation: Some(operation),
            stream: parsed.stream,
            max_tokens: number("max_tokens")
                .or_else(|| number("max_completion_tokens"))
                .map(|v| v as i64),
            temperature: number("temperature"),
            content: otel::record_content()
                .then(|| {
                    parsed
                        .field("messages")
                        .or_else(|| parsed.field("prompt"))
                        .or_else(|| parsed.field("input"))
                        .map(|raw| cut(raw.get()))
                })
                .flatten(),
        }
    }
}

/// A traced request's attempts: what its CLIENT spans are made of.
pub struct Traced {
    pub request: Arc<RequestTrace>,
    pub attempts: Vec<AttemptTrace>,
}

impl Traced {
    /// The one call of a pass-through request.
    pub fn single(attempt: AttemptTrace) -> Traced {
        Traced {
            request: Arc::new(RequestTrace::default()),
            attempts: vec![attempt],
        }
    }

    /// The attempt spans, children of the request's SERVER span.
    pub fn drafts(self) -> impl Iterator<Item = Draft> {
        let request = self.request;
        self.attempts.into_iter().map(move |a| a.draft(&request))
    }
}

/// One attempt, as its span will show it.
pub struct AttemptTrace {
    pub span_id: SpanId,
    step: Step,
    /// `None` for a pass-through call (its span is named by the method).
    kind: Option<AttemptKind>,
    method: Option<Method>,
    after: Option<&'static str>,
    probe: bool,
    number: u32,
    start: SystemTime,
    end: Option<SystemTime>,
    status: Option<u16>,
    error: Option<&'static str>,
    ttft: Option<Duration>,
    response_model: Option<String>,
    finish_reasons: Vec<String>,
    usage: Option<Usage>,
    bill: Bill,
    output: Option<String>,
    /// A plain answer, read for the model and finish reasons only when the span is built.
    plain: Option<Bytes>,
}

impl AttemptTrace {
    pub(super) fn new(
        step: &Step,
        kind: AttemptKind,
        after: Option<&'static str>,
        probe: bool,
        number: u32,
    ) -> AttemptTrace {
        AttemptTrace {
            span_id: new_span_id(),
            step: step.clone(),
            kind: Some(kind),
            method: None,
            after,
            probe,
            number,
            start: SystemTime::now(),
            end: None,
            status: None,
            error: None,
            ttft: None,
            response_model: None,
            finish_reasons: Vec::new(),
            usage: None,
            bill: Bill::default(),
            output: None,
            plain: None,
        }
    }

    /// The one call of a pass-through request.
    pub fn passthrough(step: &Step, method: Method) -> AttemptTrace {
        AttemptTrace {
            kind: None,
            method: Some(method),
            ..AttemptTrace::new(step, AttemptKind::Initial, None, false, 1)
        }
    }

    /// The attempt failed; `why` is a failure class, never provider text.
    pub fn fail(&mut self, why: &'static str, status: Option<u16>) {
        self.error = Some(why);
        if status.is_some() {
            self.status = status;
        }
        self.finish();
    }

    /// The provider answered with this status.
    pub fn answered(&mut self, status: u16) {
        self.status = Some(status);
    }

    pub(super) fn first_token(&mut self, ttft: Duration) {
        self.ttft = Some(ttft);
    }

    /// What the answer reported, priced.
    pub(super) fn reported(&mut self, reported: &mut Reported, bill: Bill) {
        self.usage = reported.usage;
        self.bill = bill;
        self.response_model = reported.model.take();
        self.finish_reasons = std::mem::take(&mut reported.finish_reasons);
        self.output = reported.content.take();
        self.plain = reported.plain.take();
    }

    /// The attempt is over (its end is the first time this is called).
    pub fn finish(&mut self) {
        self.end.get_or_insert_with(SystemTime::now);
    }

    fn draft(mut self, request: &RequestTrace) -> Draft {
        if let Some(plain) = self.plain.take() {
            (self.response_model, self.finish_reasons, self.output) =
                super::settle::PlainAnswer::details(&plain);
        }
        let target = self.step.target();
        let provider = &target.provider;
        let mut attributes = Vec::with_capacity(28);
        attributes.extend([
            KeyValue::new("server.address", provider.host().to_string()),
            KeyValue::new("server.port", i64::from(provider.port())),
            KeyValue::new("llm_sidecar.provider", provider.name.clone()),
            KeyValue::new("llm_sidecar.path", target.path().as_str()),
            KeyValue::new("llm_sidecar.attempt", i64::from(self.number)),
        ]);
        if let Some(status) = self.status {
            attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        let name: Cow<'static, str> = match (&self.method, self.kind) {
            (Some(method), _) => Cow::Owned(method.to_string()),
            (None, kind) => {
                let operation = request.operation.unwrap_or(Operation::Chat);
                attributes.extend([
                    KeyValue::new("gen_ai.operation.name", operation.name()),
                    KeyValue::new(
                        "gen_ai.provider.name",
                        crate::telemetry::gen_ai_provider_name(&provider.name).to_string(),
                    ),
                    KeyValue::new("gen_ai.request.model", target.model.clone()),
                    KeyValue::new("gen_ai.request.stream", request.stream),
                    KeyValue::new("llm_sidecar.route", self.step.route.name.clone()),
                    KeyValue::new(
                        "llm_sidecar.attempt.kind",
                        kind.unwrap_or(AttemptKind::Initial).as_str(),
                    ),
                    KeyValue::new(
                        "llm_sidecar.breaker_state",
                        if self.probe { "half_open" } else { "closed" },
                    ),
                ]);
                if let Some(max_tokens) = request.max_tokens {
                    attributes.push(KeyValue::new("gen_ai.request.max_tokens", max_tokens));
                }
                if let Some(temperature) = request.temperature {
                    attributes.push(KeyValue::new("gen_ai.request.temperature", temperature));
                }
                if let Some(content) = &request.content {
                    attributes.push(KeyValue::new("gen_ai.input.messages", content.clone()));
                }
                if let Some(after) = self.after {
                    attributes.push(KeyValue::new("llm_sidecar.attempt.reason", after));
                }
                Cow::Owned(format!("{} {}", operation.name(), target.model))
            }
        };
        if let Some(ttft) = self.ttft {
            attributes.push(KeyValue::new(
                "llm_sidecar.time_to_first_token",
                ttft.as_secs_f64(),
            ));
        }
        if let Some(model) = self.response_model {
            attributes.push(KeyValue::new("gen_ai.response.model", model));
        }
        if !self.finish_reasons.is_empty() {
            attributes.push(KeyValue::new(
                "gen_ai.response.finish_reasons",
                opentelemetry::Value::Array(
                    self.finish_reasons
                        .into_iter()
                        .map(opentelemetry::StringValue::from)
                        .collect::<Vec<_>>()
                        .into(),
                ),
            ));
        }
        if let Some(usage) = self.usage {
            attributes.push(KeyValue::new(
                "gen_ai.usage.input_tokens",
                usage.input as i64,
            ));
            attributes.push(KeyValue::new(
                "gen_ai.usage.output_tokens",
                usage.output as i64,
            ));
            if usage.cached_input > 0 {
                attributes.push(KeyValue::new(
                    "gen_ai.usage.cache_read.input_tokens",
                    usage.cached_input as i64,
                ));
            }
        }
        if let Some(cost) = self.bill.cost {
            attributes.push(KeyValue::new("llm_sidecar.cost_usd", cost));
        }
        if let Some(savings) = self.bill.savings() {
            attributes.push(KeyValue::new("llm_sidecar.savings_usd", savings));
        }
        if let Some(output) = self.output {
            attributes.push(KeyValue::new("gen_ai.output.messages", output));
        }
        Draft {
            name,
            kind: SpanKind::Client,
            span_id: self.span_id,
            start: self.start,
            end: self.end.unwrap_or_else(SystemTime::now),
            attributes,
            error: self.error,
            links: Vec::new(),
        }
    }
}
