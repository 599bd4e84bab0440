//! What makes two requests the same request for the cache: the route they name, the endpoint,
//! and a canonical form of every body field that shapes the answer. Key order, whitespace and
//! the fields that only say how the answer is delivered or who asked (`stream`,
//! `stream_options`, `user`, `metadata`) do not change the key.

use serde_json::Value;

use crate::openai::RequestBody;

/// Fields that do not shape the answer: how it is delivered, and who asked.
const IGNORED: &[&str] = &["model", "stream", "stream_options", "user", "metadata"];

/// A request's cache key: a SHA-256 digest of its canonical form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key([u8; 32]);

impl Key {
    /// The key of `body` sent to `path` for `route`. `None` when a field is not valid JSON,
    /// which the request parser has refused already.
    pub fn of(route: &str, path: &str, body: &RequestBody<'_>) -> Option<Key> {
        let mut fields: Vec<(&str, Value)> = Vec::new();
        for (name, raw) in body.fields() {
            if IGNORED.contains(&name) {
                continue;
            }
            // serde_json's maps are ordered by key, so a value written back is canonical.
            let value: Value = serde_json::from_str(raw.get()).ok()?;
            if value.is_null() {
                // `"seed": null` asks for the same answer as no seed at all.
                continue;
            }
            fields.push((name, value));
        }
        fields.sort_by(|a, b| a.0.cmp(b.0));
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [route, path] {
            digest.update(&(part.len() as u64).to_le_bytes());
            digest.update(part.as_bytes());
        }
        for (name, value) in &fields {
            let value = value.to_string();
            digest.update(&(name.len() as u64).to_le_bytes());
            digest.update(name.as_bytes());
            digest.update(&(value.len() as u64).to_le_bytes());
            digest.update(value.as_bytes());
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.finish().as_ref());
        Some(Key(key))
    }

    /// The key as hex, for a shared tier's key name and for logs.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Which requests a route caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Only requests that ask for a repeatable answer: `temperature` 0, or a `seed`.
    Deterministic,
    /// Every request.
    Always,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Deterministic => "deterministic",
            Mode::Always => "always",
        }
    }

    /// The request may be answered from, and stored in, the cache.
    pub fn admits(self, body: &RequestBody<'_>) -> bool {
        match self {
            Mode::Always => true,
            Mode::Deterministic => {
                let number = |name| {
                    body.field(name)
                        .and_then(|v| serde_json::from_str::<Value>(v.get()).ok())
                        .and_then(|v| v.as_f64())
                };
                number("temperature") == Some(0.0) || number("seed").is_some()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(route: &str, body: &str) -> Key {
        let parsed = RequestBody::parse(body.as_bytes()).expect("a request body");
        Key::of(route, "/v1/chat/completions", &parsed).expect("a key")
    }

    #[test]
    fn order_whitespace_and_delivery_fields_do_not_change_the_key() {
        let base = key(
            "deepseek-v3.2",
            r#"{"model":"deepseek-v3.2","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
        );
        for same in [
            r#"{ "temperature" : 0, "messages" : [ { "content" : "hi", "role" : "user" } ], "model" : "deepseek-v3.2" }"#,
            r#"{"model":"deepseek-v3.2","messages":[{"role":"user","content":"hi"}],"temperature":0,"stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"model":"deepseek-v3.2","messages":[{"role":"user","content":"hi"}],"temperature":0,"user":"alice","metadata":{"team":"a"}}"#,
            r#"{"model":"deepseek-v3.2","messages":[{"role":"user","content":"hi"}],"temperature":0,"seed":null}"#,
        ] {
            assert_eq!(key("deepseek-v3.2", same), base, "{same}");
        }
    }

    #[test]
    fn every_field_that_shapes_the_answer_changes_the_key() {
        let base = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let base_key = key("m", base);
        for different in [
            r#"{"model":"m","messages":[{"role":"user","content":"hi!"}]}"#,
            r#"{"model":"m","messages":[{"role":"system","content":"hi"}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"top_p":0.5}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"seed":7}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stop":["\n"]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"n":2}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f"}}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"tool_choice":"none"}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_object"}}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"logit_bias":{"50256":-100}}"#,
        ] {
            assert_ne!(key("m", different), base_key, "{different}");
        }
        assert_ne!(
            key("other-route", base),
            base_key,
            "the route is part of the key"
        );
        let parsed = RequestBody::parse(base.as_bytes()).unwrap();
        assert_ne!(
            Key::of("m", "/v1/completions", &parsed),
            Some(base_key),
            "so is the endpoint"
        );
    }

    #[test]
    fn deterministic_mode_admits_temperature_zero_or_a_seed_only() {
        let admits =
            |body: &str| Mode::Deterministic.admits(&RequestBody::parse(body.as_bytes()).unwrap());
        assert!(admits(r#"{"model":"m","temperature":0}"#));
        assert!(admits(r#"{"model":"m","temperature":0.0}"#));
        assert!(admits(r#"{"model":"m","temperature":0.7,"seed":42}"#));
        assert!(!admits(r#"{"model":"m","temperature":0.7}"#));
        assert!(!admits(r#"{"model":"m"}"#), "the default temperature is 1");
        assert!(!admits(r#"{"model":"m","seed":null}"#));
        assert!(!admits(r#"{"model":"m","temperature":"0"}"#));
        let always = RequestBody::parse(br#"{"model":"m","temperature":0.7}"#).unwrap();
        assert!(Mode::Always.admits(&always));
    }
}
