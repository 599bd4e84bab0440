#!/usr/bin/env python3
"""The checks of `make chart-test` on charts/llm-sidecar, one line each.

Run by scripts/chart-test.sh, which installs Helm first and passes its path in HELM. Every values
file in tests/chart/ is linted (`helm lint --strict`) and rendered (`helm template`); every
rendered object is validated against the Kubernetes 1.33 schemas with kubernetes-validate in
strict mode; the `bad-*.yaml` files must be rejected (by the schema, or by the chart's checks); then the rendered YAML is checked against
what the chart promises (the injector's golden template, names, selectors, certificates, RBAC,
no key in the clear). Exit 1 if any check failed.
"""

import base64
import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "llm-sidecar"
VALUES_DIR = ROOT / "tests" / "chart"
GOLDEN = ROOT / "tests" / "golden" / "inject" / "sidecar.yaml"
GOLDEN_REDIS = ROOT / "tests" / "golden" / "inject" / "sidecar-redis.yaml"
RELEASE = "llm-sidecar"
NAMESPACE = "llm-sidecar"
KUBE_VERSION = "1.33.0"

# Kinds kubernetes-validate ships no schema for. They are checked for shape only (apiVersion,
# kind, metadata.name, a spec object) and named as skipped in the output; any other kind without
# a schema fails.
NO_SCHEMA = {
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "ClusterIssuer"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}

# The sidecar's own keys never appear in the clear anywhere but in the values file.
TRIAL_KEY = "sk-chart-test-not-a-real-key-4f1c9a"

HELM = os.environ.get("HELM", "")
if not HELM or not os.access(HELM, os.X_OK):
    sys.exit("chart-test: HELM must name the helm binary (scripts/chart-test.sh sets it)")

_HELM_HOME = tempfile.mkdtemp(prefix="chart-test-helm-")
HELM_ENV = dict(
    os.environ,
    HELM_CACHE_HOME=f"{_HELM_HOME}/cache",
    HELM_CONFIG_HOME=f"{_HELM_HOME}/config",
    HELM_DATA_HOME=f"{_HELM_HOME}/data",
    # No cluster: `lookup` returns nothing and nothing is ever sent anywhere.
    KUBECONFIG=f"{_HELM_HOME}/no-kubeconfig",
)


class Failed(Exception):
    pass


def expect(condition, message):
    if not condition:
        raise Failed(message)


def helm(*args):
    return subprocess.run(
        [HELM, *args], capture_output=True, text=True, env=HELM_ENV, timeout=120, check=False
    )


def values_args(name):
    return ["-f", str(VALUES_DIR / name)]


def lint(name):
    return helm("lint", "--strict", "--quiet", "--kube-version", KUBE_VERSION, str(CHART),
                *values_args(name))


def template(name, *extra, chart=CHART):
    return helm("template", RELEASE, str(chart), "-n", NAMESPACE, "--kube-version", KUBE_VERSION,
                *values_args(name), *extra)


def first_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    interesting = [line for line in lines if "Error" in line or "error" in line or line.startswith("- ")]
    return (interesting or lines or ["(no output)"])[-1][:200]


# --- the rendered objects -------------------------------------------------------------------


class Render:
    def __init__(self, name, text):
        self.name = name
        self.text = text
        self.docs = [d for d in yaml.safe_load_all(text) if d]

    def all(self, kind):
        return [d for d in self.docs if d.get("kind") == kind]

    def maybe(self, kind, name):
        found = [d for d in self.all(kind) if d["metadata"]["name"] == name]
        expect(len(found) <= 1, f"{len(found)} {kind}s named {name}")
        return found[0] if found else None

    def get(self, kind, name):
        found = self.maybe(kind, name)
        expect(found is not None, f"no {kind} {name} (has: {self.names()})")
        return found

    def names(self):
        return ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in self.docs)

    def template(self, fullname=RELEASE):
        cm = self.get("ConfigMap", f"{fullname}-inject")
        return yaml.safe_load(cm["data"]["sidecar.yaml"])

    def test_pod(self, fullname=RELEASE):
        return self.get("Pod", f"{fullname}-test-injection")

    def webhooks(self, fullname=RELEASE):
        mwc = self.get("MutatingWebhookConfiguration", fullname)
        return mwc, {w["name"]: w for w in mwc["webhooks"]}


def validate(render):
    """kubernetes-validate, strict, Kubernetes 1.33, every object and the injector's template;
    returns the objects only shape-checked and how many templates were validated."""
    skipped, errors, templates = [], [], 0
    for doc in render.docs:
        label = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if (doc.get("apiVersion"), doc.get("kind")) in NO_SCHEMA:
            shape_ok = (isinstance(doc.get("metadata"), dict) and doc["metadata"].get("name")
                        and isinstance(doc.get("spec"), dict) and set(doc) <= {"apiVersion", "kind", "metadata", "spec"})
            if not shape_ok:
                errors.append(f"{label}: malformed (needs apiVersion, kind, metadata.name, spec)")
            skipped.append(label)
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{label}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{label}: no schema ({e.message}); add it to NO_SCHEMA knowingly")
    # The injector's template is a string inside a ConfigMap: validate its container as the pod
    # spec it becomes, so a misspelt field fails here and not at the injector's start.
    for cm in render.all("ConfigMap"):
        if "sidecar.yaml" not in cm.get("data", {}):
            continue
        label = f"ConfigMap/{cm['metadata']['name']} sidecar.yaml"
        tmpl = yaml.safe_load(cm["data"]["sidecar.yaml"])
        if not {"mode", "port", "container"} <= set(tmpl) <= {"mode", "port", "container", "volumes"}:
            errors.append(f"{label}: keys {sorted(tmpl)}")
            continue
        spec = {"containers": [{"name": "app", "image": "app"}]}
        if "volumes" in tmpl:
            spec["volumes"] = tmpl["volumes"]
        if tmpl["mode"] == "native":
            spec["initContainers"] = [dict(tmpl["container"], restartPolicy="Always")]
        else:
            spec["containers"].append(tmpl["container"])
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "injected"}, "spec": spec}
        templates += 1
        try:
            kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{label}: {'.'.join(str(p) for p in e.path)}: {e.message}")
    expect(not errors, "; ".join(errors[:3]))
    return skipped, templates


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def pem_der(b64_pem):
    pem = base64.b64decode(b64_pem).decode()
    body = re.search(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", pem, re.S)
    expect(body, "not a PEM certificate")
    return base64.b64decode("".join(body.group(1).split()))


def diff(a, b, path="$"):
    """The first few paths where two parsed YAML documents differ."""
    if type(a) is not type(b):
        return [f"{path}: {a!r} != {b!r}"]
    if isinstance(a, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'rendered' if k in a else 'golden'}")
            else:
                out += diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def expect_same(rendered, wanted, what):
    d = diff(rendered, wanted)
    expect(not d, f"{what} differs: " + "; ".join(d[:4]))


def golden(path=GOLDEN):
    with open(path) as f:
        return yaml.safe_load(f)


def no_key_in_clear(r):
    """Provider keys reach the sidecar only through the Secret: no literal *_KEY env anywhere."""
    for doc in r.docs:
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec", spec) if doc["kind"] in ("Deployment", "Pod") else {}
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            for e in c.get("env", []):
                expect(not (re.search(r"(KEY|TOKEN|SECRET)", e["name"]) and "value" in e),
                       f"{doc['kind']}/{doc['metadata']['name']} sets {e['name']} in the clear")
    tmpl = r.maybe("ConfigMap", "llm-sidecar-inject")
    if tmpl:
        for e in yaml.safe_load(tmpl["data"]["sidecar.yaml"])["container"]["env"]:
            expect(not re.search(r"(KEY|TOKEN|SECRET)", e["name"]), f"template sets {e['name']}")


# --- what each values file must render ------------------------------------------------------


def check_defaults(r):
    out = []
    expect_same(r.template(), golden(), "sidecar.yaml of llm-sidecar-inject vs tests/golden/inject/sidecar.yaml")
    out.append("golden: llm-sidecar-inject sidecar.yaml == tests/golden/inject/sidecar.yaml")

    cm = r.get("ConfigMap", "llm-sidecar")
    expect(cm["metadata"]["namespace"] == NAMESPACE, "flags ConfigMap not in the release namespace")
    flags = {k: v for k, v in cm["data"].items() if k != "config.yaml"}
    expect(flags == {"holy_sheep_routing_enabled": "true", "holy_sheep_fallback_only": "false",
                     "rollout_percent": "100", "shadow_percent": "0"}, f"flags: {flags}")
    with open(ROOT / "deploy" / "configmap.yaml") as f:
        deployed = yaml.safe_load(f)["data"]["config.yaml"]
    expect(yaml.safe_load(cm["data"]["config.yaml"]) == yaml.safe_load(deployed),
           "config.yaml differs from deploy/configmap.yaml's routing")
    out.append("flags ConfigMap: four string flags + the routing of deploy/configmap.yaml")

    role = r.get("Role", "llm-sidecar")
    expect(role["rules"][0]["resourceNames"] == ["llm-sidecar"], "Role not limited to the ConfigMap")
    expect(sorted(role["rules"][0]["verbs"]) == ["get", "list", "watch"], "Role verbs")
    subjects = r.get("RoleBinding", "llm-sidecar")["subjects"]
    expect({"kind": "ServiceAccount", "name": "llm-sidecar", "namespace": NAMESPACE} in subjects, "chart SA unbound")
    expect(any(s.get("name") == "system:serviceaccounts" and s["kind"] == "Group" for s in subjects),
           "allServiceAccounts did not bind system:serviceaccounts")
    out.append("RBAC: get/list/watch on the one ConfigMap, bound to the chart SA + system:serviceaccounts")

    dep = r.get("Deployment", "llm-sidecar-injector")
    pod = dep["spec"]["template"]
    expect(dep["spec"]["replicas"] == 2, "replicas")
    expect(pod["metadata"]["labels"].get("llm-sidecar.io/inject") == "false", "injector pods not opted out")
    expect(pod["metadata"]["labels"].get("app.kubernetes.io/component") == "injector", "component label")
    sidecar_yaml = r.get("ConfigMap", "llm-sidecar-inject")["data"]["sidecar.yaml"]
    want = hashlib.sha256(sidecar_yaml.rstrip("\n").encode()).hexdigest()
    expect(pod["metadata"]["annotations"].get("checksum/inject-template") == want,
           "checksum/inject-template is not the template's sha256")
    c = pod["spec"]["containers"][0]
    expect(c["args"] == ["inject", "--listen", "0.0.0.0:8443", "--template", "/etc/llm-sidecar/inject/sidecar.yaml",
                         "--tls-cert", "/etc/llm-sidecar/tls/tls.crt", "--tls-key", "/etc/llm-sidecar/tls/tls.key"],
           f"injector args {c['args']}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        expect(get["scheme"] == "HTTPS" and get["path"] == "/healthz", f"{probe}")
    expect(c["securityContext"] == golden()["container"]["securityContext"], "injector securityContext")
    anti = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    expect(anti, "no pod anti-affinity")
    pdb = r.get("PodDisruptionBudget", "llm-sidecar-injector")
    expect(pdb["spec"]["minAvailable"] == 1, "PDB minAvailable")
    expect(pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"], "PDB selector")
    svc = r.get("Service", "llm-sidecar-injector")
    expect(svc["spec"]["ports"][0]["port"] == 443 and svc["spec"]["ports"][0]["targetPort"] == "https", "Service port")
    expect(svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"], "Service selector")
    out.append("injector: args, HTTPS /healthz probes, opted out, template checksum, PDB, Service 443->8443")

    mwc, hooks = r.webhooks()
    expect(sorted(hooks) == ["namespace.inject.llm-sidecar.io", "pod.inject.llm-sidecar.io"], f"webhooks {sorted(hooks)}")
    ns_hook, pod_hook = hooks["namespace.inject.llm-sidecar.io"], hooks["pod.inject.llm-sidecar.io"]
    system = {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
              "values": ["kube-system", "kube-public", "kube-node-lease"]}
    expect(ns_hook["namespaceSelector"]["matchExpressions"] == [
        {"key": "llm-sidecar.io/inject", "operator": "In", "values": ["enabled", "true"]}, system], "namespace hook nsSelector")
    expect(ns_hook["objectSelector"]["matchExpressions"] == [
        {"key": "llm-sidecar.io/inject", "operator": "NotIn", "values": ["false"]}], "namespace hook objectSelector")
    expect(pod_hook["namespaceSelector"]["matchExpressions"] == [
        {"key": "llm-sidecar.io/inject", "operator": "NotIn", "values": ["enabled", "true"]}, system], "pod hook nsSelector")
    expect(pod_hook["objectSelector"]["matchExpressions"] == [
        {"key": "llm-sidecar.io/inject", "operator": "In", "values": ["true"]}], "pod hook objectSelector")
    secret = r.get("Secret", "llm-sidecar-injector-tls")
    expect(secret["type"] == "kubernetes.io/tls", "TLS Secret type")
    for name, hook in hooks.items():
        cc = hook["clientConfig"]
        expect(cc["service"] == {"name": "llm-sidecar-injector", "namespace": NAMESPACE, "port": 443,
                                 "path": "/inject/" + name.split(".")[0]}, f"{name} clientConfig")
        expect(cc.get("caBundle") == secret["data"]["ca.crt"], f"{name} caBundle is not the generated CA")
        expect(hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                  "resources": ["pods"], "scope": "Namespaced"}], f"{name} rules")
        expect((hook["failurePolicy"], hook["timeoutSeconds"], hook["sideEffects"], hook["reinvocationPolicy"],
                hook["matchPolicy"], hook["admissionReviewVersions"]) ==
               ("Fail", 10, "None", "Never", "Equivalent", ["v1"]), f"{name} policy fields")
    der = pem_der(secret["data"]["tls.crt"])
    svc_name = "llm-sidecar-injector"
    for san in (svc_name, f"{svc_name}.{NAMESPACE}", f"{svc_name}.{NAMESPACE}.svc", f"{svc_name}.{NAMESPACE}.svc.cluster.local"):
        expect(san.encode() in der, f"serving certificate lacks SAN {san}")
    pem_der(secret["data"]["ca.crt"])
    out.append("webhooks: namespace + pod, disjoint selectors, kube-system excluded, caBundle = genCA, 4 SANs")

    tp = r.test_pod()
    expect(tp["metadata"]["annotations"]["helm.sh/hook"] == "test", "test pod is not a test hook")
    expect(tp["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded", "test hook delete policy")
    expect(tp["metadata"]["labels"]["llm-sidecar.io/inject"] == "true", "test pod does not opt in")
    expect(not tp["spec"].get("initContainers"), "test pod carries its own sidecar although the webhook injects")
    expect(tp["spec"]["serviceAccountName"] == "llm-sidecar" and tp["spec"]["restartPolicy"] == "Never", "test pod SA/restartPolicy")
    app = tp["spec"]["containers"][0]
    expect(app["command"] == ["/usr/local/bin/llm-sidecar", "probe", "models"], "test pod command")
    expect("OPENAI_BASE_URL" not in env_of(app), "test pod sets OPENAI_BASE_URL although the injector does")
    out.append("helm test pod: opts in by label, probe models, left to the injector")
    no_key_in_clear(r)
    out.append("no provider key in the clear (envFrom Secret llm-sidecar-provider-keys only)")
    return out


def check_webhook_off(r):
    for kind, name in (("MutatingWebhookConfiguration", "llm-sidecar"), ("Deployment", "llm-sidecar-injector"),
                       ("ConfigMap", "llm-sidecar-inject"), ("Secret", "llm-sidecar-injector-tls"),
                       ("Service", "llm-sidecar-injector")):
        expect(r.maybe(kind, name) is None, f"{kind}/{name} rendered with the webhook off")
    tp = r.test_pod()
    expect(tp["metadata"]["labels"]["llm-sidecar.io/inject"] == "false", "test pod should opt out")
    inits = tp["spec"].get("initContainers", [])
    expect(len(inits) == 1 and inits[0].get("restartPolicy") == "Always", "no native sidecar in the test pod")
    sidecar = {k: v for k, v in inits[0].items() if k != "restartPolicy"}
    expect_same(sidecar, golden()["container"], "test pod sidecar vs the golden container")
    expect(env_of(tp["spec"]["containers"][0]).get("OPENAI_BASE_URL") == "http://127.0.0.1:4000/v1", "OPENAI_BASE_URL")
    return ["no injector/webhook/template; test pod runs the partial as a native sidecar (== golden container)"]


def check_container_mode(r):
    t = r.template()
    expect(t["mode"] == "container", f"mode {t['mode']}")
    expect_same(t["container"], golden()["container"], "container-mode container vs golden")
    tp = r.test_pod()
    inits = tp["spec"].get("initContainers", [])
    expect(len(inits) == 1 and inits[0].get("restartPolicy") == "Always", "test pod lacks its own native sidecar")
    expect_same({k: v for k, v in inits[0].items() if k != "restartPolicy"}, t["container"], "test pod sidecar vs template")
    return ["template mode: container (same container); helm test pod brings its own native sidecar"]


def check_cert_manager(r):
    expect(r.maybe("Secret", "llm-sidecar-injector-tls") is None, "genCA Secret rendered with cert-manager on")
    cert = r.get("Certificate", "llm-sidecar-injector")
    spec = cert["spec"]
    expect(spec["secretName"] == "llm-sidecar-injector-tls", "Certificate secretName")
    svc = "llm-sidecar-injector"
    expect(spec["dnsNames"] == [svc, f"{svc}.{NAMESPACE}", f"{svc}.{NAMESPACE}.svc", f"{svc}.{NAMESPACE}.svc.cluster.local"],
           f"dnsNames {spec['dnsNames']}")
    issuer = r.get("Issuer", "llm-sidecar-selfsigned")
    expect(issuer["spec"] == {"selfSigned": {}}, "Issuer is not self-signed")
    expect(spec["issuerRef"] == {"name": "llm-sidecar-selfsigned", "kind": "Issuer", "group": "cert-manager.io"}, "issuerRef")
    mwc, hooks = r.webhooks()
    expect(mwc["metadata"].get("annotations", {}).get("cert-manager.io/inject-ca-from") == f"{NAMESPACE}/{svc}",
           "no cert-manager.io/inject-ca-from annotation")
    expect(all("caBundle" not in h["clientConfig"] for h in hooks.values()), "caBundle set although cert-manager injects it")
    return ["Certificate + self-signed Issuer, no genCA Secret, inject-ca-from annotation, no caBundle"]


def check_cert_manager_issuer(r):
    expect(not r.all("Issuer"), "an Issuer rendered although issuerRef names one")
    spec = r.get("Certificate", "llm-sidecar-injector")["spec"]
    expect(spec["issuerRef"] == {"name": "platform-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}, "issuerRef")
    expect((spec["duration"], spec["renewBefore"]) == ("2160h", "360h"), "duration/renewBefore")
    return ["Certificate from issuerRef ClusterIssuer/platform-ca, no Issuer rendered"]


def check_custom(r):
    out = []
    t = r.template("llm-proxy")
    c = t["container"]
    expect(t["port"] == 14000, "template port")
    expect(c["image"] == "registry.example.com/platform/llm-sidecar@sha256:" + "0123456789abcdef" * 4, f"image {c['image']}")
    expect(c["imagePullPolicy"] == "Always", "pullPolicy")
    expect(c["resources"] == {"requests": {"cpu": "250m", "memory": "96Mi"}, "limits": {"cpu": "2", "memory": "384Mi"}},
           f"resources {c['resources']}")
    env = env_of(c)
    expect(env["LLM_SIDECAR_LISTEN"] == "127.0.0.1:14000" and env["LLM_SIDECAR_ADMIN_LISTEN"] == "0.0.0.0:14001", "listen env (data on loopback, admin exposed)")
    expect([p["containerPort"] for p in c["ports"]] == [14000, 14001], "ports")
    expect(env["LLM_SIDECAR_CONFIGMAP"] == "routing-flags" and env["LLM_SIDECAR_CONFIGMAP_NAMESPACE"] == NAMESPACE, "ConfigMap env")
    expect((env["LLM_SIDECAR_LOG_FORMAT"], env["LLM_SIDECAR_SHUTDOWN_GRACE"]) == ("text", "40s"), "log/grace env")
    out.append("custom image digest, pullPolicy, resources, ports, log format, grace and ConfigMap name in the template")
    expect({k: env.get(k) for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
                                    "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG")} ==
           {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger-collector.observability.svc:4317",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25"}, "tracing env")
    names = [e["name"] for e in c["env"]]
    expect(names[-2:] == ["LLM_SIDECAR_MAX_CONCURRENCY", "OTEL_RESOURCE_ATTRIBUTES"], "extraEnv not appended last")
    out.append("tracing env (endpoint, protocol, parentbased_traceidratio 0.25) and extraEnv appended")

    cm = r.get("ConfigMap", "routing-flags")
    expect({k: v for k, v in cm["data"].items() if k != "config.yaml"} ==
           {"holy_sheep_routing_enabled": "false", "holy_sheep_fallback_only": "true",
            "rollout_percent": "25", "shadow_percent": "5"}, "flags")
    expect(r.get("Role", "llm-proxy")["rules"][0]["resourceNames"] == ["routing-flags"], "Role resourceNames")
    out.append("flags rendered as strings into ConfigMap routing-flags; Role follows the name")

    secret = r.get("Secret", "llm-proxy-provider-keys")
    expect(c["envFrom"] == [{"secretRef": {"name": "llm-proxy-provider-keys", "optional": True}}], f"envFrom {c['envFrom']}")
    expect(base64.b64decode(secret["data"]["DEEPSEEK_API_KEY"]).decode() == TRIAL_KEY, "trial Secret content")
    expect(TRIAL_KEY not in r.text, "a provider key appears in the clear in the rendered manifests")
    encoded = base64.b64encode(TRIAL_KEY.encode()).decode()
    holders = [f"{d['kind']}/{d['metadata']['name']}" for d in r.docs if encoded in yaml.safe_dump(d)]
    expect(holders == ["Secret/llm-proxy-provider-keys"], f"the key is held by {holders}")
    no_key_in_clear(r)
    out.append("trial provider-keys Secret: only the Secret holds the key (base64), envFrom optional")

    dep = r.get("Deployment", "llm-proxy-injector")
    ps = dep["spec"]["template"]["spec"]
    expect(dep["spec"]["replicas"] == 1 and r.maybe("PodDisruptionBudget", "llm-proxy-injector") is None,
           "one replica must not get a PDB")
    expect(ps["containers"][0]["resources"]["limits"]["memory"] == "96Mi", "injector resources")
    expect(ps["imagePullSecrets"] == [{"name": "regcred"}] and ps["priorityClassName"] == "system-cluster-critical", "pull secrets/priority")
    expect(ps["nodeSelector"] == {"kubernetes.io/os": "linux"} and ps["tolerations"][0]["key"] == "dedicated", "scheduling")
    _, hooks = r.webhooks("llm-proxy")
    expect(all(h["timeoutSeconds"] == 5 for h in hooks.values()), "timeoutSeconds")
    out.append("injector: 1 replica without PDB, resources, pull secrets, priority, scheduling, timeout 5")
    return out


REDIS_ENV = ("LLM_SIDECAR_REDIS_URL", "LLM_SIDECAR_REDIS_PASSWORD_FILE", "LLM_SIDECAR_REDIS_TIMEOUT")


def check_budgets_redis(r):
    out = []
    t = r.template()
    expect_same(t, golden(GOLDEN_REDIS), "sidecar.yaml of llm-sidecar-inject vs tests/golden/inject/sidecar-redis.yaml")
    out.append("golden: llm-sidecar-inject sidecar.yaml == tests/golden/inject/sidecar-redis.yaml")
    env = env_of(t["container"])
    expect(env["LLM_SIDECAR_REDIS_URL"] == {"secretKeyRef": {"name": "llm-sidecar-redis", "key": "url"}},
           f"the URL is not taken from the Secret: {env['LLM_SIDECAR_REDIS_URL']!r}")
    expect(env["LLM_SIDECAR_REDIS_PASSWORD_FILE"] == "/etc/llm-sidecar/redis/password", "password file path")
    mounts = {m["name"]: m for m in t["container"]["volumeMounts"]}
    volumes = {v["name"]: v for v in t["volumes"]}
    expect(set(mounts) == set(volumes) == {"llm-sidecar-redis-password"}, f"mounts {sorted(mounts)}, volumes {sorted(volumes)}")
    mount, volume = mounts["llm-sidecar-redis-password"], volumes["llm-sidecar-redis-password"]
    expect(mount["readOnly"] is True and env["LLM_SIDECAR_REDIS_PASSWORD_FILE"].startswith(mount["mountPath"] + "/"),
           "the password file is not on a read-only mount")
    expect(volume["secret"] == {"secretName": "llm-sidecar-redis-auth", "items": [{"key": "password", "path": "password"}]},
           f"volume {volume}")
    out.append("URL from secretKeyRef llm-sidecar-redis/url; password Secret key mounted read-only, PASSWORD_FILE names it")
    tp = r.test_pod()
    expect(not tp["spec"].get("initContainers") and not tp["spec"].get("volumes"),
           "test pod carries a sidecar or volume although the webhook injects")
    no_key_in_clear(r)

    # The helm test pod carries the sidecar itself with the webhook off: the volume comes along.
    p = template("budgets-redis.yaml", "--set", "webhook.enabled=false")
    expect(p.returncode == 0, first_line(p.stderr))
    off = Render("budgets-redis.yaml webhook off", p.stdout).test_pod()
    sidecar = {k: v for k, v in off["spec"]["initContainers"][0].items() if k != "restartPolicy"}
    expect_same(sidecar, t["container"], "webhook-off test pod sidecar vs the redis template")
    expect_same(off["spec"]["volumes"], t["volumes"], "webhook-off test pod volumes vs the redis template")
    out.append("webhook off: the helm test pod's sidecar and volumes == the redis template")

    # A plain URL (no password in it) is a plain value; nothing else comes along.
    url = "rediss://redis.platform.svc:6380/0"
    p = template("defaults.yaml", "--set", f"budgets.redis.url={url}")
    expect(p.returncode == 0, first_line(p.stderr))
    plain = Render("plain url", p.stdout).template()
    env = env_of(plain["container"])
    expect(env.get("LLM_SIDECAR_REDIS_URL") == url and not set(REDIS_ENV[1:]) & set(env), f"plain url env {env}")
    expect("volumes" not in plain and "volumeMounts" not in plain["container"], "a plain URL brought a volume")
    out.append("budgets.redis.url: one plain LLM_SIDECAR_REDIS_URL, no volume; defaults: no LLM_SIDECAR_REDIS_* (golden)")

    for args, message in (
        (["--set", "budgets.redis.url=redis://:s3cret@redis:6379"], "budgets.redis.url carries a password"),
        (["--set", "budgets.redis.url=redis://redis:6379", "--set", "budgets.redis.timeout=6s"],
         "budgets.redis.timeout=6s: must be more than 0 and at most 5s"),
        (["--set", "budgets.redis.passwordSecret.name=a", "--set", "budgets.redis.passwordSecret.key=b"],
         "budgets.redis.passwordSecret needs budgets.redis.url or budgets.redis.urlSecret"),
        (["--set", "budgets.redis.url=http://redis:6379"], "budgets.redis.url: Does not match pattern"),
    ):
        p = template("defaults.yaml", *args)
        expect(p.returncode != 0, f"accepted {' '.join(args)}")
        expect(message in p.stderr, f"{' '.join(args)} rejected, but not for '{message}': {first_line(p.stderr)}")
        expect("s3cret" not in p.stderr, "the rejection shows the password")
    out.append("rejected: a password in budgets.redis.url (not echoed), timeout over 5s, a password without URL, http://")
    return out


def check_workload_namespaces(r):
    subjects = r.get("RoleBinding", "llm-sidecar")["subjects"]
    groups = sorted(s["name"] for s in subjects if s["kind"] == "Group")
    expect(groups == ["system:serviceaccounts:apps", "system:serviceaccounts:batch-jobs"], f"groups {groups}")
    expect(any(s["kind"] == "ServiceAccount" and s["name"] == "llm-sidecar" for s in subjects), "chart SA unbound")
    return ["RoleBinding: the chart SA + system:serviceaccounts:{apps,batch-jobs}, no cluster-wide group"]


def check_annotation_opt_in(r):
    _, hooks = r.webhooks()
    pod_hook = hooks["pod.inject.llm-sidecar.io"]
    expect(pod_hook["objectSelector"]["matchExpressions"] == [
        {"key": "llm-sidecar.io/inject", "operator": "NotIn", "values": ["false"]}], "pod hook objectSelector")
    expect(all(h["failurePolicy"] == "Ignore" for h in hooks.values()), "failurePolicy")
    return ["pod webhook objectSelector NotIn [false] (every pod to the injector), failurePolicy Ignore"]


GOOD = {
    "defaults.yaml": check_defaults,
    "webhook-off.yaml": check_webhook_off,
    "container-mode.yaml": check_container_mode,
    "cert-manager.yaml": check_cert_manager,
    "cert-manager-issuer.yaml": check_cert_manager_issuer,
    "custom.yaml": check_custom,
    "workload-namespaces.yaml": check_workload_namespaces,
    "annotation-opt-in.yaml": check_annotation_opt_in,
    "budgets-redis.yaml": check_budgets_redis,
}

# Values files the schema must reject, with the message Helm must give.
BAD = {
    "bad-type.yaml": "flags.rollout_percent: Invalid type",
    "bad-unknown-key.yaml": "Additional property webhoook is not allowed",
    "bad-nested-key.yaml": "Additional property resource is not allowed",
    "bad-enum.yaml": "webhook.failurePolicy",
    "bad-redis-password-secret.yaml": "budgets.redis.passwordSecret: Has a dependency on key",
}

# Values files the chart's own checks (`fail` in templates/_helpers.tpl) must reject, for rules
# the schema cannot state with a clear message. `helm template`, `install` and `upgrade` fail
# with the message; `helm lint` renders in lint mode, where Helm turns every `fail` into an
# `[INFO] Fail: <message>` line and exits 0, so lint must print that line.
BAD_CHART = {
    "bad-redis-both-urls.yaml": "budgets.redis: set url or urlSecret, not both",
}


def render_notes(name, *extra):
    """NOTES.txt as `helm install` prints it, rendered offline: a copy of the chart that renders
    NOTES.txt through `tpl` into a ConfigMap (`helm template` never renders NOTES.txt itself)."""
    work = Path(tempfile.mkdtemp(prefix="chart-test-notes-"))
    try:
        chart = work / "llm-sidecar"
        shutil.copytree(CHART, chart)
        (chart / "templates" / "NOTES.txt").rename(chart / "notes-under-test.txt")
        (chart / "templates" / "notes-under-test.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-under-test\n"
            'data:\n  notes: {{ tpl (.Files.Get "notes-under-test.txt") . | toJson }}\n')
        p = template(name, "--show-only", "templates/notes-under-test.yaml", *extra, chart=chart)
        expect(p.returncode == 0, first_line(p.stderr))
        return yaml.safe_load(p.stdout)["data"]["notes"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_notes():
    rollback = """kubectl -n llm-sidecar patch configmap llm-sidecar --type merge -p '{"data":{"holy_sheep_routing_enabled":"false"}}'"""
    notes = render_notes("defaults.yaml")
    for want in (rollback, "kubectl label namespace <namespace> llm-sidecar.io/inject=enabled",
                 "llm-sidecar.io/inject: \"true\"", "-o jsonpath='{.spec.initContainers[*].name}",
                 "helm test llm-sidecar -n llm-sidecar", "--reuse-values"):
        expect(want in notes, f"defaults NOTES lack: {want}")
    expect("WARNING" not in notes, "defaults NOTES warn")
    notes = render_notes("custom.yaml")
    expect("patch configmap routing-flags --type merge" in notes, "custom NOTES do not name ConfigMap routing-flags")
    notes = render_notes("annotation-opt-in.yaml", "--set", "webhook.failurePolicy=Fail")
    expect("WARNING: webhook.annotationOptIn" in notes, "no warning for annotationOptIn with failurePolicy Fail")
    return "NOTES: opt-in, verify (jsonpath initContainers), helm test, rollback patch with real names; opt-in+Fail warns"


def check_config_binary():
    """The built sidecar, if there is one: this check never builds it (make py-test does)."""
    explicit = os.environ.get("LLM_SIDECAR_BIN")
    return Path(explicit) if explicit else ROOT / "target" / "debug" / "llm-sidecar"


def main():
    started = time.monotonic()
    results = {"passed": 0, "failed": 0, "skipped": 0}

    def report(status, name, detail=""):
        results[{"ok": "passed", "FAIL": "failed", "skip": "skipped"}[status]] += 1
        print(f"{status:<5}{name}{': ' + detail if detail else ''}", flush=True)

    present = sorted(p.name for p in VALUES_DIR.glob("*.yaml"))
    unknown = sorted(set(present) - set(GOOD) - set(BAD) - set(BAD_CHART))
    missing = sorted((set(GOOD) | set(BAD) | set(BAD_CHART)) - set(present))
    if unknown or missing:
        report("FAIL", "tests/chart/ values files", f"unlisted {unknown}, missing {missing}")

    print(f"info helm {helm('version', '--short').stdout.strip()}, kubernetes-validate "
          f"{kubernetes_validate.__version__} (Kubernetes {KUBE_VERSION}, strict)", flush=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        lints = {n: pool.submit(lint, n) for n in [*GOOD, *BAD, *BAD_CHART] if n in present}
        renders = {n: pool.submit(template, n) for n in [*GOOD, *BAD, *BAD_CHART] if n in present}

        for name, check in GOOD.items():
            if name not in present:
                continue
            p = lints[name].result()
            report("ok" if p.returncode == 0 else "FAIL", f"helm lint --strict -f {name}",
                   "" if p.returncode == 0 else first_line(p.stdout + p.stderr))
            p = renders[name].result()
            if p.returncode != 0:
                report("FAIL", f"helm template -f {name}", first_line(p.stderr))
                continue
            try:
                r = Render(name, p.stdout)
            except yaml.YAMLError as e:
                report("FAIL", f"helm template -f {name}", f"output is not YAML: {e}")
                continue
            try:
                skipped, templates = validate(r)
                note = f"{len(r.docs)} objects" + (" + sidecar.yaml as an injected pod" if templates else "")
                note += f"; no schema, shape checked only: {', '.join(skipped)}" if skipped else ""
                report("ok", f"kubernetes-validate {name}", note)
            except Failed as e:
                report("FAIL", f"kubernetes-validate {name}", str(e))
            try:
                for line in check(r):
                    report("ok", f"{name}: {line}")
            except Failed as e:
                report("FAIL", f"{name}", str(e))
            except (KeyError, IndexError, TypeError) as e:
                report("FAIL", f"{name}", f"unexpected shape: {e!r}")

        for name, message in BAD.items():
            if name not in present:
                continue
            for verb, p in (("lint --strict", lints[name].result()), ("template", renders[name].result())):
                output = p.stdout + p.stderr
                if p.returncode == 0:
                    report("FAIL", f"helm {verb} -f {name}", "accepted values the schema must reject")
                elif message not in output:
                    report("FAIL", f"helm {verb} -f {name}", f"rejected, but not for '{message}': {first_line(output)}")
                else:
                    report("ok", f"helm {verb} -f {name} rejected", message)

        for name, message in BAD_CHART.items():
            if name not in present:
                continue
            p = renders[name].result()
            if p.returncode == 0:
                report("FAIL", f"helm template -f {name}", "accepted values the chart must reject")
            elif message not in p.stderr:
                report("FAIL", f"helm template -f {name}", f"rejected, but not for '{message}': {first_line(p.stderr)}")
            else:
                report("ok", f"helm template -f {name} rejected by the chart", message)
            p = lints[name].result()
            output = p.stdout + p.stderr
            if f"[INFO] Fail: {message}" in output:
                report("ok", f"helm lint --strict -f {name} reports", f"[INFO] Fail: {message}")
            else:
                report("FAIL", f"helm lint --strict -f {name}", f"does not report '{message}': {first_line(output)}")

    try:
        report("ok", check_notes())
    except Failed as e:
        report("FAIL", "NOTES.txt", str(e))

    binary = check_config_binary()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        report("FAIL", "llm-sidecar check-config on the rendered ConfigMaps",
               f"no {binary} (make chart-test builds it; LLM_SIDECAR_BIN overrides)")
    else:
        for name, fullname in (("defaults.yaml", "llm-sidecar"), ("custom.yaml", "routing-flags")):
            p = template(name, "--show-only", "templates/configmap.yaml")
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f"chart-test-{fullname}-") as f:
                f.write(p.stdout)
                f.flush()
                check = subprocess.run([str(binary), "check-config", f.name], capture_output=True, text=True,
                                       timeout=60, check=False)
            out = (check.stdout + check.stderr).strip().replace(f.name, f"ConfigMap {fullname}")
            report("ok" if p.returncode == 0 and check.returncode == 0 else "FAIL",
                   f"llm-sidecar check-config ({name})", out.splitlines()[0] if out else "")

    shutil.rmtree(_HELM_HOME, ignore_errors=True)
    elapsed = time.monotonic() - started
    print(f"info checks took {elapsed:.1f}s", flush=True)
    print(f"chart-test: {results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped",
          flush=True)
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
