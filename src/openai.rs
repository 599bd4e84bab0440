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

/// The raw text of a top-level field of a JSON object (the last, when the key repeats), found
/// without parsing any value: only the object's structure is followed. `None` when `json` is not
/// an object or lacks the key. The value is the caller's to parse. Small objects (a `usage`
/// object's fields) are read this way; an answer's `usage` is found by [`trailing_field`].
pub fn top_level_field<'a>(json: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let mut found = None;
    top_level_fields(json, |key, value| {
        if key_is(key, name) {
            found = Some(value);
        }
    })?;
    found
}

/// Calls `each(quoted key, raw value)` for every top-level field of the JSON object `json`, in
/// order; `None` when `json` is not a whole object.
pub fn top_level_fields<'a>(
    json: &'a [u8],
    mut each: impl FnMut(&'a [u8], &'a [u8]),
) -> Option<()> {
    let mut i = skip_whitespace(json, 0);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_whitespace(json, i + 1);
    if json.get(i) == Some(&b'}') {
        return Some(());
    }
    loop {
        if json.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(json, i)?;
        let key = &json[i..key_end];
        i = skip_whitespace(json, key_end);
        if json.get(i) != Some(&b':') {
            return None;
        }
        i = skip_whitespace(json, i + 1);
        let value_end = value_end(json, i)?;
        each(key, &json[i..value_end]);
        i = skip_whitespace(json, value_end);
        match json.get(i)? {
            b',' => i = skip_whitespace(json, i + 1),
            b'}' => return Some(()),
            _ => return None,
        }
    }
}

fn skip_whitespace(json: &[u8], mut i: usize) -> usize {
    while json
        .get(i)
        .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// Past the closing quote of the string opening at `start`.
fn string_end(json: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        let at = i + memchr::memchr2(b'"', b'\\', json.get(i..)?)?;
        if json[at] == b'"' {
            return Some(at + 1);
        }
        // A backslash escapes the next byte (`\uXXXX` has no quote or backslash after it).
        i = at + 2;
    }
}

/// Past the end of the value starting at `start`.
fn value_end(json: &[u8], start: usize) -> Option<usize> {
    let (open, close) = match json.get(start)? {
        b'"' => return string_end(json, start),
        b'{' => (b'{', b'}'),
        b'[' => (b'[', b']'),
        _ => {
            let len = json[start..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))?;
            return (len > 0).then_some(start + len);
        }
    };
    // In well-formed JSON the brackets of one kind balance on their own: outside strings,
    // only those of the value's kind need counting.
    let mut depth = 0usize;
    let mut i = start;
    loop {
        i += memchr::memchr3(b'"', open, close, json.get(i..)?)?;
        match json[i] {
            b'"' => {
                i = string_end(json, i)?;
                continue;
            }
            b if b == open => depth += 1,
            _ => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
        }
        i += 1;
    }
}

/// The raw text of the last top-level field `name` of the JSON object `json`, found by walking
/// its members backwards from the closing brace: only the members after the one found are
/// followed. An answer's `usage` comes at or near its end, so this reads a few dozen bytes where
/// [`top_level_field`] follows the whole answer. For a well-formed object it finds what
/// [`top_level_field`] finds; `None` when the walk meets anything but an object's structure.
pub fn trailing_field<'a>(json: &'a [u8], name: &str) -> Option<&'a [u8]> {
    // `at` is always the index of the delimiter (`}` or `,`) after the member in hand.
    let mut at = back_over_whitespace(json, json.len()).checked_sub(1)?;
    if json[at] != b'}' || json.get(skip_whitespace(json, 0)) != Some(&b'{') {
        return None;
    }
    loop {
        let value_end = back_over_whitespace(json, at);
        let value_start = value_start(json, value_end)?;
        let colon = back_over_whitespace(json, value_start).checked_sub(1)?;
        if json[colon] != b':' {
            return None;
        }
        let key_end = back_over_whitespace(json, colon);
        if json.get(key_end.checked_sub(1)?) != Some(&b'"') {
            return None;
        }
        let key_start = string_start(json, key_end - 1)?;
        if key_is(&json[key_start..key_end], name) {
            return Some(&json[value_start..value_end]);
        }
        at = back_over_whitespace(json, key_start).checked_sub(1)?;
        match json[at] {
            b',' => {}
            // The object's opening brace: no such field (or not an object, if text precedes).
            _ => return None,
        }
    }
}

/// The start of the whitespace run that ends at `end` (exclusive).
fn back_over_whitespace(json: &[u8], mut end: usize) -> usize {
    while end > 0 && matches!(json[end - 1], b' ' | b'\t' | b'\n' | b'\r') {
        end -= 1;
    }
    end
}

/// Whether the quote at `at` delimits a string: an escaped quote follows an odd run of
/// backslashes.
fn is_delimiter(json: &[u8], at: usize) -> bool {
    let backslashes = json[..at].iter().rev().take_while(|&&b| b == b'\\').count();
    backslashes % 2 == 0
}

/// The opening quote of the string whose closing quote is at `close`.
fn string_start(json: &[u8], close: usize) -> Option<usize> {
    let mut end = close;
    loop {
        let at = memchr::memrchr(b'"', &json[..end])?;
        if is_delimiter(json, at) {
            return Some(at);
        }
        end = at;
    }
}

/// The start of the value that ends at `end` (exclusive).
fn value_start(json: &[u8], end: usize) -> Option<usize> {
    let (open, close) = match json.get(end.checked_sub(1)?)? {
        b'"' => return string_start(json, end - 1),
        b'}' => (b'{', b'}'),
        b']' => (b'[', b']'),
        _ => {
            let start = json[..end]
                .iter()
                .rposition(|b| {
                    matches!(b, b',' | b':' | b'[' | b'{' | b' ' | b'\t' | b'\n' | b'\r')
                })
                .map_or(0, |p| p + 1);
            return (start < end).then_some(start);
        }
    };
    // As in `value_end`: outside strings, only the brackets of the value's kind need counting.
    let mut depth = 0usize;
    let mut i = end;
    loop {
        i = memchr::memrchr3(b'"', open, close, &json[..i])?;
        match json[i] {
            b'"' => i = string_start(json, i)?,
            b if b == close => depth += 1,
            _ => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
        }
    }
}

/// Whether the quoted JSON string `quoted` is `name`; escapes are decoded only when present.
pub fn key_is(quoted: &[u8], name: &str) -> bool {
    let inner = &quoted[1..quoted.len() - 1];
    if inner == name.as_bytes() {
        return true;
    }
    // An escape is longer than what it stands for: a key written no longer than `name` (and
    // not equal to it) cannot spell it.
    if inner.len() <= name.len() || !inner.contains(&b'\\') {
        return false;
    }
    serde_json::from_slice::<String>(quoted).is_ok_and(|key| key == name)
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

    /// A pseudo-random JSON value whose strings are full of quotes, backslashes and brackets.
    fn random_value(seed: &mut u64, depth: u32) -> serde_json::Value {
        fn next_of(seed: &mut u64, n: u64) -> u64 {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (*seed >> 33) % n
        }
        let next = |seed: &mut u64, n: u64| next_of(seed, n);
        const PIECES: [&str; 10] = ["a", "\"", "\\", "}", "]", "{", "[", ",", ":", "é\n"];
        let kind = if depth == 0 {
            next(seed, 4)
        } else {
            next(seed, 6)
        };
        match kind {
            0 => serde_json::Value::from(next(seed, 1000) as i64 - 500),
            1 => serde_json::Value::Bool(next(seed, 2) == 0),
            2 => serde_json::Value::Null,
            3 => (0..next(seed, 6))
                .map(|_| PIECES[next(seed, 10) as usize])
                .collect::<String>()
                .into(),
            4 => (0..next(seed, 4))
                .map(|_| random_value(seed, depth - 1))
                .collect::<Vec<_>>()
                .into(),
            _ => {
                let mut object = serde_json::Map::new();
                for _ in 0..next(seed, 4) {
                    let key = ["usage", "a\"b", "x\\", "}"][next(seed, 4) as usize];
                    object.insert(key.to_string(), random_value(seed, depth - 1));
                }
                serde_json::Value::Object(object)
            }
        }
    }

    #[test]
    fn the_trailing_field_is_the_top_level_field_of_any_well_formed_object() {
        let mut seed = 7;
        let mut found = 0;
        for _ in 0..6000 {
            let serde_json::Value::Object(object) = random_value(&mut seed, 4) else {
                continue;
            };
            let value = serde_json::Value::Object(object.clone());
            for text in [
                value.to_string(),
                serde_json::to_string_pretty(&value).unwrap(),
            ] {
                let text = format!(" \n{text}\t ");
                for name in ["usage", "a\"b", "x\\", "}", "absent"] {
                    let trailing = trailing_field(text.as_bytes(), name);
                    assert_eq!(
                        trailing,
                        top_level_field(text.as_bytes(), name),
                        "{text} {name}"
                    );
                    if let Some(raw) = trailing {
                        let parsed: serde_json::Value = serde_json::from_slice(raw).unwrap();
                        assert_eq!(Some(&parsed), object.get(name), "{text} {name}");
                        found += 1;
                    }
                }
            }
        }
        assert!(
            found > 2000,
            "only {found} fields found: the generator is too thin"
        );
        // Escaped keys are decoded; a key nested deeper never matches.
        assert_eq!(
            trailing_field(br#"{"\u0075sage":[7]}"#, "usage"),
            Some(&b"[7]"[..])
        );
        assert_eq!(trailing_field(br#"{"a":{"usage":1}}"#, "usage"), None);
        // Only the members after the one found are followed: a fault before it goes unseen,
        // a fault after it (or a body that is not an object) finds nothing.
        assert_eq!(
            trailing_field(br#"{"a":1 "usage":2}"#, "usage"),
            Some(&b"2"[..])
        );
        for broken in [
            &b""[..],
            b"}",
            b"[1]",
            b"{}",
            br#"{"usage":2 "a":1}"#,
            br#"x{"usage":1}"#,
            br#"{"usage":1]"#,
            br#"{"usage":{"prompt_tokens":1}"#,
            br#"{usage:1}"#,
            br#"{"usage" 1}"#,
            br#"{:1}"#,
        ] {
            assert_eq!(
                trailing_field(broken, "usage"),
                None,
                "{}",
                String::from_utf8_lossy(broken)
            );
        }
        // Every cut of an answer is walked without a panic.
        let answer = br#"{"id":"x","choices":[{"message":{"content":"a \"usage\": {} } ] , \\","usage":{"prompt_tokens":1}}}],"usage":{"prompt_tokens":3},"model":"m"}"#;
        for cut in 0..=answer.len() {
            for start in [0, 1, 5] {
                let _ = trailing_field(&answer[start.min(cut)..cut], "usage");
            }
        }
    }

    #[test]
    fn top_level_fields_are_found_by_structure_alone() {
        let answer = br#"{"id":"x","choices":[{"message":{"content":"a \"usage\": {} } ] , \\","usage":{"prompt_tokens":1}},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":13},"model":"m"}"#;
        assert_eq!(
            top_level_field(answer, "usage"),
            Some(&br#"{"prompt_tokens":3,"completion_tokens":13}"#[..])
        );
        assert_eq!(top_level_field(answer, "model"), Some(&br#""m""#[..]));
        assert_eq!(top_level_field(answer, "absent"), None);
        let spaced = b" {\n \"n\" : -1.5e3 ,\t\"usage\" :null , \"b\":true}\n";
        assert_eq!(top_level_field(spaced, "n"), Some(&b"-1.5e3"[..]));
        assert_eq!(top_level_field(spaced, "usage"), Some(&b"null"[..]));
        assert_eq!(top_level_field(spaced, "b"), Some(&b"true"[..]));
        // The last of repeated keys wins, as in a full parse; escaped keys are decoded.
        assert_eq!(
            top_level_field(br#"{"usage":1,"usage":2}"#, "usage"),
            Some(&b"2"[..])
        );
        assert_eq!(
            top_level_field(br#"{"\u0075sage":[7]}"#, "usage"),
            Some(&b"[7]"[..])
        );
        let mixed = br#"{"a":[{"b":"]}"},[[]],{"c":["{"]}],"o":{"x":[1,{"y":"}"}]},"usage":5}"#;
        assert_eq!(top_level_field(mixed, "usage"), Some(&b"5"[..]));
        assert_eq!(
            top_level_field(mixed, "o"),
            Some(&br#"{"x":[1,{"y":"}"}]}"#[..])
        );
        // A nested key never matches; what is not a whole object finds nothing.
        assert_eq!(top_level_field(br#"{"a":{"usage":1}}"#, "usage"), None);
        for broken in [
            &b""[..],
            b"[1]",
            b"{}",
            br#"{"usage""#,
            br#"{"usage":"#,
            br#"{"usage":{"prompt_tokens":1}"#,
            br#"{"usage":"open"#,
            br#"{"usage":12"#,
            br#"{usage:1}"#,
            br#"{"a":1 "usage":2}"#,
        ] {
            assert_eq!(
                top_level_field(broken, "usage"),
                None,
                "{}",
                String::from_utf8_lossy(broken)
            );
        }
        // What it finds is what a full parse finds.
        let full: serde_json::Value = serde_json::from_slice(answer).unwrap();
        let raw: serde_json::Value =
            serde_json::from_slice(top_level_field(answer, "usage").unwrap()).unwrap();
        assert_eq!(raw, full["usage"]);
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
