"""The ConfigMap control plane, wire level: the real sidecar binary (and so the real kube-rs
client) watches a ConfigMap on the Kubernetes API emulator in tests/kubeapi over HTTP on
127.0.0.1, while requests flow through it to the fake provider."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import _lines, _wait_for, start_sidecar

EMULATOR = os.path.join(os.path.dirname(__file__), "..", "kubeapi", "emulator.py")
NAMESPACE = "apps"
NAME = "llm-sidecar"
ADMIN = {"x-emulator-admin": "1"}


def http(method, url, body=None, headers=None, content_type="application/json", timeout=10):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("content-type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def eventually(check, what, timeout=30):
    """Polls `check` until it returns a truthy value; fails with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (AssertionError, OSError, ValueError) as err:
            last = err
        else:
            if last:
                return last
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class KubeApi:
    """The emulator as a separate process, restartable on the same port with its state kept."""

    def __init__(self, tmp_path):
        self.state = str(tmp_path / "kube-state.json")
        self.port = 0
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, EMULATOR, "--port", str(self.port), "--state", self.state],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.url = _wait_for(
            _lines(self.proc.stdout),
            lambda l: l.strip().split("listening on ", 1)[1] if "listening on " in l else None,
            "the API emulator",
        )
        self.port = int(self.url.rsplit(":", 1)[1])

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc.poll() is None:
            self.kill()

    def kubeconfig(self, tmp_path):
        path = tmp_path / "kubeconfig"
        sys.path.insert(0, os.path.dirname(EMULATOR))
        try:
            import emulator
        finally:
            sys.path.pop(0)
        path.write_text(emulator.kubeconfig(self.url, NAMESPACE))
        return path

    def _cm_url(self, name=NAME):
        return f"{self.url}/api/v1/namespaces/{NAMESPACE}/configmaps/{name}"

    def create(self, data, name=NAME):
        status, _, body = http(
            "POST",
            f"{self.url}/api/v1/namespaces/{NAMESPACE}/configmaps",
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data},
            ADMIN,
        )
        assert status == 201, body

    def patch(self, data, name=NAME):
        """What `kubectl patch configmap NAME --type merge -p '{"data": {...}}'` sends."""
        status, _, body = http(
            "PATCH", self._cm_url(name), {"data": data}, ADMIN, "application/merge-patch+json"
        )
        assert status == 200, body
        return json.loads(body)["metadata"]["resourceVersion"]

    def delete(self, name=NAME):
        status, _, body = http("DELETE", self._cm_url(name), None, ADMIN)
        assert status == 200, body

    def control(self, action, **params):
        query = "&".join(f"{k}={v}" for k, v in params.items())
        status, _, body = http("POST", f"{self.url}/_emulator/{action}?{query}", {}, ADMIN)
        assert status == 200, body

    def events(self):
        status, _, body = http("GET", f"{self.url}/api/v1/namespaces/{NAMESPACE}/events", None, ADMIN)
        assert status == 200, body
        return json.loads(body)["items"]


@pytest.fixture()
def kube(tmp_path):
    api = KubeApi(tmp_path)
    yield api
    api.stop()


@pytest.fixture()
def start(kube, routing_config, tmp_path):
    """Starts a sidecar watching the ConfigMap on the emulator; stops it after the test."""
    started = []

    def run(**env):
        settings = {
            "LLM_SIDECAR_CONFIGMAP": NAME,
            "KUBECONFIG": str(kube.kubeconfig(tmp_path)),
            "POD_NAMESPACE": NAMESPACE,
            "POD_NAME": "app-7d4b9-x2x1z",
            "LLM_SIDECAR_CONFIGMAP_STARTUP_TIMEOUT": "60s",
        }
        settings.update(env)
        sidecar = start_sidecar(routing_config, settings)
        started.append(sidecar)
        return sidecar

    yield run
    for sidecar in started:
        sidecar.stop()


def served_path(sidecar, timeout=10):
    """Sends one chat request; returns which side answered it (relay or official)."""
    status, headers, body = http(
        "POST",
        f"{sidecar.base_url}/chat/completions",
        {"model": "deepseek-v3.2", "messages": [{"role": "user", "content": "hi"}]},
        timeout=timeout,
    )
    assert status == 200, body
    return headers["x-llm-sidecar-path"]


def config_view(sidecar):
    status, _, body = http("GET", f"{sidecar.admin}/config")
    assert status == 200
    return json.loads(body)


def ready(sidecar):
    return http("GET", f"{sidecar.admin}/ready")[0] == 200


def metric(sidecar, name, **labels):
    _, _, body = http("GET", f"{sidecar.admin}/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in body.decode().splitlines():
        series, _, value = line.rpartition(" ")
        if series == (f"{name}{{{want}}}" if labels else name):
            return float(value)
    return None


def test_initial_load_waits_for_the_configmap_then_serves_it(kube, start):
    kube.create({"holy_sheep_routing_enabled": "False"})
    sidecar = start()
    eventually(lambda: ready(sidecar), "/ready")
    assert served_path(sidecar) == "official"
    view = config_view(sidecar)
    assert view["configmap"]["state"] == "watching"
    assert view["configmap"]["present"] is True
    assert view["config"]["flag_origins"]["holy_sheep_routing_enabled"] == "configmap"
    assert view["config"]["flag_origins"]["rollout_percent"] == "file"
    assert metric(sidecar, "llm_sidecar_configmap_watch_up") == 1


def test_not_ready_until_the_first_configmap_snapshot(kube, start):
    # 403 on the ConfigMap: no snapshot can be read, so the sidecar is not ready, yet it serves
    # the file config to the app meanwhile and says why in /config and /metrics.
    kube.create({"holy_sheep_routing_enabled": "false"})
    kube.control("forbid", resource="configmaps", on=1)
    sidecar = start()
    eventually(
        lambda: (config_view(sidecar)["configmap"]["last_error"] or {}).get("reason") == "forbidden",
        "the 403 to show in /config",
    )
    assert not ready(sidecar)
    assert metric(sidecar, "llm_sidecar_configmap_watch_errors_total", reason="forbidden") >= 1
    assert metric(sidecar, "llm_sidecar_configmap_watch_up") == 0
    assert served_path(sidecar) == "relay", "the file config serves while the ConfigMap is unreadable"

    # RBAC fixed: the watch recovers with its backoff and the ConfigMap applies.
    kube.control("forbid", resource="configmaps", on=0)
    eventually(lambda: ready(sidecar), "/ready after the 403 cleared")
    assert served_path(sidecar) == "official"
    assert config_view(sidecar)["configmap"]["state"] == "watching"


def test_a_patch_flips_routing_without_a_restart(kube, start):
    kube.create({"holy_sheep_routing_enabled": "true"})
    sidecar = start()
    eventually(lambda: ready(sidecar), "/ready")
    assert served_path(sidecar) == "relay"
    generation = config_view(sidecar)["generation"]

    kube.patch({"holy_sheep_routing_enabled": "false"})
    eventually(lambda: served_path(sidecar) == "official", "the rollback to reach requests")
    assert config_view(sidecar)["generation"] == generation + 1
    assert metric(sidecar, "llm_sidecar_config_reloads_total", source="configmap") >= 1

    kube.patch({"holy_sheep_routing_enabled": "1"})
    eventually(lambda: served_path(sidecar) == "relay", "routing back to the relay")


def test_routing_yaml_from_the_configmap_with_a_flag_key_on_top(kube, start, routing_config):
    yaml = routing_config.read_text().replace("holy_sheep_routing_enabled: true", "holy_sheep_routing_enabled: false")
    assert "holy_sheep_routing_enabled: false" in yaml
    kube.create({"config.yaml": yaml})
    sidecar = start()
    eventually(lambda: ready(sidecar), "/ready")
    assert served_path(sidecar) == "official"
    assert config_view(sidecar)["config"]["source"] == f"ConfigMap {NAMESPACE}/{NAME}"
    kube.patch({"holy_sheep_routing_enabled": "true"})
    eventually(lambda: served_path(sidecar) == "relay", "the flag key to override the YAML")


def test_invalid_patch_is_rejected_and_recorded_as_an_event(kube, start):
    kube.create({"holy_sheep_routing_enabled": "false"})
    sidecar = start()
    eventually(lambda: ready(sidecar), "/ready")
    generation = config_view(sidecar)["generation"]

    bad_version = kube.patch({"holy_sheep_routing_enabled": "true", "rollout_percent": "150"})
    rejection = eventually(lambda: config_view(sidecar)["last_rejection"], "the rejection in /config")
    assert "data.rollout_percent: 150 is out of range" in rejection["reason"]
    assert rejection["source"] == f"ConfigMap {NAMESPACE}/{NAME}"
    view = config_view(sidecar)
    assert view["generation"] == generation
    assert view["configmap"]["rejected_resource_version"] == bad_version
    assert served_path(sidecar) == "official", "the last good config keeps serving"
    assert metric(sidecar, "llm_sidecar_config_rejections_total", source="configmap") == 1

    event = eventually(lambda: kube.events(), "a Kubernetes Event")[0]
    assert event["type"] == "Warning"
    assert event["reason"] == "InvalidRoutingConfig"
    assert event["involvedObject"]["kind"] == "ConfigMap"
    assert event["involvedObject"]["name"] == NAME
    assert event["involvedObject"]["resourceVersion"] == bad_version
    assert event["reportingInstance"] == "app-7d4b9-x2x1z"
    assert "rollout_percent" in event["message"]

    # Fixing the ConfigMap applies the whole of it.
    kube.patch({"rollout_percent": "100"})
    eventually(lambda: served_path(sidecar) == "relay", "the fixed ConfigMap to apply")


def test_no_event_permission_changes_nothing_else(kube, start):
    kube.create({"holy_sheep_routing_enabled": "false"})
    kube.control("forbid", resource="events", on=1)
    sidecar = start()
    eventually(lambda: ready(sidecar), "/ready")
    kube.patch({"shadow_percent": "-5"})
    eventually(lambda: config_view(sidecar)["last_rejection"], "the rejection")
    _wait_for(sidecar.log, lambda l: "cannot record a Kubernetes Event" in l, "the Event failure log")
    assert kube.events() == []
    kube.patch({"shadow_percent": "0", "holy_sheep_routing_enabled": "true"})
    eventually(lambda: served_path(sidecar) == "relay", "later valid updates")
    assert config_view(sidecar)["configmap"]["state"] == "watching"


def test_deleted_configmap_keeps_the_last_good_config(kube, start):
    kube.create({"holy_sheep_routing_enabled": "false"})
    sidecar = start()
    eventually(lambda: ready(sidecar), "/ready")
    kube.delete()
    eventually(lambda: config_view(sidecar)["configmap"]["present"] is False, "the deletion in /config")
    assert config_view(sidecar)["configmap"]["deleted_at_unix"] is not None
    assert metric(sidecar, "llm_sidecar_configmap_present") == 0
    assert served_path(sidecar) == "official", "the last good config keeps serving"
    assert ready(sidecar)

    kube.create({"holy_sheep_routing_enabled": "true"})
    eventually(lambda: served_path(sidecar) == "relay", "the recreated ConfigMap to apply")
    assert config_view(sidecar)["configmap"]["present"] is True


def test_api_server_restart_mid_watch(kube, start):
    kube.create({"holy_sheep_routing_enabled": "true"})
    sidecar = start()
    eventually(lambda: ready(sidecar), "/ready")
    kube.kill()
    eventually(lambda: metric(sidecar, "llm_sidecar_configmap_watch_up") == 0, "the watch to notice")
    # The proxy does not need the API server.
    assert served_path(sidecar) == "relay"
    assert ready(sidecar), "an API outage never makes a ready sidecar unready"
    assert config_view(sidecar)["configmap"]["last_error"]["reason"] == "unreachable"

    kube.start()  # same port, same objects
    kube.patch({"holy_sheep_routing_enabled": "false"})
    eventually(lambda: served_path(sidecar) == "official", "the patch after the restart")
    eventually(lambda: metric(sidecar, "llm_sidecar_configmap_watch_up") == 1, "the watch to recover")


def test_expired_resource_version_410_relists(kube, start):
    kube.create({"holy_sheep_routing_enabled": "true"})
    sidecar = start()
    eventually(lambda: ready(sidecar), "/ready")
    # Compact the history and end the watch with 410 Gone, then change the ConfigMap before
    # the sidecar is back: only a fresh list can see it.
    kube.control("expire")
    kube.patch({"holy_sheep_routing_enabled": "false"})
    eventually(lambda: served_path(sidecar) == "official", "the relist after 410")
    assert metric(sidecar, "llm_sidecar_configmap_watch_errors_total", reason="gone") >= 1
    eventually(lambda: config_view(sidecar)["configmap"]["state"] == "watching", "the watch to resume")


def test_slow_api_server_never_holds_requests(kube, start):
    kube.create({"holy_sheep_routing_enabled": "false"})
    sidecar = start()
    eventually(lambda: ready(sidecar), "/ready")
    # Every API call now takes a minute, and the open watch is cut: the sidecar is stuck
    # relisting, but requests are answered at once from the last good snapshot.
    kube.control("delay", seconds=60)
    kube.control("drop")
    for _ in range(5):
        assert served_path(sidecar, timeout=5) == "official"
    assert ready(sidecar)


def test_startup_timeout_falls_back_when_the_api_server_is_unreachable(start):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    sidecar = start(LLM_SIDECAR_CONFIGMAP_STARTUP_TIMEOUT="300ms", KUBECONFIG=_kubeconfig_to(closed))
    eventually(lambda: ready(sidecar), "the start-up fallback")
    view = config_view(sidecar)["configmap"]
    assert view["serving_fallback"] is True
    assert view["last_error"]["reason"] == "unreachable"
    assert served_path(sidecar) == "relay"


def _kubeconfig_to(port):
    import tempfile

    sys.path.insert(0, os.path.dirname(EMULATOR))
    try:
        import emulator
    finally:
        sys.path.pop(0)
    f = tempfile.NamedTemporaryFile("w", suffix=".kubeconfig", delete=False)
    f.write(emulator.kubeconfig(f"http://127.0.0.1:{port}", NAMESPACE))
    f.close()
    return f.name


def test_env_override_beats_the_configmap(kube, start):
    kube.create({"holy_sheep_routing_enabled": "true"})
    sidecar = start(HOLY_SHEEP_ENABLED="false")
    eventually(lambda: ready(sidecar), "/ready")
    assert served_path(sidecar) == "official"
    view = config_view(sidecar)
    assert view["config"]["flag_origins"]["holy_sheep_routing_enabled"] == "env"
    assert view["precedence"][0] == "env HOLY_SHEEP_ENABLED"


def test_guard_trip_is_recorded_as_an_event(kube, start, routing_config):
    # The relay fails every call: the guard trips after 5 relay attempts and says so on the
    # ConfigMap, while every request is still answered by the official provider.
    yaml = routing_config.read_text().replace(
        "provider: holysheep, model: deepseek-v3.2",
        'provider: holysheep, model: "error=503"',
    )
    yaml = (
        yaml.replace("attempts_per_target: 2", "attempts_per_target: 1")
        .replace("breaker_failures: 3", "breaker_failures: 10")
        .replace("enabled: false\n  window: 60s\n  min_requests: 20", "enabled: true\n  window: 60s\n  min_requests: 5")
    )
    assert '"error=503"' in yaml and "min_requests: 5" in yaml and "breaker_failures: 10" in yaml
    kube.create({"config.yaml": yaml})
    sidecar = start()
    eventually(lambda: ready(sidecar), "/ready")
    for _ in range(5):
        assert served_path(sidecar) == "official"
    status, headers, _ = http(
        "POST",
        f"{sidecar.base_url}/chat/completions",
        {"model": "deepseek-v3.2", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert status == 200 and headers["x-llm-sidecar-reason"] == "guard_tripped"
    event = eventually(
        lambda: [e for e in kube.events() if e["reason"] == "RollbackGuardTripped"], "the guard's Event"
    )[0]
    assert event["type"] == "Warning"
    assert event["involvedObject"]["name"] == NAME
    assert "error rate" in event["message"]
    assert config_view(sidecar)["guard"]["tripped"] is True


def test_a_budget_alert_is_recorded_as_an_event(kube, start, routing_config):
    # A budget far below one request's worst case: the first request on the relay is refused
    # (the 1.0 level is reached) and goes to the official provider; the ConfigMap gets the alert.
    yaml = (
        "budgets:\n"
        "  - name: relay-tiny\n"
        "    match: { provider: holysheep }\n"
        "    daily_usd: 0.000001\n"
        "    alert_at: [0.5, 1.0]\n"
        + routing_config.read_text()
    )
    kube.create({"config.yaml": yaml})
    sidecar = start()
    eventually(lambda: ready(sidecar), "/ready")
    status, headers, _ = http(
        "POST",
        f"{sidecar.base_url}/chat/completions",
        {"model": "deepseek-v3.2", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert status == 200 and headers["x-llm-sidecar-reason"] == "budget_exhausted"
    event = eventually(
        lambda: [e for e in kube.events() if e["reason"] == "BudgetAlert"], "the budget's Event"
    )[0]
    assert event["type"] == "Warning"
    assert event["involvedObject"]["name"] == NAME
    assert "relay-tiny" in event["message"]
