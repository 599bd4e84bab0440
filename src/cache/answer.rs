//! A complete answer as the cache keeps it, built from a plain answer or assembled from a
//! finished stream, and replayed either way: as the plain JSON, or as a valid chat stream.
//! Only complete successes are kept: every choice finished with `stop` or `length`, nothing
//! cut, no error, no content filter.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

/// Finish reasons of a complete answer worth repeating.
const STORABLE: &[&str] = &["stop", "length"];

/// An answer the cache may repeat.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    /// The plain answer, as a plain request gets it.
    pub body: Bytes,
    /// A chat answer's single choice, for replaying it as a stream; `None` for other
    /// endpoints, which are only replayed plain.
    pub chat: Option<ChatAnswer>,
}

/// What a chat stream replay is made of.
#[derive(Clone, Debug, PartialEq, serde::Serialize, Deserialize)]
pub struct ChatAnswer {
    pub id: String,
    pub model: String,
    pub created: u64,
    pub content: String,
    pub finish_reason: String,
    /// The provider's usage object, as it reported it.
    pub usage: Option<Value>,
}

#[derive(Deserialize)]
struct PlainAnswer<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    object: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    created: Option<u64>,
    #[serde(borrow, default)]
    choices: Option<Vec<PlainChoice<'a>>>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
    #[serde(default)]
    usage: Option<Value>,
}

#[derive(Deserialize)]
struct PlainChoice<'a> {
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    message: Option<Message<'a>>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
    #[serde(borrow, default)]
    function_call: Option<&'a RawValue>,
}

impl Stored {
    /// A plain answer's body, when it is a complete success; `None` otherwise.
    pub fn from_plain(body: Bytes) -> Option<Stored> {
        let answer: PlainAnswer = serde_json::from_slice(&body).ok()?;
        if answer.error.is_some() {
            return None;
        }
        let choices = answer.choices.as_deref().unwrap_or_default();
        let finished = |c: &PlainChoice| {
            c.finish_reason
                .as_deref()
                .is_some_and(|r| STORABLE.contains(&r))
        };
        if answer.choices.is_some() && (choices.is_empty() || !choices.iter().all(finished)) {
            return None;
        }
        // A single plain-text chat choice can be replayed as a stream too.
        let chat = match (answer.object.as_deref(), choices) {
            (Some("chat.completion"), [only]) => only.message.as_ref().and_then(|m| {
                let text_only = m.tool_calls.is_none_or(|t| t.get() == "null")
                    && m.function_call.is_none_or(|f| f.get() == "null");
                text_only.then(|| ChatAnswer {
                    id: answer
                        .id
                        .as_deref()
                        .unwrap_or("chatcmpl-cached")
                        .to_string(),
                    model: answer.model.as_deref().unwrap_or_default().to_string(),
                    created: answer.created.unwrap_or(0),
                    content: m.content.as_deref().unwrap_or_default().to_string(),
                    finish_reason: only.finish_reason.as_deref().unwrap_or("stop").to_string(),
                    usage: answer.usage.clone(),
                })
            }),
            _ => None,
        };
        Some(Stored { body, chat })
    }

    /// The answer as a chat stream: the role, the content, the finish, the usage when the
    /// client asked for it, then `[DONE]`. `None` when it cannot be replayed as a stream.
    pub fn replay(&self, include_usage: bool) -> Option<Vec<Bytes>> {
        let chat = self.chat.as_ref()?;
        let chunk = |choices: Value, usage: Option<&Value>| {
            let mut chunk = json!({
                "id": chat.id,
                "object": "chat.completion.chunk",
                "created": chat.created,
                "model": chat.model,
                "choices": choices,
            });
            if let Some(usage) = usage {
                chunk["usage"] = usage.clone();
            }
            Bytes::from(format!("data: {chunk}\n\n"))
        };
        let mut events = vec![
            chunk(
                json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "finish_reason": null }]),
                None,
            ),
            chunk(
                json!([{ "index": 0, "delta": { "content": chat.content }, "finish_reason": null }]),
                None,
            ),
            chunk(
                json!([{ "index": 0, "delta": {}, "finish_reason": chat.finish_reason }]),
                None,
            ),
        ];
        if include_usage {
            if let Some(usage) = &chat.usage {
                events.push(chunk(json!([]), Some(usage)));
            }
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        Some(events)
    }

    /// Bytes the entry holds, for the cache's size bound.
    pub fn weight(&self) -> usize {
        self.body.len()
            + self
                .chat
                .as_ref()
                .map_or(0, |c| c.content.len() + c.id.len() + c.model.len() + 64)
    }
}

/// Builds a stored answer from a chat stream's chunks as they pass. It gives up (and the
/// answer is not stored) on anything but one plain-text choice that finishes well.
#[derive(Default)]
pub struct Assembler {
    id: Option<String>,
    model: Option<String>,
    created: Option<u64>,
    content: String,
    finish_reason: Option<String>,
    usage: Option<Value>,
    spoiled: bool,
}

#[derive(Deserialize)]
struct StreamChunk<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    created: Option<u64>,
    #[serde(borrow, default)]
    choices: Vec<StreamChoice<'a>>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
    #[serde(default)]
    usage: Option<Value>,
}

#[derive(Deserialize)]
struct StreamChoice<'a> {
    #[serde(default)]
    index: u64,
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
    #[serde(borrow, default)]
    function_call: Option<&'a RawValue>,
}

impl Assembler {
    /// One event's `data:`, as the provider sent it.
    pub fn push(&mut self, data: &str) {
        if self.spoiled || data.trim() == "[DONE]" {
            return;
        }
        let Ok(chunk) = serde_json::from_str::<StreamChunk>(data) else {
            self.spoiled = true;
            return;
        };
        if chunk.error.is_some() {
            self.spoiled = true;
            return;
        }
        self.id = self.id.take().or(chunk.id.map(Cow::into_owned));
        self.model = self.model.take().or(chunk.model.map(Cow::into_owned));
        self.created = self.created.or(chunk.created);
        if chunk.usage.as_ref().is_some_and(|u| !u.is_null()) {
            self.usage = chunk.usage;
        }
        for choice in chunk.choices {
            if choice.index != 0 {
                self.spoiled = true;
                return;
            }
            if let Some(delta) = choice.delta {
                let null = |raw: Option<&RawValue>| raw.is_none_or(|r| r.get() == "null");
                if !null(delta.tool_calls) || !null(delta.function_call) {
                    self.spoiled = true;
                    return;
                }
                if let Some(text) = delta.content {
                    self.content.push_str(&text);
                }
            }
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(reason.into_owned());
            }
        }
    }

    /// The stream ended with `[DONE]`: the answer to store, when it is a complete success.
    pub fn finish(self) -> Option<Stored> {
        let reason = self
            .finish_reason
            .filter(|r| STORABLE.contains(&r.as_str()))?;
        if self.spoiled {
            return None;
        }
        let chat = ChatAnswer {
            id: self.id.unwrap_or_else(|| "chatcmpl-cached".into()),
            model: self.model.unwrap_or_default(),
            created: self.created.unwrap_or(0),
            content: self.content,
            finish_reason: reason,
            usage: self.usage,
        };
        let mut body = json!({
            "id": chat.id,
            "object": "chat.completion",
            "created": chat.created,
            "model": chat.model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": chat.content },
                "finish_reason": chat.finish_reason,
            }],
        });
        if let Some(usage) = &chat.usage {
            body["usage"] = usage.clone();
        }
        Some(Stored {
            body: Bytes::from(body.to_string()),
            chat: Some(chat),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"deepseek-chat","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#;

    fn data_of(events: &[Bytes]) -> Vec<String> {
        events
            .iter()
            .map(|e| {
                let text = std::str::from_utf8(e).unwrap();
                assert!(text.ends_with("\n\n"), "{text:?}");
                text.trim_end().strip_prefix("data: ").unwrap().to_string()
            })
            .collect()
    }

    #[test]
    fn only_complete_successes_are_stored() {
        assert!(Stored::from_plain(Bytes::from(PLAIN)).is_some());
        let length = PLAIN.replace(r#""stop""#, r#""length""#);
        assert!(Stored::from_plain(Bytes::from(length)).is_some());
        for refused in [
            PLAIN.replace(r#""stop""#, r#""content_filter""#),
            PLAIN.replace(r#""stop""#, "null"),
            PLAIN.replace(r#""finish_reason":"stop""#, r#""x":1"#),
            r#"{"error":{"message":"overloaded","type":"server_error"}}"#.to_string(),
            r#"{"object":"chat.completion","choices":[]}"#.to_string(),
            PLAIN[..PLAIN.len() - 10].to_string(),
            "not json".to_string(),
        ] {
            assert_eq!(
                Stored::from_plain(Bytes::from(refused.clone())),
                None,
                "{refused}"
            );
        }
        let embeddings = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1]}],"usage":{"prompt_tokens":1,"total_tokens":1}}"#;
        let stored =
            Stored::from_plain(Bytes::from(embeddings)).expect("an embedding is a success");
        assert_eq!(stored.chat, None, "replayed plain only");
        assert_eq!(stored.replay(true), None);
    }

    #[test]
    fn a_plain_answer_replays_as_a_valid_chat_stream() {
        let stored = Stored::from_plain(Bytes::from(PLAIN)).unwrap();
        let data = data_of(&stored.replay(true).unwrap());
        assert_eq!(data.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "Hello there");
        assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[3]["choices"], json!([]));
        assert_eq!(chunks[3]["usage"]["completion_tokens"], 2);
        for c in &chunks {
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(c["id"], "chatcmpl-1");
            assert_eq!(c["model"], "deepseek-chat");
        }
        let without_usage = data_of(&stored.replay(false).unwrap());
        assert_eq!(without_usage.len(), data.len() - 1);
        assert!(!without_usage.iter().any(|d| d.contains("usage")));
    }

    #[test]
    fn tool_calls_are_stored_but_replayed_plain_only() {
        let tools = r#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"stop"}]}"#;
        let stored = Stored::from_plain(Bytes::from(tools)).unwrap();
        assert_eq!(stored.replay(false), None);
    }

    fn assemble(events: &[&str]) -> Option<Stored> {
        let mut a = Assembler::default();
        for e in events {
            a.push(e);
        }
        a.finish()
    }

    #[test]
    fn a_finished_stream_is_assembled_into_the_plain_answer() {
        let stored = assemble(&[
            r#"{"id":"s1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            r#"{"id":"s1","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#,
            r#"{"id":"s1","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}"#,
            r#"{"id":"s1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#,
            "[DONE]",
        ])
        .expect("stored");
        let body: Value = serde_json::from_slice(&stored.body).unwrap();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["choices"][0]["message"]["content"], "Hello");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["prompt_tokens"], 3);
        assert_eq!(body["created"], 7);
        // What is assembled replays as it came.
        let again = Stored::from_plain(stored.body.clone()).unwrap();
        assert_eq!(again.chat, stored.chat);
    }

    #[test]
    fn cut_errored_filtered_or_tool_streams_are_not_assembled() {
        let start =
            r#"{"id":"s","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#;
        assert_eq!(assemble(&[start]), None, "cut before a finish");
        assert_eq!(
            assemble(&[
                start,
                r#"{"error":{"message":"boom"}}"#,
                r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#
            ]),
            None,
            "an error event"
        );
        assert_eq!(
            assemble(&[
                start,
                r#"{"choices":[{"index":0,"delta":{},"finish_reason":"content_filter"}]}"#
            ]),
            None
        );
        assert_eq!(
            assemble(&[
                r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"f"}}]},"finish_reason":"stop"}]}"#
            ]),
            None
        );
        assert_eq!(
            assemble(&[
                start,
                r#"{"choices":[{"index":1,"delta":{"content":"x"},"finish_reason":"stop"}]}"#
            ]),
            None,
            "a second choice"
        );
        assert_eq!(
            assemble(&[
                start,
                "garbage",
                r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#
            ]),
            None
        );
    }
}
