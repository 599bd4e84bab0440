"""Traces, metrics, /stats and logs as a user sees them: the real sidecar binary exporting to real
OTLP receivers (gRPC and HTTP/protobuf) on loopback, driven by the OpenAI Python SDK."""

import contextlib
import json
import re
import secrets
import time
import urllib.request

import openai
import pytest

import otlp
from conftest import KEYS, eventually, start_sidecar

# The relay side of `flaky` always answers 500: two attempts there (the retry), then the
# official side answers.
FLAKY_ROUTE = """
  flaky:
    relay: { provider: holysheep, model: "deepseek-v3.2+error=500", price: { input: 0.21, output: 0.42 } }
    official: { provider: deepseek, model: deepseek-chat, price: { input: 0.50, output: 1.50 } }
"""
# What the app says: it must never show up in a span.
SECRET_WORDS = "the passphrase is zebra-4217"
# Asks the fake provider to send back the traceparent it received as x-fake-traceparent.
ECHO_TRACEPARENT = "x-fake-echo-traceparent"
RELAY = (0.21, 0.42)
OFFICIAL = (0.50, 1.50)
DOWNWARD_API = {"POD_NAME": "shop-7d9f", "POD_NAMESPACE": "shop", "NODE_NAME": "node-3"}


@pytest.fixture(scope="module")
def flaky_config(routing_config, tmp_path_factory):
    text = routing_config.read_text()
    assert text.rstrip().splitlines()[-1].startswith("    "), "routes is the last section"
    path = tmp_path_factory.mktemp("flaky") / "routing.yaml"
    path.write_text(text + FLAKY_ROUTE)
    return path


def cost(usage, price):
    return (usage.prompt_tokens * price[0] + usage.completion_tokens * price[1]) / 1e6


def client_for(sidecar):
    return openai.OpenAI(base_url=sidecar.base_url, api_key="sk-app-key-not-for-providers", max_retries=0)


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def metrics(sidecar):
    """The admin port's /metrics as {(name, frozenset(labels)): value}."""
    with urllib.request.urlopen(sidecar.admin + "/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        assert m, line
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(values, name, **labels):
    """The sum of `name` over every series whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, l), v in values.items() if n == name and want <= set(l))


def all_attribute_text(spans):
    return " ".join(f"{k}={v}" for s in spans for k, v in s.attributes.items())


@pytest.mark.parametrize("protocol", otlp.PROTOCOLS)
def test_a_retried_then_failed_over_request_is_one_trace_under_the_apps_span(protocol, flaky_config):
    with otlp.receiver(protocol) as rx:
        env = rx.env()
        env.update(DOWNWARD_API)
        sidecar = start_sidecar(flaky_config, extra_env=env)
        try:
            app_trace, app_span = secrets.token_hex(16), secrets.token_hex(8)
            raw = client_for(sidecar).chat.completions.with_raw_response.create(
                model="flaky",
                messages=[{"role": "user", "content": SECRET_WORDS}],
                max_tokens=50,
                temperature=0.3,
                extra_headers={"traceparent": f"00-{app_trace}-{app_span}-01", ECHO_TRACEPARENT: "1"},
            )
            answer = raw.parse()
            assert raw.headers["x-llm-sidecar-attempts"] == "3"
            assert raw.headers["x-llm-sidecar-fallbacks"] == "1"
            assert raw.headers["x-llm-sidecar-trace-id"] == app_trace
            header_cost = float(raw.headers["x-llm-sidecar-cost-usd"])
            assert header_cost == pytest.approx(cost(answer.usage, OFFICIAL), rel=1e-6)

            spans = rx.wait_for(
                lambda spans: sum(s.trace_id == app_trace for s in spans) >= 4, what="the request's 4 spans"
            )
        finally:
            sidecar.stop()

    mine = [s for s in spans if s.trace_id == app_trace]
    servers = [s for s in mine if s.kind == "SERVER"]
    assert len(servers) == 1, [str(s) for s in mine]
    server = servers[0]
    assert server.name == "POST /v1/chat/completions"
    assert server.parent_span_id == app_span, "the sidecar's span is a child of the app's"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["llm_sidecar.fallback"] is True
    assert server.attributes["llm_sidecar.attempts"] == 3
    assert server.resource["service.name"] == "llm-sidecar"
    assert server.resource["k8s.pod.name"] == "shop-7d9f"
    assert server.resource["k8s.namespace.name"] == "shop"
    assert server.resource["k8s.node.name"] == "node-3"

    attempts = sorted((s for s in mine if s.kind == "CLIENT"), key=lambda s: s.attributes["llm_sidecar.attempt"])
    assert [s.name for s in attempts] == [
        "chat deepseek-v3.2+error=500",
        "chat deepseek-v3.2+error=500",
        "chat deepseek-chat",
    ]
    assert all(s.parent_span_id == server.span_id for s in attempts), "attempts are siblings under the request"
    assert [s.attributes["llm_sidecar.attempt.kind"] for s in attempts] == ["initial", "retry", "fallback"]
    assert [s.attributes.get("llm_sidecar.attempt.reason") for s in attempts] == [
        None,
        "server_error",
        "server_error",
    ]
    assert [s.attributes["llm_sidecar.path"] for s in attempts] == ["relay", "relay", "official"]
    for failed in attempts[:2]:
        assert failed.status_code == "ERROR"
        assert failed.attributes["error.type"] == "server_error"
        assert failed.attributes["http.response.status_code"] == 500
        assert "llm_sidecar.cost_usd" not in failed.attributes, "a failed attempt is not billed"
    ok = attempts[2]
    assert ok.status_code != "ERROR"
    a = ok.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "deepseek"
    assert a["gen_ai.request.model"] == "deepseek-chat"
    assert a["gen_ai.response.model"] == answer.model
    assert a["gen_ai.request.max_tokens"] == 50
    assert a["gen_ai.request.temperature"] == pytest.approx(0.3)
    assert a["gen_ai.request.stream"] is False
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
    assert a["server.address"] == "127.0.0.1"
    assert a["server.port"] > 0
    assert a["llm_sidecar.breaker_state"] == "closed"
    assert a["llm_sidecar.cost_usd"] == pytest.approx(cost(answer.usage, OFFICIAL), rel=1e-9)

    # The provider got the attempt's context: its spans would hang under the attempt.
    provider_saw = raw.headers["x-fake-traceparent"]
    assert provider_saw.split("-")[1:3] == [app_trace, ok.span_id]

    text = all_attribute_text(mine)
    assert "zebra-4217" not in text, "message content is not recorded unless enabled"
    assert answer.choices[0].message.content not in text
    for key in list(KEYS.values()) + ["sk-app-key-not-for-providers"]:
        assert key not in text
        assert all(key not in str(v) for s in mine for v in s.resource.values())


def test_streams_carry_time_to_first_token_and_their_cost_and_a_fresh_trace(routing_config):
    with otlp.receiver("grpc") as rx:
        sidecar = start_sidecar(routing_config, extra_env=rx.env())
        try:
            stream = client_for(sidecar).chat.completions.create(
                model="deepseek-chat",
                messages=[{"role": "user", "content": "hello"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = list(stream)
            usage = chunks[-1].usage
            spans = rx.wait_for(lambda spans: any(s.kind == "CLIENT" for s in spans))
        finally:
            sidecar.stop()
    (attempt,) = [s for s in spans if s.kind == "CLIENT"]
    (server,) = [s for s in spans if s.kind == "SERVER"]
    assert server.parent_span_id == "", "without a traceparent the request starts a trace"
    assert attempt.trace_id == server.trace_id
    assert attempt.attributes["gen_ai.request.stream"] is True
    assert 0 < attempt.attributes["llm_sidecar.time_to_first_token"] < 10
    assert attempt.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert attempt.attributes["llm_sidecar.cost_usd"] == pytest.approx(cost(usage, RELAY), rel=1e-9)
    assert attempt.attributes["llm_sidecar.path"] == "relay"


def test_only_sampled_requests_make_spans_and_an_unsampled_parent_passes_through(routing_config):
    env = {"OTEL_TRACES_SAMPLER": "parentbased_always_off"}
    with otlp.receiver("http/protobuf") as rx:
        env.update(rx.env())
        sidecar = start_sidecar(routing_config, extra_env=env)
        try:
            client = client_for(sidecar)
            ask = lambda headers: client.chat.completions.with_raw_response.create(
                model="deepseek-chat",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={**headers, ECHO_TRACEPARENT: "1"},
            )
            # Sent first: their spans, if any were made, would be exported before the last one's.
            unsampled_trace = secrets.token_hex(16)
            unsampled = f"00-{unsampled_trace}-{secrets.token_hex(8)}-00"
            raw = ask({"traceparent": unsampled})
            # The app's trace and its "not sampled" flag go on; the parent is the sidecar's
            # attempt, whose span would be exported if the request turned out to need it.
            sent = raw.headers["x-fake-traceparent"].split("-")
            assert (sent[1], sent[3]) == (unsampled_trace, "00"), sent
            assert sent[2] != unsampled.split("-")[2]
            assert "x-llm-sidecar-trace-id" not in raw.headers, "no trace to look up in Jaeger"
            ask({})
            sampled_trace = secrets.token_hex(16)
            raw = ask({"traceparent": f"00-{sampled_trace}-{secrets.token_hex(8)}-01"})
            assert raw.headers["x-fake-traceparent"].startswith(f"00-{sampled_trace}-")
            assert raw.headers["x-llm-sidecar-trace-id"] == sampled_trace
            spans = rx.wait_for(lambda spans: sum(s.trace_id == sampled_trace for s in spans) >= 2)
        finally:
            sidecar.stop()
    assert {s.trace_id for s in spans} == {sampled_trace}, [str(s) for s in spans]
    assert sorted(s.kind for s in spans) == ["CLIENT", "SERVER"]


def test_at_ratio_zero_a_failover_is_exported_in_full_and_an_ordinary_request_is_not(flaky_config):
    env = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}
    with otlp.receiver("http/protobuf") as rx:
        env.update(rx.env())
        sidecar = start_sidecar(flaky_config, extra_env=env)
        try:
            client = client_for(sidecar)
            ordinary_trace = secrets.token_hex(16)
            raw = client.chat.completions.with_raw_response.create(
                model="deepseek-chat",
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"traceparent": f"00-{ordinary_trace}-{secrets.token_hex(8)}-01"},
            )
            assert raw.headers["x-llm-sidecar-attempts"] == "1"
            assert "x-llm-sidecar-trace-id" not in raw.headers
            raw = client.chat.completions.with_raw_response.create(
                model="flaky", messages=[{"role": "user", "content": "hi"}]
            )
            assert raw.headers["x-llm-sidecar-fallbacks"] == "1"
            failover = raw.headers["x-llm-sidecar-trace-id"]
            spans = rx.wait_for(lambda spans: sum(s.trace_id == failover for s in spans) >= 4, what="the failover's spans")
        finally:
            sidecar.stop()
    assert not [s for s in spans if s.trace_id == ordinary_trace], "the ordinary request was not exported"
    mine = [s for s in spans if s.trace_id == failover]
    (server,) = [s for s in mine if s.kind == "SERVER"]
    attempts = sorted((s for s in mine if s.kind == "CLIENT"), key=lambda s: s.attributes["llm_sidecar.attempt"])
    assert [a.attributes["llm_sidecar.attempt.kind"] for a in attempts] == ["initial", "retry", "fallback"]
    assert [a.attributes.get("error.type") for a in attempts] == ["server_error", "server_error", None]
    assert all(a.parent_span_id == server.span_id for a in attempts)
    assert server.attributes["llm_sidecar.outcome"] == "fallback"
    # Times are the real ones: each attempt inside the request, in order.
    assert server.start_time_unix_nano <= attempts[0].start_time_unix_nano <= attempts[1].start_time_unix_nano <= attempts[2].start_time_unix_nano
    assert attempts[-1].end_time_unix_nano <= server.end_time_unix_nano


def test_a_shadow_call_is_its_own_trace_linked_to_the_request(routing_config, tmp_path):
    config = tmp_path / "shadow.yaml"
    config.write_text(routing_config.read_text().replace("shadow_percent: 0", "shadow_percent: 100"))
    assert "shadow_percent: 100" in config.read_text()
    with otlp.receiver("http/protobuf") as rx:
        sidecar = start_sidecar(config, extra_env=rx.env())
        try:
            client_for(sidecar).chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": "hello"}]
            )
            spans = rx.wait_for(lambda spans: any(s.name.startswith("shadow ") for s in spans), what="the shadow span")
        finally:
            sidecar.stop()
    (server,) = [s for s in spans if s.kind == "SERVER"]
    (shadow,) = [s for s in spans if s.name.startswith("shadow ")]
    assert shadow.name == "shadow chat deepseek-chat", "the relay answered; the official side is the shadow"
    assert shadow.kind == "CLIENT"
    assert shadow.trace_id != server.trace_id and shadow.parent_span_id == ""
    assert shadow.links == [(server.trace_id, server.span_id)]
    assert shadow.attributes["llm_sidecar.shadow.outcome"] in ("equivalent", "different")
    assert shadow.attributes["llm_sidecar.path"] == "official"
    assert 0 <= shadow.attributes["llm_sidecar.shadow.equivalence_score"] <= 1


def test_content_is_recorded_only_when_enabled(routing_config):
    with otlp.receiver("http/protobuf") as rx:
        env = rx.env()
        env["LLM_SIDECAR_TRACE_CONTENT"] = "true"
        sidecar = start_sidecar(routing_config, extra_env=env)
        try:
            answer = client_for(sidecar).chat.completions.create(
                model="deepseek-chat", messages=[{"role": "user", "content": SECRET_WORDS}]
            )
            spans = rx.wait_for(lambda spans: any(s.kind == "CLIENT" for s in spans))
        finally:
            sidecar.stop()
    (attempt,) = [s for s in spans if s.kind == "CLIENT"]
    assert "zebra-4217" in attempt.attributes["gen_ai.input.messages"]
    assert answer.choices[0].message.content in attempt.attributes["gen_ai.output.messages"]




@pytest.mark.parametrize("collector", ["refusing", "failing"])
def test_a_collector_that_is_down_never_breaks_requests_and_losses_are_counted(collector, routing_config):
    with contextlib.ExitStack() as stack:
        if collector == "refusing":
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp.unused_port()}", "OTEL_BSP_SCHEDULE_DELAY": "50"}
        else:
            rx = stack.enter_context(otlp.receiver("grpc", fail=True))
            env = rx.env()
        sidecar = start_sidecar(routing_config, extra_env=env)
        stack.callback(sidecar.stop)
        client = client_for(sidecar)
        for _ in range(5):
            answer = client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "hi"}])
            assert answer.choices[0].message.content

        def lost():
            m = metrics(sidecar)
            gone = metric(m, "llm_sidecar_trace_spans_failed_total") + metric(m, "llm_sidecar_trace_spans_dropped_total")
            return m if gone >= 10 else None

        # Each of the 5 requests made a server and a client span; all of them are counted lost.
        m = eventually(lost, "10 spans counted as lost")
        assert metric(m, "llm_sidecar_trace_spans_exported_total") == 0
        assert metric(m, "llm_sidecar_requests_total", outcome="success") == 5


@pytest.fixture(scope="module")
def traffic(flaky_config):
    """Known traffic through one sidecar (no tracing): 3 plain answers and 2 streams from the
    relay, 1 request that fails over to the official side, 1 unknown model."""
    sidecar = start_sidecar(flaky_config)
    client = client_for(sidecar)
    plain = [
        client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": f"q{i}"}])
        for i in range(3)
    ]
    streams = []
    for i in range(2):
        chunks = list(
            client.chat.completions.create(
                model="deepseek-chat",
                messages=[{"role": "user", "content": f"s{i}"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        streams.append(chunks[-1].usage)
    app_trace = secrets.token_hex(16)
    flaky = client.chat.completions.create(
        model="flaky",
        messages=[{"role": "user", "content": "f"}],
        extra_headers={"traceparent": f"00-{app_trace}-{secrets.token_hex(8)}-01"},
    )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    yield {
        "sidecar": sidecar,
        "relay_usage": [a.usage for a in plain] + streams,
        "flaky_usage": flaky.usage,
        "app_trace": app_trace,
    }
    sidecar.stop()


def test_metrics_count_what_was_sent(traffic):
    sidecar = traffic["sidecar"]
    relay = traffic["relay_usage"]
    flaky = traffic["flaky_usage"]
    m = metrics(sidecar)
    relay_labels = dict(route="deepseek-v3.2", provider="holysheep", model="deepseek-v3.2", path="relay")
    assert metric(m, "llm_sidecar_requests_total", status="200", outcome="success", **relay_labels) == 5
    assert metric(m, "llm_sidecar_requests_total", route="flaky", provider="deepseek", outcome="fallback") == 1
    assert metric(m, "llm_sidecar_requests_total", status="404", outcome="rejected") == 1
    assert metric(m, "llm_sidecar_request_duration_seconds_count", route="deepseek-v3.2") == 5
    assert metric(m, "llm_sidecar_time_to_first_token_seconds_count", route="deepseek-v3.2") == 2
    assert metric(m, "llm_sidecar_tokens_total", type="input", **relay_labels) == sum(u.prompt_tokens for u in relay)
    assert metric(m, "llm_sidecar_tokens_total", type="output", **relay_labels) == sum(
        u.completion_tokens for u in relay
    )
    assert metric(m, "llm_sidecar_cost_usd_total", **relay_labels) == pytest.approx(
        sum(cost(u, RELAY) for u in relay), rel=1e-9
    )
    official_equivalent = sum(cost(u, OFFICIAL) for u in relay)
    assert metric(m, "llm_sidecar_official_cost_usd_total", **relay_labels) == pytest.approx(
        official_equivalent, rel=1e-9
    )
    assert metric(m, "llm_sidecar_savings_usd_total", **relay_labels) == pytest.approx(
        official_equivalent - sum(cost(u, RELAY) for u in relay), rel=1e-9
    )
    assert metric(m, "llm_sidecar_cost_usd_total", route="flaky", path="official") == pytest.approx(
        cost(flaky, OFFICIAL), rel=1e-9
    )
    # The failover: two failed attempts on the relay, one move to the official side.
    assert metric(m, "llm_sidecar_upstream_attempts_total", provider="holysheep", outcome="server_error") == 2
    assert (
        metric(m, "llm_sidecar_fallbacks_total", provider="holysheep", model="deepseek-v3.2+error=500", reason="server_error")
        == 1
    )
    # The GenAI client metrics, one observation per upstream call.
    assert metric(
        m, "gen_ai_client_operation_duration_seconds_count", gen_ai_provider_name="holysheep", error_type=""
    ) == 5
    assert metric(m, "gen_ai_client_operation_duration_seconds_count", error_type="server_error") == 2
    assert metric(m, "gen_ai_client_token_usage_sum", gen_ai_token_type="output", gen_ai_provider_name="holysheep") == sum(
        u.completion_tokens for u in relay
    )
    assert metric(m, "llm_sidecar_retry_budget_exhausted_total") == 0


def test_stats_totals_and_per_target(traffic):
    stats = get_json(traffic["sidecar"].admin + "/stats")
    relay = traffic["relay_usage"]
    flaky = traffic["flaky_usage"]
    total = stats["total"]
    assert (total["requests"], total["successes"], total["fallbacks"], total["failures"]) == (7, 5, 1, 1)
    assert total["tokens"]["input"] == sum(u.prompt_tokens for u in relay) + flaky.prompt_tokens
    assert total["tokens"]["output"] == sum(u.completion_tokens for u in relay) + flaky.completion_tokens
    paid = sum(cost(u, RELAY) for u in relay) + cost(flaky, OFFICIAL)
    assert total["cost_usd"] == pytest.approx(paid, abs=1e-8)
    assert total["savings_usd"] == pytest.approx(sum(cost(u, OFFICIAL) - cost(u, RELAY) for u in relay), abs=1e-8)
    assert 0 < total["latency_ms"]["p50"] <= total["latency_ms"]["p95"] <= total["latency_ms"]["p99"]

    by = {(t["route"], t["provider"], t["model"]): t for t in stats["targets"]}
    relay_target = by[("deepseek-v3.2", "holysheep", "deepseek-v3.2")]
    assert (relay_target["requests"], relay_target["successes"], relay_target["failures"]) == (5, 5, 0)
    assert relay_target["latency_ms"]["p99"] is not None
    broken = by[("flaky", "holysheep", "deepseek-v3.2+error=500")]
    assert (broken["requests"], broken["successes"], broken["failures"]) == (2, 0, 2)
    official = by[("flaky", "deepseek", "deepseek-chat")]
    assert (official["requests"], official["successes"], official["fallbacks"]) == (1, 0, 1)
    assert official["cost_usd"] == pytest.approx(cost(flaky, OFFICIAL), abs=1e-9)
    assert official["savings_usd"] == 0


def test_one_json_log_line_per_request_with_the_apps_trace_id(traffic):
    sidecar = traffic["sidecar"]
    lines, requests = [], []
    while len(requests) < 7:
        line = sidecar.log.get(timeout=15)
        assert line is not None, "the sidecar exited"
        lines.append(line)
        if '"llm_sidecar::access"' in line:
            requests.append(json.loads(line))
    for event in requests:
        assert event["level"] == "INFO" and event["message"] == "request"
        assert {"status", "outcome", "attempts", "fallbacks", "duration_ms"} <= event.keys()
    (flaky,) = [e for e in requests if e.get("route") == "flaky"]
    assert flaky["trace_id"] == traffic["app_trace"]
    assert (flaky["attempts"], flaky["fallbacks"], flaky["path"], flaky["outcome"]) == (3, 1, "official", "fallback")
    assert flaky["cost_usd"] == pytest.approx(cost(traffic["flaky_usage"], OFFICIAL), abs=1e-9)
    assert flaky["input_tokens"] == traffic["flaky_usage"].prompt_tokens
    text = "\n".join(lines)
    for key in KEYS.values():
        assert key not in text
