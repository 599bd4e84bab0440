#!/usr/bin/env python3
"""Small requests' latency through the sidecar alone, then while 8 MiB bodies arrive on another
connection: how much a large body holds up a single-worker sidecar. Stdlib only.

  bigbody.py URL   (the sidecar's /v1/chat/completions)
"""
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

SMALL = json.dumps({"model": "deepseek-v3.2",
                    "messages": [{"role": "user", "content": "Say hello."}]}).encode()
# An 8 MiB prompt over many messages: parsed, estimated and rendered like a real long chat.
BIG = json.dumps({"model": "deepseek-v3.2", "messages": [
    {"role": "user", "content": "word " * 2000} for _ in range(800)]}).encode()
ROUNDS = 300
BIG_BODIES = 20


def connection(url):
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=60), parts.path


def post(conn, path, body):
    conn.request("POST", path, body=body, headers={"content-type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response.status


def small_latencies(url, stop):
    conn, path = connection(url)
    out = []
    while not stop() and len(out) < ROUNDS:
        start = time.perf_counter()
        status = post(conn, path, SMALL)
        out.append(time.perf_counter() - start)
        if status != 200:
            sys.exit(f"bigbody: a small request answered {status}")
    return out


def summary(name, values):
    ms = sorted(v * 1000 for v in values)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(f"{name:>28}: n={len(ms):4d} p50={statistics.median(ms):7.2f} ms "
          f"p99={p99:7.2f} ms max={ms[-1]:7.2f} ms")


def main(url):
    for _ in range(20):  # warm-up
        conn, path = connection(url)
        post(conn, path, SMALL)
    summary("small requests alone", small_latencies(url, lambda: False))

    done = threading.Event()
    big_status = []

    def big_sender():
        conn, path = connection(url)
        for _ in range(BIG_BODIES):
            big_status.append(post(conn, path, BIG))
        done.set()

    sender = threading.Thread(target=big_sender)
    sender.start()
    during = small_latencies(url, done.is_set)
    sender.join()
    # Larger than any window of the default config: the sidecar answers them itself after
    # reading them whole, which is the part measured here.
    summary(f"while {BIG_BODIES} x {len(BIG) >> 20} MiB arrive", during)
    print(f"{'big bodies answered':>28}: {sorted(set(big_status))}")


if __name__ == "__main__":
    main(sys.argv[1])
