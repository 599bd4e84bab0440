//! Prompt size estimate and truncation to a context window.
//!
//! The providers behind one route use different tokenizers (DeepSeek, Kimi, Gemini, GPT), so no
//! single real tokenizer is right for all of them. The estimate is deliberately conservative:
//! ASCII text counts one token per 4 bytes (BPE tokenizers average 3.5–4.5 characters per token
//! on English and code), every other character counts as one token (CJK text is close to one
//! token per character on these models), and each message adds 4 tokens of framing.

use serde_json::Value;

const MESSAGE_OVERHEAD: u64 = 4;

pub fn estimate_text(text: &str) -> u64 {
    let (ascii, other) = text.chars().fold((0u64, 0u64), |(a, o), c| {
        if c.is_ascii() {
            (a + 1, o)
        } else {
            (a, o + 1)
        }
    });
    ascii.div_ceil(4) + other
}

/// Text of a message's `content`: a string, or the text parts of a content array.
fn content_tokens(content: &Value) -> u64 {
    match content {
        Value::String(s) => estimate_text(s),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p.get("text") {
                Some(Value::String(s)) => estimate_text(s),
                // Images and audio: a flat allowance rather than guessing their encoding.
                _ => 85,
            })
            .sum(),
        Value::Null => 0,
        other => estimate_text(&other.to_string()),
    }
}

pub fn estimate_message(message: &Value) -> u64 {
    let tool_calls = message
        .get("tool_calls")
        .map(|t| estimate_text(&t.to_string()))
        .unwrap_or(0);
    MESSAGE_OVERHEAD + message.get("content").map(content_tokens).unwrap_or(0) + tool_calls
}

/// Estimated prompt tokens of a chat `messages` array, or of a completions/embeddings `prompt`
/// or `input`.
pub fn estimate_prompt(messages: Option<&Value>, prompt: Option<&Value>) -> u64 {
    let from_messages: u64 = messages
        .and_then(Value::as_array)
        .map(|m| m.iter().map(estimate_message).sum())
        .unwrap_or(0);
    from_messages + prompt.map(content_tokens).unwrap_or(0)
}

/// Drops the oldest non-system messages until the estimate fits `budget`, always keeping the
/// system messages and the last message. Returns how many were dropped, or `None` when even
/// that does not fit.
pub fn truncate_to_fit(messages: &mut Vec<Value>, budget: u64) -> Option<usize> {
    let mut total: u64 = messages.iter().map(estimate_message).sum();
    let mut dropped = 0;
    while total > budget {
        let last = messages.len().checked_sub(1)?;
        let oldest = messages.iter().enumerate().position(|(i, m)| {
            i < last && m.get("role").and_then(Value::as_str) != Some("system")
        })?;
        total -= estimate_message(&messages[oldest]);
        messages.remove(oldest);
        dropped += 1;
    }
    Some(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn estimates_ascii_and_cjk_conservatively() {
        assert_eq!(estimate_text("abcd"), 1);
        assert_eq!(estimate_text("abcde"), 2);
        assert_eq!(estimate_text("你好世界"), 4);
        let messages = json!([{"role": "user", "content": "x".repeat(400)}]);
        assert_eq!(estimate_prompt(Some(&messages), None), 104);
        let parts = json!([{"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image_url"}]}]);
        assert_eq!(estimate_prompt(Some(&parts), None), 4 + 1 + 85);
    }

    #[test]
    fn truncation_drops_oldest_non_system_messages_and_keeps_the_last() {
        let mut messages: Vec<Value> = vec![
            json!({"role": "system", "content": "rules"}),
            json!({"role": "user", "content": "a".repeat(400)}),
            json!({"role": "assistant", "content": "b".repeat(400)}),
            json!({"role": "user", "content": "question"}),
        ];
        let dropped = truncate_to_fit(&mut messages, 150).unwrap();
        assert_eq!(dropped, 1);
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[0]["role"], "system");
        assert_eq!(messages[1]["content"], "b".repeat(400));
        assert_eq!(messages[2]["content"], "question");

        let mut tiny = vec![json!({"role": "user", "content": "c".repeat(4000)})];
        assert_eq!(
            truncate_to_fit(&mut tiny, 10),
            None,
            "the last message alone does not fit"
        );
    }
}
