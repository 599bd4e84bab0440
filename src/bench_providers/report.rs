//! The benchmark's result as a person reads it (a plain table sorted by p50 and the line naming
//! the cheapest target near the fastest), as a Markdown table for a migration ticket, and as
//! JSON for scripts.

use serde::Serialize;

use super::stats::{cheapest_near_fastest, Quantiles, Summary, MIN_SAMPLES};
use crate::cli::{markdown_table, table, usd};

/// How the percentiles are computed, as the report states it.
pub const METHOD: &str = "nearest-rank percentiles over answered requests only; failures are \
counted as errors by class, never as latencies";

/// Everything a run found out.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub config: String,
    pub stream: bool,
    pub requests_per_target: usize,
    pub concurrency: usize,
    pub prompts: Vec<String>,
    pub method: &'static str,
    /// Sorted by p50 latency, fastest first; targets that never answered last.
    pub targets: Vec<Summary>,
    /// The cheapest target (cost per answer) whose p50 is within 20 % of the best p50.
    pub cheapest_near_fastest: Option<String>,
    /// Every request to every target failed.
    pub all_failed: bool,
}

impl Report {
    pub fn new(
        config: String,
        stream: bool,
        requests_per_target: usize,
        concurrency: usize,
        prompts: Vec<String>,
        targets: Vec<Summary>,
    ) -> Report {
        let cheapest = cheapest_near_fastest(&targets).map(|s| s.target.clone());
        let all_failed = targets.iter().all(|t| t.answered == 0);
        Report {
            config,
            stream,
            requests_per_target,
            concurrency,
            prompts,
            method: METHOD,
            targets,
            cheapest_near_fastest: cheapest,
            all_failed,
        }
    }

    pub fn json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".into());
        text.push('\n');
        text
    }

    fn header(&self) -> Vec<&'static str> {
        let mut h = vec!["target", "answered", "p50 ms", "p95 ms", "p99 ms"];
        if self.stream {
            h.extend(["ttft p50", "ttft p95"]);
        }
        h.extend(["tok/s", "cost", "$/1M out", "agreement", "errors"]);
        h
    }

    fn right(&self) -> Vec<bool> {
        let mut r = vec![false, true, true, true, true];
        if self.stream {
            r.extend([true, true]);
        }
        r.extend([true, true, true, true, false]);
        r
    }

    fn rows(&self) -> Vec<Vec<String>> {
        self.targets
            .iter()
            .map(|s| {
                let mut row = vec![s.target.clone(), format!("{}/{}", s.answered, s.requests)];
                let q = |q: &Option<Quantiles>, pick: fn(&Quantiles) -> f64| match q {
                    None => "-".to_string(),
                    Some(q) => format!("{:.1}{}", pick(q), if q.low_sample { "*" } else { "" }),
                };
                row.push(q(&s.latency_ms, |q| q.p50));
                row.push(q(&s.latency_ms, |q| q.p95));
                row.push(q(&s.latency_ms, |q| q.p99));
                if self.stream {
                    row.push(q(&s.first_token_ms, |q| q.p50));
                    row.push(q(&s.first_token_ms, |q| q.p95));
                }
                row.push(match s.output_tokens_per_second {
                    Some(t) => format!("{t:.0}"),
                    None => "-".into(),
                });
                row.push(s.cost_usd.map(usd).unwrap_or_else(|| "no price".into()));
                row.push(
                    s.price_per_1m_output_usd
                        .map(usd)
                        .unwrap_or_else(|| "-".into()),
                );
                row.push(match s.agreement {
                    Some(a) => format!("{a:.2}"),
                    None => "-".into(),
                });
                row.push(errors(s));
                row
            })
            .collect()
    }

    fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self
            .targets
            .iter()
            .any(|s| s.latency_ms.as_ref().is_some_and(|q| q.low_sample))
        {
            notes.push(format!(
                "* from fewer than {MIN_SAMPLES} answered requests: a rough figure"
            ));
        }
        let estimated: usize = self.targets.iter().map(|s| s.usage_estimated).sum();
        if estimated > 0 {
            notes.push(format!(
                "{estimated} answers reported no usage: their tokens (and cost) are estimates"
            ));
        }
        for s in self.targets.iter().filter(|s| s.answered == 0) {
            if let Some(e) = &s.first_error {
                notes.push(format!("{} never answered: {e}", s.target));
            }
        }
        notes.push(self.verdict());
        notes
    }

    /// The line that names the cheapest target within 20 % of the best p50.
    pub fn verdict(&self) -> String {
        let best = self.targets.first().and_then(|s| s.latency_ms.as_ref());
        let Some(best) = best else {
            return "No target answered: nothing to choose from.".into();
        };
        match self
            .cheapest_near_fastest
            .as_ref()
            .and_then(|name| self.targets.iter().find(|s| &s.target == name))
        {
            Some(s) => format!(
                "Cheapest within 20 % of the best p50 ({:.1} ms): {} at {} per answer (p50 {:.1} ms, {:.0} % errors).",
                best.p50,
                s.target,
                s.cost_per_answer_usd.map(usd).unwrap_or_default(),
                s.latency_ms.as_ref().map(|q| q.p50).unwrap_or_default(),
                s.error_rate * 100.0,
            ),
            None => format!(
                "Cheapest within 20 % of the best p50 ({:.1} ms): unknown, none of those targets has a price in the config.",
                best.p50
            ),
        }
    }

    pub fn text(&self) -> String {
        let mut out = format!(
            "bench-providers: {} targets, {} requests each ({} prompts), concurrency {}, {} (config: {})\n\n",
            self.targets.len(),
            self.requests_per_target,
            self.prompts.len(),
            self.concurrency,
            if self.stream { "streaming" } else { "not streaming" },
            self.config,
        );
        out.push_str(&table(&self.header(), &self.rows(), &self.right()));
        out.push('\n');
        for note in self.notes() {
            out.push_str(&note);
            out.push('\n');
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = format!(
            "### Provider benchmark\n\n{} requests per target ({} prompts: {}), concurrency {}, {}. Config: {}. Latencies in ms; {}.\n\n",
            self.requests_per_target,
            self.prompts.len(),
            self.prompts.join(", "),
            self.concurrency,
            if self.stream { "streaming" } else { "not streaming" },
            self.config,
            METHOD,
        );
        out.push_str(&markdown_table(&self.header(), &self.rows(), &self.right()));
        out.push('\n');
        for note in self.notes() {
            out.push_str(&format!("{note}\n\n"));
        }
        out
    }
}

/// `-`, or the error rate and the count of each failure class.
fn errors(s: &Summary) -> String {
    if s.errors == 0 {
        return "-".into();
    }
    let classes: Vec<String> = s
        .errors_by_class
        .iter()
        .map(|(class, n)| format!("{n} {class}"))
        .collect();
    format!("{:.0}%: {}", s.error_rate * 100.0, classes.join(", "))
}

#[cfg(test)]
mod tests {
    use super::super::stats::{Answered, Outcome, Sample};
    use super::*;
    use crate::config::Price;
    use crate::telemetry::cost::Usage;
    use std::time::Duration;

    fn summary(name: &str, ms: &[u64], failures: usize, price: Option<f64>) -> Summary {
        let mut samples: Vec<Sample> = ms
            .iter()
            .map(|ms| Sample {
                prompt: 0,
                outcome: Outcome::Answered(Answered {
                    latency: Duration::from_millis(*ms),
                    first_token: None,
                    usage: Usage {
                        input: 100,
                        output: 10,
                        cached_input: 0,
                    },
                    usage_reported: true,
                    text: "hi".into(),
                }),
            })
            .collect();
        samples.extend((0..failures).map(|_| Sample {
            prompt: 0,
            outcome: Outcome::Failed {
                class: "rate_limited",
                detail: "429".into(),
            },
        }));
        let price = price.map(|output| Price {
            input: 0.1,
            output,
            cached_input: None,
        });
        Summary::new(name, None, price, &samples)
    }

    #[test]
    fn the_table_marks_rough_percentiles_and_names_the_choice() {
        let targets = vec![
            summary("fast/a", &[5, 6, 7], 1, Some(0.42)),
            summary("slow/b", &[200; 20], 0, None),
        ];
        let report = Report::new("test".into(), false, 20, 4, vec!["p".into()], targets);
        let text = report.text();
        assert!(text.contains("fast/a       3/4    6.0*    7.0*"), "{text}");
        assert!(text.contains("200.0 "), "{text}");
        assert!(text.contains("25%: 1 rate_limited"), "{text}");
        assert!(text.contains("no price"), "{text}");
        assert!(
            text.contains("Cheapest within 20 % of the best p50 (6.0 ms): fast/a"),
            "{text}"
        );
        let md = report.markdown();
        assert!(md.contains("| fast/a | 3/4 |"), "{md}");
        let json: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
        assert_eq!(json["targets"][0]["errors_by_class"]["rate_limited"], 1);
        assert_eq!(json["targets"][0]["latency_ms"]["low_sample"], true);
        assert_eq!(json["cheapest_near_fastest"], "fast/a");
        assert_eq!(json["all_failed"], false);
    }
}
