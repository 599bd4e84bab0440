//! `llm-sidecar roi`: what the migration saves, from the prices this deployment's config holds.
//! Without traffic, per route: a month of a given volume on the official target and on the
//! relay, the saving per month and per year, and the percentage (the migration playbook's
//! "Pricing and ROI" table). With `--from-stats URL`, from a running sidecar's `/stats`: the
//! tokens each route carried, the actual spend, what the same tokens would have cost on the
//! official targets, and that projected to a month, with a warning for every target on the
//! traffic path whose cost is unknown because it has no price.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};

use crate::cli::{self, table, usd, Flags, EXIT_USAGE};
use crate::config::{Price, Snapshot};
use crate::env::{Env, ProcessEnv};
use crate::providers::ProviderKind;
use crate::telemetry::cost::Usage;
use crate::upstream::Upstream;

pub const USAGE: &str = "\
usage: llm-sidecar roi [--config FILE] [--monthly-output-tokens 500M] [--input-per-output 3]
           [--from-stats URL] [--json OUT]
  --monthly-output-tokens  output tokens a month, e.g. 500M, 2B, 750k (default 500M)
  --input-per-output       input tokens per output token (default 3)
  --from-stats             a running sidecar's /stats (e.g. http://127.0.0.1:4001/stats): its real traffic
  --json                   also write the result there (`-` for stdout)";

/// A month, for projections: 30 days.
pub const MONTH: Duration = Duration::from_secs(30 * 86_400);
const STATS_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_STATS_BYTES: usize = 16 << 20;

/// A monthly token volume.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Volume {
    pub output_tokens: u64,
    pub input_tokens: u64,
    pub input_per_output: f64,
}

impl Volume {
    pub fn new(output_tokens: u64, input_per_output: f64) -> Volume {
        Volume {
            output_tokens,
            input_tokens: (output_tokens as f64 * input_per_output).round() as u64,
            input_per_output,
        }
    }

    fn usage(&self) -> Usage {
        Usage {
            input: self.input_tokens,
            output: self.output_tokens,
            cached_input: 0,
        }
    }
}

/// One route of the price table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PriceRow {
    pub route: String,
    pub official_target: Option<String>,
    pub relay_target: Option<String>,
    pub official_monthly_usd: Option<f64>,
    pub relay_monthly_usd: Option<f64>,
    pub saving_monthly_usd: Option<f64>,
    pub saving_yearly_usd: Option<f64>,
    /// The saving as a percentage of the official cost.
    pub saving_percent: Option<f64>,
}

/// The price table: every route as if it carried the whole `volume`.
pub fn price_table(snapshot: &Snapshot, volume: Volume) -> Vec<PriceRow> {
    let usage = volume.usage();
    snapshot
        .routes
        .values()
        .map(|route| {
            let name = |t: &Option<crate::config::Target>| {
                t.as_ref()
                    .map(|t| format!("{}/{}", t.provider.name, t.model))
            };
            let monthly = |t: &Option<crate::config::Target>| {
                t.as_ref().and_then(|t| t.price).map(|p| p.cost(usage))
            };
            let official = monthly(&route.official);
            let relay = monthly(&route.relay);
            let saving = official.zip(relay).map(|(o, r)| o - r);
            PriceRow {
                route: route.name.clone(),
                official_target: name(&route.official),
                relay_target: name(&route.relay),
                official_monthly_usd: official,
                relay_monthly_usd: relay,
                saving_monthly_usd: saving,
                saving_yearly_usd: saving.map(|s| s * 12.0),
                saving_percent: official
                    .zip(saving)
                    .filter(|(o, _)| *o > 0.0)
                    .map(|(o, s)| s / o * 100.0),
            }
        })
        .collect()
}

fn money(v: Option<f64>) -> String {
    v.map(usd).unwrap_or_else(|| "no price".into())
}

fn percent(v: Option<f64>) -> String {
    v.map(|p| format!("{p:.1} %")).unwrap_or_else(|| "-".into())
}

pub fn price_text(rows: &[PriceRow], volume: Volume, config: &str) -> String {
    let mut out = format!(
        "ROI per route at {} output and {} input tokens a month ({} input per output token); prices from {config}\n\
         Each row puts the whole volume on that route.\n\n",
        tokens(volume.output_tokens),
        tokens(volume.input_tokens),
        volume.input_per_output,
    );
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.route.clone(),
                r.official_target.clone().unwrap_or_else(|| "-".into()),
                money(r.official_monthly_usd),
                r.relay_target.clone().unwrap_or_else(|| "-".into()),
                money(r.relay_monthly_usd),
                r.saving_monthly_usd.map(usd).unwrap_or_else(|| "-".into()),
                r.saving_yearly_usd.map(usd).unwrap_or_else(|| "-".into()),
                percent(r.saving_percent),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "route",
            "official",
            "official/month",
            "relay",
            "relay/month",
            "saving/month",
            "saving/year",
            "saving",
        ],
        &cells,
        &[false, false, true, false, true, true, true, true],
    ));
    let unpriced: Vec<&str> = rows
        .iter()
        .filter(|r| r.saving_monthly_usd.is_none())
        .map(|r| r.route.as_str())
        .collect();
    if !unpriced.is_empty() {
        out.push_str(&format!(
            "\nNo saving for {}: a target without a price (add `price:` to it in the config).\n",
            unpriced.join(", ")
        ));
    }
    out
}

/// A token count as an operator writes it: 500M, 1.5B, 750k.
pub fn tokens(n: u64) -> String {
    let (scale, suffix) = match n {
        n if n >= 1_000_000_000_000 => (1e12, "T"),
        n if n >= 1_000_000_000 => (1e9, "B"),
        n if n >= 1_000_000 => (1e6, "M"),
        n if n >= 10_000 => (1e3, "k"),
        _ => return n.to_string(),
    };
    let v = n as f64 / scale;
    let text = format!("{v:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}{suffix}")
}

// --- From a running sidecar's /stats ---------------------------------------------------------

#[derive(Clone, Debug, Default, Deserialize)]
struct StatsTokens {
    #[serde(default)]
    input: u64,
    #[serde(default)]
    output: u64,
    #[serde(default)]
    cached_input: u64,
}

#[derive(Clone, Debug, Deserialize)]
struct StatsTarget {
    route: String,
    provider: String,
    model: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    requests: u64,
    #[serde(default)]
    failures: u64,
    #[serde(default)]
    tokens: StatsTokens,
    #[serde(default)]
    cost_usd: f64,
}

/// The part of `/stats` the ROI reads.
#[derive(Clone, Debug, Deserialize)]
pub struct StatsView {
    since_unix: u64,
    #[serde(default)]
    targets: Vec<StatsTarget>,
}

impl StatsView {
    pub fn parse(body: &[u8]) -> Result<StatsView, String> {
        serde_json::from_slice(body).map_err(|e| format!("not the sidecar's /stats JSON: {e}"))
    }
}

/// One route's real traffic.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TrafficRow {
    pub route: String,
    pub requests: u64,
    pub failures: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    /// USD the sidecar counted for the priced targets.
    pub spend_usd: f64,
    /// Some target of this route carried tokens without a price: the spend is a lower bound.
    pub spend_incomplete: bool,
    /// The same tokens at the route's official price; `None` without one.
    pub official_usd: Option<f64>,
    pub saving_usd: Option<f64>,
    pub monthly_spend_usd: f64,
    pub monthly_official_usd: Option<f64>,
    pub monthly_saving_usd: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Traffic {
    pub observed_seconds: u64,
    /// Seconds of a month over seconds observed: what the figures are multiplied by.
    pub month_factor: f64,
    pub routes: Vec<TrafficRow>,
    pub total: TrafficRow,
    pub warnings: Vec<String>,
}

/// The traffic of `stats` priced by `snapshot`, observed until `now`.
pub fn traffic(snapshot: &Snapshot, stats: &StatsView, now: SystemTime) -> Traffic {
    let now_unix = crate::config::unix_seconds(now);
    let observed = now_unix.saturating_sub(stats.since_unix).max(1);
    let factor = MONTH.as_secs() as f64 / observed as f64;
    let mut warnings = Vec::new();
    let mut rows: Vec<TrafficRow> = Vec::new();
    for t in &stats.targets {
        let usage = Usage {
            input: t.tokens.input,
            output: t.tokens.output,
            cached_input: t.tokens.cached_input,
        };
        let route = snapshot.routes.get(&t.route);
        let index = match rows.iter().position(|r| r.route == t.route) {
            Some(i) => i,
            None => {
                rows.push(TrafficRow {
                    route: t.route.clone(),
                    official_usd: Some(0.0),
                    ..Default::default()
                });
                rows.len() - 1
            }
        };
        let row = &mut rows[index];
        row.requests += t.requests;
        row.failures += t.failures;
        row.input_tokens += usage.input;
        row.output_tokens += usage.output;
        row.cached_input_tokens += usage.cached_input;
        row.spend_usd += t.cost_usd;
        let carried = usage.input + usage.output > 0;
        let side = match t.path.as_str() {
            "official" => Some(ProviderKind::Official),
            "relay" => Some(ProviderKind::Relay),
            _ => None,
        };
        let price: Option<Price> = route.and_then(|r| {
            [
                side.and_then(|s| r.target(s)),
                r.relay.as_ref(),
                r.official.as_ref(),
            ]
            .into_iter()
            .flatten()
            .find(|c| c.provider.name == t.provider && c.model == t.model)
            .and_then(|c| c.price)
        });
        let Some(route) = route else {
            if carried {
                warnings.push(format!(
                    "route `{}` is not in this config: pass the sidecar's config with --config to price it",
                    t.route
                ));
                row.official_usd = None;
                if t.cost_usd == 0.0 {
                    row.spend_incomplete = true;
                }
            }
            continue;
        };
        if carried && price.is_none() {
            row.spend_incomplete = true;
            warnings.push(format!(
                "{}/{} ({} of route `{}`) carried {} tokens but has no price: its cost is unknown",
                t.provider,
                t.model,
                if t.path.is_empty() { "target" } else { &t.path },
                t.route,
                tokens(usage.input + usage.output),
            ));
        }
        match route.official.as_ref().and_then(|o| o.price) {
            Some(official) => {
                if let Some(sum) = row.official_usd.as_mut() {
                    *sum += official.cost(usage);
                }
            }
            None if carried => {
                row.official_usd = None;
                let w = format!(
                    "route `{}` has no official price: what its tokens would cost on the official target is unknown",
                    t.route
                );
                if !warnings.contains(&w) {
                    warnings.push(w);
                }
            }
            None => {}
        }
    }
    rows.sort_by(|a, b| a.route.cmp(&b.route));
    let mut total = TrafficRow {
        route: "total".into(),
        official_usd: Some(0.0),
        ..Default::default()
    };
    for row in &mut rows {
        row.saving_usd = row.official_usd.map(|o| o - row.spend_usd);
        row.monthly_spend_usd = row.spend_usd * factor;
        row.monthly_official_usd = row.official_usd.map(|o| o * factor);
        row.monthly_saving_usd = row.saving_usd.map(|s| s * factor);
        total.requests += row.requests;
        total.failures += row.failures;
        total.input_tokens += row.input_tokens;
        total.output_tokens += row.output_tokens;
        total.cached_input_tokens += row.cached_input_tokens;
        total.spend_usd += row.spend_usd;
        total.spend_incomplete |= row.spend_incomplete;
        total.official_usd = total.official_usd.zip(row.official_usd).map(|(a, b)| a + b);
    }
    total.saving_usd = total.official_usd.map(|o| o - total.spend_usd);
    total.monthly_spend_usd = total.spend_usd * factor;
    total.monthly_official_usd = total.official_usd.map(|o| o * factor);
    total.monthly_saving_usd = total.saving_usd.map(|s| s * factor);
    Traffic {
        observed_seconds: observed,
        month_factor: factor,
        routes: rows,
        total,
        warnings,
    }
}

fn span(seconds: u64) -> String {
    match seconds {
        s if s >= 86_400 => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

pub fn traffic_text(t: &Traffic, url: &str, config: &str) -> String {
    let mut out = format!(
        "Traffic seen by {url} over {}, projected to a 30-day month (x{:.1}); prices from {config}\n\n",
        span(t.observed_seconds),
        t.month_factor,
    );
    let spend = |r: &TrafficRow, v: f64| {
        if r.spend_incomplete {
            format!("{} + unknown", usd(v))
        } else {
            usd(v)
        }
    };
    let unknown = |v: Option<f64>| v.map(usd).unwrap_or_else(|| "unknown".into());
    let cells: Vec<Vec<String>> = t
        .routes
        .iter()
        .chain(std::iter::once(&t.total))
        .map(|r| {
            vec![
                r.route.clone(),
                r.requests.to_string(),
                r.input_tokens.to_string(),
                r.output_tokens.to_string(),
                spend(r, r.spend_usd),
                unknown(r.official_usd),
                unknown(r.saving_usd),
                spend(r, r.monthly_spend_usd),
                unknown(r.monthly_official_usd),
                unknown(r.monthly_saving_usd),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "route",
            "requests",
            "input tok",
            "output tok",
            "spend",
            "on official",
            "saving",
            "spend/month",
            "official/month",
            "saving/month",
        ],
        &cells,
        &[false, true, true, true, true, true, true, true, true, true],
    ));
    if t.observed_seconds < 3600 {
        out.push_str(&format!(
            "note: projected from only {} of traffic: a rough figure\n",
            span(t.observed_seconds)
        ));
    }
    for w in &t.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}

/// GETs `url` with the sidecar's own upstream client.
async fn fetch(upstream: &Arc<Upstream>, url: &str) -> Result<Vec<u8>, String> {
    let mut uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    if matches!(uri.path(), "" | "/") {
        uri = format!("{}/stats", url.trim_end_matches('/'))
            .parse()
            .map_err(|e| format!("{url}: {e}"))?;
    }
    let authority = uri
        .authority()
        .ok_or(format!("{url}: not an absolute http:// URL"))?
        .to_string();
    let host = HeaderValue::from_str(&authority).map_err(|e| format!("{url}: {e}"))?;
    let mut request = Request::new(Full::new(Bytes::new()));
    *request.uri_mut() = uri;
    request.headers_mut().insert(header::HOST, host);
    let exchange = async {
        let (response, lease) = upstream.send(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), MAX_STATS_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if let Some(lease) = lease {
            lease.release();
        }
        if !status.is_success() {
            return Err(format!("answered {status}"));
        }
        Ok(body.to_vec())
    };
    tokio::time::timeout(STATS_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {STATS_TIMEOUT:?}"))?
        .map_err(|e| format!("{url}: {e}"))
}

fn usage_error(why: &str) -> ExitCode {
    eprintln!("llm-sidecar roi: {why}\n{USAGE}");
    ExitCode::from(EXIT_USAGE)
}

fn ratio(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err("expected a number of 0 or more".into()),
    }
}

/// The subcommand: exit 0 with the table, 1 when `/stats` cannot be read, 64 on bad usage,
/// settings or config.
pub fn cli(args: &[String]) -> ExitCode {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let env: &dyn Env = &ProcessEnv;
    let prepared = Flags::parse(
        args,
        &[
            "--config",
            "--monthly-output-tokens",
            "--input-per-output",
            "--from-stats",
            "--json",
        ],
        &[],
    )
    .and_then(|flags| {
        let volume = Volume::new(
            flags.parsed("--monthly-output-tokens", 500_000_000, cli::parse_size)?,
            flags.parsed("--input-per-output", 3.0, ratio)?,
        );
        let settings = cli::settings(env)?;
        let path = flags
            .value("--config")
            .map(std::path::PathBuf::from)
            .or(settings.config_path.clone());
        let snapshot = cli::load_config(path.as_deref(), env)?;
        Ok((flags, volume, settings, snapshot))
    });
    let (flags, volume, settings, snapshot) = match prepared {
        Ok(p) => p,
        Err(why) => return usage_error(&why),
    };
    let config = snapshot.source.to_string();
    let (text, json) = match flags.value("--from-stats") {
        None => {
            let rows = price_table(&snapshot, volume);
            let json = serde_json::json!({
                "mode": "prices",
                "config": config,
                "volume": volume,
                "routes": rows,
            });
            (price_text(&rows, volume, &config), json)
        }
        Some(url) => {
            let fetched = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the runtime: {e}"))
                .and_then(|rt| {
                    rt.block_on(async {
                        let upstream = Upstream::new(
                            settings.connect_timeout,
                            settings.extra_ca_file.as_deref(),
                        )
                        .map_err(|e| format!("cannot build the upstream client: {e}"))?;
                        fetch(&upstream, url).await
                    })
                })
                .and_then(|body| StatsView::parse(&body));
            let stats = match fetched {
                Ok(s) => s,
                Err(why) => {
                    eprintln!("llm-sidecar roi: cannot read /stats: {why}");
                    return ExitCode::FAILURE;
                }
            };
            let t = traffic(&snapshot, &stats, SystemTime::now());
            let json = serde_json::json!({
                "mode": "traffic",
                "config": config,
                "stats_url": url,
                "traffic": t,
            });
            (traffic_text(&t, url, &config), json)
        }
    };
    print!("{text}");
    if let Some(path) = flags.value("--json") {
        let mut body = serde_json::to_string_pretty(&json).unwrap_or_default();
        body.push('\n');
        if let Err(why) = cli::write_output(path, &body) {
            eprintln!("llm-sidecar roi: {why}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
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

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn the_playbook_volume_on_the_embedded_prices() {
        let rows = price_table(&embedded(), Volume::new(500_000_000, 3.0));
        let ds = rows.iter().find(|r| r.route == "deepseek-v3.2").unwrap();
        // Official: 1.5B input x $0.50 + 500M output x $1.50; relay: x $0.21 and x $0.42.
        assert!(close(ds.official_monthly_usd.unwrap(), 1500.0));
        assert!(close(ds.relay_monthly_usd.unwrap(), 525.0));
        assert!(close(ds.saving_monthly_usd.unwrap(), 975.0));
        assert!(close(ds.saving_yearly_usd.unwrap(), 11_700.0));
        assert!(close(ds.saving_percent.unwrap(), 65.0));
        // Kimi K2 has no official price: no saving is made up.
        let kimi = rows.iter().find(|r| r.route == "kimi-k2").unwrap();
        assert_eq!(kimi.official_monthly_usd, None);
        assert_eq!(kimi.saving_monthly_usd, None);
        assert!(kimi.relay_monthly_usd.is_some());
        let text = price_text(&rows, Volume::new(500_000_000, 3.0), "embedded default");
        assert!(text.contains("$11,700.00"), "{text}");
        assert!(text.contains("65.0 %"), "{text}");
        assert!(text.contains("500M output and 1.5B input"), "{text}");
    }

    #[test]
    fn output_only_volume_is_the_playbooks_72_percent() {
        let rows = price_table(&embedded(), Volume::new(1_000_000, 0.0));
        let ds = rows.iter().find(|r| r.route == "deepseek-v3.2").unwrap();
        assert!(close(ds.saving_percent.unwrap(), 72.0));
    }

    #[test]
    fn traffic_is_priced_projected_and_unknown_costs_are_warned_about() {
        let stats = StatsView::parse(
            br#"{"since_unix": 1000, "total": {}, "targets": [
              {"route":"deepseek-v3.2","provider":"holysheep","model":"deepseek-v3.2","path":"relay",
               "requests":10,"failures":1,"tokens":{"input":3000000,"output":1000000,"cached_input":0},
               "cost_usd":1.05},
              {"route":"minimax-m2","provider":"holysheep","model":"MiniMax-M2","path":"relay",
               "requests":2,"tokens":{"input":10,"output":5,"cached_input":0},"cost_usd":0}
            ]}"#,
        )
        .unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + 86_400);
        let t = traffic(&embedded(), &stats, now);
        assert_eq!(t.observed_seconds, 86_400);
        assert!(close(t.month_factor, 30.0));
        let ds = &t.routes[0];
        assert_eq!(
            (ds.route.as_str(), ds.requests, ds.failures),
            ("deepseek-v3.2", 10, 1)
        );
        // 3M x $0.50 + 1M x $1.50 officially.
        assert!(close(ds.official_usd.unwrap(), 3.0));
        assert!(close(ds.saving_usd.unwrap(), 1.95));
        assert!(close(ds.monthly_saving_usd.unwrap(), 58.5));
        assert!(!ds.spend_incomplete);
        let mm = &t.routes[1];
        assert!(mm.spend_incomplete);
        assert_eq!(mm.official_usd, None);
        assert_eq!(t.total.official_usd, None);
        assert!(t.total.spend_incomplete);
        assert!(
            t.warnings
                .iter()
                .any(|w| w.contains("holysheep/MiniMax-M2") && w.contains("no price")),
            "{:?}",
            t.warnings
        );
        let text = traffic_text(&t, "http://x/stats", "embedded default");
        assert!(text.contains("+ unknown"), "{text}");
        assert!(
            text.contains("warning: route `minimax-m2` has no official price"),
            "{text}"
        );
    }

    #[test]
    fn token_counts_read_back_as_written() {
        assert_eq!(tokens(500_000_000), "500M");
        assert_eq!(tokens(1_500_000_000), "1.5B");
        assert_eq!(tokens(750_000), "750k");
        assert_eq!(tokens(42), "42");
    }
}
