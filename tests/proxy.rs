//! End-to-end behaviour of the data plane over real sockets: round trips, streaming without
//! buffering, key injection, routing flag, errors a client can act on, h2c, pass-through.

mod support;

use std::time::Duration;

use http_body_util::BodyExt;
use support::*;

#[tokio::test]
async fn non_stream_round_trip_goes_to_the_relay_with_the_upstream_model() {
    let fake = fake().await;
    let sidecar = sidecar(&config(&fake, true)).await;
    let client = client();

    let (status, headers, body) = call_json(
        &client,
        post(
            sidecar.data_addr,
            "/v1/chat/completions",
            chat_body("chat-latest", false),
        ),
    )
    .await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "x-llm-sidecar-provider"), "sheep");
    assert_eq!(header(&headers, "x-llm-sidecar-path"), "relay");
    assert_eq!(header(&headers, "x-llm-sidecar-route"), "chat");
    assert_eq!(
        header(&headers, "x-llm-sidecar-upstream-model"),
        "relay-model"
    );
    let content = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(content.starts_with("Hello from sheep."), "{content}");
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0);

    let seen = fake.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].label, "sheep");
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(seen[0].model, "relay-model");
    // Everything but the model is forwarded as the app sent it.
    assert_eq!(seen[0].body["messages"][0]["content"], "Say hello.");
}

#[tokio::test]
async fn stream_round_trip_delivers_every_event_and_done() {
    let fake = fake().await;
    let sidecar = sidecar(&config(&fake, true)).await;

    let (status, headers, body) = ask(&sidecar, "chat", true).await;

    assert_eq!(status, 200);
    assert!(header(&headers, "content-type").starts_with("text/event-stream"));
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let text = stream_text(&events);
    assert!(text.starts_with("Hello from sheep. w1 w2"), "{text}");
    assert!(text.ends_with(" w12"), "{text}");
}

#[tokio::test]
async fn the_first_chunk_reaches_the_client_while_the_upstream_is_still_sending() {
    let fake = fake().await;
    let extra = "  gated:\n    relay: { provider: sheep, model: gate=held }\n";
    let sidecar = sidecar(&config_with(&fake, true, extra)).await;
    let client = client();

    let response = send(
        &client,
        post(
            sidecar.data_addr,
            "/v1/chat/completions",
            chat_body("gated", true),
        ),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    // The fake holds the rest of its answer until the gate opens, so everything read here has
    // passed through the sidecar while the upstream response is unfinished.
    let mut received = Vec::new();
    while !String::from_utf8_lossy(&received).contains("Hello from sheep.") {
        let frame = body
            .frame()
            .await
            .expect("stream still open")
            .expect("frame ok");
        if let Ok(data) = frame.into_data() {
            received.extend_from_slice(&data);
        }
    }
    assert!(!String::from_utf8_lossy(&received).contains("[DONE]"));
    fake.release("held");
    let rest = body.collect().await.expect("rest of stream").to_bytes();
    received.extend_from_slice(&rest);
    let events = sse_data(&received);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(stream_text(&events).ends_with(" w12"));
}

#[tokio::test]
async fn the_upstream_sees_the_configured_key_and_never_the_apps() {
    let fake = fake().await;
    let path = tempfile::tempdir().expect("tempdir");
    let config_path = path.path().join("routing.yaml");
    let text = config(&fake, true);
    write_atomically(&config_path, &text);
    let mut settings = test_settings();
    settings.config_path = Some(config_path.clone());
    let sidecar = sidecar_with(settings, &text).await;
    let client = client();

    let mut req = post(
        sidecar.data_addr,
        "/v1/chat/completions",
        chat_body("chat", false),
    );
    req.headers_mut()
        .insert("x-api-key", APP_KEY.parse().expect("header"));
    req.headers_mut()
        .insert("openai-organization", "org-app".parse().expect("header"));
    let (status, _, _) = call(&client, req).await;
    assert_eq!(status, 200);
    write_atomically(&config_path, &config(&fake, false));
    eventually(
        Duration::from_secs(5),
        "routing flips to official",
        || async {
            let (_, headers, _) = ask(&sidecar, "chat", false).await;
            header(&headers, "x-llm-sidecar-provider") == "deep"
        },
    )
    .await;

    let relay = fake.requests_for("sheep");
    let official = fake.requests_for("deep");
    assert!(!relay.is_empty() && !official.is_empty());
    for seen in &relay {
        assert_eq!(
            seen.authorization.as_deref(),
            Some(&*format!("Bearer {RELAY_KEY}"))
        );
    }
    for seen in &official {
        assert_eq!(
            seen.authorization.as_deref(),
            Some(&*format!("Bearer {OFFICIAL_KEY}"))
        );
    }
    for seen in fake.requests() {
        for (name, value) in &seen.headers {
            let value = value.to_str().unwrap_or_default();
            assert!(!value.contains(APP_KEY), "app key forwarded in {name}");
            assert_ne!(name.as_str(), "openai-organization");
        }
    }

    let (_, _, config_body) = call(&client, get(sidecar.admin_addr, "/config")).await;
    let config_text = String::from_utf8_lossy(&config_body);
    assert!(config_text.contains("TEST_RELAY_KEY"), "{config_text}");
    for secret in [RELAY_KEY, OFFICIAL_KEY, APP_KEY] {
        assert!(!config_text.contains(secret), "/config shows a key");
    }
}

#[tokio::test]
async fn a_key_file_is_reread_when_the_secret_rotates() {
    let fake = fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = dir.path().join("relay-key");
    std::fs::write(&key_path, "sk-first\n").expect("write key");
    let text = config(&fake, true).replace(
        "api_key: { env: TEST_RELAY_KEY }",
        &format!("api_key: {{ file: {} }}", key_path.display()),
    );
    let sidecar = sidecar(&text).await;

    let (status, _, _) = ask(&sidecar, "chat", false).await;
    assert_eq!(status, 200);
    assert_eq!(
        fake.requests()[0].authorization.as_deref(),
        Some("Bearer sk-first")
    );

    write_atomically(&key_path, "sk-second\n");
    eventually(
        Duration::from_secs(5),
        "the rotated key is used",
        || async {
            ask(&sidecar, "chat", false).await;
            fake.requests()
                .last()
                .and_then(|r| r.authorization.clone())
                .as_deref()
                == Some("Bearer sk-second")
        },
    )
    .await;
}

#[tokio::test]
async fn a_missing_key_fails_over_and_is_reported_instead_of_calling_unauthenticated() {
    let fake = fake().await;
    let text = config(&fake, true).replace("TEST_RELAY_KEY", "UNSET_KEY_VARIABLE");
    let sidecar = sidecar(&text).await;
    // A local misconfiguration is not the target's fault: its breaker never opens, so every
    // request still looks at it first (and says why it moved on).
    for _ in 0..5 {
        let (status, headers, _) = ask_json(&sidecar, "chat", false).await;
        assert_eq!(
            (status.as_u16(), header(&headers, "x-llm-sidecar-provider")),
            (200, "deep")
        );
        assert_eq!(
            header(&headers, "x-llm-sidecar-attempt-log"),
            "sheep/relay-model=sidecar_config,deep/official-model=ok"
        );
    }
    assert!(
        fake.requests_for("sheep").is_empty(),
        "no unauthenticated call"
    );
    let (_, _, config) = call_json(&client(), get(sidecar.admin_addr, "/config")).await;
    let problem = config["config"]["providers"]["sheep"]["problem"]
        .as_str()
        .unwrap_or_default();
    assert!(problem.contains("UNSET_KEY_VARIABLE"), "{config}");
    assert_eq!(
        config["providers"]["deep"]["problem"],
        serde_json::Value::Null
    );

    let text = text.replace("TEST_OFFICIAL_KEY", "ANOTHER_UNSET_VARIABLE");
    let sidecar = sidecar_with(test_settings(), &text).await;
    let (status, headers, body) = ask_json(&sidecar, "chat", false).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(
        header(&headers, "x-llm-sidecar-error"),
        "all_targets_failed"
    );
    assert_eq!(body["error"]["code"], "provider_key_missing");
    assert_eq!(body["error"]["type"], "sidecar_config");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    // It names the target and what is missing.
    assert!(message.contains("UNSET_KEY_VARIABLE"), "{body}");
    assert!(message.contains("sheep/relay-model"), "{body}");
    // The five answers of the first sidecar; nothing left this one.
    assert_eq!(fake.requests().len(), 5);
}

#[tokio::test]
async fn routing_disabled_sends_every_model_endpoint_to_the_official_provider() {
    let fake = fake().await;
    let sidecar = sidecar(&config(&fake, false)).await;
    let client = client();

    let (status, headers, _) = ask(&sidecar, "chat", false).await;
    assert_eq!(
        (status, header(&headers, "x-llm-sidecar-path")),
        (200, "official")
    );
    assert_eq!(header(&headers, "x-llm-sidecar-reason"), "routing_disabled");

    let body = serde_json::json!({"model": "embed", "input": ["a", "b"]}).to_string();
    let (status, headers, json) =
        call_json(&client, post(sidecar.data_addr, "/v1/embeddings", body)).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(header(&headers, "x-llm-sidecar-provider"), "deep");
    assert_eq!(json["data"].as_array().map(Vec::len), Some(2));

    let body = serde_json::json!({"model": "chat", "prompt": "Once"}).to_string();
    let (status, _, json) =
        call_json(&client, post(sidecar.data_addr, "/v1/completions", body)).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["object"], "text_completion");

    let models: Vec<String> = fake
        .requests()
        .iter()
        .map(|r| format!("{}:{}", r.label, r.model))
        .collect();
    assert_eq!(
        models,
        [
            "deep:official-model",
            "deep:official-embed",
            "deep:official-model"
        ]
    );
}

#[tokio::test]
async fn models_are_listed_and_retrieved_in_openai_format() {
    let fake = fake().await;
    let sidecar = sidecar(&config(&fake, true)).await;
    let client = client();

    let (status, _, list) = call_json(&client, get(sidecar.data_addr, "/v1/models")).await;
    assert_eq!(status, 200);
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["chat", "chat-latest", "embed"]);
    assert_eq!(list["data"][0]["object"], "model");

    let (status, _, model) =
        call_json(&client, get(sidecar.data_addr, "/v1/models/chat-latest")).await;
    assert_eq!(
        (status.as_u16(), model["id"].as_str()),
        (200, Some("chat-latest"))
    );
    let (status, _, _) = call_json(&client, get(sidecar.data_addr, "/v1/models/nope")).await;
    assert_eq!(status, 404);
    assert!(
        fake.requests().is_empty(),
        "listing models is answered locally"
    );
}

#[tokio::test]
async fn other_v1_paths_pass_through_to_the_chosen_provider() {
    let fake = fake().await;
    let sidecar = sidecar(&config(&fake, true)).await;
    let client = client();

    let (status, headers, json) =
        call_json(&client, get(sidecar.data_addr, "/v1/files?purpose=batch")).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(header(&headers, "x-llm-sidecar-provider"), "sheep");
    assert_eq!(json["echo"]["path"], "/v1/files");
    assert_eq!(
        fake.requests()[0].authorization.as_deref(),
        Some(&*format!("Bearer {RELAY_KEY}"))
    );

    let body = serde_json::json!({"model": "chat", "input": "moderate me"}).to_string();
    let (status, _, json) =
        call_json(&client, post(sidecar.data_addr, "/v1/moderations", body)).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        json["echo"]["body"]["model"], "relay-model",
        "a known model is rewritten on pass-through too"
    );
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let fake = fake().await;
    let sidecar = sidecar(&config(&fake, true)).await;
    let response = send(
        &h2c_client(),
        post(
            sidecar.data_addr,
            "/v1/chat/completions",
            chat_body("chat", true),
        ),
    )
    .await;
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(sse_data(&body).last().map(String::as_str), Some("[DONE]"));
}

async fn assert_error(
    response: (http::StatusCode, http::HeaderMap, serde_json::Value),
    status: u16,
    code: &str,
) -> serde_json::Value {
    let (got, headers, body) = response;
    assert_eq!(got, status, "{body}");
    assert_eq!(header(&headers, "x-llm-sidecar-error"), code);
    assert_eq!(header(&headers, "content-type"), "application/json");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["type"].is_string());
    assert!(!body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .is_empty());
    body
}

#[tokio::test]
async fn malformed_json_is_a_400() {
    let fake = fake().await;
    let sidecar = sidecar(&config(&fake, true)).await;
    let client = client();
    for body in [
        "{\"model\": \"chat\", ",
        "[]",
        "{\"model\": 7}",
        "{\"messages\": []}",
    ] {
        let response = call_json(
            &client,
            post(sidecar.data_addr, "/v1/chat/completions", body),
        )
        .await;
        let json = assert_error(response, 400, "invalid_request").await;
        assert_eq!(json["error"]["type"], "invalid_request_error");
    }
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn an_unknown_model_is_a_404_listing_the_aliases() {
    let fake = fake().await;
    let sidecar = sidecar(&config(&fake, true)).await;
    let response = ask_json(&sidecar, "gpt-9", false).await;
    let json = assert_error(response, 404, "model_not_found").await;
    let message = json["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("gpt-9") && message.contains("chat, chat-latest, embed"),
        "{message}"
    );
}

#[tokio::test]
async fn a_body_over_the_cap_is_a_413() {
    let fake = fake().await;
    let mut settings = test_settings();
    settings.max_body_bytes = 1024;
    let sidecar = sidecar_with(settings, &config(&fake, true)).await;
    let big = serde_json::json!({"model": "chat", "messages": [{"role": "user", "content": "x".repeat(4000)}]}).to_string();
    let response = call_json(
        &client(),
        post(sidecar.data_addr, "/v1/chat/completions", big),
    )
    .await;
    assert_error(response, 413, "request_too_large").await;
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn unreachable_upstreams_are_a_502_listing_every_attempt() {
    let fake = fake().await;
    let dead = format!("http://127.0.0.1:{}/v1", closed_port());
    let text = config(&fake, true)
        .replace(&fake.base_url("sheep"), &dead)
        .replace(&fake.base_url("deep"), &dead);
    let sidecar = sidecar(&text).await;
    let (status, headers, body) = ask_json(&sidecar, "chat", false).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(
        header(&headers, "x-llm-sidecar-error"),
        "all_targets_failed"
    );
    let attempts = body["error"]["attempts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let outcomes: Vec<String> = attempts
        .iter()
        .map(|a| {
            format!(
                "{}={}",
                a["provider"].as_str().unwrap_or(""),
                a["outcome"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            "sheep=connection_error",
            "sheep=connection_error",
            "deep=connection_error",
            "deep=connection_error"
        ]
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot connect"),
        "{body}"
    );
}

#[tokio::test]
async fn a_silent_upstream_is_a_504_after_one_header_timeout() {
    let fake = fake().await;
    let extra = "  quiet:\n    relay: { provider: sheep, model: silent }\n";
    let text =
        config_with(&fake, true, extra).replace("response_headers: 2s", "response_headers: 300ms");
    let sidecar = sidecar(&text).await;
    let (status, headers, body) = ask_json(&sidecar, "quiet", false).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(
        header(&headers, "x-llm-sidecar-error"),
        "all_targets_failed"
    );
    assert_eq!(body["error"]["code"], "timeout");
    // A silent target is not retried: one attempt, one request upstream.
    let attempts = body["error"]["attempts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(attempts.len(), 1, "{body}");
    assert_eq!(attempts[0]["outcome"], "timeout");
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn wrong_methods_and_paths_get_openai_errors() {
    let fake = fake().await;
    let sidecar = sidecar(&config(&fake, true)).await;
    let client = client();
    let response = call_json(&client, get(sidecar.data_addr, "/v1/chat/completions")).await;
    assert_error(response, 405, "method_not_allowed").await;
    let response = call_json(&client, get(sidecar.data_addr, "/healthz")).await;
    assert_error(response, 404, "not_found").await;
}

#[tokio::test]
async fn admin_port_reports_liveness_readiness_metrics_and_config() {
    let fake = fake().await;
    let sidecar = sidecar(&config(&fake, true)).await;
    let client = client();
    for _ in 0..3 {
        ask(&sidecar, "chat", false).await;
    }
    ask(&sidecar, "nope", false).await;

    let (status, _, _) = call(&client, get(sidecar.admin_addr, "/live")).await;
    assert_eq!(status, 200);
    let (status, _, _) = call(&client, get(sidecar.admin_addr, "/ready")).await;
    assert_eq!(status, 200);

    let text = metrics_text(&client, sidecar.admin_addr).await;
    assert_eq!(
        metric_value(
            &text,
            r#"llm_sidecar_requests_total{route="chat",provider="sheep",model="relay-model",path="relay",status="200",outcome="success"}"#
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            r#"llm_sidecar_requests_total{route="none",provider="none",model="none",path="none",status="404",outcome="rejected"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            r#"llm_sidecar_request_duration_seconds_count{route="chat",provider="sheep",model="relay-model"}"#
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "llm_sidecar_config_generation "),
        Some(1.0),
        "{text}"
    );

    let (status, _, config) = call_json(&client, get(sidecar.admin_addr, "/config")).await;
    assert_eq!(status, 200);
    assert_eq!(config["generation"], 1);
    assert_eq!(
        config["config"]["routes"]["chat"]["relay"]["model"],
        "relay-model"
    );
    assert_eq!(
        config["config"]["providers"]["sheep"]["api_key"]["env"],
        "TEST_RELAY_KEY"
    );
    assert_eq!(
        config["config"]["providers"]["sheep"]["api_key"]["present"],
        true
    );
}
