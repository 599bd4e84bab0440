"""Starts the real llm-sidecar binary and the fake provider's binary on loopback for the SDK tests.

LLM_SIDECAR_BIN names the sidecar (default target/debug/llm-sidecar), LLM_SIDECAR_FAKE_BIN the
fake provider (default llm-sidecar-fake-provider next to it); `make py-test` builds and sets both.
"""

import json
import os
import queue
import subprocess
import threading
import time

import pytest

BIN = os.environ.get("LLM_SIDECAR_BIN", os.path.join(os.path.dirname(__file__), "..", "..", "target", "debug", "llm-sidecar"))
FAKE_BIN = os.environ.get("LLM_SIDECAR_FAKE_BIN") or os.path.join(os.path.dirname(BIN), "llm-sidecar-fake-provider")
KEYS = {
    "HOLYSHEEP_API_KEY": "sk-py-relay-key",
    "DEEPSEEK_API_KEY": "sk-py-deepseek-key",
    "MOONSHOT_API_KEY": "sk-py-moonshot-key",
    "MINIMAX_API_KEY": "sk-py-minimax-key",
    "GEMINI_API_KEY": "sk-py-gemini-key",
    "OPENAI_API_KEY": "sk-py-openai-key",
}


def eventually(check, what, timeout=20.0):
    """Polls `check` until it returns a true value (the admin port has no push channel)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


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


# Settings from the caller's environment that would change what the sidecar does.
SCRUBBED = ("KUBERNETES_SERVICE_HOST", "KUBECONFIG", "HOLY_SHEEP_ENABLED", "POD_NAMESPACE", "LLM_SIDECAR_CONFIG")


def start_fake():
    """The fake provider on a free port: (process, base URL)."""
    fake = subprocess.Popen(
        [FAKE_BIN, "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    url = _wait_for(
        _lines(fake.stdout),
        lambda l: l.strip().split("listening on ", 1)[1] if "listening on " in l else None,
        "the fake provider",
    )
    return fake, url


class Sidecar:
    """A running sidecar process: its data and admin URLs, and its log lines."""

    def __init__(self, proc, event, log):
        self.proc = proc
        self.base_url = f"http://{event['data_addr']}/v1"
        self.admin = f"http://{event['admin_addr']}"
        self.log = log

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def start_sidecar(config_path, extra_env=None):
    """Starts `llm-sidecar run` on free ports and waits until it serves."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env.update(KEYS)
    env.update(
        LLM_SIDECAR_LISTEN="127.0.0.1:0",
        LLM_SIDECAR_ADMIN_LISTEN="127.0.0.1:0",
        LLM_SIDECAR_LOG_FORMAT="json",
        LLM_SIDECAR_CONFIGMAP="off",
        RUST_LOG="info",
    )
    env.update(extra_env or {})
    proc = subprocess.Popen(
        [BIN, "run", "--config", str(config_path)],
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

    log = _lines(proc.stderr)
    event = _wait_for(log, serving, "the sidecar to serve")
    return Sidecar(proc, event, log)


@pytest.fixture(scope="session")
def fake_provider():
    fake, url = start_fake()
    yield url
    fake.terminate()
    fake.wait(timeout=30)


@pytest.fixture(scope="session")
def routing_config(tmp_path_factory, fake_provider):
    """The embedded default config with every provider pointed at the fake provider."""
    config = tmp_path_factory.mktemp("config") / "routing.yaml"
    config.write_text(subprocess.check_output([BIN, "default-config", "--upstream", fake_provider], text=True))
    return config


@pytest.fixture(scope="session")
def sidecar(routing_config):
    proc = start_sidecar(routing_config)
    yield {"base_url": proc.base_url, "admin": proc.admin}
    proc.stop()
