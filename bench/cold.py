"""Cold-start benchmark driver: for each round, starts a fresh sidecar and measures
  ready_ms  - from starting the process to its first 200 on /ready
  cold      - a burst of N concurrent new streams through it (its upstream pool empty)
  warm      - the same burst again at once (the pool now holds connections)
  direct    - the same burst straight at the fake provider, for the upstream's own share
with the kernel's TCP counters (listen-queue overflows and drops, SYN retransmissions,
retransmitted segments) read around each burst. Standard library only.

usage: cold.py SIDECAR_URL DIRECT_URL MODEL DIRECT_MODEL STREAMS ROUNDS ADMIN_PORT -- CMD...
  (CMD starts the sidecar; the environment it runs in is this one's)
  -> one line per round, then: cold: rounds=… ready_ms_max=… cold_ttfb_p99_ms=… …
"""

import asyncio
import http.client
import statistics
import subprocess
import sys
import time

import streams

COUNTERS = {
    "TcpExt": ("ListenOverflows", "ListenDrops", "TCPSynRetrans"),
    "Tcp": ("RetransSegs",),
}


def tcp_counters():
    """The kernel's TCP counters named in COUNTERS, from /proc/net/netstat and /proc/net/snmp."""
    found = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        with open(path) as f:
            lines = f.read().splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            prefix = names.split(":")[0]
            pairs = zip(names.split()[1:], values.split()[1:])
            for name, value in pairs:
                if name in COUNTERS.get(prefix, ()):
                    found[name] = int(value)
    return found


def delta(before, after):
    return {k: after[k] - before.get(k, 0) for k in after}


def wait_ready(port, started, timeout=10.0):
    """Milliseconds from `started` to the first 200 on /ready, polling as fast as it answers."""
    while time.perf_counter() - started < timeout:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/ready")
            if conn.getresponse().status == 200:
                return (time.perf_counter() - started) * 1000
        except OSError:
            pass
        time.sleep(0.0005)
    raise SystemExit(f"cold: the sidecar was not ready within {timeout}s")


def burst(url, model, n):
    before = tcp_counters()
    result = asyncio.run(streams.burst(url, model, n))
    return result, delta(before, tcp_counters())


def main():
    split = sys.argv.index("--")
    url, direct_url, model, direct_model, n, rounds, admin = sys.argv[1:split]
    cmd = sys.argv[split + 1 :]
    n, rounds, admin = int(n), int(rounds), int(admin)
    rows = []
    for round_ in range(1, rounds + 1):
        started = time.perf_counter()
        sidecar = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ready_ms = wait_ready(admin, started)
            cold, cold_tcp = burst(url, model, n)
            warm, warm_tcp = burst(url, model, n)
            direct, direct_tcp = burst(direct_url, direct_model, n)
        finally:
            sidecar.terminate()
            sidecar.wait()
        for name, (r, tcp) in {"cold": (cold, cold_tcp), "warm": (warm, warm_tcp), "direct": (direct, direct_tcp)}.items():
            if r["failed"]:
                raise SystemExit(f"cold: round {round_}: {r['failed']} {name} streams failed")
        row = {
            "ready_ms": ready_ms,
            "cold_p50": cold["ttfb_p50_ms"], "cold_p99": cold["ttfb_p99_ms"],
            "warm_p50": warm["ttfb_p50_ms"], "warm_p99": warm["ttfb_p99_ms"],
            "direct_p99": direct["ttfb_p99_ms"],
            "syn_retrans": cold_tcp["TCPSynRetrans"] + warm_tcp["TCPSynRetrans"],
            "overflows": cold_tcp["ListenOverflows"] + warm_tcp["ListenOverflows"]
            + direct_tcp["ListenOverflows"],
            "retrans": cold_tcp["RetransSegs"],
        }
        rows.append(row)
        print(
            f"round {round_}: ready_ms={ready_ms:.1f} cold ttfb p50/p99={row['cold_p50']:.1f}/{row['cold_p99']:.1f} ms "
            f"warm p50/p99={row['warm_p50']:.1f}/{row['warm_p99']:.1f} ms direct p99={row['direct_p99']:.1f} ms "
            f"tcp: cold {cold_tcp} warm {warm_tcp} direct {direct_tcp}",
            flush=True,
        )
    med = lambda k: statistics.median(r[k] for r in rows)
    print(
        f"cold: rounds={rounds} streams={n} ready_ms_max={max(r['ready_ms'] for r in rows):.1f} "
        f"ready_ms_median={med('ready_ms'):.1f} cold_ttfb_p99_ms={med('cold_p99'):.1f} "
        f"warm_ttfb_p99_ms={med('warm_p99'):.1f} cold_minus_warm_p99_ms={med('cold_p99') - med('warm_p99'):.1f} "
        f"direct_ttfb_p99_ms={med('direct_p99'):.1f} syn_retrans={sum(r['syn_retrans'] for r in rows)} "
        f"listen_overflows={sum(r['overflows'] for r in rows)}"
    )


if __name__ == "__main__":
    main()
