"""The files in deploy/ as a user applies them: the hand-written sidecar is the chart's container,
the pieces (ConfigMap, RBAC, Secret, workloads) name each other right, the Secret example holds no
key, and every metric the Grafana dashboard and the PrometheusRule query is one the real sidecar
binary exports."""

import copy
import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import BIN, KEYS, eventually, start_sidecar

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
GOLDEN = yaml.safe_load((ROOT / "tests" / "golden" / "inject" / "sidecar.yaml").read_text())
DEFAULT_CONFIG = yaml.safe_load((ROOT / "src" / "config" / "default.yaml").read_text())
WORKLOADS = ["sidecar-deployment.yaml", "sidecar-job.yaml"]
# The one documented difference between the chart's container and the plain manifests' copy:
# the flags ConfigMap lives in the app's namespace instead of the chart's release namespace.
CONFIGMAP_NAMESPACE_ENV = "LLM_SIDECAR_CONFIGMAP_NAMESPACE"
APPS = "apps"
# Labels Prometheus adds to every scraped series, and the histogram bucket label.
SCRAPE_LABELS = {"namespace", "pod", "container", "instance", "job", "le"}


def documents(name):
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]


def only(name, kind):
    found = [d for d in documents(name) if d["kind"] == kind]
    assert len(found) == 1, f"{name}: {len(found)} {kind}"
    return found[0]


def env_of(container):
    return {v["name"]: v.get("value") for v in container.get("env", [])}


def golden_env(name):
    return env_of(GOLDEN["container"])[name]


def pod_spec(name):
    (workload,) = documents(name)
    return workload, workload["spec"]["template"]["spec"]


def sidecar_of(spec):
    name = GOLDEN["container"]["name"]
    sidecars = [c for c in spec.get("initContainers", []) if c["name"] == name]
    assert len(sidecars) == 1, f"one init container named {name}"
    assert name not in [c["name"] for c in spec["containers"]], "the sidecar is not also a regular container"
    return sidecars[0]


def app_containers(spec):
    return spec["containers"]


# ------------------------------------------------------------------------------------ workloads

KUBERNETES = "1.33.0"
PLAIN = ["rbac.yaml", "configmap.yaml", "secret.example.yaml", *WORKLOADS]


@pytest.mark.parametrize("manifest", PLAIN)
def test_plain_manifests_are_valid_kubernetes_objects(manifest):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in documents(manifest):
        # strict: an unknown field (a typo kubectl would drop with a warning) fails too.
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)



@pytest.mark.parametrize("manifest", WORKLOADS)
def test_the_sidecar_is_the_charts_container_but_for_its_configmap_namespace(manifest):
    _, spec = pod_spec(manifest)
    sidecar = copy.deepcopy(sidecar_of(spec))
    # Native sidecar: what the chart's `mode: native` means.
    assert GOLDEN["mode"] == "native"
    assert sidecar.pop("restartPolicy") == "Always", "a native sidecar (init container, restartPolicy Always)"

    expected = copy.deepcopy(GOLDEN["container"])
    assert golden_env(CONFIGMAP_NAMESPACE_ENV) == "llm-sidecar", "the chart reads the release namespace's ConfigMap"
    for var in expected["env"]:
        if var["name"] == CONFIGMAP_NAMESPACE_ENV:
            var["value"] = APPS
    assert sidecar == expected


@pytest.mark.parametrize("manifest", WORKLOADS)
def test_apps_reach_the_sidecar_on_the_golden_port(manifest):
    workload, spec = pod_spec(manifest)
    port = GOLDEN["port"]
    assert golden_env("LLM_SIDECAR_LISTEN") == f"127.0.0.1:{port}"
    ports = {p["name"]: p["containerPort"] for p in sidecar_of(spec)["ports"]}
    assert ports["llm-http"] == port
    assert workload["metadata"]["namespace"] == APPS
    for app in app_containers(spec):
        env = env_of(app)
        assert env["OPENAI_BASE_URL"] == f"http://127.0.0.1:{port}/v1", app["name"]
        # A placeholder only: the sidecar drops the app's key and sends the provider's.
        assert env["OPENAI_API_KEY"] and "REPLACE" not in env["OPENAI_API_KEY"]
        assert "llm-sidecar" in env["OPENAI_API_KEY"], "an obvious placeholder, not a key"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_binary_takes_the_manifests_settings_and_its_probes_pass(routing_config):
    """The sidecar started with the container's own environment serves, and the container's exec
    probes (and the app's `probe models` through OPENAI_BASE_URL) pass against it."""
    _, spec = pod_spec("sidecar-deployment.yaml")
    sidecar = sidecar_of(spec)
    data, admin = free_port(), free_port()
    env = {k: v for k, v in env_of(sidecar).items() if v is not None}  # the Downward API ones aside
    env.update(POD_NAME="ai-service-7d9f", POD_NAMESPACE=APPS, NODE_NAME="node-1")
    # Not in a cluster: free ports instead of 4000/4001, no ConfigMap watch.
    env.update(
        LLM_SIDECAR_LISTEN=f"127.0.0.1:{data}",
        LLM_SIDECAR_ADMIN_LISTEN=f"127.0.0.1:{admin}",
        LLM_SIDECAR_CONFIGMAP="off",
    )
    assert sidecar["args"] == ["run"]
    running = start_sidecar(routing_config, extra_env=env)
    try:
        probe_env = {**os.environ, **KEYS, **env}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = sidecar[probe]["exec"]["command"]
            assert command[0] == "/usr/local/bin/llm-sidecar", "the image's binary"
            out = subprocess.run([BIN, *command[1:]], env=probe_env, capture_output=True, text=True, timeout=10)
            assert out.returncode == 0, f"{probe}: {out.stdout}{out.stderr}"
        app_url = env_of(app_containers(spec)[0])["OPENAI_BASE_URL"].replace(f":{GOLDEN['port']}/", f":{data}/")
        out = subprocess.run(
            [BIN, "probe", "models"], env={**probe_env, "OPENAI_BASE_URL": app_url}, capture_output=True, text=True, timeout=10
        )
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        running.stop()


def test_the_job_completes_when_its_app_exits():
    job, spec = pod_spec("sidecar-job.yaml")
    assert job["kind"] == "Job"
    assert spec["restartPolicy"] in ("Never", "OnFailure")
    # The sidecar must not be a regular container (it would keep the pod running forever).
    assert [c["name"] for c in spec["containers"]] == ["app"]
    assert sidecar_of(spec)["restartPolicy"] == "Always"


def test_workloads_configmap_rbac_and_secret_name_each_other():
    configmap = only("configmap.yaml", "ConfigMap")
    account = only("rbac.yaml", "ServiceAccount")
    role = only("rbac.yaml", "Role")
    binding = only("rbac.yaml", "RoleBinding")
    secret = only("secret.example.yaml", "Secret")

    for manifest in WORKLOADS:
        workload, spec = pod_spec(manifest)
        sidecar = sidecar_of(spec)
        env = env_of(sidecar)
        assert env["LLM_SIDECAR_CONFIGMAP"] == configmap["metadata"]["name"], manifest
        assert env[CONFIGMAP_NAMESPACE_ENV] == configmap["metadata"]["namespace"] == workload["metadata"]["namespace"]
        assert spec["serviceAccountName"] == account["metadata"]["name"], manifest
        assert [e["secretRef"]["name"] for e in sidecar["envFrom"]] == [secret["metadata"]["name"]]

    assert role["rules"][0]["resourceNames"] == [configmap["metadata"]["name"]]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": APPS}
    ]
    assert secret["metadata"]["namespace"] == APPS


def flag_keys():
    """The sidecar's flags: the scalar top-level keys of its embedded default config."""
    return {k for k, v in DEFAULT_CONFIG.items() if isinstance(v, (bool, int))}


def test_configmap_keys_are_the_sidecars_flags():
    flags = flag_keys()
    assert flags == {"holy_sheep_routing_enabled", "holy_sheep_fallback_only", "rollout_percent", "shadow_percent"}
    data = only("configmap.yaml", "ConfigMap")["data"]
    assert set(data) == flags | {"config.yaml"}
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values are strings"
    # The rollback patch of the README and of every alert's runbook names a real key.
    assert '{"data":{"holy_sheep_routing_enabled":"false"}}' in (ROOT / "README.md").read_text()
    values = ROOT / "charts" / "llm-sidecar" / "values.yaml"
    if values.exists():
        assert set(yaml.safe_load(values.read_text())["flags"]) == flags, "the chart's flags are the same keys"


# ------------------------------------------------------------------------------------ secret

# Shapes of real provider keys, and any long opaque token.
REAL_LOOKING = [
    re.compile(r"sk-[A-Za-z0-9_\-]{16,}"),
    re.compile(r"AIza[0-9A-Za-z_\-]{20,}"),
    re.compile(r"\b[A-Za-z0-9+/_\-]{32,}\b"),
]


def test_the_secret_example_holds_placeholders_for_exactly_the_keys_the_config_reads():
    text = (DEPLOY / "secret.example.yaml").read_text()
    secret = only("secret.example.yaml", "Secret")
    assert secret["metadata"]["name"] == GOLDEN["container"]["envFrom"][0]["secretRef"]["name"]
    assert "data" not in secret, "stringData only: nothing base64 to hide a key in"
    wanted = {p["api_key"]["env"] for p in DEFAULT_CONFIG["providers"].values()}
    assert set(secret["stringData"]) == wanted
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}
    for pattern in REAL_LOOKING:
        assert not pattern.search(text), pattern.pattern
    # The kubectl alternative in the comment sets the same keys.
    assert set(re.findall(r"--from-literal=(\w+)=", text)) == wanted


# ------------------------------------------------------------------------------------ dashboard, rules


def dashboard():
    return json.loads((DEPLOY / "grafana-dashboard.json").read_text())


def rules():
    rule = yaml.safe_load((DEPLOY / "prometheus-rule.yaml").read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_the_dashboard_parses_and_every_panel_has_a_datasource():
    d = dashboard()
    assert d["schemaVersion"] == 39
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert len(panels) >= 20
    for p in panels:
        assert p["datasource"] == ds, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds, p["title"]
            assert t["expr"].strip(), p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]


def test_every_alert_has_for_severity_summary_description_and_a_runbook_that_exists():
    readme = (ROOT / "README.md").read_text()
    # GitHub's heading anchors: lowercase, spaces to '-', punctuation dropped.
    anchors = {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", readme, flags=re.M)
    }
    names = set()
    for r in rules():
        names.add(r["alert"])
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        for anchor in re.findall(r"README\.md#([\w\-]+)", r["annotations"]["runbook"]):
            assert anchor in anchors, f"{r['alert']}: README has no #{anchor}"
        for path in re.findall(r"(deploy/[\w./\-]+)", r["annotations"]["runbook"]):
            assert (ROOT / path).exists(), f"{r['alert']}: {path}"
    for wanted in (
        "LlmSidecarHighFallbackRate",
        "LlmSidecarCircuitBreakerOpen",
        "LlmSidecarRelayErrorRateHigh",
        "LlmSidecarSpendPerDayHigh",
        "LlmSidecarConfigRejected",
        "LlmSidecarNotReady",
        "LlmSidecarTraceSpansDropped",
    ):
        assert wanted in names
    rollbacks = [r for r in rules() if "holy_sheep_routing_enabled" in r["annotations"]["runbook"]]
    assert len(rollbacks) >= 3, "the traffic alerts say how to roll back"


OURS = re.compile(r"\b(?:llm_sidecar|gen_ai)_[a-z0-9_]+\b")
# `by (...)` and its kin name labels, not metrics; `{...}` holds matchers.
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"\{[^}]*\}")


def queries():
    """(where, PromQL) for every query of the dashboard (panels and variables) and the rules."""
    d = dashboard()
    out = [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]
    out += [(f"variable {v['name']}", v["definition"]) for v in d["templating"]["list"] if v["type"] == "query"]
    out += [(r["alert"], r["expr"]) for r in rules()]
    return out


def metric_names(expr):
    return set(OURS.findall(MATCHERS.sub("", GROUPING.sub("", expr))))


def grouping_labels(expr):
    return {label.strip() for _, labels in GROUPING.findall(expr) for label in labels.split(",") if label.strip()}


def matcher_labels(expr):
    """{metric: labels its own `{...}` matchers name}."""
    out = {}
    for name, matchers in re.findall(r"\b([a-z_][a-z0-9_]*)\{([^}]*)\}", expr):
        out.setdefault(name, set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return out


# A fallback (relay answers 500), a stream that breaks after it started, shadow calls and a
# rejected config edit: what it takes for every family the dashboard and the alerts query to
# have a series.
EXTRA_ROUTES = """
  flaky:
    relay: { provider: holysheep, model: "deepseek-v3.2+error=500", price: { input: 0.21, output: 0.42 } }
    official: { provider: deepseek, model: deepseek-chat, price: { input: 0.50, output: 1.50 } }
  broken-stream:
    relay: { provider: holysheep, model: "deepseek-v3.2+tokens=40+cut=5" }
    official: { provider: deepseek, model: "deepseek-chat+tokens=40+cut=5" }
"""


def post(url, body):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.read()


def get_text(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()




@pytest.fixture(scope="module")
def scraped(routing_config, tmp_path_factory):
    """{sample name: label names} from the admin /metrics of a real sidecar after some traffic."""
    text = routing_config.read_text()
    assert text.rstrip().splitlines()[-1].startswith("    "), "routes is the last section"
    text = re.sub(r"(?m)^shadow_percent: \d+", "shadow_percent: 100", text) + EXTRA_ROUTES
    # A budget, so the budget gauges have a series to scrape.
    text = "budgets: [{ name: all, daily_usd: 1000 }]\n" + text
    config = tmp_path_factory.mktemp("deploy") / "routing.yaml"
    config.write_text(text)
    sidecar = start_sidecar(config)
    try:
        chat = sidecar.base_url + "/chat/completions"
        hello = [{"role": "user", "content": "Say hello."}]
        assert post(chat, {"model": "deepseek-v3.2", "messages": hello})[0] == 200
        assert post(chat, {"model": "deepseek-v3.2", "messages": hello, "stream": True})[0] == 200
        assert post(chat, {"model": "flaky", "messages": hello})[0] == 200
        status, body = post(chat, {"model": "broken-stream", "messages": hello, "stream": True})
        assert status == 200 and b"error" in body, body[-300:]
        # An invalid edit: rejected, counted, the last good config keeps serving.
        config.write_text(text.replace("rollout_percent: 100", "rollout_percent: 150"))
        eventually(
            lambda: json.loads(get_text(sidecar.admin + "/config")).get("last_rejection"),
            "the rejected config edit",
        )

        def families():
            out = {}
            for line in get_text(sidecar.admin + "/metrics").splitlines():
                if line.startswith("#") or not line.strip():
                    continue
                m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+$", line)
                assert m, line
                out.setdefault(m.group(1), set()).update(re.findall(r'(\w+)="', m.group(2) or ""))
            return out

        # Shadow calls finish in the background, after their request answered.
        return eventually(
            lambda: (f := families()) and "llm_sidecar_shadow_requests_total" in f and f, "the shadow calls"
        )
    finally:
        sidecar.stop()


def test_every_metric_the_dashboard_and_alerts_query_is_exported(scraped):
    used = {}
    for where, expr in queries():
        for name in metric_names(expr):
            used.setdefault(name, []).append(where)
    assert len(used) >= 25, sorted(used)
    missing = {name: where for name, where in used.items() if name not in scraped}
    assert not missing, f"not in the sidecar's /metrics: {missing}"


def test_every_label_the_dashboard_and_alerts_use_is_on_those_metrics(scraped):
    problems = []
    for where, expr in queries():
        names = metric_names(expr)
        if not names:
            continue
        known = set().union(*(scraped[n] for n in names if n in scraped)) | SCRAPE_LABELS
        for label in grouping_labels(expr) - known:
            problems.append(f"{where}: groups by `{label}`, which {sorted(names)} do not have")
        for name, labels in matcher_labels(expr).items():
            if name in scraped:
                for label in labels - scraped[name] - SCRAPE_LABELS:
                    problems.append(f"{where}: {name} has no label `{label}`")
    assert not problems, "\n".join(problems)
