//! What a call cost: the usage a provider reported, priced at the answering target's price, and
//! what the same usage would have cost at the route's official price.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::config::Price;

/// Tokens a provider reported for one answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    /// Input tokens served from the provider's prompt cache (a part of `input`).
    pub cached_input: u64,
}

impl Usage {
    /// Adds a continuation's usage; saturating, since the counts are the provider's numbers.
    pub fn add(&mut self, other: Usage) {
        self.input = self.input.saturating_add(other.input);
        self.output = self.output.saturating_add(other.output);
        self.cached_input = self.cached_input.saturating_add(other.cached_input);
    }
}

/// The `usage` member of an answer or a stream chunk, read in place: no JSON tree is built.
/// Any JSON value reads, so an odd `usage` cannot make the rest of its answer unreadable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageMember {
    /// The member is a JSON object (a stream's usage chunk has one and no choices).
    pub object: bool,
    /// What an OpenAI-style `usage` object reports: `prompt_tokens`, `completion_tokens` (absent
    /// for embeddings) and cached input as OpenAI (`prompt_tokens_details.cached_tokens`) or
    /// DeepSeek (`prompt_cache_hit_tokens`) report it. A count that is not a non-negative
    /// integer is absent, as is a `prompt_tokens_details` that is not an object; without
    /// `prompt_tokens` there is no usage. A repeated member counts with its last value.
    pub usage: Option<Usage>,
}

/// The members of a `usage` object the sidecar reads.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum UsageField {
    PromptTokens,
    CompletionTokens,
    PromptTokensDetails,
    PromptCacheHitTokens,
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum DetailsField {
    CachedTokens,
    #[serde(other)]
    Other,
}

/// A token count: a non-negative integer; any other value reads as `Count(None)`.
#[derive(Default)]
struct Count(Option<u64>);

/// `prompt_tokens_details`: its `cached_tokens`; any value that is not an object reads as
/// `Details(None)`.
#[derive(Default)]
struct Details(Option<u64>);

/// A value read from any JSON: what an integer or an object says, and the default for every
/// other value.
trait Lenient: Default {
    fn from_u64(_: u64) -> Self {
        Self::default()
    }
    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Self::default())
    }
}

impl Lenient for Count {
    fn from_u64(count: u64) -> Self {
        Count(Some(count))
    }
}

impl Lenient for Details {
    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut cached = None;
        while let Some(field) = map.next_key()? {
            match field {
                DetailsField::CachedTokens => cached = map.next_value::<Count>()?.0,
                DetailsField::Other => drop(map.next_value::<IgnoredAny>()?),
            }
        }
        Ok(Details(cached))
    }
}

impl Lenient for UsageMember {
    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let (mut input, mut output, mut cached, mut cache_hit) = (None, None, None, None);
        while let Some(field) = map.next_key()? {
            match field {
                UsageField::PromptTokens => input = map.next_value::<Count>()?.0,
                UsageField::CompletionTokens => output = map.next_value::<Count>()?.0,
                UsageField::PromptTokensDetails => cached = map.next_value::<Details>()?.0,
                UsageField::PromptCacheHitTokens => cache_hit = map.next_value::<Count>()?.0,
                UsageField::Other => drop(map.next_value::<IgnoredAny>()?),
            }
        }
        let usage = input.map(|input| Usage {
            input,
            output: output.unwrap_or(0),
            cached_input: cached.or(cache_hit).unwrap_or(0).min(input),
        });
        Ok(UsageMember {
            object: true,
            usage,
        })
    }
}

/// Reads any JSON value as `T` (see [`Lenient`]).
fn lenient<'de, T: Lenient, D: Deserializer<'de>>(deserializer: D) -> Result<T, D::Error> {
    struct Any<T>(PhantomData<T>);
    impl<'de, T: Lenient> Visitor<'de> for Any<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_u64<E>(self, v: u64) -> Result<T, E> {
            Ok(T::from_u64(v))
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::from_map(map)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(T::default())
        }
        fn visit_bool<E>(self, _: bool) -> Result<T, E> {
            Ok(T::default())
        }
        fn visit_i64<E>(self, _: i64) -> Result<T, E> {
            Ok(T::default())
        }
        fn visit_f64<E>(self, _: f64) -> Result<T, E> {
            Ok(T::default())
        }
        fn visit_str<E>(self, _: &str) -> Result<T, E> {
            Ok(T::default())
        }
        fn visit_unit<E>(self) -> Result<T, E> {
            Ok(T::default())
        }
    }
    deserializer.deserialize_any(Any(PhantomData))
}

impl<'de> Deserialize<'de> for UsageMember {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        lenient(deserializer)
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        lenient(deserializer)
    }
}

impl<'de> Deserialize<'de> for Details {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        lenient(deserializer)
    }
}

impl Price {
    /// USD for `usage`; cached input at the cached price when the target has one.
    pub fn cost(&self, usage: Usage) -> f64 {
        let cached = usage.cached_input.min(usage.input);
        let fresh = usage.input - cached;
        let cached_price = self.cached_input.unwrap_or(self.input);
        (fresh as f64 * self.input
            + cached as f64 * cached_price
            + usage.output as f64 * self.output)
            / 1_000_000.0
    }
}

/// The price of one answer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Bill {
    /// USD paid; `None` when the answering target has no price.
    pub cost: Option<f64>,
    /// USD the same usage costs at the route's official price; `None` without one.
    pub official: Option<f64>,
}

impl Bill {
    pub fn new(usage: Usage, paid: Option<&Price>, official: Option<&Price>) -> Bill {
        Bill {
            cost: paid.map(|p| p.cost(usage)),
            official: official.map(|p| p.cost(usage)),
        }
    }

    /// Official price minus what was paid, when both are known.
    pub fn savings(&self) -> Option<f64> {
        Some(self.official? - self.cost?)
    }

    pub fn add(&mut self, other: Bill) {
        fn sum(a: Option<f64>, b: Option<f64>) -> Option<f64> {
            match (a, b) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
            }
        }
        self.cost = sum(self.cost, other.cost);
        self.official = sum(self.official, other.official);
    }
}

/// A USD amount for a header or a log line: up to 9 decimals, no trailing zeros. Printed as
/// whole nano-dollars: formatting the float itself to 9 places costs about twice as much, on
/// every priced answer.
pub fn format_usd(usd: f64) -> String {
    let nanos = (usd.abs() * 1e9).round() as u64;
    let sign = if usd < 0.0 && nanos > 0 { "-" } else { "" };
    let mut text = format!(
        "{sign}{}.{:09}",
        nanos / 1_000_000_000,
        nanos % 1_000_000_000
    );
    let kept = text.trim_end_matches('0').trim_end_matches('.').len();
    text.truncate(kept);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn usage_of(value: serde_json::Value) -> Option<Usage> {
        serde_json::from_value::<UsageMember>(value).unwrap().usage
    }

    #[test]
    fn playbook_prices() {
        // The migration playbook: relay DeepSeek V3.2 $0.21 / $0.42, official $0.50 / $1.50.
        let relay = Price {
            input: 0.21,
            output: 0.42,
            cached_input: None,
        };
        let official = Price {
            input: 0.50,
            output: 1.50,
            cached_input: None,
        };
        let usage = Usage {
            input: 1_000_000,
            output: 1_000_000,
            cached_input: 0,
        };
        let bill = Bill::new(usage, Some(&relay), Some(&official));
        assert!((bill.cost.unwrap() - 0.63).abs() < 1e-12);
        assert!((bill.savings().unwrap() - 1.37).abs() < 1e-12);
        // Output alone: 0.42 against 1.50 is the playbook's 72 % discount.
        let out = Usage {
            input: 0,
            output: 1_000_000,
            cached_input: 0,
        };
        let b = Bill::new(out, Some(&relay), Some(&official));
        assert!((1.0 - b.cost.unwrap() / b.official.unwrap() - 0.72).abs() < 1e-9);
    }

    #[test]
    fn cached_input_is_billed_at_the_cached_price() {
        let price = Price {
            input: 1.0,
            output: 2.0,
            cached_input: Some(0.1),
        };
        let usage = usage_of(json!({
            "prompt_tokens": 1000, "completion_tokens": 10,
            "prompt_tokens_details": {"cached_tokens": 800}
        }))
        .unwrap();
        assert_eq!(usage.cached_input, 800);
        let expected = (200.0 * 1.0 + 800.0 * 0.1 + 10.0 * 2.0) / 1e6;
        assert!((price.cost(usage) - expected).abs() < 1e-15);
        let deepseek = usage_of(json!({
            "prompt_tokens": 50, "completion_tokens": 5, "prompt_cache_hit_tokens": 40
        }))
        .unwrap();
        assert_eq!(deepseek.cached_input, 40);
    }

    #[test]
    fn embeddings_and_missing_usage() {
        let u = usage_of(json!({"prompt_tokens": 8, "total_tokens": 8})).unwrap();
        assert_eq!((u.input, u.output), (8, 0));
        assert_eq!(usage_of(json!(null)), None);
        assert_eq!(Bill::new(u, None, None).savings(), None);
    }

    #[test]
    fn usd_text() {
        assert_eq!(format_usd(0.00063), "0.00063");
        assert_eq!(format_usd(1.0), "1");
        assert_eq!(format_usd(0.0), "0");
        assert_eq!(format_usd(12.5), "12.5");
        assert_eq!(format_usd(0.00000609), "0.00000609");
        assert_eq!(format_usd(-0.25), "-0.25");
        assert_eq!(format_usd(0.0000000014), "0.000000001");
        assert_eq!(format_usd(1234.5678901234), "1234.567890123");
        assert_eq!(format_usd(100.0), "100");
        assert_eq!(format_usd(-0.0000000001), "0");
        assert_eq!(format_usd(0.1 + 0.2), "0.3");
    }

    #[test]
    fn usage_follows_the_reading_rules() {
        let usage = |input, output, cached_input| {
            Some(Usage {
                input,
                output,
                cached_input,
            })
        };
        for (text, want) in [
            (
                r#"{"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13}"#,
                usage(8, 5, 0),
            ),
            (r#"{"prompt_tokens": 8, "total_tokens": 8}"#, usage(8, 0, 0)),
            (
                r#"{"prompt_tokens": 90, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0}}"#,
                usage(90, 5, 64),
            ),
            (
                r#"{"prompt_tokens": 90, "completion_tokens": 5, "prompt_cache_hit_tokens": 80, "prompt_cache_miss_tokens": 10}"#,
                usage(90, 5, 80),
            ),
            (
                r#"{"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 64}}"#,
                usage(10, 0, 10),
            ),
            (
                r#"{"prompt_tokens": 10, "prompt_tokens_details": null, "prompt_cache_hit_tokens": 4}"#,
                usage(10, 0, 4),
            ),
            (
                r#"{"prompt_tokens": 10, "prompt_tokens_details": "none", "completion_tokens": null}"#,
                usage(10, 0, 0),
            ),
            (
                r#"{"prompt_tokens": 7, "completion_tokens": {"nested": [1, 2]}}"#,
                usage(7, 0, 0),
            ),
            (r#" {"\u0070rompt_tokens": 3}"#, usage(3, 0, 0)),
            (r#"{"prompt_tokens": 10.5, "completion_tokens": 1}"#, None),
            (r#"{"prompt_tokens": -3}"#, None),
            (r#"{"prompt_tokens": "12"}"#, None),
            (r#"{"completion_tokens": 3}"#, None),
            (r#"null"#, None),
            (r#"[1, 2]"#, None),
            (r#""usage""#, None),
            (r#"{"prompt_tokens": 3"#, None),
        ] {
            let read = serde_json::from_str::<UsageMember>(text)
                .ok()
                .and_then(|member| member.usage);
            assert_eq!(read, want, "{text}");
        }
    }

    #[test]
    fn a_usage_member_tells_an_object_from_other_values_and_a_repeated_count_from_the_first() {
        let member = |text| serde_json::from_str::<UsageMember>(text).unwrap();
        assert_eq!(
            member("{}"),
            UsageMember {
                object: true,
                usage: None
            }
        );
        for other in ["null", "3", "\"usage\"", "[{\"prompt_tokens\": 3}]"] {
            assert_eq!(member(other), UsageMember::default(), "{other}");
        }
        let repeated = member(
            r#"{"prompt_tokens": 5, "prompt_tokens": 6, "prompt_tokens_details": {"cached_tokens": 2}, "prompt_tokens_details": {}}"#,
        );
        assert_eq!(
            repeated.usage,
            Some(Usage {
                input: 6,
                output: 0,
                cached_input: 0
            })
        );
    }
}
