//! Server-sent events as providers stream them: split a byte stream into events (across frame
//! boundaries) and tell content, usage, `[DONE]` and malformed chunks apart, so the sidecar can
//! see how a stream ends without buffering it. Events pass through as the bytes they came in;
//! a chunk is read into borrowed, typed fields, only those the sidecar looks at.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use bytes::{Buf, Bytes, BytesMut};
use serde::de::{self, Deserializer, IgnoredAny, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::telemetry::cost::{Usage, UsageMember};

/// The most a provider may send without ending an event: past it the stream counts as broken,
/// so one answer cannot make the sidecar hold an unbounded buffer.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// One event: its raw text (ending with the blank line) and its joined `data:` lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawEvent {
    pub raw: Bytes,
    pub data: Option<String>,
}

#[derive(Default)]
pub struct SseParser {
    buf: BytesMut,
    /// How much of `buf` is known to hold no event end: each byte is searched once.
    scanned: usize,
}

fn parse_event(raw: Bytes) -> RawEvent {
    // Valid text, the usual case, is checked by `from_utf8`, which takes ASCII a word at a
    // time; the lossy conversion walks it byte by byte.
    let text = match std::str::from_utf8(&raw) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(&raw),
    };
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
        while let Some(end) = self.next_end() {
            let raw = self.buf.split_to(end).freeze();
            self.scanned = 0;
            events.push(parse_event(raw));
        }
        self.scanned = self.buf.len();
        events
    }

    /// The end of the first event in the buffer: just past a blank line (`\n\n` or
    /// `\r\n\r\n`). Only bytes not searched before are looked at.
    fn next_end(&self) -> Option<usize> {
        let buf = &self.buf[..];
        memchr::memchr_iter(b'\n', &buf[self.scanned..])
            .map(|i| i + self.scanned)
            .find(|&i| (i >= 1 && buf[i - 1] == b'\n') || (i >= 3 && &buf[i - 3..i] == b"\r\n\r"))
            .map(|i| i + 1)
    }

    /// The provider has sent more than [`MAX_EVENT_BYTES`] without ending an event.
    pub fn overflowed(&self) -> bool {
        self.buf.len() > MAX_EVENT_BYTES
    }

    /// What is left when the stream ends without a final blank line.
    pub fn finish(&mut self) -> Option<RawEvent> {
        let rest = self.buf.split().freeze();
        self.scanned = 0;
        let trimmed = rest.chunk().iter().all(|b| b.is_ascii_whitespace());
        (!trimmed).then(|| parse_event(rest))
    }
}

/// What a chunk of a chat (or legacy completions) stream says.
#[derive(Clone, Debug, PartialEq)]
pub enum Chunk<'a> {
    Done,
    /// `data:` that is not a JSON object: dropped, never forwarded.
    Malformed,
    /// An error sent in the stream by the provider, as it wrote it.
    Error(&'a str),
    /// A chunk with no choices and usage: the `include_usage` chunk.
    UsageOnly {
        usage: Option<Usage>,
        model: Option<Cow<'a, str>>,
    },
    Content {
        /// Text added by this chunk (delta content or legacy text).
        text: Cow<'a, str>,
        finish_reason: Option<Cow<'a, str>>,
        /// The chunk carries an answer (text, tool calls or a finish), not just the role.
        substantive: bool,
        usage: Option<Usage>,
        /// The answering model, read only from a chunk that finishes or carries usage.
        model: Option<Cow<'a, str>>,
    },
}

/// The fields of a stream chunk the sidecar reads; everything else is skipped unread. Every
/// field is lenient: a value of an unexpected type reads as absent, so any JSON object is a
/// chunk (as the streaming contract says) and only other `data:` is malformed.
#[derive(Deserialize)]
struct WireChunk<'a> {
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
    #[serde(default)]
    usage: UsageMember,
    #[serde(borrow, default, deserialize_with = "text")]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    choices: FirstObject<WireChoice<'a>>,
}

#[derive(Deserialize)]
struct WireChoice<'a> {
    #[serde(borrow, default)]
    delta: Object<WireDelta<'a>>,
    /// Legacy completions carry their text here.
    #[serde(borrow, default, deserialize_with = "text")]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct WireDelta<'a> {
    #[serde(borrow, default, deserialize_with = "text")]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "text")]
    reasoning_content: Option<Cow<'a, str>>,
}

/// A JSON object read as `T`; any other value is skipped and reads as absent.
struct Object<T>(Option<T>);

/// The first element of a JSON array, when it is an object, read as `T`; the rest, or any
/// value that is not an array, is skipped.
struct FirstObject<T>(Option<T>);

impl<T> Default for Object<T> {
    fn default() -> Self {
        Object(None)
    }
}

impl<T> Default for FirstObject<T> {
    fn default() -> Self {
        FirstObject(None)
    }
}

/// Skips any scalar: what a lenient field does with a value of the wrong type.
macro_rules! skip_scalars {
    ($value:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Expect<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Expect<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            skip_scalars!(Object(None));
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(|t| Object(Some(t)))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Object(None))
            }
        }
        deserializer.deserialize_any(Expect(PhantomData))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for FirstObject<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Expect<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Expect<T> {
            type Value = FirstObject<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            skip_scalars!(FirstObject(None));
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let first = seq.next_element::<Object<T>>()?.and_then(|o| o.0);
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FirstObject(first))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(FirstObject(None))
            }
        }
        deserializer.deserialize_any(Expect(PhantomData))
    }
}

/// A string field, borrowed when it has no escapes; a value of any other type reads as absent,
/// as a provider's odd field must not make the whole chunk unreadable.
fn text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    struct Text;
    impl<'de> Visitor<'de> for Text {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_string())))
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    deserializer.deserialize_any(Text)
}

pub fn inspect(data: &str) -> Chunk<'_> {
    if data.trim() == "[DONE]" {
        return Chunk::Done;
    }
    if !data.trim_start().starts_with('{') {
        return Chunk::Malformed;
    }
    let Ok(chunk) = serde_json::from_str::<WireChunk<'_>>(data) else {
        return Chunk::Malformed;
    };
    if let Some(error) = chunk.error.filter(|e| e.get() != "null") {
        return Chunk::Error(error.get());
    }
    let usage = chunk.usage;
    let Some(choice) = chunk.choices.0 else {
        return if usage.object {
            Chunk::UsageOnly {
                usage: usage.usage,
                model: chunk.model,
            }
        } else {
            Chunk::Content {
                text: Cow::Borrowed(""),
                finish_reason: None,
                substantive: false,
                usage: None,
                model: None,
            }
        };
    };
    let (content, tool_calls, reasoning) = match choice.delta.0 {
        Some(delta) => (
            delta.content,
            delta.tool_calls.is_some_and(|t| t.get() != "null"),
            delta.reasoning_content.is_some_and(|r| !r.is_empty()),
        ),
        None => (None, false, false),
    };
    let text = content.or(choice.text).unwrap_or(Cow::Borrowed(""));
    let finish_reason = choice.finish_reason;
    let model = if finish_reason.is_some() || usage.object {
        chunk.model
    } else {
        None
    };
    Chunk::Content {
        substantive: !text.is_empty() || tool_calls || reasoning || finish_reason.is_some(),
        text,
        finish_reason,
        usage: usage.usage,
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
    fn an_event_that_never_ends_overflows_instead_of_growing_without_bound() {
        let mut p = SseParser::default();
        let line = vec![b'x'; 64 * 1024];
        let mut pushed = 0;
        while !p.overflowed() {
            assert!(p.push(&line).is_empty());
            pushed += line.len();
            assert!(
                pushed <= MAX_EVENT_BYTES + line.len(),
                "{pushed} bytes held"
            );
        }
        // A stream of ordinary events never does.
        let mut q = SseParser::default();
        for _ in 0..100_000 {
            assert_eq!(q.push(b"data: {\"a\":1}\n\n").len(), 1);
        }
        assert!(!q.overflowed());
    }

    #[test]
    fn an_event_end_split_across_pushes_is_found() {
        for split in 1..7 {
            let whole = b"data: a\r\n\r\ndata: b\n\n";
            let mut p = SseParser::default();
            let mut events = p.push(&whole[..split]);
            for byte in &whole[split..] {
                events.extend(p.push(std::slice::from_ref(byte)));
            }
            let data: Vec<_> = events.iter().map(|e| e.data.clone()).collect();
            assert_eq!(
                data,
                [Some("a".to_string()), Some("b".to_string())],
                "{split}"
            );
        }
    }

    #[test]
    fn an_event_that_is_not_utf8_is_read_lossily() {
        let mut p = SseParser::default();
        let events = p.push(b"data: caf\xff\n\n");
        assert_eq!(events[0].data.as_deref(), Some("caf\u{fffd}"));
        assert_eq!(&events[0].raw[..], b"data: caf\xff\n\n");
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
        // Borrowed from the chunk when it has no escapes.
        let data = r#"{"choices":[{"delta":{"content":"plain"}}]}"#;
        assert!(matches!(
            inspect(data),
            Chunk::Content {
                text: Cow::Borrowed("plain"),
                ..
            }
        ));
        // Odd shapes read as absent fields, not as a malformed chunk.
        for odd in [
            r#"{"choices":5}"#,
            r#"{"choices":[5,{"delta":{"content":"x"}}]}"#,
            r#"{"choices":[{"delta":"x","text":7,"finish_reason":[1]}]}"#,
            r#"{"choices":{"a":1},"model":3}"#,
        ] {
            assert!(
                matches!(
                    inspect(odd),
                    Chunk::Content {
                        substantive: false,
                        ..
                    }
                ),
                "{odd}: {:?}",
                inspect(odd)
            );
        }
        let tools = inspect(r#"{"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}"#);
        assert!(matches!(
            tools,
            Chunk::Content {
                substantive: true,
                ..
            }
        ));
        let reasoning = inspect(r#"{"choices":[{"delta":{"reasoning_content":"hm"}}]}"#);
        assert!(matches!(
            reasoning,
            Chunk::Content {
                substantive: true,
                ..
            }
        ));
        let finish = inspect(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#);
        assert!(
            matches!(finish, Chunk::Content { finish_reason: Some(ref f), substantive: true, .. } if f == "stop")
        );
        let usage = inspect(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#);
        assert!(matches!(usage, Chunk::UsageOnly { usage: Some(u), .. } if u.output == 5));
        let legacy = inspect(r#"{"choices":[{"text":"Once","index":0}]}"#);
        assert!(matches!(legacy, Chunk::Content { ref text, .. } if text == "Once"));
        assert!(matches!(
            inspect(r#"{"error":{"message":"overloaded"}}"#),
            Chunk::Error(_)
        ));
    }
}
