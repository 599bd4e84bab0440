//! The benchmark's statistics, kept honest: latency percentiles come only from requests that
//! were answered (a failure is an error, never a made-up latency), by the nearest-rank method
//! over the sorted samples, and a percentile of fewer than [`MIN_SAMPLES`] samples says so.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::config::Price;
use crate::telemetry::cost::Usage;

/// Below this many samples a percentile is shown as a rough figure.
pub const MIN_SAMPLES: usize = 20;

/// What one benchmark request came to.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Answered(Answered),
    /// The failure class (`rate_limited`, `timeout`, `server_error`, ...) and what happened.
    Failed {
        class: &'static str,
        detail: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Answered {
    /// From sending the request to the end of the answer.
    pub latency: Duration,
    /// Streams: from sending the request to the first content chunk.
    pub first_token: Option<Duration>,
    pub usage: Usage,
    /// False when the provider reported no usage and the counts are estimates.
    pub usage_reported: bool,
    pub text: String,
}

/// One request of the run: which prompt it sent and what came of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub prompt: usize,
    pub outcome: Outcome,
}

/// p50, p95 and p99 in milliseconds, and how many samples they come from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Quantiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub samples: usize,
    /// Fewer than [`MIN_SAMPLES`] samples: the figures are rough.
    pub low_sample: bool,
}

/// The nearest-rank `q` quantile (0 < q <= 1) of ascending `sorted`: the smallest sample with at
/// least `q` of all samples at or below it (rank `ceil(q * n)`).
pub fn nearest_rank(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

impl Quantiles {
    pub fn of(durations: impl IntoIterator<Item = Duration>) -> Option<Quantiles> {
        let mut ms: Vec<f64> = durations
            .into_iter()
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        ms.sort_by(f64::total_cmp);
        let round = |v: f64| (v * 100.0).round() / 100.0;
        Some(Quantiles {
            p50: round(nearest_rank(&ms, 0.50)?),
            p95: round(nearest_rank(&ms, 0.95)?),
            p99: round(nearest_rank(&ms, 0.99)?),
            samples: ms.len(),
            low_sample: ms.len() < MIN_SAMPLES,
        })
    }
}

/// One target's result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// `provider/model`.
    pub target: String,
    pub route: Option<String>,
    pub requests: usize,
    pub answered: usize,
    pub errors: usize,
    pub error_rate: f64,
    /// Failed requests by failure class.
    pub errors_by_class: BTreeMap<&'static str, usize>,
    pub latency_ms: Option<Quantiles>,
    pub first_token_ms: Option<Quantiles>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Answers whose provider reported no usage: their tokens are estimates.
    pub usage_estimated: usize,
    /// Output tokens over the summed latency of the answered requests.
    pub output_tokens_per_second: Option<f64>,
    /// USD for the answered requests at the config's price; `None` without a price.
    pub cost_usd: Option<f64>,
    pub cost_per_answer_usd: Option<f64>,
    pub price_per_1m_input_usd: Option<f64>,
    pub price_per_1m_output_usd: Option<f64>,
    /// Mean word-overlap equivalence of this target's answers with the other targets' answers
    /// to the same prompts (0..1); `None` when there was nothing to compare.
    pub agreement: Option<f64>,
    /// The first failure's description, to say what went wrong.
    pub first_error: Option<String>,
}

impl Summary {
    pub fn new(
        target: &str,
        route: Option<&str>,
        price: Option<Price>,
        samples: &[Sample],
    ) -> Self {
        let answered: Vec<&Answered> = samples
            .iter()
            .filter_map(|s| match &s.outcome {
                Outcome::Answered(a) => Some(a),
                Outcome::Failed { .. } => None,
            })
            .collect();
        let mut errors_by_class = BTreeMap::new();
        let mut first_error = None;
        for s in samples {
            if let Outcome::Failed { class, detail } = &s.outcome {
                *errors_by_class.entry(*class).or_insert(0) += 1;
                first_error.get_or_insert_with(|| format!("{class}: {detail}"));
            }
        }
        let errors = samples.len() - answered.len();
        let usage = answered.iter().fold(Usage::default(), |mut sum, a| {
            sum.add(a.usage);
            sum
        });
        let busy: f64 = answered.iter().map(|a| a.latency.as_secs_f64()).sum();
        let cost_usd = price.map(|p| answered.iter().map(|a| p.cost(a.usage)).sum::<f64>());
        Summary {
            target: target.to_string(),
            route: route.map(str::to_string),
            requests: samples.len(),
            answered: answered.len(),
            errors,
            error_rate: if samples.is_empty() {
                0.0
            } else {
                errors as f64 / samples.len() as f64
            },
            errors_by_class,
            latency_ms: Quantiles::of(answered.iter().map(|a| a.latency)),
            first_token_ms: Quantiles::of(answered.iter().filter_map(|a| a.first_token)),
            input_tokens: usage.input,
            output_tokens: usage.output,
            usage_estimated: answered.iter().filter(|a| !a.usage_reported).count(),
            output_tokens_per_second: (busy > 0.0).then(|| usage.output as f64 / busy),
            cost_usd,
            cost_per_answer_usd: cost_usd
                .filter(|_| !answered.is_empty())
                .map(|c| c / answered.len() as f64),
            price_per_1m_input_usd: price.map(|p| p.input),
            price_per_1m_output_usd: price.map(|p| p.output),
            agreement: None,
            first_error,
        }
    }
}

/// For each target, the mean equivalence of its answers with every other target's answer to
/// the same prompt. `answers[t]` maps a prompt to target `t`'s answer texts; each prompt is
/// compared through its first answer on either side.
pub fn agreement(answers: &[BTreeMap<usize, String>]) -> Vec<Option<f64>> {
    answers
        .iter()
        .enumerate()
        .map(|(t, mine)| {
            let scores: Vec<f64> = mine
                .iter()
                .flat_map(|(prompt, text)| {
                    answers
                        .iter()
                        .enumerate()
                        .filter(move |(other, _)| *other != t)
                        .filter_map(move |(_, theirs)| theirs.get(prompt))
                        .map(move |their| crate::shadow::equivalence(text, their))
                })
                .collect();
            (!scores.is_empty()).then(|| {
                let mean = scores.iter().sum::<f64>() / scores.len() as f64;
                (mean * 1000.0).round() / 1000.0
            })
        })
        .collect()
}

/// The first answer each prompt got.
pub fn first_answers(samples: &[Sample]) -> BTreeMap<usize, String> {
    let mut out = BTreeMap::new();
    for s in samples {
        if let Outcome::Answered(a) = &s.outcome {
            out.entry(s.prompt).or_insert_with(|| a.text.clone());
        }
    }
    out
}

/// Sorts by p50 latency, fastest first; targets without an answer go last.
pub fn sort_by_p50(summaries: &mut [Summary]) {
    summaries.sort_by(|a, b| {
        let key = |s: &Summary| s.latency_ms.as_ref().map(|q| q.p50);
        match (key(a), key(b)) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.target.cmp(&b.target),
        }
    });
}

/// Among the targets whose p50 is within 20 % of the best p50, the one whose answers cost
/// least in this run (cost per answered request); `None` when none of them has a price.
pub fn cheapest_near_fastest(summaries: &[Summary]) -> Option<&Summary> {
    let best = summaries
        .iter()
        .filter_map(|s| s.latency_ms.as_ref().map(|q| q.p50))
        .min_by(f64::total_cmp)?;
    summaries
        .iter()
        .filter(|s| s.latency_ms.as_ref().is_some_and(|q| q.p50 <= best * 1.2))
        .filter(|s| s.cost_per_answer_usd.is_some())
        .min_by(|a, b| {
            let cost = |s: &Summary| s.cost_per_answer_usd.unwrap_or(f64::INFINITY);
            cost(a).total_cmp(&cost(b))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(ms: u64, output: u64, text: &str) -> Outcome {
        Outcome::Answered(Answered {
            latency: Duration::from_millis(ms),
            first_token: None,
            usage: Usage {
                input: 10,
                output,
                cached_input: 0,
            },
            usage_reported: true,
            text: text.into(),
        })
    }

    fn failed(class: &'static str) -> Outcome {
        Outcome::Failed {
            class,
            detail: "x".into(),
        }
    }

    fn samples(outcomes: Vec<Outcome>) -> Vec<Sample> {
        outcomes
            .into_iter()
            .enumerate()
            .map(|(i, outcome)| Sample { prompt: i, outcome })
            .collect()
    }

    #[test]
    fn nearest_rank_picks_a_real_sample() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(nearest_rank(&v, 0.5), Some(50.0));
        assert_eq!(nearest_rank(&v, 0.95), Some(95.0));
        assert_eq!(nearest_rank(&v, 0.99), Some(99.0));
        assert_eq!(nearest_rank(&[7.0], 0.99), Some(7.0));
        assert_eq!(nearest_rank(&[1.0, 2.0, 3.0], 0.5), Some(2.0));
        assert_eq!(nearest_rank(&[], 0.5), None);
    }

    #[test]
    fn failures_are_errors_and_never_latencies() {
        let s = Summary::new(
            "p/m",
            None,
            None,
            &samples(vec![
                answered(10, 5, "a"),
                answered(20, 5, "a"),
                failed("timeout"),
                failed("rate_limited"),
                failed("rate_limited"),
            ]),
        );
        assert_eq!((s.requests, s.answered, s.errors), (5, 2, 3));
        assert!((s.error_rate - 0.6).abs() < 1e-9);
        assert_eq!(s.errors_by_class["rate_limited"], 2);
        assert_eq!(s.errors_by_class["timeout"], 1);
        let latency = s.latency_ms.unwrap();
        // Only the two answers count: the slowest is 20 ms, not a timeout penalty.
        assert_eq!((latency.p50, latency.p99, latency.samples), (10.0, 20.0, 2));
        assert!(latency.low_sample);
        assert_eq!(s.cost_usd, None);
    }

    #[test]
    fn cost_is_tokens_times_price_and_throughput_is_tokens_over_time() {
        let price = Price {
            input: 1.0,
            output: 2.0,
            cached_input: None,
        };
        let s = Summary::new(
            "p/m",
            Some("r"),
            Some(price),
            &samples((0..20).map(|_| answered(500, 50, "x")).collect()),
        );
        assert_eq!((s.input_tokens, s.output_tokens), (200, 1000));
        let expected = (200.0 * 1.0 + 1000.0 * 2.0) / 1e6;
        assert!((s.cost_usd.unwrap() - expected).abs() < 1e-12);
        assert!((s.cost_per_answer_usd.unwrap() - expected / 20.0).abs() < 1e-12);
        assert!((s.output_tokens_per_second.unwrap() - 100.0).abs() < 1e-9);
        assert!(!s.latency_ms.unwrap().low_sample);
    }

    #[test]
    fn agreement_compares_answers_to_the_same_prompt() {
        let a: BTreeMap<usize, String> = [(0, "a b c d".into()), (1, "yes".into())].into();
        let b: BTreeMap<usize, String> = [(0, "a b c x".into())].into();
        let c: BTreeMap<usize, String> = [(2, "other".into())].into();
        let scores = agreement(&[a, b, c]);
        assert_eq!(scores, vec![Some(0.75), Some(0.75), None]);
    }

    #[test]
    fn sorted_by_p50_and_the_cheapest_near_the_fastest_is_named() {
        let price = |output| Price {
            input: 0.0,
            output,
            cached_input: None,
        };
        let run = |ms| samples(vec![answered(ms, 1_000_000, "x")]);
        let mut all = vec![
            Summary::new("slow/cheap", None, Some(price(0.1)), &run(100)),
            Summary::new("fast/dear", None, Some(price(8.0)), &run(10)),
            Summary::new("near/cheaper", None, Some(price(1.0)), &run(11)),
            Summary::new(
                "down/x",
                None,
                Some(price(0.0)),
                &samples(vec![failed("timeout")]),
            ),
        ];
        sort_by_p50(&mut all);
        let order: Vec<&str> = all.iter().map(|s| s.target.as_str()).collect();
        assert_eq!(order, ["fast/dear", "near/cheaper", "slow/cheap", "down/x"]);
        assert_eq!(cheapest_near_fastest(&all).unwrap().target, "near/cheaper");
    }
}
