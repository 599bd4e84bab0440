#!/usr/bin/env python3
"""Drives N chat requests over one keep-alive connection, each read to its end: the load for
bench/callgrind.sh. Stdlib only.

  callgrind.py URL N plain|stream
"""
import http.client
import json
import sys
import urllib.parse


def main(url, n, kind):
    parts = urllib.parse.urlsplit(url)
    body = {"model": "deepseek-v3.2", "messages": [{"role": "user", "content": "Say hello."}]}
    if kind == "stream":
        body["stream"] = True
    payload = json.dumps(body).encode()
    headers = {"content-type": "application/json", "authorization": "Bearer app-key"}
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    for _ in range(n):
        conn.request("POST", parts.path, body=payload, headers=headers)
        response = conn.getresponse()
        answer = response.read()
        if response.status != 200 or (kind == "stream" and b"data: [DONE]" not in answer):
            sys.exit(f"callgrind.py: unexpected answer {response.status}: {answer[:200]!r}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
