//! Settlement: what an answer reported (usage, model, finish reasons), priced at the
//! answering target's price, counted, and recorded for the attempt span.

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
        let read: PlainUsage = serde_json::from_slice(bytes).unwrap_or_default();
        Reported {
            usage: read.usage.usage,
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
        target: &Target,
        route: &Route,
        trace: Option<&mut AttemptTrace>,
        started: Instant,
        mut reported: Reported,
    ) -> Bill {
        let metrics = &self.core.metrics;
        let handles = metrics.target(target);
        let gen_ai = metrics.gen_ai(&handles, self.operation);
        gen_ai.duration.observe(started.elapsed().as_secs_f64());
        let official = route.official.as_ref().and_then(|t| t.price.as_ref());
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
