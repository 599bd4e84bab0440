//! The real binary as an operator runs it: starts on a config file, serves, never logs a key,
//! drains an in-flight stream on SIGTERM and exits 0; `check-config` reports every problem; it
//! has no fake provider in it.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use http_body_util::BodyExt;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_llm-sidecar");

#[tokio::test]
async fn sigterm_drains_a_stream_and_logs_never_show_a_key() {
    let fake = fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("routing.yaml");
    let extra = "  gated:\n    relay: { provider: sheep, model: gate=term }\n";
    std::fs::write(&config_path, config_with(&fake, true, extra)).expect("write config");

    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config_path)
        .env("LLM_SIDECAR_CONFIGMAP", "off")
        .env_remove("HOLY_SHEEP_ENABLED")
        .env("LLM_SIDECAR_LISTEN", "127.0.0.1:0")
        .env("LLM_SIDECAR_ADMIN_LISTEN", "127.0.0.1:0")
        .env("LLM_SIDECAR_LOG_FORMAT", "json")
        .env("RUST_LOG", "trace")
        .env("TEST_RELAY_KEY", RELAY_KEY)
        .env("TEST_OFFICIAL_KEY", OFFICIAL_KEY)
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let stderr = child.stderr.take().expect("stderr");
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut logs = Vec::new();
    let (data, admin) = loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the sidecar logs that it is serving");
        logs.push(line.clone());
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if event["message"] == "llm-sidecar serving" {
            let addr = |k: &str| {
                event[k]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .expect("address")
            };
            break (addr("data_addr"), addr("admin_addr"));
        }
    };
    let _ = admin;
    let client = client();

    let (status, _, _) = call(
        &client,
        post(data, "/v1/chat/completions", chat_body("chat", false)),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, _) = call(
        &client,
        post(data, "/v1/chat/completions", chat_body("unknown", false)),
    )
    .await;
    assert_eq!(status, 404);

    let response = send(
        &client,
        post(data, "/v1/chat/completions", chat_body("gated", true)),
    )
    .await;
    let mut body = response.into_body();
    body.frame().await.expect("first frame").expect("frame ok");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    // The drain has begun once the sidecar says so; only then let the upstream finish.
    loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the sidecar logs the drain");
        logs.push(line.clone());
        if line.contains("shutting down") {
            break;
        }
    }
    fake.release("term");
    let rest = body
        .collect()
        .await
        .expect("stream completes after SIGTERM")
        .to_bytes();
    assert_eq!(sse_data(&rest).last().map(String::as_str), Some("[DONE]"));

    let status = child.wait().expect("the sidecar exits");
    assert_eq!(status.code(), Some(0));
    reader.join().expect("reader thread");
    logs.extend(lines_rx.try_iter());
    let all = logs.join("\n");
    assert!(all.contains("drained"), "{all}");
    for secret in [RELAY_KEY, OFFICIAL_KEY, APP_KEY] {
        assert!(!all.contains(secret), "a key appears in the logs");
    }
}

#[test]
fn check_config_accepts_the_default_and_lists_every_problem_of_a_bad_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.yaml");
    let out = Command::new(BIN)
        .arg("default-config")
        .output()
        .expect("runs");
    assert!(out.status.success());
    std::fs::write(&good, &out.stdout).expect("write");
    let out = check_config(&good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid (6 providers"));

    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(&good)
        .expect("read")
        .replace("rollout_percent: 100", "rollout_percent: 150")
        .replace("provider: moonshot", "provider: moonshoot");
    std::fs::write(&bad, text).expect("write");
    let out = check_config(&bad);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rollout_percent: 150 is out of range"),
        "{stderr}"
    );
    assert!(
        stderr.contains("routes.kimi-k2.official.provider: unknown provider `moonshoot`"),
        "{stderr}"
    );
}

#[test]
fn bad_settings_exit_64_naming_each_variable() {
    let out = Command::new(BIN)
        .env("LLM_SIDECAR_LISTEN", "not-an-address")
        .env("LLM_SIDECAR_SHUTDOWN_GRACE", "25")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("LLM_SIDECAR_LISTEN") && stderr.contains("LLM_SIDECAR_SHUTDOWN_GRACE"),
        "{stderr}"
    );
}

/// The product binary carries no fake provider (it is the `llm-sidecar-fake-provider` binary of
/// the fake-provider/ crate, a dev-dependency only): `fake-provider` is an unknown command, the
/// usage does not offer it, and none of the fake provider's own strings are linked in (its
/// binary prints the first one: fake-provider/tests/binary.rs).
#[tokio::test]
async fn the_product_binary_has_no_fake_provider() {
    let (code, out, err) = run_bin(&["fake-provider", "--listen", "127.0.0.1:0"], vec![]).await;
    assert_eq!(code, 64, "{out}{err}");
    assert!(err.contains("unknown command `fake-provider`"), "{err}");
    // The usage printed with the error does not offer it either.
    let usage = usage_of(&err);
    assert!(
        usage.contains("check-config") && !usage.contains("fake"),
        "{err}"
    );
    let (code, out, _) = run_bin(&["--help"], vec![]).await;
    assert_eq!(code, 0);
    assert!(out.contains("check-config"), "{out}");
    assert!(
        !out.contains("fake"),
        "the usage still mentions a fake provider:\n{out}"
    );

    let binary = std::fs::read(BIN).expect("read the product binary");
    for marker in [
        "fake provider listening on",
        "fake provider fault",
        "x-fake-provider",
    ] {
        assert!(
            memchr::memmem::find(&binary, marker.as_bytes()).is_none(),
            "the product binary contains the fake provider's `{marker}`"
        );
    }
}

/// The usage text printed after an error line.
fn usage_of(stderr: &str) -> &str {
    stderr.split_once("usage:").map_or("", |(_, usage)| usage)
}

/// Runs `llm-sidecar <args>` with `env` off the async runtime; returns (exit code, stdout, stderr).
async fn run_bin(args: &[&str], env: Vec<(&'static str, String)>) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(BIN)
            .args(&args)
            .env_remove("OPENAI_BASE_URL")
            .envs(env)
            .output()
            .expect("binary runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("join")
}

#[tokio::test]
async fn exec_probes_pass_on_a_serving_sidecar_and_fail_on_a_closed_port() {
    let fake = fake().await;
    let sidecar = sidecar_with(test_settings(), &config_with(&fake, true, "")).await;
    let admin = ("LLM_SIDECAR_ADMIN_LISTEN", sidecar.admin_addr.to_string());
    let (code, out, err) = run_bin(&["probe", "ready"], vec![admin.clone()]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, _) = run_bin(&["probe", "live"], vec![admin]).await;
    assert_eq!(code, 0);
    // What an injected app sees through OPENAI_BASE_URL.
    let base = (
        "OPENAI_BASE_URL",
        format!("http://{}/v1", sidecar.data_addr),
    );
    let (code, out, err) = run_bin(&["probe", "models"], vec![base]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("chat"), "{out}");

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, _, err) = run_bin(
        &["probe", "ready"],
        vec![("LLM_SIDECAR_ADMIN_LISTEN", closed.to_string())],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("/ready"), "{err}");
    let (code, _, err) = run_bin(&["probe", "soon"], vec![]).await;
    assert_eq!(code, 64, "{err}");
}

#[tokio::test]
async fn the_injector_refuses_to_start_on_a_bad_template_or_a_missing_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let template = dir.path().join("sidecar.yaml");
    std::fs::write(
        &template,
        "mode: native\nport: 4000\ncontainer: {name: s, image: i, imagePolicy: x}\n",
    )
    .unwrap();
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let missing = dir.path().join("tls.crt");
    let args = [
        "inject".to_string(),
        "--listen=127.0.0.1:0".into(),
        "--template".into(),
        path(&template),
        "--tls-cert".into(),
        path(&missing),
        "--tls-key".into(),
        path(&dir.path().join("tls.key")),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = run_bin(&args, vec![]).await;
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("unknown field `container.imagePolicy`"),
        "{err}"
    );

    std::fs::write(
        &template,
        "mode: native\nport: 4000\ncontainer: {name: s, image: i}\n",
    )
    .unwrap();
    let (code, _, err) = run_bin(&args, vec![]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("tls.crt"), "{err}");
    let (code, _, err) = run_bin(&["inject", "--listen", "127.0.0.1:0"], vec![]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--template"), "{err}");
}
