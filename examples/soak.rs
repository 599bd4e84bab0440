//! The load driver of `make soak` (bench/soak.sh): open-loop plain and streamed chat traffic
//! through a running sidecar, a routing-config change every second and a provider fault every
//! 10 s; counts every request on the client and on the sidecar, reads the sidecar's RSS and open
//! fds, and exits 1 on a lost request, a count mismatch, an unexpected error or RSS growth.
//!
//! Usage: `soak DATA_ADDR ADMIN_ADDR CONFIG_FILE SIDECAR_PID`. CONFIG_FILE is the sidecar's
//! routing config (`llm-sidecar default-config --upstream URL`, every provider on the fake
//! provider); the driver rewrites it once a second (temp file + rename).
//! Environment: `SOAK_SECONDS` (600), `SOAK_RPS` (1000), `SOAK_WARMUP` (60: seconds of the same
//! schedule, one round of every fault, before the start is measured, so that the start already
//! holds what a first fault allocates once), `SOAK_MAX_IN_FLIGHT` (512), `SOAK_FAULT_SECONDS` (3:
//! how long each fault stays in the config), `SOAK_MAX_RSS_GROWTH_MB` (5). With both durations
//! multiples of 60 s, the start and the end are measured at the same point of the fault round.
//!
//! Traffic, by request number modulo 10: 5 plain `deepseek-v3.2`, 2 plain `minimax-m2`, 2
//! streamed `kimi-k2` (5 ms between chunks), 1 streamed `deepseek-v3.2`. Request `i` is launched
//! at `i / SOAK_RPS` s whether or not earlier ones have finished; one that finds
//! `SOAK_MAX_IN_FLIGHT` requests open is not sent and counts as *skipped*, a failure.
//!
//! Every request ends up in exactly one class:
//! - *complete*: 200 and the whole answer (plain: a `chat.completion` whose text ends with the
//!   fake provider's last word; streamed: the same text, then `data: [DONE]`, no error event);
//! - *lost*: no response, or none complete within 30 s;
//! - *surfaced*: any other answer *caused by an injected fault*: the sidecar's own account of it
//!   (its headers, its error body or its SSE error event) names a target the soak faulted, and
//!   that fault is one failover cannot hide (`hideable: false` in `FAULTS`);
//! - *unexpected*: every other answer, including one that names a fault failover should hide.
//!
//! A fault is *hidden* by a complete answer that shows failover: its headers name the faulted
//! target (tried, then retried elsewhere or continued: *tried*), or it fell back (reason
//! `fallback`, more than one attempt, or another route) under a config generation that carried
//! the fault (*skipped*: the faulted target's breaker was open).

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use serde_yaml::Value as Yaml;
use tokio::sync::Semaphore;
use tokio::time::{sleep, sleep_until, timeout, Instant};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The fake provider's default answer is "Hello from LABEL. w1 … w12": a complete one ends so.
const LAST_WORD: &str = " w12";
/// Shaping of the kimi-k2 targets: streams last about 70 ms, across config changes.
const STREAM_SHAPING: &str = "chunk-delay=5";
/// Each fault is written at this second of every 10.
const FAULT_AT: u64 = 5;
/// Flag states written in turn; each differs from the one before, so every write is a reload.
const FLAGS: [(bool, u64); 4] = [(true, 100), (true, 50), (false, 100), (true, 75)];

/// Request `i` of the traffic mix: (route, streamed).
fn kind(i: u64) -> (&'static str, bool) {
    match i % 10 {
        0..=4 => ("deepseek-v3.2", false),
        5 | 6 => ("minimax-m2", false),
        7 | 8 => ("kimi-k2", true),
        _ => ("deepseek-v3.2", true),
    }
}

/// A provider fault: fake-provider fault parts appended to some targets' model names, tagged
/// `+soak=NAME` (the fake provider ignores it, the sidecar repeats it in what it reports).
struct Fault {
    name: &'static str,
    /// Whether failover can hide it; only a fault it cannot hide may surface.
    hideable: bool,
    /// (route, side, fault parts).
    targets: &'static [(&'static str, &'static str, &'static str)],
    /// Whether kimi-k2's official target may continue a stream another target cut off.
    prefill: bool,
    what: &'static str,
}

/// Injected in turn, one every 10 s.
const FAULTS: [Fault; 6] = [
    Fault {
        name: "relay-503",
        hideable: true,
        targets: &[("deepseek-v3.2", "relay", "error=503")],
        prefill: true,
        what: "deepseek-v3.2's relay answers 503; its official target is next",
    },
    Fault {
        name: "relay-reset",
        hideable: true,
        targets: &[("deepseek-v3.2", "relay", "reset")],
        prefill: true,
        what: "deepseek-v3.2's relay resets the connection before answering",
    },
    Fault {
        name: "route-down",
        hideable: true,
        targets: &[
            ("deepseek-v3.2", "relay", "error=503"),
            ("deepseek-v3.2", "official", "error=503"),
        ],
        prefill: true,
        what: "both deepseek-v3.2 targets answer 503; the fallback route kimi-k2 is next",
    },
    Fault {
        name: "stream-cut",
        hideable: true,
        targets: &[("kimi-k2", "relay", "cut=2")],
        prefill: true,
        what: "kimi-k2's relay cuts streams after 2 chunks; its official target continues them",
    },
    Fault {
        name: "chain-down",
        hideable: false,
        targets: &[
            ("minimax-m2", "relay", "error=503"),
            ("minimax-m2", "official", "error=503"),
        ],
        prefill: true,
        what: "both targets of minimax-m2 (no fallback route) answer 503: cannot be hidden",
    },
    Fault {
        name: "stream-cut-final",
        hideable: false,
        targets: &[("kimi-k2", "relay", "cut=2")],
        prefill: false,
        what: "kimi-k2's relay cuts streams, no target may continue them: cannot be hidden",
    },
];

/// The fault named by the first `soak=NAME` in `text`.
fn marker(text: &str) -> Option<usize> {
    let at = text.find("soak=")? + "soak=".len();
    let name = text[at..]
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '-')
        .next()?;
    FAULTS.iter().position(|f| f.name == name)
}

struct Settings {
    seconds: u64,
    rps: u64,
    warmup: u64,
    max_in_flight: usize,
    fault_seconds: u64,
    max_rss_growth_kb: u64,
}

impl Settings {
    fn from_env() -> Result<Settings, String> {
        let var = |name: &str, default: u64| match std::env::var(name) {
            Ok(v) => v
                .parse()
                .map_err(|_| format!("{name}={v:?} is not a whole number")),
            Err(_) => Ok(default),
        };
        let s = Settings {
            seconds: var("SOAK_SECONDS", 600)?,
            rps: var("SOAK_RPS", 1000)?,
            warmup: var("SOAK_WARMUP", 60)?,
            max_in_flight: var("SOAK_MAX_IN_FLIGHT", 512)? as usize,
            fault_seconds: var("SOAK_FAULT_SECONDS", 3)?,
            max_rss_growth_kb: var("SOAK_MAX_RSS_GROWTH_MB", 5)? * 1024,
        };
        if s.rps == 0 || s.max_in_flight == 0 || !(1..=9).contains(&s.fault_seconds) {
            return Err(
                "SOAK_RPS and SOAK_MAX_IN_FLIGHT must be > 0, SOAK_FAULT_SECONDS 1-9".into(),
            );
        }
        Ok(s)
    }
}

// ---------------------------------------------------------------------------------------------
// The routing config: the base file with the flags of the second and the fault in effect.

/// What `/config` shows once a written config is live.
#[derive(Debug, PartialEq)]
struct Shown {
    routing_enabled: bool,
    rollout_percent: u64,
    /// The faulted model names, sorted.
    faulted: Vec<String>,
}

struct Routing {
    path: PathBuf,
    base: Yaml,
}

fn model(cfg: &Yaml, route: &str, side: &str) -> Result<String, String> {
    let model = cfg["routes"][route][side]["model"].as_str();
    model
        .map(str::to_owned)
        .ok_or_else(|| format!("the config lacks routes.{route}.{side}.model"))
}

impl Routing {
    fn load(path: PathBuf) -> Result<Routing, String> {
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut base: Yaml = serde_yaml::from_str(&text).map_err(|e| e.to_string())?;
        for side in ["relay", "official"] {
            let shaped = format!("{}+{STREAM_SHAPING}", model(&base, "kimi-k2", side)?);
            base["routes"]["kimi-k2"][side]["model"] = shaped.into();
        }
        for fault in &FAULTS {
            for (route, side, _) in fault.targets {
                model(&base, route, side)?;
            }
        }
        Ok(Routing { path, base })
    }

    /// Writes flag state `step` with `fault` in effect; returns what `/config` should show.
    fn write(&self, step: u64, fault: Option<&Fault>) -> Result<Shown, String> {
        let (routing_enabled, rollout_percent) = FLAGS[(step % FLAGS.len() as u64) as usize];
        let mut cfg = self.base.clone();
        cfg["holy_sheep_routing_enabled"] = routing_enabled.into();
        cfg["rollout_percent"] = rollout_percent.into();
        let prefill = fault.is_none_or(|f| f.prefill);
        cfg["routes"]["kimi-k2"]["official"]["supports_prefill"] = prefill.into();
        let mut faulted = Vec::new();
        if let Some(f) = fault {
            for &(route, side, parts) in f.targets {
                let name = format!("{}+{parts}+soak={}", model(&cfg, route, side)?, f.name);
                cfg["routes"][route][side]["model"] = name.clone().into();
                faulted.push(name);
            }
        }
        faulted.sort();
        let text = serde_yaml::to_string(&cfg).map_err(|e| e.to_string())?;
        let tmp = self.path.with_extension("soak-tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .map_err(|e| format!("writing {}: {e}", self.path.display()))?;
        Ok(Shown {
            routing_enabled,
            rollout_percent,
            faulted,
        })
    }
}

/// The generation `/config` serves, and what it shows.
fn config_view(doc: &Value) -> Option<(u64, Shown)> {
    let cfg = &doc["config"];
    let routes = cfg["routes"].as_object()?.values();
    let models = routes.flat_map(|r| [&r["relay"]["model"], &r["official"]["model"]]);
    let mut faulted: Vec<String> = models
        .filter_map(Value::as_str)
        .filter(|m| m.contains("soak="))
        .map(str::to_owned)
        .collect();
    faulted.sort();
    let shown = Shown {
        routing_enabled: cfg["holy_sheep_routing_enabled"].as_bool()?,
        rollout_percent: cfg["rollout_percent"].as_u64()?,
        faulted,
    };
    Some((doc["generation"].as_u64()?, shown))
}

// ---------------------------------------------------------------------------------------------
// One request and what became of it.

enum Outcome {
    /// A complete answer; `met` says whether and how it met a fault.
    Complete {
        met: Option<Met>,
        generation: Option<u64>,
    },
    /// An answer, but not a complete one; `fault` is the fault its account names.
    Failed {
        problem: Problem,
        fault: Option<usize>,
    },
    Lost(Problem),
}

/// What went wrong, as (kind, the details of one case).
type Problem = (String, String);

fn clip(text: &str, chars: usize) -> String {
    text.chars().take(chars).collect()
}

#[derive(Clone, Copy)]
enum Met {
    /// The answer names this faulted target: tried, then retried elsewhere or continued.
    Tried(usize),
    /// It fell back without naming a faulted target (skipped, its breaker open).
    FellBack,
}

struct Ctx {
    settings: Settings,
    client: Client<HttpConnector, Full<Bytes>>,
    chat: Uri,
    admin: String,
    routing: Routing,
    pid: u32,
    /// Config writes so far: picks the flag state of the next one.
    writes: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn body(route: &str, stream: bool) -> Bytes {
    let messages = r#"[{"role":"user","content":"Say hello."}]"#;
    Bytes::from(format!(
        r#"{{"model":"{route}","messages":{messages},"stream":{stream}}}"#
    ))
}

async fn exchange(ctx: &Ctx, route: &str, stream: bool, body: Bytes) -> Outcome {
    let request = Request::post(ctx.chat.clone())
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .expect("a valid request");
    let answer = async {
        let (parts, body) = ctx.client.request(request).await?.into_parts();
        let body = body.collect().await.map(|c| c.to_bytes());
        Ok::<_, hyper_util::client::legacy::Error>((parts, body))
    };
    match timeout(REQUEST_TIMEOUT, answer).await {
        Err(_) => Outcome::Lost((
            format!("{route}: no complete answer within 30 s"),
            String::new(),
        )),
        Ok(Err(err)) => Outcome::Lost((format!("{route}: no answer"), format!("{err:?}"))),
        Ok(Ok((parts, body))) => judge(route, stream, parts, body),
    }
}

fn judge(
    route: &str,
    stream: bool,
    parts: http::response::Parts,
    body: Result<Bytes, hyper::Error>,
) -> Outcome {
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let upstream = header("x-llm-sidecar-upstream-model");
    let account = format!("{upstream} {}", header("x-llm-sidecar-attempt-log"));
    let text = match &body {
        Ok(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Err(err) => format!("the body broke off: {err}"),
    };
    let problem = if parts.status != StatusCode::OK || body.is_err() {
        Some((format!("status {}", parts.status), clip(&text, 400)))
    } else if stream {
        stream_problem(&text)
    } else {
        plain_problem(&text)
    };
    if let Some((kind, detail)) = problem {
        let fault = marker(&account).or_else(|| marker(&text));
        let problem = (format!("{route}: {kind}"), format!("[{account}] {detail}"));
        return Outcome::Failed { problem, fault };
    }
    let fell_back = header("x-llm-sidecar-reason") == "fallback"
        || header("x-llm-sidecar-attempts")
            .parse::<u32>()
            .is_ok_and(|n| n > 1)
        || header("x-llm-sidecar-route") != route;
    let met = match marker(&account) {
        Some(fault) => Some(Met::Tried(fault)),
        None => fell_back.then_some(Met::FellBack),
    };
    let generation = header("x-llm-sidecar-config-generation").parse().ok();
    Outcome::Complete { met, generation }
}

fn plain_problem(text: &str) -> Option<Problem> {
    let doc: Value = match serde_json::from_str(text) {
        Ok(doc) => doc,
        Err(err) => return Some(("not JSON".into(), format!("{err}: {}", clip(text, 300)))),
    };
    let content = doc["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("");
    (doc["object"] != "chat.completion" || !content.ends_with(LAST_WORD))
        .then(|| ("not a complete chat.completion".into(), clip(text, 400)))
}

/// What keeps a stream from being a complete answer: text ending with the last word, `[DONE]`.
fn stream_problem(text: &str) -> Option<Problem> {
    let mut content = String::new();
    let mut done = false;
    for event in text.split("\n\n") {
        let Some(data) = event.lines().find_map(|l| l.strip_prefix("data:")) else {
            continue;
        };
        let data = data.trim();
        if done {
            return Some(("an event after data: [DONE]".into(), clip(data, 300)));
        }
        done = data == "[DONE]";
        if done {
            continue;
        }
        let chunk: Value = match serde_json::from_str(data) {
            Ok(chunk) => chunk,
            Err(err) => return Some(("a chunk that is not JSON".into(), format!("{err}: {data}"))),
        };
        if chunk.get("error").is_some() {
            return Some(("an error event".into(), clip(data, 400)));
        }
        content.push_str(
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or(""),
        );
    }
    if !done {
        return Some((
            "no data: [DONE]".into(),
            format!("answer so far {content:?}"),
        ));
    }
    (!content.ends_with(LAST_WORD)).then(|| ("an incomplete answer".into(), format!("{content:?}")))
}

// ---------------------------------------------------------------------------------------------
// Counting.

/// An answer that met a fault: assigned to its injection once the phase is over.
struct Hit {
    sent_at: Duration,
    met: Met,
    generation: Option<u64>,
    surfaced: bool,
}

#[derive(Default)]
struct Tally {
    sent: u64,
    skipped: u64,
    complete: u64,
    failed: u64,
    lost: u64,
    /// Failed answers not caused by an injected fault.
    unexpected: u64,
    /// Unexpected and lost answers by kind: how many, and the details of the first.
    problems: BTreeMap<String, (u64, String)>,
    hits: Vec<Hit>,
    /// Of the complete answers, in microseconds.
    latencies_us: Vec<u32>,
    max_lag: Duration,
    peak_in_flight: usize,
}

impl Tally {
    fn problem(&mut self, (kind, detail): Problem) {
        self.problems.entry(kind).or_insert((0, detail)).0 += 1;
    }

    fn record(&mut self, sent_at: Duration, took: Duration, outcome: Outcome) {
        match outcome {
            Outcome::Complete { met, generation } => {
                self.complete += 1;
                self.latencies_us
                    .push(took.as_micros().try_into().unwrap_or(u32::MAX));
                if let Some(met) = met {
                    self.hits.push(Hit {
                        sent_at,
                        met,
                        generation,
                        surfaced: false,
                    });
                }
            }
            Outcome::Failed { problem, fault } => {
                self.failed += 1;
                match fault {
                    Some(f) if !FAULTS[f].hideable => {
                        let hit = Hit {
                            sent_at,
                            met: Met::Tried(f),
                            generation: None,
                            surfaced: true,
                        };
                        self.hits.push(hit);
                    }
                    Some(f) => {
                        self.unexpected += 1;
                        let (kind, detail) = problem;
                        self.problem((format!("{kind} ({} not hidden)", FAULTS[f].name), detail));
                    }
                    None => {
                        self.unexpected += 1;
                        self.problem(problem);
                    }
                }
            }
            Outcome::Lost((kind, detail)) => {
                self.lost += 1;
                self.problem((format!("lost: {kind}"), detail));
            }
        }
    }
}

/// One fault as injected: when, the generations that carried it, and what it did.
#[derive(Default)]
struct Injection {
    fault: usize,
    written_at: Duration,
    generations: Vec<u64>,
    hidden_tried: u64,
    hidden_skipped: u64,
    surfaced: u64,
}

#[derive(Default)]
struct Reloads {
    written: u64,
    seen: u64,
    /// Writes that failed or whose generation did not show in `/config` before the next one.
    missed: Vec<String>,
    max_latency: Duration,
    total_latency: Duration,
    last_generation: u64,
    injections: Vec<Injection>,
    /// Generation -> the injection it carried.
    faulted: HashMap<u64, usize>,
}

/// A phase's traffic and config writes.
struct Run {
    tally: Tally,
    reloads: Reloads,
}

impl Run {
    /// Assigns each hit to the injection it belongs to; returns the answers that fell back
    /// under a generation without a fault.
    fn resolve(&mut self) -> u64 {
        let mut outside = 0;
        let injections = &mut self.reloads.injections;
        for hit in &self.tally.hits {
            let at = match hit.met {
                // The latest injection of that fault written before the request was sent.
                Met::Tried(f) => injections
                    .iter()
                    .rposition(|i| i.fault == f && i.written_at <= hit.sent_at),
                Met::FellBack => hit
                    .generation
                    .and_then(|g| self.reloads.faulted.get(&g).copied()),
            };
            let Some(i) = at.map(|at| &mut injections[at]) else {
                outside += 1;
                continue;
            };
            match (hit.surfaced, hit.met) {
                (true, _) => i.surfaced += 1,
                (false, Met::Tried(_)) => i.hidden_tried += 1,
                (false, Met::FellBack) => i.hidden_skipped += 1,
            }
        }
        outside
    }
}

// ---------------------------------------------------------------------------------------------
// The sidecar's side: the admin port and /proc.

async fn admin_get(ctx: &Ctx, path: &str) -> Result<String, String> {
    let uri: Uri = format!("{}{path}", ctx.admin)
        .parse()
        .map_err(|e| format!("{e}"))?;
    let request = Request::get(uri)
        .body(Full::new(Bytes::new()))
        .expect("a valid request");
    let get = async {
        let response = ctx
            .client
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&body.to_bytes()).into_owned())
    };
    let answer = timeout(Duration::from_secs(5), get).await;
    answer
        .unwrap_or_else(|_| Err("no answer within 5 s".into()))
        .map_err(|e| format!("GET {path}: {e}"))
}

/// The sidecar's counters and process, read when nothing is in flight.
#[derive(Clone, Copy, Default)]
struct Counts {
    /// `llm_sidecar_requests_total`, summed over every label set.
    requests: u64,
    /// `/stats` totals: requests, answered (successes + fallbacks), failures.
    stats_requests: u64,
    stats_answered: u64,
    stats_failures: u64,
    /// `llm_sidecar_config_reloads_total{source="file"}`.
    reloads: u64,
    rss_kb: u64,
    fds: usize,
}

fn metric(metrics: &str, name: &str, labels: &str) -> u64 {
    let lines = metrics.lines().filter(|l| {
        l.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with([' ', '{']) && rest.contains(labels))
    });
    lines
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn rss_kb(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"));
    let kb = line.and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
    kb.ok_or_else(|| format!("no VmRSS in {path}"))
}

fn fds(pid: u32) -> Result<usize, String> {
    let path = format!("/proc/{pid}/fd");
    std::fs::read_dir(&path)
        .map(Iterator::count)
        .map_err(|e| format!("{path}: {e}"))
}

async fn counts(ctx: &Ctx) -> Result<Counts, String> {
    // A request is counted when its response body ends: wait until nothing is in flight and the
    // count holds still.
    let mut last = None;
    for _ in 0..100 {
        let metrics = admin_get(ctx, "/metrics").await?;
        let requests = metric(&metrics, "llm_sidecar_requests_total", "");
        let idle = metric(&metrics, "llm_sidecar_in_flight_requests", "") == 0;
        if idle && last == Some(requests) {
            let stats: Value = serde_json::from_str(&admin_get(ctx, "/stats").await?)
                .map_err(|e| format!("/stats: {e}"))?;
            let n = |k: &str| stats["total"][k].as_u64().unwrap_or(0);
            return Ok(Counts {
                requests,
                stats_requests: n("requests"),
                stats_answered: n("successes") + n("fallbacks"),
                stats_failures: n("failures"),
                reloads: metric(
                    &metrics,
                    "llm_sidecar_config_reloads_total",
                    r#"source="file""#,
                ),
                rss_kb: rss_kb(ctx.pid)?,
                fds: fds(ctx.pid)?,
            });
        }
        last = idle.then_some(requests);
        sleep(Duration::from_millis(50)).await;
    }
    Err("the sidecar never went idle with its request count holding still".into())
}

// ---------------------------------------------------------------------------------------------
// A phase: the traffic, and one config write a second with a fault every 10 s.

/// The phase's config writes, one a second; `name` labels its progress lines.
async fn config_writes(
    ctx: Arc<Ctx>,
    name: &'static str,
    start: Instant,
    seconds: u64,
    tally: Arc<Mutex<Tally>>,
) -> Reloads {
    let mut reloads = Reloads::default();
    for k in 0..seconds {
        let tick = start + Duration::from_secs(k);
        sleep_until(tick).await;
        if k % 10 == 0 && k > 0 {
            progress(&ctx, name, k, &lock(&tally), &reloads);
        }
        let on = (FAULT_AT..FAULT_AT + ctx.settings.fault_seconds).contains(&(k % 10));
        let fault = on.then_some((k / 10) as usize % FAULTS.len());
        if let Some(f) = fault.filter(|_| k % 10 == FAULT_AT) {
            let n = reloads.injections.len() + 1;
            let Fault {
                name: fault, what, ..
            } = &FAULTS[f];
            println!("soak: {name} t={k:>4}s fault #{n} {fault}: {what}");
            let written_at = start.elapsed();
            reloads.injections.push(Injection {
                fault: f,
                written_at,
                ..Injection::default()
            });
        }
        let step = ctx.writes.fetch_add(1, Ordering::Relaxed);
        let written = Instant::now();
        let expected = match ctx.routing.write(step, fault.map(|f| &FAULTS[f])) {
            Ok(expected) => expected,
            Err(err) => {
                reloads.missed.push(err);
                continue;
            }
        };
        reloads.written += 1;
        // The new generation, seen before the next write is due.
        let mut seen = None;
        while seen.is_none() && Instant::now() < tick + Duration::from_millis(950) {
            let doc = admin_get(&ctx, "/config").await.ok();
            let view = doc
                .and_then(|d| serde_json::from_str(&d).ok())
                .and_then(|d| config_view(&d));
            seen = view.filter(|(g, shown)| *g > reloads.last_generation && *shown == expected);
            if seen.is_none() {
                sleep(Duration::from_millis(20)).await;
            }
        }
        let Some((generation, _)) = seen else {
            reloads.missed.push(format!(
                "write {step} ({expected:?}) not live within 950 ms"
            ));
            continue;
        };
        reloads.seen += 1;
        reloads.last_generation = generation;
        reloads.max_latency = reloads.max_latency.max(written.elapsed());
        reloads.total_latency += written.elapsed();
        if fault.is_some() {
            let at = reloads.injections.len() - 1;
            reloads.faulted.insert(generation, at);
            reloads.injections[at].generations.push(generation);
        }
    }
    reloads
}

fn progress(ctx: &Ctx, name: &str, k: u64, t: &Tally, reloads: &Reloads) {
    let rss = rss_kb(ctx.pid).map_or_else(|e| e, |kb| format!("{:.1} MB", mb(kb)));
    let fds = fds(ctx.pid).map_or_else(|e| e, |n| n.to_string());
    let generation = reloads.last_generation;
    println!(
        "soak: {name} t={k:>4}s sent={} complete={} failed={} unexpected={} lost={} skipped={} \
         generation={generation} rss={rss} fds={fds}",
        t.sent, t.complete, t.failed, t.unexpected, t.lost, t.skipped
    );
}

async fn phase(ctx: &Arc<Ctx>, name: &'static str, seconds: u64) -> Run {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let writes = tokio::spawn(config_writes(
        ctx.clone(),
        name,
        start,
        seconds,
        tally.clone(),
    ));
    let slots = Arc::new(Semaphore::new(ctx.settings.max_in_flight));
    let rps = ctx.settings.rps;
    for i in 0..seconds * rps {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / rps);
        sleep_until(due).await;
        let mut t = lock(&tally);
        t.max_lag = t.max_lag.max(due.elapsed());
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            t.skipped += 1;
            continue;
        };
        t.sent += 1;
        t.peak_in_flight = t
            .peak_in_flight
            .max(ctx.settings.max_in_flight - slots.available_permits());
        drop(t);
        let (ctx, tally) = (ctx.clone(), tally.clone());
        tokio::spawn(async move {
            let (route, stream) = kind(i);
            let sent = Instant::now();
            let outcome = exchange(&ctx, route, stream, body(route, stream)).await;
            lock(&tally).record(sent - start, sent.elapsed(), outcome);
            drop(slot);
        });
    }
    let reloads = writes.await.unwrap_or_default();
    // Every request ends within REQUEST_TIMEOUT; then every slot is free again.
    let all = slots.acquire_many(ctx.settings.max_in_flight as u32);
    let _ = timeout(REQUEST_TIMEOUT + Duration::from_secs(5), all).await;
    let tally = std::mem::take(&mut *lock(&tally));
    Run { tally, reloads }
}

// ---------------------------------------------------------------------------------------------
// The report.

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile_ms(sorted: &[u32], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted
        .get(rank - 1)
        .map_or(0.0, |&us| f64::from(us) / 1000.0)
}

fn report(s: &Settings, warm: &Run, soak: &mut Run, before: Counts, after: Counts) -> bool {
    let outside = soak.resolve();
    let (t, r) = (&mut soak.tally, &soak.reloads);
    let answered = t.complete + t.failed;
    let requests = after.requests - before.requests;
    let stats_requests = after.stats_requests - before.stats_requests;
    let stats_answered = after.stats_answered - before.stats_answered;
    let stats_failures = after.stats_failures - before.stats_failures;
    let file_reloads = after.reloads - before.reloads;
    let surfaced: u64 = r.injections.iter().map(|i| i.surfaced).sum();
    let hidden: u64 = r
        .injections
        .iter()
        .map(|i| i.hidden_tried + i.hidden_skipped)
        .sum();
    let growth_mb = (after.rss_kb as f64 - before.rss_kb as f64) / 1024.0;
    t.latencies_us.sort_unstable();
    let lat = |q| percentile_ms(&t.latencies_us, q);

    println!(
        "\nsoak: {} faults injected, each for {} s:",
        r.injections.len(),
        s.fault_seconds
    );
    println!("    #      t  fault             hideable  hidden:tried  hidden:skipped  surfaced");
    for (n, i) in r.injections.iter().enumerate() {
        let f = &FAULTS[i.fault];
        let hideable = if f.hideable { "yes" } else { "no" };
        println!(
            "  {:>3} {:>5}s  {:<17} {hideable:<8} {:>13} {:>15} {:>9}  generations {:?}",
            n + 1,
            i.written_at.as_secs(),
            f.name,
            i.hidden_tried,
            i.hidden_skipped,
            i.surfaced,
            i.generations
        );
    }
    println!("  tried: the answer names the faulted target; skipped: it fell back past it (breaker open)");
    if outside > 0 {
        println!("  and {outside} complete answers fell back under a generation without a fault");
    }
    println!(
        "\nsoak: client   sent {}, answered {answered} ({} complete, {} failed), lost {}, \
         skipped (no capacity) {}",
        t.sent, t.complete, t.failed, t.lost, t.skipped
    );
    println!(
        "soak: sidecar  llm_sidecar_requests_total +{requests}; /stats total: requests \
         +{stats_requests}, answered +{stats_answered}, failures +{stats_failures}"
    );
    println!(
        "soak: errors   unexpected {}; surfaced by unhideable faults {surfaced}; faults hidden \
         {hidden}",
        t.unexpected
    );
    println!(
        "soak: latency  complete answers p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; launch lag \
         max {:.1} ms; peak in flight {}",
        lat(0.5),
        lat(0.99),
        lat(1.0),
        ms(t.max_lag),
        t.peak_in_flight
    );
    println!(
        "soak: reloads  {} written, {} seen in /config (mean {:.0} ms, max {:.0} ms after the \
         write); file reloads counted +{file_reloads}",
        r.written,
        r.seen,
        ms(r.total_latency) / r.seen.max(1) as f64,
        ms(r.max_latency)
    );
    println!(
        "soak: process  RSS {:.1} MB -> {:.1} MB ({growth_mb:+.2} MB), open fds {} -> {}",
        mb(before.rss_kb),
        mb(after.rss_kb),
        before.fds,
        after.fds
    );

    let (w, wr) = (&warm.tally, &warm.reloads);
    let missed: Vec<&String> = wr.missed.iter().chain(&r.missed).collect();
    let checks = [
        (t.lost + w.lost == 0, format!("{} requests lost ({} in the warm-up)", t.lost + w.lost, w.lost)),
        (
            t.skipped + w.skipped == 0,
            format!("{} requests skipped for lack of capacity", t.skipped + w.skipped),
        ),
        (
            requests == t.sent && stats_requests == t.sent,
            format!("the sidecar counted {requests} / {stats_requests} requests, the client sent {}", t.sent),
        ),
        (
            stats_answered == t.complete && stats_failures == t.failed,
            format!(
                "/stats: {stats_answered} answered, {stats_failures} failed; the client: {} complete, \
                 {} failed",
                t.complete, t.failed
            ),
        ),
        (
            t.unexpected + w.unexpected == 0,
            format!("{} unexpected errors ({} in the warm-up)", t.unexpected + w.unexpected, w.unexpected),
        ),
        (
            growth_mb * 1024.0 < s.max_rss_growth_kb as f64,
            format!("RSS grew by {growth_mb:.2} MB (limit {} MB)", s.max_rss_growth_kb / 1024),
        ),
        (
            missed.is_empty() && file_reloads == r.written,
            format!("config writes not live: {missed:?}; {file_reloads} file reloads for {}", r.written),
        ),
    ];
    for (phase, tally) in [("warm-up", w), ("soak", &*t)] {
        for (kind, (n, detail)) in &tally.problems {
            println!("soak: {phase} problem: {n} x {kind}; the first: {detail}");
        }
    }
    let failures: Vec<&String> = checks
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, why)| why)
        .collect();
    for failure in &failures {
        println!("soak: FAILED: {failure}");
    }
    let result = if failures.is_empty() {
        "pass"
    } else {
        "FAILED"
    };
    println!(
        "soak: seconds={} rps={} sent={} answered={answered} lost={} skipped={} \
         sidecar_requests={requests} stats_requests={stats_requests} unexpected={} faults={} \
         hidden={hidden} surfaced={surfaced} reloads={}/{} rss_start_mb={:.1} rss_end_mb={:.1} \
         rss_growth_mb={growth_mb:.2} fds_start={} fds_end={} result={result}",
        s.seconds,
        s.rps,
        t.sent,
        t.lost,
        t.skipped,
        t.unexpected,
        r.injections.len(),
        r.seen,
        r.written,
        mb(before.rss_kb),
        mb(after.rss_kb),
        before.fds,
        after.fds
    );
    failures.is_empty()
}

async fn run(args: &[String]) -> Result<bool, String> {
    let [_, data, admin, config, pid] = args else {
        return Err("usage: soak DATA_ADDR ADMIN_ADDR CONFIG_FILE SIDECAR_PID".into());
    };
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let ctx = Arc::new(Ctx {
        settings: Settings::from_env()?,
        // Idle connections go before the sidecar's 10 s header-read timeout would close them.
        client: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(5))
            .build(connector),
        chat: format!("http://{data}/v1/chat/completions")
            .parse()
            .map_err(|e| format!("{data}: {e}"))?,
        admin: format!("http://{admin}"),
        routing: Routing::load(PathBuf::from(config))?,
        pid: pid.parse().map_err(|_| format!("{pid:?} is not a pid"))?,
        writes: AtomicU64::new(0),
    });
    let s = &ctx.settings;
    println!(
        "soak: {} s at {} req/s after {} s of warm-up; at most {} in flight; a fault every 10 s \
         for {} s; RSS growth limit {} MB",
        s.seconds,
        s.rps,
        s.warmup,
        s.max_in_flight,
        s.fault_seconds,
        s.max_rss_growth_kb / 1024
    );
    let warm = phase(&ctx, "warm-up", s.warmup).await;
    let before = counts(&ctx).await?;
    let (t, r) = (&warm.tally, &warm.reloads);
    println!(
        "soak: warm-up: sent={} complete={} failed={} (unexpected {}) lost={} skipped={} \
         reloads={}/{}; start: rss={:.1} MB fds={}",
        t.sent,
        t.complete,
        t.failed,
        t.unexpected,
        t.lost,
        t.skipped,
        r.seen,
        r.written,
        mb(before.rss_kb),
        before.fds
    );
    let mut soak = phase(&ctx, "soak", s.seconds).await;
    let after = counts(&ctx).await?;
    Ok(report(s, &warm, &mut soak, before, after))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match run(&args).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(err) => {
            eprintln!("soak: FAILED: {err}");
            std::process::exit(1);
        }
    }
}
