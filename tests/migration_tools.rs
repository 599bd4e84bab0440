//! `llm-sidecar bench-providers` and `llm-sidecar roi` as an engineer runs them before and
//! during a migration: the real binary against the fake provider, whose fault models give the
//! targets different latencies and error rates. The reports must tell the targets apart, count
//! every failure by class (never as a latency), and price exactly the tokens the fake provider
//! reported.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_llm-sidecar");

/// 40 characters: the fake provider counts 10 prompt tokens.
const PROMPT: &str = "0123456789012345678901234567890123456789";

/// Runs the binary off the test's runtime, so the fake provider keeps answering meanwhile.
async fn run(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&args)
            .env_remove("HOLY_SHEEP_ENABLED")
            .env_remove("LLM_SIDECAR_CONFIG")
            .env("LLM_SIDECAR_CONFIGMAP", "off")
            .env("TEST_RELAY_KEY", RELAY_KEY)
            .env("TEST_OFFICIAL_KEY", OFFICIAL_KEY)
            .output()
            .expect("llm-sidecar runs")
    })
    .await
    .expect("the command finishes")
}

fn args(dir: &Path, items: &[&str]) -> Vec<String> {
    items
        .iter()
        .map(|a| a.replace("{dir}", &dir.display().to_string()))
        .collect()
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("the JSON result is written");
    serde_json::from_str(&text).expect("the JSON result parses")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Five targets: fast and priced, slow and dearer, and three that fail their first requests
/// (rate limited, server errors, silence past the header timeout), all slow.
fn bench_config(fake: &FakeProvider) -> String {
    format!(
        "timeouts:
  response_headers: 300ms
providers:
  fast:
    kind: relay
    base_url: {fast}
    api_key: {{ env: TEST_RELAY_KEY }}
  slow:
    kind: official
    base_url: {slow}
    api_key: {{ env: TEST_OFFICIAL_KEY }}
  flaky:
    kind: official
    base_url: {flaky}
    api_key: {{ env: TEST_OFFICIAL_KEY }}
routes:
  chat:
    relay: {{ provider: fast, model: 'm+latency=5+tokens=8', price: {{ input: 0.2, output: 0.4 }} }}
    official: {{ provider: slow, model: 'm+latency=200+tokens=8', price: {{ input: 1.0, output: 2.0 }} }}
  limited:
    official: {{ provider: flaky, model: 'limited+latency=200+fail-times=5+rate-limit+tokens=2' }}
  broken:
    official: {{ provider: flaky, model: 'broken+latency=200+fail-times=3+tokens=8' }}
  silent:
    official: {{ provider: flaky, model: 'silent+latency=200+fail-times=2+silent+tokens=8' }}
  embed:
    relay: {{ provider: fast, model: text-embedding-3-small }}
",
        fast = fake.base_url("fast"),
        slow = fake.base_url("slow"),
        flaky = fake.base_url("flaky"),
    )
}

#[tokio::test]
async fn bench_tells_fast_from_slow_counts_errors_by_class_and_prices_the_fakes_tokens() {
    let fake = fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("routing.yaml"), bench_config(&fake)).expect("config");
    let prompt = serde_json::json!({"messages": [{"role": "user", "content": PROMPT}]});
    std::fs::write(dir.path().join("prompts.jsonl"), format!("{prompt}\n")).expect("prompts");

    let out = run(args(
        dir.path(),
        &[
            "bench-providers",
            "--config",
            "{dir}/routing.yaml",
            "--prompts",
            "{dir}/prompts.jsonl",
            "--iterations",
            "20",
            "--concurrency",
            "4",
            "--json",
            "{dir}/bench.json",
            "--markdown",
            "{dir}/bench.md",
        ],
    ))
    .await;
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = read_json(&dir.path().join("bench.json"));
    let targets = report["targets"].as_array().expect("targets");
    let names: Vec<&str> = targets
        .iter()
        .filter_map(|t| t["target"].as_str())
        .collect();
    // Every chat target, the embedding one left out; the 5 ms target first (sorted by p50).
    assert_eq!(names.len(), 5, "{names:?}");
    assert_eq!(names[0], "fast/m+latency=5+tokens=8", "{text}");
    assert!(!names.iter().any(|n| n.contains("embedding")));
    let by_name = |name: &str| {
        targets
            .iter()
            .find(|t| t["target"] == name)
            .unwrap_or_else(|| panic!("{name} in {names:?}"))
    };
    let fast = by_name("fast/m+latency=5+tokens=8");
    let slow = by_name("slow/m+latency=200+tokens=8");
    let p50 = |t: &Value| t["latency_ms"]["p50"].as_f64().expect("p50");
    assert!(p50(fast) * 5.0 < p50(slow), "{text}");

    // No retries and no fallback: each target got exactly its 20 requests, with its own key.
    for (label, n) in [("fast", 20), ("slow", 20), ("flaky", 60)] {
        let seen = fake.requests_for(label);
        assert_eq!(seen.len(), n, "{label}");
        assert!(seen.iter().all(|r| r.path == "/v1/chat/completions"));
    }
    assert!(fake
        .requests_for("fast")
        .iter()
        .all(|r| r.authorization.as_deref() == Some(&format!("Bearer {RELAY_KEY}"))));

    // Errors by class, exactly as many as the fault models produced; never a latency.
    for (name, class, errors) in [
        (
            "flaky/limited+latency=200+fail-times=5+rate-limit+tokens=2",
            "rate_limited",
            5,
        ),
        (
            "flaky/broken+latency=200+fail-times=3+tokens=8",
            "server_error",
            3,
        ),
        (
            "flaky/silent+latency=200+fail-times=2+silent+tokens=8",
            "timeout",
            2,
        ),
    ] {
        let t = by_name(name);
        assert_eq!(t["errors"], errors, "{name}");
        assert_eq!(t["errors_by_class"][class], errors, "{name}");
        assert_eq!(t["answered"], 20 - errors, "{name}");
        assert_eq!(t["latency_ms"]["samples"], 20 - errors, "{name}");
        assert_eq!(t["latency_ms"]["low_sample"], true, "{name}");
        assert!((t["error_rate"].as_f64().unwrap() - errors as f64 / 20.0).abs() < 1e-9);
    }
    assert_eq!(fast["errors"], 0);
    assert_eq!(fast["latency_ms"]["low_sample"], false);

    // Tokens as the fake provider reported them (10 in, 9 out per answer) and cost = tokens x
    // the config's price.
    assert_eq!(
        (
            fast["input_tokens"].as_u64(),
            fast["output_tokens"].as_u64()
        ),
        (Some(200), Some(180))
    );
    assert_eq!(fast["usage_estimated"], 0);
    let cost = (200.0 * 0.2 + 180.0 * 0.4) / 1e6;
    assert!(
        (fast["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-12,
        "{fast}"
    );
    assert_eq!(fast["price_per_1m_output_usd"], 0.4);
    let limited = by_name("flaky/limited+latency=200+fail-times=5+rate-limit+tokens=2");
    assert_eq!(limited["output_tokens"], 15 * 3);
    assert_eq!(
        limited["cost_usd"],
        Value::Null,
        "no price, no made-up cost"
    );

    // The two 8-word targets agree with each other more than with the 2-word one.
    let agreement = |t: &Value| t["agreement"].as_f64().expect("agreement");
    assert!(agreement(limited) < agreement(fast), "{text}");

    assert_eq!(report["cheapest_near_fastest"], "fast/m+latency=5+tokens=8");
    assert!(
        text.contains("Cheapest within 20 % of the best p50"),
        "{text}"
    );
    assert!(text.contains("25%: 5 rate_limited"), "{text}");
    let md = std::fs::read_to_string(dir.path().join("bench.md")).expect("markdown");
    assert!(md.contains("| target | answered |"), "{md}");
    // Not a terminal: plain progress lines, on stderr.
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains("fast/m+latency=5+tokens=8: 20/20 requests, 0 errors"),
        "{progress}"
    );
}

#[tokio::test]
async fn streaming_bench_measures_time_to_first_token_with_the_builtin_prompts() {
    let fake = fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("routing.yaml"), bench_config(&fake)).expect("config");
    let out = run(args(
        dir.path(),
        &[
            "bench-providers",
            "--config",
            "{dir}/routing.yaml",
            "--targets",
            "fast/m+latency=5+tokens=8+slow-first-token=150,slow/m+latency=5+tokens=8",
            "--iterations",
            "10",
            "--stream",
            "--json",
            "{dir}/bench.json",
        ],
    ))
    .await;
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ttft p50"), "{text}");
    let report = read_json(&dir.path().join("bench.json"));
    assert_eq!(report["stream"], true);
    let prompts: Vec<&str> = report["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for kind in ["code", "reasoning", "long-context", "cjk"] {
        assert!(prompts.contains(&kind), "{prompts:?}");
    }
    let targets = report["targets"].as_array().unwrap();
    // The target with a slow first token is second by p50 and by time to first token.
    assert_eq!(targets[0]["target"], "slow/m+latency=5+tokens=8", "{text}");
    let ttft = |t: &Value| t["first_token_ms"]["p50"].as_f64().expect("ttft");
    assert!(ttft(&targets[0]) * 3.0 < ttft(&targets[1]), "{text}");
    for t in targets {
        assert_eq!(t["answered"], 10, "{t}");
        // Usage came in the stream (include_usage): 9 output tokens per answer, none estimated.
        assert_eq!(t["output_tokens"], 90, "{t}");
        assert_eq!(t["usage_estimated"], 0, "{t}");
        assert_eq!(t["first_token_ms"]["samples"], 10);
    }
    // A target that is not a route of the config is measured, without a price.
    assert_eq!(targets[1]["cost_usd"], Value::Null);
    assert!(fake
        .requests_for("fast")
        .iter()
        .all(|r| r.body["stream"] == true && r.body["stream_options"]["include_usage"] == true));
}

#[tokio::test]
async fn bench_exits_non_zero_when_every_target_failed_and_64_on_bad_usage() {
    let fake = fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "providers:
  down:
    kind: official
    base_url: http://127.0.0.1:{port}/v1
  sick:
    kind: official
    base_url: {sick}
routes:
  a:
    official: {{ provider: down, model: m }}
  b:
    official: {{ provider: sick, model: 'm+error=503' }}
",
        port = closed_port(),
        sick = fake.base_url("sick"),
    );
    std::fs::write(dir.path().join("routing.yaml"), config).expect("config");
    let out = run(args(
        dir.path(),
        &[
            "bench-providers",
            "--config",
            "{dir}/routing.yaml",
            "--iterations",
            "3",
            "--json",
            "{dir}/bench.json",
        ],
    ))
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let report = read_json(&dir.path().join("bench.json"));
    assert_eq!(report["all_failed"], true);
    let classes: Vec<&Value> = report["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["errors_by_class"])
        .collect();
    assert!(
        classes.iter().any(|c| c["connection_error"] == 3),
        "{classes:?}"
    );
    assert!(
        classes.iter().any(|c| c["server_error"] == 3),
        "{classes:?}"
    );
    assert!(
        stdout(&out).contains("No target answered"),
        "{}",
        stdout(&out)
    );

    for bad in [
        vec!["bench-providers", "--iterations", "0"],
        vec!["bench-providers", "--targets", "nosuch/model"],
        vec!["bench-providers", "--frobnicate"],
        vec!["roi", "--monthly-output-tokens", "lots"],
    ] {
        let out = run(bad.iter().map(|s| s.to_string()).collect()).await;
        assert_eq!(out.status.code(), Some(64), "{bad:?}");
    }
}

#[tokio::test]
async fn roi_from_prices_is_the_playbook_table_for_this_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(args(
        dir.path(),
        &[
            "roi",
            "--monthly-output-tokens",
            "500M",
            "--json",
            "{dir}/roi.json",
        ],
    ))
    .await;
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    let report = read_json(&dir.path().join("roi.json"));
    assert_eq!(report["mode"], "prices");
    let row = report["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "deepseek-v3.2")
        .expect("the DeepSeek route");
    // 1.5B input and 500M output tokens: $1,500 officially, $525 on the relay.
    assert_eq!(row["official_monthly_usd"], 1500.0);
    assert!((row["relay_monthly_usd"].as_f64().unwrap() - 525.0).abs() < 1e-6);
    assert!((row["saving_yearly_usd"].as_f64().unwrap() - 11_700.0).abs() < 1e-6);
    assert!(
        text.contains("$975.00") && text.contains("65.0 %"),
        "{text}"
    );
}

#[tokio::test]
async fn roi_from_stats_prices_the_traffic_a_sidecar_saw_and_warns_about_unpriced_targets() {
    let fake = fake().await;
    let extra = "  cheap:
    relay: { provider: sheep, model: 'cheap+tokens=4', price: { input: 0.2, output: 0.4 } }
    official: { provider: deep, model: official-cheap, price: { input: 1.0, output: 3.0 } }
";
    let config = config_with(&fake, true, extra);
    let sidecar = sidecar(&config).await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("routing.yaml"), &config).expect("config");

    let (mut input, mut output) = (0, 0);
    for _ in 0..4 {
        let (status, _, body) = ask_json(&sidecar, "cheap", false).await;
        assert_eq!(status, 200);
        input += body["usage"]["prompt_tokens"].as_u64().unwrap();
        output += body["usage"]["completion_tokens"].as_u64().unwrap();
    }
    // `chat` has no prices at all: its traffic's cost is unknown.
    let (status, _, _) = ask_json(&sidecar, "chat", false).await;
    assert_eq!(status, 200);

    let url = format!("http://{}/stats", sidecar.admin_addr);
    let out = run(args(
        dir.path(),
        &[
            "roi",
            "--config",
            "{dir}/routing.yaml",
            "--from-stats",
            &url,
            "--json",
            "{dir}/roi.json",
        ],
    ))
    .await;
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = read_json(&dir.path().join("roi.json"));
    assert_eq!(report["mode"], "traffic");
    let traffic = &report["traffic"];
    let cheap = traffic["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "cheap")
        .expect("the cheap route");
    assert_eq!(
        (
            cheap["input_tokens"].as_u64(),
            cheap["output_tokens"].as_u64()
        ),
        (Some(input), Some(output))
    );
    assert_eq!(cheap["requests"], 4);
    let spend = (input as f64 * 0.2 + output as f64 * 0.4) / 1e6;
    let official = (input as f64 * 1.0 + output as f64 * 3.0) / 1e6;
    let close = |v: &Value, x: f64| (v.as_f64().unwrap() - x).abs() < 1e-9;
    assert!(close(&cheap["spend_usd"], spend), "{cheap}");
    assert!(close(&cheap["official_usd"], official), "{cheap}");
    assert!(close(&cheap["saving_usd"], official - spend), "{cheap}");
    let factor = traffic["month_factor"].as_f64().unwrap();
    assert!(close(
        &cheap["monthly_saving_usd"],
        (official - spend) * factor
    ));
    assert_eq!(cheap["spend_incomplete"], false);
    let warnings: Vec<&str> = traffic["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("sheep/relay-model") && w.contains("no price")),
        "{warnings:?}"
    );
    assert!(text.contains("warning: sheep/relay-model"), "{text}");
    sidecar.shutdown();
}
