"""Rollback propagation benchmark.

N sidecar processes (SIDECARS, default 20) watch one ConfigMap on the Kubernetes API emulator
(tests/kubeapi/emulator.py), each with requests flowing through it to the fake provider. The
ConfigMap is patched to `holy_sheep_routing_enabled: "false"`; for every sidecar we measure the
time from the patch being accepted (the API server's 200) to the first request that the official
provider served. Rounds (ROUNDS, default 3) alternate: roll forward to the relay (not measured,
waited for), then roll back (measured).

Prints p50, p99 and max over all rollbacks and ends with one machine-readable line:
  rollback: sidecars=… p50_ms=… p99_ms=… max_ms=… failed_requests=…
failed_requests counts non-200 answers and errors during the whole run, and requests that went
back to the relay after a sidecar had switched (a flapping rollback). Target: p99 under 1 s.

Environment: SIDECARS, ROUNDS, LLM_SIDECAR_BIN (skip the release build), LLM_SIDECAR_FAKE_BIN
(the fake provider's binary, default llm-sidecar-fake-provider next to LLM_SIDECAR_BIN), TIMEOUT
(seconds a sidecar may take before it counts as failed, default 10).
"""

import http.client
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATOR = os.path.join(ROOT, "tests", "kubeapi", "emulator.py")
SIDECARS = int(os.environ.get("SIDECARS", "20"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
TIMEOUT = float(os.environ.get("TIMEOUT", "10"))
NAMESPACE, NAME = "bench", "llm-sidecar"
KEYS = {
    k: "bench-key"
    for k in ("HOLYSHEEP_API_KEY", "DEEPSEEK_API_KEY", "MOONSHOT_API_KEY", "MINIMAX_API_KEY", "GEMINI_API_KEY", "OPENAI_API_KEY")
}
BODY = json.dumps({"model": "deepseek-v3.2", "messages": [{"role": "user", "content": "hi"}]})


def log(msg):
    print(f"rollback: {msg}", file=sys.stderr, flush=True)


def lines(stream):
    q = queue.Queue()

    def pump():
        for line in iter(stream.readline, ""):
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def wait_line(q, predicate, what, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SystemExit(f"rollback: FAILED: timed out waiting for {what}")
        try:
            line = q.get(timeout=left)
        except queue.Empty:
            continue
        if line is None:
            raise SystemExit(f"rollback: FAILED: process exited before {what}")
        found = predicate(line)
        if found:
            return found


def api(base, method, path, body=None, content_type="application/json"):
    host = base.split("//", 1)[1]
    conn = http.client.HTTPConnection(host, timeout=10)
    headers = {"x-emulator-admin": "1"}
    data = None
    if body is not None:
        data = json.dumps(body)
        headers["content-type"] = content_type
    conn.request(method, path, data, headers)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    if resp.status >= 300:
        raise SystemExit(f"rollback: FAILED: {method} {path}: {resp.status} {payload[:200]!r}")
    return json.loads(payload)


class Traffic(threading.Thread):
    """Sends requests to one sidecar back to back on a kept-alive connection and records, for
    each answer, when it completed and which side served it."""

    def __init__(self, addr):
        super().__init__(daemon=True)
        self.addr = addr
        self.lock = threading.Lock()
        self.answers = []  # (completed_at, path)
        self.failed = 0
        self.stop = threading.Event()

    def run(self):
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.addr, timeout=10)
                conn.request("POST", "/v1/chat/completions", BODY, {"content-type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                done = time.monotonic()
                with self.lock:
                    if resp.status == 200:
                        self.answers.append((done, resp.getheader("x-llm-sidecar-path")))
                    else:
                        self.failed += 1
            except (OSError, http.client.HTTPException):
                with self.lock:
                    self.failed += 1
                conn = None

    def first_since(self, since, path):
        with self.lock:
            for done, p in self.answers:
                if done >= since and p == path:
                    return done
        return None

    def flaps_after(self, since, path):
        """Answers from the other side after the first one from `path` (a flapping switch)."""
        with self.lock:
            seen = False
            flaps = 0
            for done, p in self.answers:
                if done < since:
                    continue
                if p == path:
                    seen = True
                elif seen:
                    flaps += 1
            return flaps


def percentile(values, p):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def main():
    bin_path = os.environ.get("LLM_SIDECAR_BIN")
    if not bin_path:
        log("cargo build --release --bin llm-sidecar --bin llm-sidecar-fake-provider")
        subprocess.run(["cargo", "build", "--release", "--bin", "llm-sidecar", "--bin", "llm-sidecar-fake-provider"],
                       cwd=ROOT, check=True, stdout=sys.stderr)
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
        bin_path = os.path.join(target, "release", "llm-sidecar")
    fake_bin = os.environ.get("LLM_SIDECAR_FAKE_BIN") or os.path.join(os.path.dirname(bin_path), "llm-sidecar-fake-provider")
    if not os.access(fake_bin, os.X_OK):
        sys.exit(f"rollback: no fake provider at {fake_bin} (cargo build --release --bin llm-sidecar-fake-provider)")
    procs = []
    tmp = tempfile.mkdtemp(prefix="llm-sidecar-rollback.")
    try:
        fake = subprocess.Popen([fake_bin, "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(fake)
        fake_url = wait_line(lines(fake.stdout), lambda l: l.strip().split("listening on ", 1)[1] if "listening on " in l else None, "the fake provider")

        kube = subprocess.Popen([sys.executable, EMULATOR, "--port", "0"], stdout=subprocess.PIPE, text=True)
        procs.append(kube)
        kube_url = wait_line(lines(kube.stdout), lambda l: l.strip().split("listening on ", 1)[1] if "listening on " in l else None, "the API emulator")
        sys.path.insert(0, os.path.dirname(EMULATOR))
        import emulator

        kubeconfig = os.path.join(tmp, "kubeconfig")
        with open(kubeconfig, "w") as f:
            f.write(emulator.kubeconfig(kube_url, NAMESPACE))
        config = os.path.join(tmp, "routing.yaml")
        with open(config, "w") as f:
            f.write(subprocess.check_output([bin_path, "default-config", "--upstream", fake_url], text=True))
        api(kube_url, "POST", f"/api/v1/namespaces/{NAMESPACE}/configmaps",
            {"metadata": {"name": NAME}, "data": {"holy_sheep_routing_enabled": "true"}})

        env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "HOLY_SHEEP_ENABLED")}
        env.update(KEYS)
        env.update(
            LLM_SIDECAR_LISTEN="127.0.0.1:0",
            LLM_SIDECAR_ADMIN_LISTEN="127.0.0.1:0",
            LLM_SIDECAR_LOG_FORMAT="json",
            LLM_SIDECAR_CONFIGMAP=NAME,
            POD_NAMESPACE=NAMESPACE,
            KUBECONFIG=kubeconfig,
            RUST_LOG="warn,llm_sidecar=info",
        )
        addrs = []
        log(f"starting {SIDECARS} sidecars")
        for i in range(SIDECARS):
            proc = subprocess.Popen([bin_path, "run", "--config", config], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=dict(env, POD_NAME=f"bench-{i}"))
            procs.append(proc)

            def serving(line):
                try:
                    event = json.loads(line)
                except ValueError:
                    return None
                return event if event.get("message") == "llm-sidecar serving" else None

            event = wait_line(lines(proc.stderr), serving, f"sidecar {i}")
            addrs.append((event["data_addr"], event["admin_addr"]))

        for data_addr, admin_addr in addrs:
            deadline = time.monotonic() + 30
            while True:
                conn = http.client.HTTPConnection(admin_addr, timeout=5)
                conn.request("GET", "/ready")
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"rollback: FAILED: sidecar {admin_addr} never became ready")
                time.sleep(0.02)

        traffic = [Traffic(data_addr) for data_addr, _ in addrs]
        for t in traffic:
            t.start()

        samples = []
        flaps = 0
        missing = 0
        path = f"/api/v1/namespaces/{NAMESPACE}/configmaps/{NAME}"
        for round_no in range(1, ROUNDS + 1):
            # Roll forward and wait until every sidecar serves from the relay.
            forward = time.monotonic()
            api(kube_url, "PATCH", path, {"data": {"holy_sheep_routing_enabled": "true"}}, "application/merge-patch+json")
            deadline = time.monotonic() + TIMEOUT
            while any(t.first_since(forward, "relay") is None for t in traffic):
                if time.monotonic() > deadline:
                    raise SystemExit("rollback: FAILED: not every sidecar came back to the relay")
                time.sleep(0.01)
            # Settle: every sidecar has served a relay answer after the forward switch.
            settle = time.monotonic()
            while any(t.first_since(settle, "relay") is None for t in traffic):
                if time.monotonic() > deadline:
                    raise SystemExit("rollback: FAILED: a sidecar stopped answering")
                time.sleep(0.01)

            # The rollback.
            api(kube_url, "PATCH", path, {"data": {"holy_sheep_routing_enabled": "false"}}, "application/merge-patch+json")
            accepted = time.monotonic()
            deadline = accepted + TIMEOUT
            while any(t.first_since(accepted, "official") is None for t in traffic) and time.monotonic() < deadline:
                time.sleep(0.01)
            round_samples = []
            for t in traffic:
                first = t.first_since(accepted, "official")
                if first is None:
                    missing += 1
                else:
                    round_samples.append((first - accepted) * 1000)
            # Keep traffic flowing a little to catch a sidecar that flips back.
            hold = time.monotonic() + 0.3
            while time.monotonic() < hold:
                time.sleep(0.01)
            flaps += sum(t.flaps_after(accepted, "official") for t in traffic)
            samples.extend(round_samples)
            log(
                f"round {round_no}: {len(round_samples)}/{len(traffic)} sidecars on official; "
                f"p50 {percentile(round_samples, 50):.1f} ms, max {max(round_samples, default=float('nan')):.1f} ms"
            )

        for t in traffic:
            t.stop.set()
        for t in traffic:
            t.join(timeout=15)
        answered = sum(len(t.answers) for t in traffic)
        gaps = []
        for t in traffic:
            times = [done for done, _ in t.answers]
            gaps.extend((b - a) * 1000 for a, b in zip(times, times[1:]))
        failed = sum(t.failed for t in traffic) + flaps + missing
        p50, p99, worst = percentile(samples, 50), percentile(samples, 99), max(samples, default=float("nan"))
        print(f"sidecars: {SIDECARS}, rollbacks measured: {len(samples)} ({ROUNDS} rounds), requests answered: {answered}")
        print(f"time from patch accepted to first official answer: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {worst:.1f} ms")
        print(f"request spacing per sidecar (the resolution of the measurement): median {percentile(gaps, 50):.1f} ms")
        print(f"failed requests: {failed} (errors {failed - flaps - missing}, back on the relay after switching {flaps}, never switched {missing})")
        print(f"target p99 < 1000 ms: {'met' if p99 < 1000 and not missing else 'NOT met'}")
        print(f"rollback: sidecars={SIDECARS} p50_ms={p50:.1f} p99_ms={p99:.1f} max_ms={worst:.1f} failed_requests={failed}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
