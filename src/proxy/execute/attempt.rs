//! One attempt on one target: the upstream request, its head, a plain answer read whole or
//! a stream read to its first token, and the attempt's span and record.

use super::*;

pub(super) const OVERSIZED_EVENT: &str =
    "the provider sent more than 1 MiB without ending an event";

/// Error bodies are read to classify them, up to this size.
pub(super) const MAX_ERROR_BODY: usize = 64 * 1024;

/// What an attempt produced before anything was sent to the client.
pub(super) enum Answer {
    Plain {
        head: http::response::Parts,
        body: PlainBody,
        lease: Option<Lease>,
    },
    Stream {
        head: http::response::Parts,
        body: Incoming,
        parser: SseParser,
        prefix: Vec<RawEvent>,
        lease: Option<Lease>,
        /// From the request to the upstream to its first content chunk.
        ttft: Duration,
    },
}

pub(super) enum PlainBody {
    /// Read to the end: the connection is free again.
    Whole(Bytes),
    /// Too large to hold: what was read, then the rest as it comes.
    Large { read: Vec<Bytes>, rest: Incoming },
}

/// Reads a plain answer; every frame must come within `idle` (providers that keep the
/// connection alive with blank lines while they generate pass), all of it before `deadline`.
pub(super) async fn read_answer(
    mut body: Incoming,
    idle: Duration,
    deadline: Instant,
) -> Result<PlainBody, Failure> {
    // Most answers come in one frame: it is kept apart, without a list to hold it.
    let mut first: Option<Bytes> = None;
    let mut read: Vec<Bytes> = Vec::new();
    let mut size = 0;
    loop {
        // A frame already read from the connection needs no timer.
        let next = match futures_util::FutureExt::now_or_never(body.frame()) {
            Some(frame) => Ok(frame),
            None => {
                let until = (Instant::now() + idle).min(deadline);
                tokio::time::timeout_at(until, body.frame()).await
            }
        };
        match next {
            Err(_) => {
                return Err(Failure::ConnectionLost(format!(
                    "the answer body stalled (no data for {idle:?}, or the deadline passed)"
                )))
            }
            Ok(None) => break,
            Ok(Some(Err(err))) => {
                return Err(Failure::ConnectionLost(format!(
                    "the answer body broke: {}",
                    crate::upstream::describe(&err)
                )))
            }
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                size += data.len();
                if first.is_none() && read.is_empty() {
                    first = Some(data);
                } else {
                    read.extend(first.take());
                    read.push(data);
                }
                if size > MAX_BUFFERED_ANSWER {
                    read.extend(first);
                    return Ok(PlainBody::Large { read, rest: body });
                }
            }
        }
    }
    Ok(PlainBody::Whole(match first {
        Some(only) => only,
        None => read.concat().into(),
    }))
}

/// A failed attempt; `passthrough` keeps a provider's own error to return as it is.
pub(super) struct AttemptError {
    pub(super) failure: Failure,
    pub(super) passthrough: Option<(StatusCode, HeaderMap, Bytes)>,
}

impl From<Failure> for AttemptError {
    fn from(failure: Failure) -> Self {
        AttemptError {
            failure,
            passthrough: None,
        }
    }
}

impl Exchange {
    /// One attempt on one target, until the answer is usable or has failed.
    pub(super) async fn attempt(
        &self,
        target: &Target,
        prefill: Option<&str>,
        first: bool,
        traceparent: Option<HeaderValue>,
    ) -> Result<Answer, AttemptError> {
        let body = self.body_for(target, prefill, first);
        let request = crate::outbound::request(
            &target.provider,
            self.call.method.clone(),
            &self.call.path_and_query,
            &self.call.headers,
            body,
            traceparent,
        )
        .map_err(|why| Failure::LocalConfig {
            code: why.code,
            message: why.to_string(),
        })?;

        let sent = Instant::now();
        let header_timeout = self.header_timeout().min(self.remaining());
        let (response, lease) =
            match tokio::time::timeout(header_timeout, self.core.upstream.send(request)).await {
                Err(_) => return Err(Failure::HeaderTimeout(header_timeout).into()),
                Ok(Err(UpstreamError::Connect(why))) => return Err(Failure::Connect(why).into()),
                Ok(Err(UpstreamError::Exchange(why))) => {
                    return Err(Failure::ConnectionLost(why).into())
                }
                Ok(Ok(pair)) => pair,
            };

        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
            let (parts, body) = response.into_parts();
            let read = tokio::time::timeout(
                Duration::from_secs(5).min(self.remaining()),
                http_body_util::Limited::new(body, MAX_ERROR_BODY).collect(),
            )
            .await;
            let raw = match read {
                Ok(Ok(collected)) => collected.to_bytes(),
                _ => Bytes::new(),
            };
            return Err(AttemptError {
                failure: Failure::Status {
                    status,
                    retry_after,
                    error: UpstreamErrorBody::parse(&raw),
                },
                passthrough: Some((status, parts.headers, raw)),
            });
        }
        if !self.stream {
            let (head, body) = response.into_parts();
            let idle = self.snapshot.resilience.stream_idle_timeout;
            let body = read_answer(body, idle, self.deadline).await?;
            return Ok(Answer::Plain { head, body, lease });
        }

        // Streams are committed on the first content chunk: until then everything is retryable.
        let ttft_deadline =
            (sent + self.snapshot.resilience.first_token_timeout).min(self.deadline);
        let (head, mut body) = response.into_parts();
        let mut parser = SseParser::default();
        let mut prefix = Vec::new();
        loop {
            let frame = match tokio::time::timeout_at(ttft_deadline, body.frame()).await {
                Err(_) => {
                    return Err(Failure::FirstTokenTimeout(
                        ttft_deadline.saturating_duration_since(sent),
                    )
                    .into())
                }
                Ok(None) => {
                    return Err(Failure::StreamFailedEarly(
                        "the stream ended before the first token".into(),
                    )
                    .into())
                }
                Ok(Some(Err(err))) => {
                    return Err(Failure::StreamFailedEarly(crate::upstream::describe(&err)).into())
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let mut first = false;
            for event in parser.push(&data) {
                if let Some(d) = &event.data {
                    match inspect(d) {
                        Chunk::Content {
                            substantive: true, ..
                        } => first = true,
                        Chunk::Error(e) => {
                            return Err(Failure::StreamFailedEarly(format!(
                                "the provider sent an error in the stream: {e}"
                            ))
                            .into())
                        }
                        _ => {}
                    }
                }
                prefix.push(event);
            }
            if parser.overflowed() {
                return Err(Failure::StreamFailedEarly(OVERSIZED_EVENT.into()).into());
            }
            if first {
                let ttft = sent.elapsed();
                return Ok(Answer::Stream {
                    head,
                    body,
                    parser,
                    prefix,
                    lease,
                    ttft,
                });
            }
        }
    }

    pub(super) fn record(
        &mut self,
        step: &Step,
        outcome: AttemptOutcome,
        status: Option<u16>,
        started: Instant,
    ) {
        let target = step.target();
        let duration = started.elapsed();
        self.attempts.push(AttemptRecord {
            step: step.clone(),
            outcome,
            status,
            duration,
        });
        let metrics = &self.core.metrics;
        metrics.record_attempt(&target.tags.provider, outcome.label());
        if let AttemptOutcome::Failed(class) = outcome {
            let handles = metrics.target(target);
            handles.stats.tally.sent();
            handles.stats.tally.failed();
            metrics
                .gen_ai_duration
                .get_or_create(&crate::telemetry::metrics::GenAiLabels {
                    gen_ai_operation_name: self.operation.name(),
                    gen_ai_provider_name: handles.gen_ai_provider.clone(),
                    gen_ai_request_model: handles.model.clone(),
                    error_type: Some(class.label()),
                })
                .observe(duration.as_secs_f64());
        }
    }

    /// The record of one attempt for its CLIENT span; `None` while tracing is off.
    pub(super) fn attempt_trace(
        &self,
        step: &Step,
        kind: AttemptKind,
        after: Option<&'static str>,
        admission: Admission,
    ) -> Option<AttemptTrace> {
        self.ids.as_ref()?;
        let number = self
            .attempts
            .iter()
            .filter(|a| a.outcome.was_sent())
            .count()
            + 1;
        Some(AttemptTrace::new(
            step,
            kind,
            after,
            admission == Admission::Probe,
            number as u32,
        ))
    }

    /// The `traceparent` for the provider: the attempt's span in the request's trace.
    pub(super) fn traceparent(&self, trace: &Option<AttemptTrace>) -> Option<HeaderValue> {
        let (ids, trace) = (self.ids.as_ref()?, trace.as_ref()?);
        Some(ids.traceparent(trace.span_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use http_body_util::Full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The body of one HTTP/1.1 answer sent with the given chunks (chunked encoding: each
    /// chunk reaches the reader as its own frame), read by a real hyper client.
    async fn answer_body(chunks: Vec<Vec<u8>>) -> Incoming {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 4096];
            let _ = stream.read(&mut request).await.unwrap();
            let mut reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            for chunk in &chunks {
                reply.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                reply.extend_from_slice(chunk);
                reply.extend_from_slice(b"\r\n");
            }
            reply.extend_from_slice(b"0\r\n\r\n");
            stream.write_all(&reply).await.unwrap();
        });
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = Request::builder()
            .uri("/")
            .header(header::HOST, addr.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.send_request(request).await.unwrap().into_body()
    }

    async fn read(chunks: Vec<Vec<u8>>) -> PlainBody {
        let body = answer_body(chunks).await;
        let far = Instant::now() + Duration::from_secs(30);
        match read_answer(body, Duration::from_secs(10), far).await {
            Ok(body) => body,
            Err(failure) => panic!("the answer was not read: {failure:?}"),
        }
    }

    #[tokio::test]
    async fn a_plain_answer_in_one_or_several_frames_is_read_whole_and_in_order() {
        for chunks in [
            vec![],
            vec![b"{\"id\":1}".to_vec()],
            vec![b"{\"id\"".to_vec(), b":".to_vec(), b"1}".to_vec()],
        ] {
            let expected = chunks.concat();
            match read(chunks).await {
                PlainBody::Whole(bytes) => assert_eq!(&bytes[..], &expected[..]),
                PlainBody::Large { .. } => panic!("a small answer was not held whole"),
            }
        }
    }

    #[tokio::test]
    async fn an_answer_over_the_cap_keeps_what_was_read_and_the_rest_follows() {
        let chunks: Vec<Vec<u8>> = (0..9u8).map(|i| vec![b'a' + i; 1024 * 1024]).collect();
        let expected = chunks.concat();
        match read(chunks).await {
            PlainBody::Whole(_) => panic!("an answer over the cap was held whole"),
            PlainBody::Large { read, rest } => {
                let mut all = read.concat();
                all.extend_from_slice(&rest.collect().await.unwrap().to_bytes());
                assert_eq!(all.len(), expected.len());
                assert!(all == expected, "the answer's bytes were reordered or lost");
            }
        }
    }
}
