//! Server-sent events as providers stream them: split a byte stream into events (across frame
//! boundaries) and tell content, usage, `[DONE]` and malformed chunks apart, so the sidecar can
//! see how a stream ends without buffering it.

use bytes::{Buf, Bytes, BytesMut};
use serde_json::Value;

/// One event: its raw text (ending with the blank line) and its joined `data:` lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawEvent {
    pub raw: Bytes,
    pub data: Option<String>,
}

#[derive(Default)]
pub struct SseParser {
    buf: BytesMut,
}

fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn parse_event(raw: Bytes) -> RawEvent {
    let text = String::from_utf8_lossy(&raw);
    let mut data: Option<String> = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("data:") else {
            continue;
        };
        let rest = rest.strip_prefix(' ').unwrap_or(rest);
        match &mut data {
            Some(d) => {
                d.push('\n');
                d.push_str(rest);
            }
            None => data = Some(rest.to_string()),
        }
    }
    RawEvent { raw, data }
}

impl SseParser {
    /// Feeds bytes; returns every event completed by them.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<RawEvent> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some((at, len)) = event_end(&self.buf) {
            let raw = self.buf.split_to(at + len).freeze();
            events.push(parse_event(raw));
        }
        events
    }

    /// What is left when the stream ends without a final blank line.
    pub fn finish(&mut self) -> Option<RawEvent> {
        let rest = self.buf.split().freeze();
        let trimmed = rest.chunk().iter().all(|b| b.is_ascii_whitespace());
        (!trimmed).then(|| parse_event(rest))
    }
}

/// What a chunk of a chat (or legacy completions) stream says.
#[derive(Clone, Debug, PartialEq)]
pub enum Chunk {
    Done,
    /// `data:` that is not JSON: dropped, never forwarded.
    Malformed,
    /// An error object sent in the stream by the provider.
    Error(Value),
    /// A chunk with no choices and usage: the `include_usage` chunk.
    UsageOnly {
        usage: Value,
        model: Option<String>,
    },
    Content {
        /// Text added by this chunk (delta content or legacy text).
        text: String,
        finish_reason: Option<String>,
        /// The chunk carries an answer (text, tool calls or a finish), not just the role.
        substantive: bool,
        usage: Option<Value>,
        /// The answering model, read only from a chunk that finishes or carries usage.
        model: Option<String>,
    },
}

pub fn inspect(data: &str) -> Chunk {
    if data.trim() == "[DONE]" {
        return Chunk::Done;
    }
    let Ok(value) = serde_json::from_str::<Value>(data) else {
        return Chunk::Malformed;
    };
    if !value.is_object() {
        return Chunk::Malformed;
    }
    if let Some(error) = value.get("error") {
        return Chunk::Error(error.clone());
    }
    let usage = value.get("usage").filter(|u| u.is_object()).cloned();
    let model = || {
        value
            .get("model")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let choices = value.get("choices").and_then(Value::as_array);
    let Some(choice) = choices.and_then(|c| c.first()) else {
        return match usage {
            Some(usage) => Chunk::UsageOnly {
                usage,
                model: model(),
            },
            None => Chunk::Content {
                text: String::new(),
                finish_reason: None,
                substantive: false,
                usage: None,
                model: None,
            },
        };
    };
    let delta = choice.get("delta");
    let text = delta
        .and_then(|d| d.get("content"))
        .or_else(|| choice.get("text"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let tool_calls = delta
        .and_then(|d| d.get("tool_calls"))
        .is_some_and(|t| !t.is_null());
    let reasoning = delta
        .and_then(|d| d.get("reasoning_content"))
        .and_then(Value::as_str)
        .is_some_and(|r| !r.is_empty());
    let finish_reason = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .map(str::to_string);
    let model = if finish_reason.is_some() || usage.is_some() {
        model()
    } else {
        None
    };
    Chunk::Content {
        substantive: !text.is_empty() || tool_calls || reasoning || finish_reason.is_some(),
        text,
        finish_reason,
        usage,
        model,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_frames_are_reassembled() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\"").is_empty());
        let events = p.push(b":1}\n\ndata: [DONE]\n\n: keep-alive\r\n\r\ndata: x");
        let data: Vec<Option<&str>> = events.iter().map(|e| e.data.as_deref()).collect();
        assert_eq!(data, [Some("{\"a\":1}"), Some("[DONE]"), None]);
        assert_eq!(&events[0].raw[..], b"data: {\"a\":1}\n\n");
        let rest = p.finish().unwrap();
        assert_eq!(rest.data.as_deref(), Some("x"));
        assert!(p.finish().is_none());
    }

    #[test]
    fn multi_line_data_is_joined() {
        let mut p = SseParser::default();
        let events = p.push(b"event: message\ndata: line1\ndata: line2\n\n");
        assert_eq!(events[0].data.as_deref(), Some("line1\nline2"));
    }

    #[test]
    fn chunks_are_told_apart() {
        assert_eq!(inspect("[DONE]"), Chunk::Done);
        assert_eq!(inspect("{\"id\": broken"), Chunk::Malformed);
        assert_eq!(inspect("42"), Chunk::Malformed);
        let role = inspect(
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
        );
        assert!(matches!(
            role,
            Chunk::Content {
                substantive: false,
                ..
            }
        ));
        let text =
            inspect(r#"{"choices":[{"index":0,"delta":{"content":" w1"},"finish_reason":null}]}"#);
        assert!(
            matches!(text, Chunk::Content { ref text, substantive: true, .. } if text == " w1")
        );
        let finish = inspect(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#);
        assert!(
            matches!(finish, Chunk::Content { finish_reason: Some(ref f), substantive: true, .. } if f == "stop")
        );
        let usage = inspect(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#);
        assert!(
            matches!(usage, Chunk::UsageOnly { usage: ref u, .. } if u["completion_tokens"] == 5)
        );
        let legacy = inspect(r#"{"choices":[{"text":"Once","index":0}]}"#);
        assert!(matches!(legacy, Chunk::Content { ref text, .. } if text == "Once"));
        assert!(matches!(
            inspect(r#"{"error":{"message":"overloaded"}}"#),
            Chunk::Error(_)
        ));
    }
}
