#!/usr/bin/env python3
"""Small stdlib-only helpers for bench/run.sh.

  ports N                      print N distinct free loopback ports
  wait-tcp PORT SECONDS        wait until 127.0.0.1:PORT accepts connections
  wait-http URL SECONDS        wait until GET URL answers 200
  wait-line FILE TEXT SECONDS  wait until FILE contains TEXT
  post URL SECONDS             POST the benchmark body once; expect 200 and a chat.completion
  spans METRICS_URL           print the traced sidecar's exported/dropped/failed span counts
  summary RESULTS PACED RSS_MB SPANS
                               print the table and the final `bench:` line (PACED: the
                               fixed-load runs, for CPU per request)
"""
import json
import socket
import statistics
import sys
import time
import urllib.error
import urllib.request

BODY = b'{"model":"deepseek-v3.2","messages":[{"role":"user","content":"Say hello."}]}'
TARGETS = ("direct", "nginx", "sidecar", "stack", "traced", "sampled")


def die(msg):
    print(f"bench: {msg}", file=sys.stderr)
    sys.exit(1)


def ports(n):
    socks = []
    for _ in range(int(n)):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


def poll(what, seconds, probe):
    deadline = time.monotonic() + float(seconds)
    last = None
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except Exception as err:  # noqa: BLE001 - any failure means "not yet"
            last = err
        time.sleep(0.05)
    die(f"timed out after {seconds}s waiting for {what}" + (f" (last error: {last})" if last else ""))


def wait_tcp(port, seconds):
    def probe():
        with socket.create_connection(("127.0.0.1", int(port)), timeout=1):
            return True
    poll(f"127.0.0.1:{port}", seconds, probe)


def wait_http(url, seconds):
    def probe():
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    poll(url, seconds, probe)


def wait_line(path, text, seconds):
    def probe():
        with open(path, encoding="utf-8", errors="replace") as f:
            return text in f.read()
    poll(f"'{text}' in {path}", seconds, probe)


def post(url, seconds):
    req = urllib.request.Request(
        url,
        data=BODY,
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": "Bearer app-key"},
    )
    try:
        with urllib.request.urlopen(req, timeout=float(seconds)) as r:
            body = r.read()
            status = r.status
    except urllib.error.HTTPError as err:
        die(f"POST {url} answered {err.code}: {err.read()[:300]!r}")
    except OSError as err:
        die(f"POST {url} failed: {err}")
    try:
        doc = json.loads(body)
    except ValueError:
        die(f"POST {url} answered {status} with a non-JSON body: {body[:300]!r}")
    if status != 200 or doc.get("object") != "chat.completion":
        die(f"POST {url} answered {status} with an unexpected body: {body[:300]!r}")


def spans(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    counts = {}
    for line in text.splitlines():
        for what in ("exported", "dropped", "failed"):
            if line.startswith(f"llm_sidecar_trace_spans_{what}_total "):
                counts[what] = int(float(line.split()[1]))
    if len(counts) != 3:
        die("the span counters are missing from /metrics")
    print(f"spans_exported={counts['exported']} spans_dropped={counts['dropped']} spans_failed={counts['failed']}")


def load_runs(path):
    """Rows of `TARGET round=… rps=… …` by target."""
    runs = {t: [] for t in TARGETS + ("baseline",)}
    with open(path, encoding="utf-8") as f:
        for line in f:
            target, *fields = line.split()
            runs[target].append(dict(x.split("=", 1) for x in fields))
    return runs


def paired(runs, key, a, b):
    """The median over rounds of a's KEY over b's in the same round.

    A comparison is made round by round, between runs next to each other in time: a
    neighbour's load that comes and goes moves both sides of a pair, and one disturbed round
    does not move the median."""
    by_round = {t: {r["round"]: float(r[key]) for r in runs[t] if key in r} for t in (a, b)}
    ratios = [by_round[a][k] / by_round[b][k] for k in by_round[a] if by_round[b].get(k)]
    return statistics.median(ratios) if ratios else 0.0


def cpu_figures(runs, label):
    """CPU per request of each target that has it (median of rounds), and the sidecar's rise
    over the baseline build when there is one; prints them and returns `name=value` fields."""
    cpu = {}
    for t in ("sidecar", "stack", "nginx", "sampled", "baseline"):
        if runs[t] and all("cpu_us" in r for r in runs[t]):
            cpu[t] = statistics.median(float(r["cpu_us"]) for r in runs[t])
    fields = [f"{t}_cpu_us={c:.1f}" for t, c in cpu.items()]
    print(f"CPU per request {label} (user + sys from /proc, median of rounds, µs): {' '.join(fields)}")
    if "baseline" in cpu and "sidecar" in cpu:
        rise = paired(runs, "cpu_us", "sidecar", "baseline") - 1
        fields.append(f"sidecar_vs_baseline_cpu={rise:+.3f}")
        print(f"  sidecar against the baseline build: {rise * 100:+.1f} % (median of the rounds' ratios)")
    return fields


def summary(results_path, paced_path, rss_mb, span_counts):
    runs = load_runs(results_path)
    # The baseline (another build, BASELINE_BIN) is optional.
    targets = TARGETS + (("baseline",) if runs["baseline"] else ())
    agg = {}
    for t in targets:
        if not runs[t]:
            die(f"no results for {t}")
        agg[t] = {
            "rps": statistics.mean(float(r["rps"]) for r in runs[t]),
            "p50": statistics.median(float(r["p50_ms"]) for r in runs[t]),
            "p99": statistics.median(float(r["p99_ms"]) for r in runs[t]),
            "n": len(runs[t]),
        }
    print()
    print(f"{'target':<8} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}  rounds")
    for t in targets:
        a = agg[t]
        print(f"{t:<8} {a['rps']:>10.1f} {a['p50']:>8.2f} {a['p99']:>8.2f}  {a['n']}")
    d, n, s = agg["direct"], agg["nginx"], agg["sidecar"]
    ratio = s["rps"] / n["rps"] if n["rps"] > 0 else 0.0
    rss = float(rss_mb)
    print(f"sidecar peak RSS (VmHWM): {rss:.1f} MB")
    print(f"sidecar / nginx req/s: {ratio:.2f} (a guard against regressions: >= 0.7)")
    stack = agg["stack"]
    stack_ratio = stack["rps"] / n["rps"] if n["rps"] > 0 else 0.0
    print(
        f"stack floor / nginx req/s: {stack_ratio:.2f} (the sidecar's server loop and upstream pool, "
        f"none of its work); sidecar / stack floor: "
        f"{s['rps'] / stack['rps'] if stack['rps'] > 0 else 0.0:.2f}"
    )
    traced = agg["traced"]
    sampled = agg["sampled"]
    cost = 1 - paired(runs, "rps", "traced", "sidecar")
    sampled_cost = 1 - paired(runs, "rps", "sampled", "sidecar")
    print(f"tracing on (every request, exported over OTLP/HTTP): {cost * 100:.1f} % fewer req/s (no target: the exporter's encoding sets it); {span_counts}")
    print(
        f"tracing on, 10 % sampled plus every retry, failover, error and slow request "
        f"(parentbased_traceidratio 0.1): {sampled_cost * 100:.1f} % fewer req/s (median of the rounds' ratios; target < 10 %)"
    )
    # Saturated, each target's CPU per request depends on the rate it reaches; at the fixed
    # load every target carries the same req/s, and that comparison is the one with a target.
    cpu_text = " ".join(cpu_figures(runs, "saturated"))
    paced = load_runs(paced_path)
    paced_rps = statistics.median(float(r["rps"]) for r in paced["sidecar"])
    paced_fields = cpu_figures(paced, f"at a fixed load (sidecar {paced_rps:.0f} req/s)")
    if paced["baseline"]:
        print("  target for the sidecar against the baseline build, at the fixed load: at most +10 %")
    cpu_text += f" paced_rps={paced_rps:.1f} " + " ".join("paced_" + f for f in paced_fields)
    print(
        f"bench: direct_rps={d['rps']:.1f} nginx_rps={n['rps']:.1f} sidecar_rps={s['rps']:.1f} "
        f"sidecar_vs_nginx={ratio:.2f} stack_rps={stack['rps']:.1f} stack_vs_nginx={stack_ratio:.2f} "
        f"added_p50_ms={s['p50'] - d['p50']:.2f} "
        f"added_p99_ms={s['p99'] - d['p99']:.2f} sidecar_rss_mb={rss:.1f} "
        f"traced_rps={traced['rps']:.1f} tracing_cost={cost:.3f} sampled_rps={sampled['rps']:.1f} "
        f"sampled_tracing_cost={sampled_cost:.3f} {span_counts} {cpu_text}"
    )


def main(argv):
    cmds = {
        "ports": (ports, 1),
        "wait-tcp": (wait_tcp, 2),
        "wait-http": (wait_http, 2),
        "wait-line": (wait_line, 3),
        "post": (post, 2),
        "spans": (spans, 1),
        "summary": (summary, 4),
    }
    if not argv or argv[0] not in cmds or len(argv) - 1 != cmds[argv[0]][1]:
        die("usage: " + __doc__)
    cmds[argv[0]][0](*argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
