//! The prompts a benchmark sends: a built-in set (code, reasoning, long context, CJK) or the
//! chat requests of a JSONL file, and the request body each target gets for one of them.

use bytes::Bytes;
use serde_json::{json, Map, Value};

/// One prompt: a name for the report and the chat request (without `model`).
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    pub name: String,
    pub request: Map<String, Value>,
}

fn user(name: &str, system: Option<&str>, text: &str) -> Prompt {
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": text}));
    let mut request = Map::new();
    request.insert("messages".into(), Value::Array(messages));
    Prompt {
        name: name.to_string(),
        request,
    }
}

/// A few thousand tokens of a made-up service log with one fact to find, so the long-context
/// prompt measures reading a long prompt, the same on every run.
fn long_document() -> String {
    let services = ["checkout", "search", "billing", "auth", "catalog", "ledger"];
    let mut text = String::with_capacity(16 * 1024);
    for i in 0..160u32 {
        let service = services[i as usize % services.len()];
        let line = if i == 117 {
            format!("2026-05-14T03:{:02}:11Z {service} ERROR pool exhausted: max_connections=64 reached, request id r-{i:04} dropped\n", i % 60)
        } else {
            format!(
                "2026-05-14T03:{:02}:{:02}Z {service} INFO handled request r-{i:04} in {} ms (cache {})\n",
                i % 60,
                (i * 7) % 60,
                20 + (i * 13) % 180,
                if i % 3 == 0 { "hit" } else { "miss" }
            )
        };
        text.push_str(&line);
    }
    text
}

/// The built-in prompts.
pub fn builtin() -> Vec<Prompt> {
    vec![
        user(
            "code",
            Some("You are a senior software engineer. Answer with code and a short explanation."),
            "Write a Python decorator that rate-limits a function to N calls per second \
             using a token bucket, safe to use from several threads.",
        ),
        user(
            "reasoning",
            None,
            "A train leaves at 09:40 and travels 210 km at 84 km/h, then waits 12 minutes, then \
             travels 96 km at 64 km/h. At what time does it arrive? Show the steps briefly.",
        ),
        user(
            "long-context",
            Some("You read logs carefully and answer only from them."),
            &format!(
                "{}\nWhich service logged an ERROR, at what time, and why? Quote the line.",
                long_document()
            ),
        ),
        user(
            "cjk",
            None,
            "请用三句话解释什么是分布式系统中的 CAP 定理，并举一个实际的例子。",
        ),
        user(
            "summary",
            None,
            "Summarise the difference between JWT and OAuth 2.0 in four bullet points.",
        ),
    ]
}

/// Reads a JSONL file of chat requests (one JSON object per line, blank lines skipped); each
/// needs a `messages` array. A `model` in the file is replaced by each target's model.
pub fn from_jsonl(text: &str) -> Result<Vec<Prompt>, String> {
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = i + 1;
        let value: Value =
            serde_json::from_str(line).map_err(|e| format!("line {at}: not JSON: {e}"))?;
        let Value::Object(request) = value else {
            return Err(format!(
                "line {at}: expected a JSON object (a chat request)"
            ));
        };
        if !request.get("messages").is_some_and(Value::is_array) {
            return Err(format!(
                "line {at}: a chat request needs a `messages` array"
            ));
        }
        prompts.push(Prompt {
            name: format!("line {at}"),
            request,
        });
    }
    if prompts.is_empty() {
        return Err("no chat requests in the file".into());
    }
    Ok(prompts)
}

/// How every request of a run is shaped besides its prompt.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub stream: bool,
    /// Set on every request when given on the command line.
    pub max_tokens: Option<u64>,
    /// Set on requests that ask for no limit of their own.
    pub default_max_tokens: u64,
}

/// The body sent to a target: the prompt's request naming `model`, streaming (with usage in
/// the stream) or not, with a token limit.
pub fn body(prompt: &Prompt, model: &str, shape: Shape) -> Bytes {
    let mut request = prompt.request.clone();
    request.insert("model".into(), json!(model));
    request.insert("stream".into(), json!(shape.stream));
    if shape.stream {
        request.insert("stream_options".into(), json!({"include_usage": true}));
    } else {
        request.remove("stream_options");
    }
    let has_limit =
        request.contains_key("max_tokens") || request.contains_key("max_completion_tokens");
    match shape.max_tokens {
        Some(n) => {
            request.remove("max_completion_tokens");
            request.insert("max_tokens".into(), json!(n));
        }
        None if !has_limit => {
            request.insert("max_tokens".into(), json!(shape.default_max_tokens));
        }
        None => {}
    }
    Bytes::from(Value::Object(request).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_prompts_cover_code_reasoning_long_context_and_cjk() {
        let prompts = builtin();
        let names: Vec<&str> = prompts.iter().map(|p| p.name.as_str()).collect();
        for kind in ["code", "reasoning", "long-context", "cjk"] {
            assert!(names.contains(&kind), "{kind}");
        }
        let long = &prompts[names.iter().position(|n| *n == "long-context").unwrap()];
        let estimate = crate::routing::tokens::estimate_prompt(long.request.get("messages"), None);
        assert!(estimate > 3000, "long context is long: {estimate} tokens");
    }

    #[test]
    fn the_body_names_the_target_model_and_asks_for_usage_in_streams() {
        let prompt = &builtin()[0];
        let shape = Shape {
            stream: true,
            max_tokens: None,
            default_max_tokens: 256,
        };
        let v: Value = serde_json::from_slice(&body(prompt, "deepseek-chat", shape)).unwrap();
        assert_eq!(v["model"], "deepseek-chat");
        assert_eq!(v["stream"], true);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["max_tokens"], 256);
    }

    #[test]
    fn jsonl_requests_keep_their_fields_and_their_limit_unless_told() {
        let prompts = from_jsonl(
            "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":9,\"temperature\":0}\n\n{\"model\":\"x\",\"messages\":[]}\n",
        )
        .unwrap();
        assert_eq!(prompts.len(), 2);
        assert_eq!(prompts[1].name, "line 3");
        let shape = Shape {
            stream: false,
            max_tokens: None,
            default_max_tokens: 256,
        };
        let v: Value = serde_json::from_slice(&body(&prompts[0], "m", shape)).unwrap();
        assert_eq!(
            (v["max_tokens"].as_u64(), v["temperature"].as_u64()),
            (Some(9), Some(0))
        );
        let told = Shape {
            max_tokens: Some(32),
            ..shape
        };
        let v: Value = serde_json::from_slice(&body(&prompts[1], "m", told)).unwrap();
        assert_eq!(
            (v["model"].as_str(), v["max_tokens"].as_u64()),
            (Some("m"), Some(32))
        );
        for bad in ["[1]", "{\"prompt\":\"x\"}", "nope", ""] {
            assert!(from_jsonl(bad).is_err(), "{bad}");
        }
    }
}
