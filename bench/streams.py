"""Streaming benchmark: N concurrent streamed chat completions against one URL, measuring the
time to the first content chunk (TTFB) and to the end of each stream. Standard library only.

usage: streams.py URL MODEL CONCURRENCY  -> prints one line: ttfb_p50_ms=... ttfb_p99_ms=... total_p50_ms=... failed=...
"""

import asyncio
import json
import statistics
import sys
import time
from urllib.parse import urlsplit


async def one(host, port, path, body):
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer bench\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    writer.write(request)
    await writer.drain()
    ttfb = None
    seen = b""
    scanned = 0
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        seen += chunk
        if ttfb is None:
            # Complete SSE events so far; the first one carrying text is the first token.
            while (end := seen.find(b"\n\n", scanned)) != -1:
                event, scanned = seen[scanned:end], end + 2
                data = event.rpartition(b"data: ")[2]
                try:
                    delta = json.loads(data)["choices"][0]["delta"]
                except (ValueError, KeyError, IndexError, TypeError):
                    continue
                if delta.get("content"):
                    ttfb = time.perf_counter() - started
                    break
        if b"data: [DONE]" in seen:
            break
    writer.close()
    total = time.perf_counter() - started
    ok = seen.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in seen and ttfb is not None
    return ok, ttfb, total


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def burst(url, model, concurrency):
    """`concurrency` streams at once; their time to first token and to the end, in ms."""
    parts = urlsplit(url)
    body = json.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": "Say hello."}]}
    ).encode()
    results = await asyncio.gather(
        *[one(parts.hostname, parts.port, parts.path, body) for _ in range(concurrency)],
        return_exceptions=True,
    )
    good = [r for r in results if not isinstance(r, BaseException) and r[0]]
    failed = len(results) - len(good)
    if not good:
        nan = float("nan")
        return {"ttfb_p50_ms": nan, "ttfb_p99_ms": nan, "total_p50_ms": nan, "failed": failed}
    ttfb = [r[1] * 1000 for r in good]
    total = [r[2] * 1000 for r in good]
    return {
        "ttfb_p50_ms": pct(ttfb, 50),
        "ttfb_p99_ms": pct(ttfb, 99),
        "total_p50_ms": statistics.median(total),
        "failed": failed,
    }


async def main():
    url, model, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3])
    r = await burst(url, model, concurrency)
    print(
        f"ttfb_p50_ms={r['ttfb_p50_ms']:.2f} ttfb_p99_ms={r['ttfb_p99_ms']:.2f} "
        f"total_p50_ms={r['total_p50_ms']:.2f} failed={r['failed']}"
    )


if __name__ == "__main__":
    asyncio.run(main())
