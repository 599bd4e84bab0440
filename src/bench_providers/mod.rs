//! `llm-sidecar bench-providers`: the same prompts sent to every selected target, concurrently
//! across targets and with bounded concurrency within each, through the sidecar's own config,
//! keys, upstream client, timeouts and failure classes (one attempt per request, no fallback),
//! then a report of latency, time to first token, throughput, errors by class, cost and how far
//! the targets' answers agree.

pub mod call;
pub mod prompts;
pub mod report;
pub mod stats;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::cli::{self, Flags, EXIT_USAGE};
use crate::config::{Price, Snapshot};
use crate::env::{Env, ProcessEnv};
use crate::providers::Provider;
use crate::upstream::Upstream;
use prompts::{Prompt, Shape};
use report::Report;
use stats::{Sample, Summary};

pub const USAGE: &str = "\
usage: llm-sidecar bench-providers [--config FILE] [--targets PROVIDER/MODEL,...] [--prompts FILE]
           [--iterations N] [--concurrency C] [--stream] [--max-tokens N] [--json OUT] [--markdown OUT]
  --targets      provider/model pairs (default: every chat target of the config)
  --prompts      a JSONL file of chat requests (default: built-in code, reasoning, long-context, CJK prompts)
  --iterations   requests per target, cycling through the prompts (default 20)
  --concurrency  requests in flight per target (default 4); targets run side by side
  --stream       stream the answers and measure time to first token
  --max-tokens   max_tokens of every request (default: 256 where a prompt sets none)
  --json, --markdown  also write the result there (`-` for stdout)";

const DEFAULT_ITERATIONS: usize = 20;
const DEFAULT_CONCURRENCY: usize = 4;
const DEFAULT_MAX_TOKENS: u64 = 256;

/// One target to measure: a provider and the model it is asked for.
#[derive(Clone, Debug)]
pub struct Target {
    /// `provider/model`.
    pub name: String,
    /// The config route that has this target, if any (its price comes from there).
    pub route: Option<String>,
    pub provider: Arc<Provider>,
    pub model: String,
    pub price: Option<Price>,
}

/// The targets named by `--targets`, or every chat target of the config (embedding targets are
/// left out: chat prompts mean nothing to them). Returns the targets and what was left out.
pub fn select_targets(
    snapshot: &Snapshot,
    spec: Option<&str>,
) -> Result<(Vec<Target>, Vec<String>), String> {
    let mut known: Vec<Target> = Vec::new();
    for route in snapshot.routes.values() {
        for target in [&route.relay, &route.official].into_iter().flatten() {
            let name = format!("{}/{}", target.provider.name, target.model);
            if known.iter().all(|t| t.name != name) {
                known.push(Target {
                    name,
                    route: Some(route.name.clone()),
                    provider: target.provider.clone(),
                    model: target.model.clone(),
                    price: target.price,
                });
            }
        }
    }
    let Some(spec) = spec else {
        let (chat, skipped): (Vec<Target>, Vec<Target>) = known.into_iter().partition(|t| {
            !(t.model.contains("embed") || t.route.as_deref().is_some_and(|r| r.contains("embed")))
        });
        return Ok((chat, skipped.into_iter().map(|t| t.name).collect()));
    };
    let mut chosen: Vec<Target> = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (provider, model) = item
            .split_once('/')
            .filter(|(p, m)| !p.is_empty() && !m.is_empty())
            .ok_or(format!("--targets: `{item}` is not provider/model"))?;
        let Some(p) = snapshot.providers.get(provider) else {
            let names: Vec<&str> = snapshot.providers.keys().map(String::as_str).collect();
            return Err(format!(
                "--targets: unknown provider `{provider}` (known: {})",
                names.join(", ")
            ));
        };
        let target = known
            .iter()
            .find(|t| t.name == item)
            .cloned()
            .unwrap_or(Target {
                name: item.to_string(),
                route: None,
                provider: p.clone(),
                model: model.to_string(),
                price: None,
            });
        if chosen.iter().all(|t| t.name != target.name) {
            chosen.push(target);
        }
    }
    if chosen.is_empty() {
        return Err("--targets names no target".into());
    }
    Ok((chosen, Vec::new()))
}

/// How a run is shaped.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    pub iterations: usize,
    pub concurrency: usize,
    pub shape: Shape,
}

/// Progress as requests finish: a bar on a terminal, a plain line now and then otherwise (on
/// stderr, so the report on stdout stays clean).
pub enum Progress {
    Bar(indicatif::ProgressBar),
    Lines {
        per_target: usize,
        done: Mutex<BTreeMap<String, (usize, usize)>>,
    },
    Quiet,
}

impl Progress {
    pub fn for_stdout(total: usize, per_target: usize) -> Progress {
        if std::io::stdout().is_terminal() {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(total as u64),
                indicatif::ProgressDrawTarget::stdout(),
            );
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} requests  {msg}")
            {
                bar.set_style(style);
            }
            Progress::Bar(bar)
        } else {
            Progress::Lines {
                per_target,
                done: Mutex::new(BTreeMap::new()),
            }
        }
    }

    fn record(&self, target: &str, failed: bool) {
        match self {
            Progress::Quiet => {}
            Progress::Bar(bar) => {
                bar.inc(1);
                if failed {
                    bar.set_message(format!("last error: {target}"));
                }
            }
            Progress::Lines { per_target, done } => {
                let mut done = done.lock().unwrap_or_else(|p| p.into_inner());
                let entry = done.entry(target.to_string()).or_insert((0, 0));
                entry.0 += 1;
                entry.1 += usize::from(failed);
                let step = (*per_target / 4).max(1);
                if entry.0 % step == 0 || entry.0 == *per_target {
                    eprintln!(
                        "bench-providers: {target}: {}/{per_target} requests, {} errors",
                        entry.0, entry.1
                    );
                }
            }
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// Measures every target side by side and summarises them, sorted by p50.
pub async fn run(
    snapshot: &Snapshot,
    upstream: Arc<Upstream>,
    targets: Vec<Target>,
    prompts: Vec<Prompt>,
    options: RunOptions,
    progress: Arc<Progress>,
) -> Report {
    let limits = call::Limits::of(snapshot);
    let prompts = Arc::new(prompts);
    let tasks: Vec<_> = targets
        .iter()
        .cloned()
        .map(|target| {
            let upstream = upstream.clone();
            let prompts = prompts.clone();
            let progress = progress.clone();
            tokio::spawn(async move {
                let next = AtomicUsize::new(0);
                let worker = || async {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= options.iterations {
                            return mine;
                        }
                        let prompt = i % prompts.len();
                        let body = prompts::body(&prompts[prompt], &target.model, options.shape);
                        let outcome = call::measure(
                            &upstream,
                            &target.provider,
                            body,
                            options.shape.stream,
                            limits,
                        )
                        .await;
                        progress.record(
                            &target.name,
                            matches!(outcome, stats::Outcome::Failed { .. }),
                        );
                        mine.push((i, Sample { prompt, outcome }));
                    }
                };
                let workers = (0..options.concurrency.min(options.iterations)).map(|_| worker());
                let mut samples: Vec<(usize, Sample)> = futures_util::future::join_all(workers)
                    .await
                    .into_iter()
                    .flatten()
                    .collect();
                samples.sort_by_key(|(i, _)| *i);
                samples.into_iter().map(|(_, s)| s).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all = Vec::with_capacity(tasks.len());
    for task in tasks {
        all.push(task.await.unwrap_or_default());
    }
    progress.finish();
    let answers: Vec<_> = all.iter().map(|s| stats::first_answers(s)).collect();
    let agreement = stats::agreement(&answers);
    let mut summaries: Vec<Summary> = targets
        .iter()
        .zip(&all)
        .zip(agreement)
        .map(|((t, samples), agreement)| {
            let mut s = Summary::new(&t.name, t.route.as_deref(), t.price, samples);
            s.agreement = agreement;
            s
        })
        .collect();
    stats::sort_by_p50(&mut summaries);
    Report::new(
        snapshot.source.to_string(),
        options.shape.stream,
        options.iterations,
        options.concurrency,
        prompts.iter().map(|p| p.name.clone()).collect(),
        summaries,
    )
}

struct Command {
    config: Option<PathBuf>,
    targets: Option<String>,
    prompts: Option<PathBuf>,
    options: RunOptions,
    json: Option<String>,
    markdown: Option<String>,
}

fn parse(args: &[String]) -> Result<Command, String> {
    let flags = Flags::parse(
        args,
        &[
            "--config",
            "--targets",
            "--prompts",
            "--iterations",
            "--concurrency",
            "--max-tokens",
            "--json",
            "--markdown",
        ],
        &["--stream"],
    )?;
    let max_tokens = flags.parsed("--max-tokens", None, |v| {
        cli::positive(v).map(|n| Some(n as u64))
    })?;
    Ok(Command {
        config: flags.value("--config").map(PathBuf::from),
        targets: flags.value("--targets").map(str::to_string),
        prompts: flags.value("--prompts").map(PathBuf::from),
        options: RunOptions {
            iterations: flags.parsed("--iterations", DEFAULT_ITERATIONS, cli::positive)?,
            concurrency: flags.parsed("--concurrency", DEFAULT_CONCURRENCY, cli::positive)?,
            shape: Shape {
                stream: flags.switch("--stream"),
                max_tokens,
                default_max_tokens: DEFAULT_MAX_TOKENS,
            },
        },
        json: flags.value("--json").map(str::to_string),
        markdown: flags.value("--markdown").map(str::to_string),
    })
}

fn usage_error(why: &str) -> ExitCode {
    eprintln!("llm-sidecar bench-providers: {why}\n{USAGE}");
    ExitCode::from(EXIT_USAGE)
}

/// The subcommand: exit 0 when some target answered, 1 when every target failed, 64 on bad
/// usage, settings or config.
pub fn cli(args: &[String]) -> ExitCode {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let command = match parse(args) {
        Ok(c) => c,
        Err(why) => return usage_error(&why),
    };
    let env: &dyn Env = &ProcessEnv;
    let prepared = cli::settings(env).and_then(|settings| {
        let path = command.config.clone().or(settings.config_path.clone());
        let snapshot = cli::load_config(path.as_deref(), env)?;
        let (targets, skipped) = select_targets(&snapshot, command.targets.as_deref())?;
        let prompts = match &command.prompts {
            None => prompts::builtin(),
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
                .and_then(|text| prompts::from_jsonl(&text))
                .map_err(|e| format!("--prompts {}: {e}", path.display()))?,
        };
        Ok((settings, snapshot, targets, skipped, prompts))
    });
    let (settings, snapshot, targets, skipped, prompts) = match prepared {
        Ok(p) => p,
        Err(why) => return usage_error(&why),
    };
    if !skipped.is_empty() {
        eprintln!(
            "bench-providers: leaving out embedding targets ({}); name them with --targets to include them",
            skipped.join(", ")
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("llm-sidecar bench-providers: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(async {
        let upstream = Upstream::new(settings.connect_timeout, settings.extra_ca_file.as_deref())
            .map_err(|e| format!("cannot build the upstream client: {e}"))?;
        let progress = Arc::new(Progress::for_stdout(
            targets.len() * command.options.iterations,
            command.options.iterations,
        ));
        Ok::<_, String>(
            run(
                &snapshot,
                upstream,
                targets,
                prompts,
                command.options,
                progress,
            )
            .await,
        )
    });
    let report = match report {
        Ok(r) => r,
        Err(why) => return usage_error(&why),
    };
    print!("{}", report.text());
    for (path, text) in [
        (&command.json, report.json()),
        (&command.markdown, report.markdown()),
    ] {
        if let Some(path) = path {
            if let Err(why) = cli::write_output(path, &text) {
                eprintln!("llm-sidecar bench-providers: {why}");
                return ExitCode::FAILURE;
            }
        }
    }
    if report.all_failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{compile, ConfigSource, EMBEDDED_DEFAULT};
    use std::collections::HashMap;

    fn embedded() -> Snapshot {
        compile(
            EMBEDDED_DEFAULT,
            ConfigSource::Embedded,
            1,
            &HashMap::<String, String>::new(),
        )
        .unwrap()
    }

    #[test]
    fn every_chat_target_of_the_config_is_measured_by_default() {
        let (targets, skipped) = select_targets(&embedded(), None).unwrap();
        let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        assert!(names.contains(&"holysheep/deepseek-v3.2"), "{names:?}");
        assert!(names.contains(&"deepseek/deepseek-chat"), "{names:?}");
        assert!(names.iter().all(|n| !n.contains("embedding")), "{names:?}");
        assert_eq!(
            skipped,
            [
                "holysheep/text-embedding-3-small",
                "openai/text-embedding-3-small"
            ]
        );
        let official = targets
            .iter()
            .find(|t| t.name == "deepseek/deepseek-chat")
            .unwrap();
        assert_eq!(official.price.map(|p| p.output), Some(1.50));
    }

    #[test]
    fn named_targets_are_checked_against_the_providers() {
        let snapshot = embedded();
        let (targets, _) = select_targets(
            &snapshot,
            Some("holysheep/deepseek-v3.2, moonshot/new-model"),
        )
        .unwrap();
        assert_eq!(targets[0].route.as_deref(), Some("deepseek-v3.2"));
        assert_eq!(
            (targets[1].route.as_deref(), targets[1].price),
            (None, None)
        );
        let err = select_targets(&snapshot, Some("nosuch/m")).unwrap_err();
        assert!(err.contains("unknown provider `nosuch`"), "{err}");
        assert!(select_targets(&snapshot, Some("holysheep")).is_err());
        assert!(select_targets(&snapshot, Some(",")).is_err());
    }

    #[test]
    fn bad_usage_is_refused() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(parse(&args(&["--iterations", "0"])).is_err());
        assert!(parse(&args(&["--concurrency", "x"])).is_err());
        assert!(parse(&args(&["--frobnicate"])).is_err());
        let c = parse(&args(&["--stream", "--iterations=3", "--max-tokens", "8"])).unwrap();
        assert!(c.options.shape.stream);
        assert_eq!(c.options.iterations, 3);
        assert_eq!(c.options.shape.max_tokens, Some(8));
    }
}
