//! What the exchange tells the client about itself: the headers every answer gets (attempts,
//! fallbacks, the attempt log), a provider's refusal passed back as it is, the one error when
//! every target failed, and the report the exchange returns.

use super::*;
use crate::outbound::number_header;

impl Exchange {
    /// Fallbacks: how many times the request moved on to another target.
    pub(super) fn moves(&self) -> usize {
        self.attempts
            .windows(2)
            .filter(|w| w[0].step.target().health_key != w[1].step.target().health_key)
            .count()
    }

    pub(super) fn add_headers(&self, headers: &mut HeaderMap, step: &Step) {
        let target = step.target();
        headers.reserve(10);
        let reason = if self
            .attempts
            .iter()
            .any(|a| a.outcome == AttemptOutcome::BudgetExhausted)
        {
            crate::spend::BUDGET_EXHAUSTED
        } else if self
            .attempts
            .iter()
            .any(|a| a.outcome != AttemptOutcome::Answered)
        {
            FALLBACK
        } else if step.side != self.decision.order.first_side() {
            // Either the route lacks that side, or the plan skipped it (an open breaker).
            if step
                .route
                .target(self.decision.order.first_side())
                .is_none()
            {
                ONLY_TARGET
            } else {
                FALLBACK
            }
        } else {
            self.decision.why.as_str()
        };
        crate::proxy::add_route_headers(
            headers,
            target,
            reason,
            self.decision.bucket,
            &self.snapshot,
        );
        let attempts = self.attempts.len().max(1) as u64;
        headers.insert(HEADER_ATTEMPTS, number_header(attempts));
        headers.insert(HEADER_FALLBACKS, number_header(self.moves() as u64));
        if self.attempts.len() > 1 {
            let log: Vec<String> = self
                .attempts
                .iter()
                .map(|a| format!("{}={}", a.step.target().health_key, a.outcome.label()))
                .collect();
            if let Ok(value) = HeaderValue::from_str(&log.join(",")) {
                headers.insert(HEADER_ATTEMPT_LOG, value);
            }
        }
        if self.truncated > 0 {
            headers.insert(HEADER_TRUNCATED, number_header(self.truncated as u64));
        }
    }

    pub(super) fn passthrough_error(
        &mut self,
        step: &Step,
        status: StatusCode,
        upstream: HeaderMap,
        body: Bytes,
    ) -> Committed {
        let mut response = Response::new(full(body));
        *response.status_mut() = status;
        if let Some(ct) = upstream.get(header::CONTENT_TYPE) {
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, ct.clone());
        }
        self.add_headers(response.headers_mut(), step);
        Committed {
            response,
            route: step.route.clone(),
            side: step.side,
            lease: None,
            handles: self.core.metrics.target(step.target()),
            report: self.final_report(),
            stream_end: None,
        }
    }

    pub(super) fn give_up(
        &self,
        worst: Option<Worst>,
        skipped: &[crate::routing::plan::Skipped],
    ) -> SidecarError {
        let attempts: Vec<Value> = self.attempts.iter().map(AttemptRecord::json).collect();
        let skipped: Vec<Value> = skipped
            .iter()
            .map(|s| {
                let t = s.target();
                json!({ "route": s.route.name, "provider": t.provider.name, "model": t.model, "reason": s.reason.label() })
            })
            .collect();
        let Some(Worst {
            class,
            failure,
            target,
        }) = worst
        else {
            return SidecarError::AllTargetsFailed {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "no target could be tried: every target was skipped or its circuit breaker is open".into(),
                upstream_type: None,
                upstream_code: Some("no_target_available".into()),
                attempts: json!({ "attempts": attempts, "skipped": skipped }),
            };
        };
        let (status, detail, kind, code) = match &failure {
            Failure::Status { status, error, .. } => (
                match class {
                    Class::ContextTooLong => StatusCode::BAD_REQUEST,
                    Class::Misconfigured => StatusCode::BAD_GATEWAY,
                    _ => *status,
                },
                format!(
                    "{} {}",
                    status.as_u16(),
                    error.message.clone().unwrap_or_default()
                ),
                error.kind.clone(),
                error.code.clone(),
            ),
            Failure::HeaderTimeout(d) => (
                StatusCode::GATEWAY_TIMEOUT,
                format!("no response headers within {d:?}"),
                None,
                None,
            ),
            Failure::FirstTokenTimeout(d) => (
                StatusCode::GATEWAY_TIMEOUT,
                format!("no first token within {d:?}"),
                None,
                None,
            ),
            Failure::Connect(why) => (
                StatusCode::BAD_GATEWAY,
                format!("cannot connect: {why}"),
                None,
                None,
            ),
            Failure::ConnectionLost(why) | Failure::StreamFailedEarly(why) => {
                (StatusCode::BAD_GATEWAY, why.clone(), None, None)
            }
            Failure::LocalConfig { code, message } => (
                StatusCode::BAD_GATEWAY,
                message.clone(),
                Some("sidecar_config".to_string()),
                Some(code.to_string()),
            ),
        };
        SidecarError::AllTargetsFailed {
            status,
            message: format!(
                "every target failed ({} attempts); the most relevant failure, {} from {target}: {}",
                self.attempts.len(),
                class.label(),
                detail.trim()
            ),
            upstream_type: kind,
            upstream_code: code.or_else(|| Some(class.label().to_string())),
            attempts: json!({ "attempts": attempts, "skipped": skipped }),
        }
    }

    /// What the attempts so far add up to: their count, the moves between targets, the last
    /// target tried. Usage and cost are added by whoever settles the answer.
    pub(super) fn report(&self) -> Report {
        Report {
            attempts: self.attempts.len().max(1) as u32,
            fallbacks: self.moves() as u32,
            fell_back: self.fell_back(),
            last: self
                .attempts
                .last()
                .map(|a| self.core.metrics.target(a.step.target())),
            ..Report::default()
        }
    }

    /// [`Exchange::report`] with the attempts recorded for their spans.
    pub(super) fn final_report(&mut self) -> Report {
        Report {
            trace: self.traced(),
            ..self.report()
        }
    }

    /// The attempts recorded so far, for their spans (`None` while tracing is off).
    pub(super) fn traced(&mut self) -> Option<Traced> {
        let request = self.request_trace.clone()?;
        Some(Traced {
            request,
            attempts: std::mem::take(&mut self.traces),
        })
    }

    /// The answer comes after at least one failed attempt.
    pub(super) fn fell_back(&self) -> bool {
        self.attempts
            .iter()
            .any(|a| a.outcome != AttemptOutcome::Answered)
    }
}

/// What the exchange found out about a request: returned with its answer or its error, for the
/// request's metrics, `/stats`, log line and span.
#[derive(Default)]
pub struct Report {
    /// Upstream attempts, the attempt header's number.
    pub attempts: u32,
    /// Moves from one target to another.
    pub fallbacks: u32,
    /// The answer came after at least one failed attempt.
    pub fell_back: bool,
    /// The last target tried, for a request that got no answer.
    pub last: Option<Arc<TargetMetrics>>,
    /// Reported usage of a plain answer (a stream's comes in its [`StreamEnd`]).
    pub usage: Option<Usage>,
    pub bill: Bill,
    pub ttft: Option<Duration>,
    /// A plain answer read whole: the client got all of it once it was sent.
    pub complete: bool,
    /// The attempts, for their spans, while tracing is on.
    pub trace: Option<Traced>,
}

/// How a committed stream ended, as its pump saw it.
#[derive(Default)]
pub struct StreamEnd {
    /// Reported usage of the part that finished the answer.
    pub usage: Option<Usage>,
    pub bill: Bill,
    /// The stream broke and ended with an error event; otherwise it ended whole.
    pub interrupted: bool,
    /// The client left before the end.
    pub cancelled: bool,
    /// The attempts of the stream's parts (the committed one, continuations), for their spans.
    pub attempts: Vec<AttemptTrace>,
}
