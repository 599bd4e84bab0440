"""Memory benchmark driver: holds N streamed chat completions open at once against one URL and
reads the proxy's VmRSS while all of them are open (each has received its first chunk), then
lets them end and reads it again after a pause. Standard library only.

usage: memory.py URL MODEL STREAMS PID AFTER_SECONDS
  -> prints one line: open_rss_mb=... after_rss_mb=... failed=...
"""

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def one(host, port, path, body, first_chunk):
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            (
                f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer bench\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            + body
        )
        await writer.drain()
        seen = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            seen += chunk
            if not first_chunk.done() and b"\r\n\r\n" in seen and b"data: " in seen:
                first_chunk.set_result(None)
            if b"data: [DONE]" in seen:
                break
        writer.close()
        return seen.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in seen
    finally:
        if not first_chunk.done():
            first_chunk.set_result(None)


async def main():
    url, model, n, pid, after = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    parts = urlsplit(url)
    body = json.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": "Say hello."}]}
    ).encode()
    loop = asyncio.get_running_loop()
    firsts = [loop.create_future() for _ in range(n)]
    tasks = [asyncio.create_task(one(parts.hostname, parts.port, parts.path, body, f)) for f in firsts]
    await asyncio.gather(*firsts)
    open_kb = rss_kb(pid)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failed = sum(1 for r in results if r is not True)
    # Still open at the reading: none may have ended before every stream had its first chunk.
    await asyncio.sleep(after)
    after_kb = rss_kb(pid)
    print(f"open_rss_mb={open_kb / 1024:.1f} after_rss_mb={after_kb / 1024:.1f} failed={failed}")


asyncio.run(main())
