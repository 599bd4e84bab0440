"""The official OpenAI Python SDK, unchanged apart from base_url, against the real sidecar."""

import openai
import pytest
from openai import OpenAI


@pytest.fixture()
def client(sidecar):
    # The app's own key is a placeholder: the sidecar replaces it with the provider's.
    return OpenAI(base_url=sidecar["base_url"], api_key="sk-app-placeholder", max_retries=0, timeout=30)


def test_chat_completion(client):
    raw = client.chat.completions.with_raw_response.create(
        model="deepseek-v3.2",
        messages=[{"role": "user", "content": "Say hello."}],
    )
    completion = raw.parse()
    assert raw.headers["x-llm-sidecar-provider"] == "holysheep"
    assert raw.headers["x-llm-sidecar-path"] == "relay"
    assert completion.choices[0].message.content.startswith("Hello from holysheep.")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_chat_completion_stream(client):
    stream = client.chat.completions.create(
        model="deepseek-chat",
        messages=[{"role": "user", "content": "Say hello."}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello from holysheep. w1 w2")
    assert text.endswith(" w12")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    for alias in ["deepseek-v3.2", "deepseek-chat", "kimi-k2", "gemini-2.5-flash", "gpt-4.1"]:
        assert alias in ids
    assert ids == sorted(ids)


def test_embeddings(client):
    result = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) > 0


def test_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    err = excinfo.value
    assert err.status_code == 404
    assert err.response.headers["x-llm-sidecar-error"] == "model_not_found"
    assert err.body["code"] == "model_not_found"
    assert "deepseek-v3.2" in err.body["message"]


def test_oversized_request_is_rejected_with_413(client):
    with pytest.raises(openai.APIStatusError) as excinfo:
        client.chat.completions.create(
            model="deepseek-v3.2",
            messages=[{"role": "user", "content": "x" * (11 * 1024 * 1024)}],
        )
    assert excinfo.value.status_code == 413
    assert excinfo.value.body["code"] == "request_too_large"
