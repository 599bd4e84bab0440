"""The response cache seen through the official OpenAI Python SDK: a hit after a miss, plain
and streamed, with equal content, and a replayed stream the SDK parses like a live one."""

import pytest
from openai import OpenAI

from conftest import start_sidecar


@pytest.fixture(scope="module")
def cached(tmp_path_factory, fake_provider):
    config = tmp_path_factory.mktemp("cache") / "routing.yaml"
    config.write_text(
        f"""
providers:
  holysheep:
    kind: relay
    base_url: {fake_provider}/holysheep/v1
    api_key: {{ env: HOLYSHEEP_API_KEY }}
routes:
  deepseek-v3.2:
    relay: {{ provider: holysheep, model: deepseek-v3.2, price: {{ input: 0.27, output: 1.1 }} }}
    cache: {{ ttl: 10m, max_stale: 24h, mode: deterministic }}
"""
    )
    proc = start_sidecar(config)
    yield OpenAI(base_url=proc.base_url, api_key="sk-app-placeholder", max_retries=0, timeout=30)
    proc.stop()


def ask(client, content, **extra):
    return client.chat.completions.with_raw_response.create(
        model="deepseek-v3.2",
        temperature=0,
        messages=[{"role": "user", "content": content}],
        **extra,
    )


def test_a_plain_hit_after_a_miss_has_the_same_content(cached):
    first = ask(cached, "Cache me, plain.")
    second = ask(cached, "Cache me, plain.")
    assert first.headers["x-llm-sidecar-cache"] == "miss"
    assert second.headers["x-llm-sidecar-cache"] == "hit"
    assert second.headers["x-llm-sidecar-cost-usd"] == "0"
    a, b = first.parse(), second.parse()
    assert a.choices[0].message.content == b.choices[0].message.content
    assert b.choices[0].finish_reason == "stop"
    assert a.usage.completion_tokens == b.usage.completion_tokens


def test_a_streamed_hit_replays_a_stream_the_sdk_parses(cached):
    def stream():
        raw = ask(cached, "Cache me, streamed.", stream=True, stream_options={"include_usage": True})
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return raw.headers["x-llm-sidecar-cache"], text, finish, chunks[-1].usage

    live = stream()
    replayed = stream()
    assert live[0] == "miss" and replayed[0] == "hit"
    assert replayed[1] == live[1] and live[1].startswith("Hello from holysheep.")
    assert replayed[2] == ["stop"]
    assert replayed[3] is not None and replayed[3].completion_tokens == live[3].completion_tokens


def test_a_plain_answer_is_replayed_to_a_streaming_client(cached):
    plain = ask(cached, "Plain first, then streamed.").parse()
    raw = ask(cached, "Plain first, then streamed.", stream=True)
    assert raw.headers["x-llm-sidecar-cache"] == "hit"
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == plain.choices[0].message.content
