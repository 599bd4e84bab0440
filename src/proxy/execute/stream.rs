//! A committed answer on its way to the client: a plain one sent as read, a stream pumped
//! event by event to its end, continued on a prefill-capable target when it breaks, or ended
//! with an explicit error event, never a clean `[DONE]` on a truncated answer.

use super::*;

impl Exchange {
    pub(super) fn commit(
        mut self: Box<Self>,
        step: &Step,
        answer: Answer,
        rest: Vec<Step>,
        mut trace: Option<AttemptTrace>,
        started: Instant,
        reservation: Option<Reservation>,
    ) -> Committed {
        let mut report = self.report();
        let fell_back = report.fell_back;
        let target = step.target();
        let handles = self.core.metrics.target(target);
        if self.attempts.is_empty() {
            handles.ok_attempts.inc();
        }
        let tally = &handles.stats.tally;
        tally.sent();
        match answer {
            Answer::Plain { head, body, lease } => {
                tally.answered(fell_back);
                report.complete = matches!(body, PlainBody::Whole(_));
                let mut response = Response::from_parts(head, ());
                crate::proxy::strip_hop_by_hop(response.headers_mut());
                self.add_headers(response.headers_mut(), step);
                let (body, lease) = match body {
                    PlainBody::Whole(bytes) => {
                        if let Some(lease) = lease {
                            lease.release();
                        }
                        let reported = Reported::from_plain(&bytes, trace.is_some());
                        report.usage = reported.usage;
                        let bill = self.settle(step, &handles, trace.as_mut(), started, reported);
                        report.bill = bill;
                        let cost = bill
                            .cost
                            .unwrap_or_else(|| streamed_cost(target, self.prompt_tokens, ""));
                        settle_reservation(reservation, cost);
                        // Read for the cache only where the request is to be stored.
                        if let Some(capture) = self.capture.take() {
                            let storable = response
                                .status()
                                .is_success()
                                .then(|| crate::cache::Stored::from_plain(bytes.clone()))
                                .flatten();
                            if let Some(answer) = storable {
                                capture.store(answer, bill.cost);
                            }
                        }
                        if let Some(cost) = bill.cost {
                            if let Ok(value) = HeaderValue::from_str(&format_usd(cost)) {
                                response.headers_mut().insert(HEADER_COST, value);
                            }
                        }
                        (full(bytes), None)
                    }
                    PlainBody::Large { read, rest } => {
                        let unread = Reported::default();
                        self.settle(step, &handles, trace.as_mut(), started, unread);
                        // Passed through unread, so unpriced: the worst case stays spent.
                        if let Some(reservation) = reservation {
                            let worst = reservation.reserved_usd();
                            settle_reservation(Some(reservation), worst);
                        }
                        let read = futures_util::stream::iter(
                            read.into_iter().map(|b| Ok::<_, BoxError>(Frame::data(b))),
                        );
                        let rest = http_body_util::BodyStream::new(rest.map_err(BoxError::from));
                        let stream = futures_util::StreamExt::chain(read, rest);
                        (
                            http_body_util::StreamBody::new(stream).boxed_unsync(),
                            lease,
                        )
                    }
                };
                if let Some(mut trace) = trace {
                    trace.answered(response.status().as_u16());
                    trace.finish();
                    self.traces.push(trace);
                }
                report.trace = self.traced();
                Committed {
                    response: response.map(|()| body),
                    route: step.route.clone(),
                    side: step.side,
                    lease,
                    handles,
                    report,
                    stream_end: None,
                }
            }
            Answer::Stream {
                mut head,
                body,
                parser,
                prefix,
                lease,
                ttft,
            } => {
                report.ttft = Some(ttft);
                report.trace = self.traced();
                if let Some(trace) = &mut trace {
                    trace.answered(head.status.as_u16());
                    trace.first_token(ttft);
                }
                crate::proxy::strip_hop_by_hop(&mut head.headers);
                head.headers.remove(header::CONTENT_LENGTH);
                self.add_headers(&mut head.headers, step);
                let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(16);
                let (end_tx, end_rx) = oneshot::channel();
                let route = step.route.clone();
                let side = step.side;
                let current = step.clone();
                let capture = self
                    .capture
                    .take()
                    .map(|c| (c, crate::cache::Assembler::default()));
                tokio::spawn(async move {
                    let mut pump = Pump {
                        tx,
                        end: Some(end_tx),
                        capture,
                        reservation,
                        traces: Vec::new(),
                        state: StreamState::default(),
                        usage_added: self.usage_added,
                        metrics: self.core.metrics.clone(),
                    };
                    let mut segment = Segment {
                        step: current,
                        trace,
                        started,
                        fell_back,
                        settled: false,
                    };
                    for event in prefix {
                        if !self.relay(&mut pump, &mut segment, event).await {
                            self.client_left(&mut segment, &mut pump);
                            return;
                        }
                    }
                    // The exchange, pump and segment live here, once; the pump borrows them
                    // (an async fn would hold its by-value arguments twice).
                    self.pump(&mut pump, &mut segment, body, parser, lease, rest)
                        .await;
                });
                let body = ChannelBody::new(rx).boxed_unsync();
                Committed {
                    response: Response::from_parts(head, body),
                    route,
                    side,
                    lease: None,
                    handles,
                    report,
                    stream_end: Some(end_rx),
                }
            }
        }
    }

    /// The client went away mid-stream: that says nothing about the target's health (a probe
    /// it carried is given back).
    pub(super) fn client_left(&self, segment: &mut Segment, pump: &mut Pump) {
        if !segment.settled {
            if let Some(mut trace) = segment.trace.take() {
                trace.fail("client_cancelled", None);
                pump.traces.push(trace);
            }
            self.core.health.record_inconclusive(segment.step.target());
            self.settle_cut(segment, pump);
        }
        pump.conclude(StreamEnd {
            cancelled: true,
            ..StreamEnd::default()
        });
    }

    /// A part that ended before its answer did is billed on what it streamed.
    pub(super) fn settle_cut(&self, segment: &Segment, pump: &mut Pump) {
        let text = &pump.state.text[pump.state.segment_start..];
        let cost = streamed_cost(segment.step.target(), self.prompt_tokens, text);
        settle_reservation(pump.reservation.take(), cost);
    }

    /// A stream part ended well: its target answered, its usage is billed.
    pub(super) fn finish_segment(&self, segment: &mut Segment, pump: &mut Pump) {
        if std::mem::replace(&mut segment.settled, true) {
            return;
        }
        let target = segment.step.target();
        self.core.health.record_answered(target);
        let handles = self.core.metrics.target(target);
        handles.stats.tally.answered(segment.fell_back);
        let mut reported = std::mem::take(&mut pump.state.reported);
        if otel::record_content() {
            reported.content = Some(cut(&pump.state.text[pump.state.segment_start..]));
        }
        let usage = reported.usage;
        let streamed = &pump.state.text[pump.state.segment_start..];
        let estimate = streamed_cost(target, self.prompt_tokens, streamed);
        let bill = self.settle(
            &segment.step,
            &handles,
            segment.trace.as_mut(),
            segment.started,
            reported,
        );
        if let Some(mut trace) = segment.trace.take() {
            trace.finish();
            pump.traces.push(trace);
        }
        settle_reservation(pump.reservation.take(), bill.cost.unwrap_or(estimate));
        // An answer continued on another target has a seam: it is not stored.
        if let Some((capture, assembler)) = pump.capture.take().filter(|_| !pump.state.continuing) {
            if let Some(answer) = assembler.finish() {
                capture.store(answer, bill.cost);
            }
        }
        pump.conclude(StreamEnd {
            usage,
            bill,
            ..StreamEnd::default()
        });
    }

    /// Forwards one event; a `[DONE]` settles the part first, so the answer is billed before
    /// the client can see its end.
    pub(super) async fn relay(
        &self,
        pump: &mut Pump,
        segment: &mut Segment,
        event: RawEvent,
    ) -> bool {
        if !segment.settled && event.data.as_deref().is_some_and(|d| d.trim() == "[DONE]") {
            self.finish_segment(segment, pump);
        }
        pump.forward(event).await
    }

    /// A stream part broke: its target failed this request.
    pub(super) fn break_segment(&self, segment: &mut Segment, why: &'static str, pump: &mut Pump) {
        let handles = self.core.metrics.target(segment.step.target());
        handles.stats.tally.failed();
        if let Some(mut trace) = segment.trace.take() {
            trace.fail(why, None);
            pump.traces.push(trace);
        }
    }

    /// Streams the committed answer to its end; continues it elsewhere or ends it with an error
    /// event when the upstream stream breaks.
    pub(super) async fn pump(
        &self,
        pump: &mut Pump,
        segment: &mut Segment,
        mut body: Incoming,
        mut parser: SseParser,
        mut lease: Option<Lease>,
        mut rest: Vec<Step>,
    ) {
        let idle = self.snapshot.resilience.stream_idle_timeout;
        loop {
            let broken: String = loop {
                match tokio::time::timeout(idle, body.frame()).await {
                    Err(_) => break format!("the stream stalled for {idle:?}"),
                    Ok(Some(Err(err))) => {
                        break format!("the stream broke: {}", crate::upstream::describe(&err))
                    }
                    Ok(Some(Ok(frame))) => {
                        let Ok(data) = frame.into_data() else {
                            continue;
                        };
                        for event in parser.push(&data) {
                            if !self.relay(pump, segment, event).await {
                                self.client_left(segment, pump);
                                return;
                            }
                        }
                        if pump.state.failed.is_some() {
                            break pump.state.failed.take().unwrap_or_default();
                        }
                        if parser.overflowed() {
                            break OVERSIZED_EVENT.to_string();
                        }
                    }
                    Ok(None) => {
                        if let Some(event) = parser.finish() {
                            let _ = self.relay(pump, segment, event).await;
                        }
                        if pump.state.done || pump.state.finished {
                            if let Some(lease) = lease.take() {
                                lease.release();
                            }
                            // Billed before the last bytes go out: the request's log line and
                            // metrics are written when the client has read them.
                            self.finish_segment(segment, pump);
                            if !pump.state.done {
                                // Complete but for the terminator: finalise it.
                                pump.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                            }
                            return;
                        }
                        break "the stream ended before the answer was finished".to_string();
                    }
                }
            };
            drop(lease.take());
            let t = segment.step.target();
            tracing::warn!(provider = %t.provider.name, model = %t.model, reason = %broken, sent_chars = pump.state.text.len(), "committed stream broke");
            self.core
                .health
                .record_failure(t, Instant::now(), &self.snapshot.resilience.breaker);
            let original = format!("{}/{}: {broken}", t.provider.name, t.model);
            self.settle_cut(segment, pump);
            self.break_segment(segment, "stream_interrupted", pump);
            pump.state.reported = Reported::default();

            // Continue the answer on the next target that accepts an assistant prefill.
            let mut continued = None;
            while !rest.is_empty() {
                let step = rest.remove(0);
                if !step.target().supports_prefill || Instant::now() >= self.deadline {
                    continue;
                }
                // Rare: boxed, so every open stream's task does not carry room for it.
                let Ok(reservation) = Box::pin(self.reserve(&step)).await else {
                    continue;
                };
                let admission = self.core.health.admit(step.target(), Instant::now(), false);
                if admission == Admission::Rejected {
                    continue;
                }
                let mut trace = self.attempt_trace(
                    &step,
                    AttemptKind::Continuation,
                    Some("stream_interrupted"),
                    admission,
                );
                let started = Instant::now();
                let traceparent = self.traceparent(&trace);
                let attempt = Box::pin(self.attempt(
                    step.target(),
                    Some(&pump.state.text),
                    false,
                    traceparent,
                ));
                match attempt.await {
                    Ok(Answer::Stream {
                        body,
                        parser,
                        prefix,
                        lease: l,
                        ..
                    }) => {
                        self.core.health.record_latency(
                            step.target(),
                            started.elapsed(),
                            Some(started.elapsed()),
                        );
                        self.core.metrics.target(step.target()).stats.tally.sent();
                        if let Some(trace) = &mut trace {
                            trace.answered(200);
                        }
                        let next = Segment {
                            step,
                            trace,
                            started,
                            fell_back: true,
                            settled: false,
                        };
                        pump.reservation = reservation;
                        continued = Some((next, body, parser, prefix, l));
                        break;
                    }
                    Ok(Answer::Plain { .. }) => {
                        if let Some(mut trace) = trace {
                            trace.fail("not_a_stream", None);
                            pump.traces.push(trace);
                        }
                    }
                    Err(err) => {
                        let class = classify(&err.failure);
                        if let Some(mut trace) = trace {
                            trace.fail(class.label(), None);
                            pump.traces.push(trace);
                        }
                        if class.counts_against_target() {
                            self.core.health.record_failure(
                                step.target(),
                                Instant::now(),
                                &self.snapshot.resilience.breaker,
                            );
                        }
                        tracing::warn!(provider = %step.target().provider.name, outcome = class.label(), "continuation attempt failed");
                    }
                }
            }
            let Some((next, next_body, next_parser, prefix, next_lease)) = continued else {
                self.core.metrics.record_stream_interruption("error_event");
                let attempts = std::mem::take(&mut pump.traces);
                pump.conclude(StreamEnd {
                    interrupted: true,
                    attempts,
                    ..StreamEnd::default()
                });
                let error = json!({
                    "error": {
                        "message": format!("the answer was interrupted and could not be continued: {original}"),
                        "type": "server_error",
                        "param": null,
                        "code": "stream_interrupted",
                    }
                });
                pump.send(Bytes::from(format!("data: {error}\n\n"))).await;
                return;
            };
            self.core.metrics.record_stream_interruption("continued");
            pump.state.continuing = true;
            pump.state.segment_start = pump.state.text.len();
            *segment = next;
            for event in prefix {
                if !self.relay(pump, segment, event).await {
                    self.client_left(segment, pump);
                    return;
                }
            }
            body = next_body;
            parser = next_parser;
            lease = next_lease;
        }
    }
}

/// One target's part of a committed stream: its attempt's record, and when it started.
pub(super) struct Segment {
    pub(super) step: Step,
    pub(super) trace: Option<AttemptTrace>,
    pub(super) started: Instant,
    /// This part answers after another target failed.
    pub(super) fell_back: bool,
    /// Billed and counted already.
    pub(super) settled: bool,
}

/// What the sidecar has seen of a committed stream.
#[derive(Default)]
pub(super) struct StreamState {
    pub(super) text: String,
    pub(super) finished: bool,
    pub(super) done: bool,
    /// Set by a provider error event: the stream is broken.
    pub(super) failed: Option<String>,
    /// Forwarding a continuation: its role chunk is not repeated to the client.
    pub(super) continuing: bool,
    /// Where the current part's text starts in `text`.
    pub(super) segment_start: usize,
    /// What the current part reported: usage, model, finish reasons.
    pub(super) reported: Reported,
}

pub(super) struct Pump {
    pub(super) tx: mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
    /// Where the stream's ending goes, once, before the client can see it (the request's
    /// record reads it when the response body ends). Dropped unsent when the client left.
    pub(super) end: Option<oneshot::Sender<StreamEnd>>,
    /// The attempts of the stream's parts that have ended, for their spans.
    pub(super) traces: Vec<AttemptTrace>,
    /// What the current part holds on the daily budgets, settled when it ends.
    pub(super) reservation: Option<Reservation>,
    /// Where the answer goes once it is complete, and what has been seen of it.
    pub(super) capture: Option<(Capture, crate::cache::Assembler)>,
    pub(super) state: StreamState,
    pub(super) usage_added: bool,
    pub(super) metrics: Arc<Metrics>,
}

impl Pump {
    /// Sends the stream's ending (with the attempts recorded so far) once.
    pub(super) fn conclude(&mut self, mut end: StreamEnd) {
        if let Some(tx) = self.end.take() {
            end.attempts.append(&mut self.traces);
            // The receiver is gone only when the client is, and then nobody needs it.
            let _ = tx.send(end);
        }
    }

    pub(super) async fn send(&mut self, bytes: Bytes) -> bool {
        self.tx.send(Ok(Frame::data(bytes))).await.is_ok()
    }

    /// Forwards one upstream event to the client, or drops it; false when the client is gone.
    pub(super) async fn forward(&mut self, event: RawEvent) -> bool {
        let Some(data) = &event.data else {
            return self.send(event.raw).await;
        };
        if let Some((_, assembler)) = &mut self.capture {
            assembler.push(data);
        }
        match inspect(data) {
            Chunk::Done => {
                self.state.done = true;
                self.send(event.raw).await
            }
            Chunk::Malformed => {
                tracing::debug!("dropped a malformed stream chunk");
                self.metrics.malformed_chunks.inc();
                true
            }
            Chunk::Error(e) => {
                self.state.failed = Some(format!("the provider sent an error in the stream: {e}"));
                true
            }
            Chunk::UsageOnly { usage, model } => {
                self.state.reported.usage = usage;
                if let Some(model) = model {
                    self.state.reported.model = Some(model.into_owned());
                }
                if self.usage_added {
                    return true;
                }
                self.send(event.raw).await
            }
            Chunk::Content {
                text,
                finish_reason,
                substantive,
                usage,
                model,
            } => {
                if let Some(usage) = usage {
                    self.state.reported.usage = Some(usage);
                }
                if let Some(model) = model {
                    self.state.reported.model = Some(model.into_owned());
                }
                if let Some(reason) = &finish_reason {
                    self.state.reported.finish_reasons.push(reason.to_string());
                }
                if self.state.continuing && !substantive {
                    return true;
                }
                self.state.text.push_str(&text);
                if finish_reason.is_some() {
                    self.state.finished = true;
                }
                self.send(event.raw).await
            }
        }
    }
}
