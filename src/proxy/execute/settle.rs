//! Settlement: what an answer reported (usage, model, finish reasons), priced at the
//! answering target's price, counted, and recorded for the attempt span.

use std::sync::LazyLock;

use memchr::memmem::FinderRev;

use super::*;
use crate::telemetry::cost::UsageMember;

pub(super) fn cut(text: &str) -> String {
    if text.len() <= MAX_CONTENT_ATTRIBUTE {
        return text.to_string();
    }
    let mut end = MAX_CONTENT_ATTRIBUTE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// What a plain answer's body says about itself, for the attempt span.
#[derive(Default, serde::Deserialize)]
pub(super) struct PlainAnswer<'a> {
    #[serde(borrow, default)]
    pub(super) model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(super) choices: Vec<PlainChoice<'a>>,
}

/// A plain answer's usage, read on its own so an odd field elsewhere cannot lose it.
#[derive(Default, serde::Deserialize)]
pub(super) struct PlainUsage {
    #[serde(default)]
    pub(super) usage: UsageMember,
}

impl PlainUsage {
    /// The usage of a plain answer. OpenAI-compatible answers end their object with `usage`,
    /// and reading just that member is a tenth of what reading the whole answer to reach it
    /// costs (every string of the message checked on the way: 5–7 k instructions, about a
    /// tenth of a plain request; docs/performance.md). Any other shape is read whole.
    pub(super) fn read(answer: &[u8]) -> Option<Usage> {
        match Self::last_member(answer) {
            Some(usage) => usage,
            None => {
                let whole: PlainUsage = serde_json::from_slice(answer).unwrap_or_default();
                whole.usage.usage
            }
        }
    }

    /// `usage` when it is the answer's last member: its key is the last `"usage"` in the
    /// answer, after a `{` or `,` (inside a string a quote is escaped, so it is a key), and
    /// its value, read as a whole by serde, runs up to the answer's closing brace. `None` when
    /// the answer ends otherwise (a `usage` nested deeper, or followed by other members).
    fn last_member(answer: &[u8]) -> Option<Option<Usage>> {
        const KEY: &[u8] = b"\"usage\"";
        // Built once: building the searcher costs more than the search itself.
        static FINDER: LazyLock<FinderRev<'static>> = LazyLock::new(|| FinderRev::new(KEY));
        let members = answer.trim_ascii().strip_suffix(b"}")?;
        let key = FINDER.rfind(members)?;
        if !matches!(members[..key].trim_ascii_end().last(), Some(b'{' | b',')) {
            return None;
        }
        let value = members[key + KEY.len()..]
            .trim_ascii_start()
            .strip_prefix(b":")?;
        let member: UsageMember = serde_json::from_slice(value).ok()?;
        Some(member.usage)
    }
}

#[derive(serde::Deserialize)]
pub(super) struct PlainChoice<'a> {
    #[serde(borrow, default)]
    pub(super) finish_reason: Option<Cow<'a, str>>,
}

/// What one answer (or one part of a continued stream) reported.
#[derive(Default)]
pub(super) struct Reported {
    pub(super) usage: Option<Usage>,
    pub(super) model: Option<String>,
    pub(super) finish_reasons: Vec<String>,
    /// The answer text, only when content recording is on.
    pub(super) content: Option<String>,
    /// A traced plain answer, whose model and finish reasons its span reads only if the request
    /// is exported ([`PlainAnswer::details`]): most are not, and reading them costs more than
    /// the rest of the request's trace record.
    pub(super) plain: Option<Bytes>,
}

impl Reported {
    /// Reads a plain answer's usage; a `traced` one is kept for its span.
    pub(super) fn from_plain(bytes: &Bytes, traced: bool) -> Reported {
        Reported {
            usage: PlainUsage::read(bytes),
            plain: traced.then(|| bytes.clone()),
            ..Reported::default()
        }
    }
}

impl PlainAnswer<'_> {
    /// A plain answer's model, finish reasons and (when content recording is on) text.
    pub(super) fn details(bytes: &[u8]) -> (Option<String>, Vec<String>, Option<String>) {
        let answer: PlainAnswer = serde_json::from_slice(bytes).unwrap_or_default();
        let reasons = answer
            .choices
            .into_iter()
            .filter_map(|c| c.finish_reason.map(Cow::into_owned))
            .collect();
        let content = otel::record_content().then(|| cut(&String::from_utf8_lossy(bytes)));
        (answer.model.map(Cow::into_owned), reasons, content)
    }
}

impl Exchange {
    /// Prices what one answer (or one part of a continued stream) reported, counts it, and
    /// puts it on the attempt span.
    pub(super) fn settle(
        &self,
        step: &Step,
        handles: &TargetMetrics,
        trace: Option<&mut AttemptTrace>,
        started: Instant,
        mut reported: Reported,
    ) -> Bill {
        let metrics = &self.core.metrics;
        let gen_ai = metrics.gen_ai(handles, self.operation);
        gen_ai.duration.observe(started.elapsed().as_secs_f64());
        let target = step.target();
        let official = step.route.official.as_ref().and_then(|t| t.price.as_ref());
        let bill = match reported.usage {
            Some(usage) => {
                let bill = Bill::new(usage, target.price.as_ref(), official);
                handles.input_tokens.inc_by(usage.input);
                handles.output_tokens.inc_by(usage.output);
                handles.cached_input_tokens.inc_by(usage.cached_input);
                if let Some(cost) = bill.cost {
                    handles.cost.inc_by(cost);
                }
                if let Some(official) = bill.official {
                    handles.official_cost.inc_by(official);
                }
                if let Some(savings) = bill.savings().filter(|s| *s > 0.0) {
                    handles.savings.inc_by(savings);
                }
                gen_ai.input_tokens.observe(usage.input as f64);
                gen_ai.output_tokens.observe(usage.output as f64);
                bill
            }
            None => {
                metrics.usage_missing.inc();
                Bill::default()
            }
        };
        handles.stats.tally.add_usage(reported.usage, bill);
        if let Some(trace) = trace {
            trace.reported(&mut reported, bill);
        }
        bill
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What reading the whole answer finds: the reference the tail read must agree with.
    fn whole(answer: &str) -> Option<Usage> {
        serde_json::from_str::<PlainUsage>(answer)
            .unwrap_or_default()
            .usage
            .usage
    }

    #[test]
    fn a_plain_answers_usage_reads_the_same_from_its_tail_as_whole() {
        let usage = r#"{"prompt_tokens":12,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":4}}"#;
        let answers = [
            // The usual shape, compact and pretty-printed.
            format!(
                r#"{{"id":"c1","choices":[{{"message":{{"content":"hi"}},"finish_reason":"stop"}}],"usage":{usage}}}"#
            ),
            format!("{{\n  \"id\": \"c1\",\n  \"usage\" : {usage}\n}}\n"),
            // `usage` not last, nested, repeated, in the text, absent, null, odd.
            format!(r#"{{"usage":{usage},"id":"c1"}}"#),
            format!(r#"{{"choices":[{{"usage":{usage}}}]}}"#),
            format!(r#"{{"usage":{usage},"x":{{"usage":{{"prompt_tokens":9}}}}}}"#),
            r#"{"choices":[{"message":{"content":"say \"usage\": {\"prompt_tokens\": 99}"}}]}"#
                .to_string(),
            r#"{"choices":[{"message":{"content":"\\"}}],"usage":{"prompt_tokens":3}}"#.to_string(),
            r#"{"id":"c1"}"#.to_string(),
            r#"{"id":"c1","usage":null}"#.to_string(),
            r#"{"id":"c1","usage":"many"}"#.to_string(),
            format!(r#"{{"usage":{{"prompt_tokens":1,"usage":{usage}}}}}"#),
            "not json".to_string(),
        ];
        for answer in &answers {
            assert_eq!(
                PlainUsage::read(answer.as_bytes()),
                whole(answer),
                "{answer}"
            );
        }
        assert_eq!(
            PlainUsage::read(answers[0].as_bytes()),
            Some(Usage {
                input: 12,
                output: 5,
                cached_input: 4
            })
        );
        // A repeated `usage` counts with its last value, as in a JSON tree (a whole read by
        // the typed struct refuses the duplicate and finds none).
        let repeated = format!(r#"{{"usage":{{"prompt_tokens":1}},"usage":{usage}}}"#);
        assert_eq!(
            PlainUsage::read(repeated.as_bytes()),
            PlainUsage::read(answers[0].as_bytes())
        );
        // The usual shape is read from its tail, the others whole.
        assert!(PlainUsage::last_member(answers[0].as_bytes()).is_some());
        assert!(PlainUsage::last_member(answers[2].as_bytes()).is_none());
    }
}
