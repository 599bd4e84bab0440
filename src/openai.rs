//! The small part of the OpenAI wire format the sidecar needs: the routing fields of a request
//! body, rewriting its `model` while forwarding every other field byte for byte, and the model list.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

/// A JSON request body split into its top-level fields, values left unparsed.
pub struct RequestBody<'a> {
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
    /// The `model` field, when present.
    pub model: Option<Cow<'a, str>>,
    pub stream: bool,
}

struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

/// A string borrowed from the input when it has no escapes, owned otherwise.
struct CowStr<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;
        impl<'de> Visitor<'de> for StrVisitor {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_string())))
            }
        }
        deserializer.deserialize_str(StrVisitor)
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(CowStr(key)) = map.next_key::<CowStr<'de>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    fields.push((key, value));
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// Why a request body cannot be served, in words a client can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not JSON, or JSON but not an object: a pass-through call may still carry it (an upload).
    #[error("{0}")]
    NotAnObject(String),
    /// A JSON object the sidecar refuses to forward.
    #[error("{0}")]
    Invalid(String),
}

impl BodyError {
    fn invalid(message: &str) -> BodyError {
        BodyError::Invalid(message.to_string())
    }
}

/// A top-level key that appears twice (compared after unescaping), if any.
fn duplicate_key<'f>(fields: &'f [(Cow<'_, str>, &RawValue)]) -> Option<&'f str> {
    let mut keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_ref()).collect();
    keys.sort_unstable();
    keys.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

impl<'a> RequestBody<'a> {
    /// Parses a request body; the error says what is wrong in words a client can act on.
    pub fn parse(bytes: &'a [u8]) -> Result<RequestBody<'a>, BodyError> {
        let Fields(fields) = serde_json::from_slice(bytes).map_err(|e| {
            BodyError::NotAnObject(format!("the request body is not a valid JSON object: {e}"))
        })?;
        if let Some(key) = duplicate_key(&fields) {
            // The provider may read the other copy: the sidecar would route, price and budget
            // by one value and the provider bill by another.
            return Err(BodyError::Invalid(format!(
                "the request body has the key `{key}` more than once; send each field once"
            )));
        }
        let mut model = None;
        let mut stream = false;
        for (key, value) in &fields {
            match key.as_ref() {
                "model" => {
                    model = Some(
                        serde_json::from_str::<CowStr<'a>>(value.get())
                            .map(|CowStr(s)| s)
                            .map_err(|_| BodyError::invalid("`model` must be a string"))?,
                    )
                }
                "stream" => {
                    stream = serde_json::from_str::<Option<bool>>(value.get())
                        .map_err(|_| BodyError::invalid("`stream` must be a boolean"))?
                        .unwrap_or(false)
                }
                _ => {}
            }
        }
        Ok(RequestBody {
            fields,
            model,
            stream,
        })
    }

    /// The body with `model` replaced; every other field is copied verbatim, in order.
    pub fn with_model(&self, model: &str) -> Bytes {
        self.render(model, &[])
    }

    /// The request's `stream_options` with `include_usage: true` added, as raw JSON: the override
    /// that makes a stream end with its usage.
    pub fn stream_options_with_usage(&self) -> String {
        let mut options = self
            .field("stream_options")
            .and_then(|o| serde_json::from_str::<serde_json::Value>(o.get()).ok())
            .filter(serde_json::Value::is_object)
            .unwrap_or_else(|| serde_json::json!({}));
        options["include_usage"] = serde_json::Value::Bool(true);
        options.to_string()
    }

    /// The raw JSON of a top-level field.
    /// Every top-level field, in the order the client wrote them.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &'a RawValue)> + '_ {
        self.fields.iter().map(|(k, v)| (k.as_ref(), *v))
    }

    pub fn field(&self, name: &str) -> Option<&'a RawValue> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
    }

    /// The body with `model` replaced and each `(name, raw JSON)` override replacing the field
    /// of that name (or appended when absent); every other field is copied verbatim, in order.
    pub fn render(&self, model: &str, overrides: &[(&str, &str)]) -> Bytes {
        let size: usize = self
            .fields
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>()
            + overrides
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>();
        let mut out = Vec::with_capacity(size + model.len() + 2);
        out.push(b'{');
        let mut first = true;
        let mut field = |out: &mut Vec<u8>, key: &str, raw: &[u8]| {
            if !first {
                out.push(b',');
            }
            first = false;
            write_json_string(out, key);
            out.push(b':');
            out.extend_from_slice(raw);
        };
        let mut model_json = Vec::with_capacity(model.len() + 2);
        write_json_string(&mut model_json, model);
        for (key, value) in &self.fields {
            if key == "model" {
                field(&mut out, key, &model_json);
            } else if let Some((_, raw)) = overrides.iter().find(|(k, _)| k == key) {
                field(&mut out, key, raw.as_bytes());
            } else {
                field(&mut out, key, value.get().as_bytes());
            }
        }
        for (key, raw) in overrides {
            if !self.fields.iter().any(|(k, _)| k == key) {
                field(&mut out, key, raw.as_bytes());
            }
        }
        out.push(b'}');
        Bytes::from(out)
    }
}

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// `GET /v1/models` in the OpenAI list format.
pub fn model_list(ids: &[String], created: u64) -> serde_json::Value {
    json!({
        "object": "list",
        "data": ids.iter().map(|id| model_object(id, created)).collect::<Vec<_>>(),
    })
}

pub fn model_object(id: &str, created: u64) -> serde_json::Value {
    json!({ "id": id, "object": "model", "created": created, "owned_by": "llm-sidecar" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_top_level_key_is_refused_naming_it_in_either_order() {
        for (body, key) in [
            (
                r#"{"model":"gpt-4.1","model":"deepseek-v3.2","messages":[]}"#,
                "model",
            ),
            (
                r#"{"model":"deepseek-v3.2","messages":[],"model":"gpt-4.1"}"#,
                "model",
            ),
            (r#"{"model":"m","stream":true,"stream":false}"#, "stream"),
            (
                r#"{"model":"m","max_tokens":1,"max_tokens":100000}"#,
                "max_tokens",
            ),
            (r#"{"model":"m","user":"a","user":"b"}"#, "user"),
            (r#"{"model":"m","messages":[],"messages":[]}"#, "messages"),
            (r#"{"model":"m","x-any":1,"x-any":1}"#, "x-any"),
            // The same key spelled with an escape is still the same key.
            (r#"{"model":"a","mod\u0065l":"b"}"#, "model"),
        ] {
            let err = RequestBody::parse(body.as_bytes()).err().expect(body);
            assert!(
                err.to_string().contains(&format!("`{key}` more than once")),
                "{body}: {err}"
            );
        }
        // Keys that are equal only inside nested objects are the provider's business.
        let nested = r#"{"model":"m","messages":[{"role":"user","content":"a"},{"role":"user","content":"b"}]}"#;
        assert!(RequestBody::parse(nested.as_bytes()).is_ok());
    }

    #[test]
    fn rewrites_model_and_keeps_everything_else_verbatim() {
        let body = br#"{"messages":[{"role":"user","content":"hi \u00e9"}],"model":"deepseek-chat","temperature":0.70000000000000001,"stream":true,"x":{"nested":[1,2]}}"#;
        let parsed = RequestBody::parse(body).unwrap();
        assert_eq!(parsed.model.as_deref(), Some("deepseek-chat"));
        assert!(parsed.stream);
        let out = parsed.with_model("deepseek-v3.2");
        let text = std::str::from_utf8(&out).unwrap();
        assert_eq!(
            text,
            r#"{"messages":[{"role":"user","content":"hi \u00e9"}],"model":"deepseek-v3.2","temperature":0.70000000000000001,"stream":true,"x":{"nested":[1,2]}}"#
        );
    }

    #[test]
    fn bad_bodies_are_explained() {
        for (body, needle) in [
            (&b"not json"[..], "not a valid JSON object"),
            (b"[1,2]", "not a valid JSON object"),
            (br#"{"model": 5}"#, "`model` must be a string"),
            (
                br#"{"model": "m", "stream": "yes"}"#,
                "`stream` must be a boolean",
            ),
            (br#"{"model": "m""#, "not a valid JSON object"),
        ] {
            let err = RequestBody::parse(body).err().unwrap();
            assert!(err.to_string().contains(needle), "{err}");
        }
        let parsed = RequestBody::parse(br#"{"stream": null}"#).unwrap();
        assert_eq!(parsed.model, None);
        assert!(!parsed.stream);
    }

    #[test]
    fn overrides_replace_or_append_fields() {
        let parsed = RequestBody::parse(br#"{"model":"a","stream":true,"messages":[1]}"#).unwrap();
        let out = parsed.render(
            "b",
            &[
                ("messages", "[2]"),
                ("stream_options", r#"{"include_usage":true}"#),
            ],
        );
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"b","stream":true,"messages":[2],"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(parsed.field("messages").map(|v| v.get()), Some("[1]"));
    }

    #[test]
    fn keys_with_escapes_survive() {
        let parsed = RequestBody::parse(br#"{"a\"b":1,"model":"m"}"#).unwrap();
        let out = parsed.with_model("n");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["a\"b"], 1);
        assert_eq!(v["model"], "n");
    }
}
