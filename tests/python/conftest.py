"""Starts the real llm-sidecar binary and its fake provider on loopback for the SDK tests."""

import json
import os
import queue
import subprocess
import threading

import pytest

BIN = os.environ.get("LLM_SIDECAR_BIN", os.path.join(os.path.dirname(__file__), "..", "..", "target", "debug", "llm-sidecar"))
KEYS = {
    "HOLYSHEEP_API_KEY": "sk-py-relay-key",
    "DEEPSEEK_API_KEY": "sk-py-deepseek-key",
    "MOONSHOT_API_KEY": "sk-py-moonshot-key",
    "MINIMAX_API_KEY": "sk-py-minimax-key",
    "GEMINI_API_KEY": "sk-py-gemini-key",
    "OPENAI_API_KEY": "sk-py-openai-key",
}


def _lines(stream):
    q = queue.Queue()

    def pump():
        for line in iter(stream.readline, ""):
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _wait_for(q, predicate, what, timeout=30):
    seen = []
    while True:
        try:
            line = q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"timed out waiting for {what}; saw: {seen[-20:]}")
        if line is None:
            raise AssertionError(f"process exited before {what}; saw: {seen[-20:]}")
        seen.append(line)
        found = predicate(line)
        if found:
            return found


@pytest.fixture(scope="session")
def sidecar(tmp_path_factory):
    fake = subprocess.Popen(
        [BIN, "fake-provider", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    fake_url = _wait_for(
        _lines(fake.stdout),
        lambda l: l.strip().split("listening on ", 1)[1] if "listening on " in l else None,
        "the fake provider",
    )
    config = tmp_path_factory.mktemp("config") / "routing.yaml"
    config.write_text(subprocess.check_output([BIN, "default-config", "--upstream", fake_url], text=True))
    env = dict(os.environ, **KEYS)
    env.update(
        LLM_SIDECAR_LISTEN="127.0.0.1:0",
        LLM_SIDECAR_ADMIN_LISTEN="127.0.0.1:0",
        LLM_SIDECAR_LOG_FORMAT="json",
        RUST_LOG="info",
    )
    proc = subprocess.Popen(
        [BIN, "run", "--config", str(config)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )

    def serving(line):
        try:
            event = json.loads(line)
        except ValueError:
            return None
        return event if event.get("message") == "llm-sidecar serving" else None

    event = _wait_for(_lines(proc.stderr), serving, "the sidecar to serve")
    yield {"base_url": f"http://{event['data_addr']}/v1", "admin": f"http://{event['admin_addr']}"}
    for p in (proc, fake):
        p.terminate()
        p.wait(timeout=30)
