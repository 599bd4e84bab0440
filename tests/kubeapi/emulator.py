"""A small Kubernetes API server emulator for ConfigMaps and Events, on 127.0.0.1 over HTTP.

It keeps the parts of the API contract a ConfigMap watcher depends on:
  - one global, increasing resourceVersion; list returns it, every object carries its own;
  - watch from a resourceVersion replays the history after it, then streams live events;
    a resourceVersion older than the compacted history gets `ERROR 410 Expired`;
  - fieldSelector `metadata.name=` and `metadata.namespace=`;
  - create (with generateName), get, merge/strategic-merge patch, replace, delete;
  - Status bodies for errors (404, 409, 403, 410, 415).

Faults for tests, under /_emulator/ (POST, query parameters):
  forbid?resource=configmaps&on=1   403 for that resource (requests with the header
                                    `x-emulator-admin: 1` bypass it, so tests can still patch)
  expire                            compact the history and end every open watch with 410
  drop                              cut every open watch connection
  delay?seconds=2.5                 answer every API request that much later
  GET watches                       {"open": N}: the watch streams open now

With --state FILE the store survives a restart: kill the process and start it again on the
same port, as when the API server restarts behind a stable address.

Run: python3 emulator.py --port 0 [--state FILE]   (prints "kube-api emulator listening on URL")
"""

import argparse
import json
import os
import random
import socket
import string
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

RESOURCES = {"configmaps": "ConfigMap", "events": "Event"}
HISTORY_LIMIT = 10_000


def status(code, reason, message):
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch (a strategic merge patch on ConfigMap data is the same)."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class Store:
    def __init__(self, state_file=None):
        self.cond = threading.Condition()
        self.rv = 0
        self.objects = {}  # (resource, namespace, name) -> object
        self.history = []  # (rv, resource, namespace, name, event)
        self.compacted = 0  # watches from a resourceVersion below this get 410
        self.forbidden = set()
        self.delay = 0.0
        self.epoch = 0  # bumped to end open watches
        self.epoch_action = None  # "expire" or "drop"
        self.open_watches = 0
        self.state_file = state_file
        if state_file and os.path.exists(state_file):
            with open(state_file) as f:
                saved = json.load(f)
            self.rv = saved["rv"]
            self.compacted = saved["compacted"]
            for obj in saved["objects"]:
                key = (obj["_resource"], obj["metadata"]["namespace"], obj["metadata"]["name"])
                del obj["_resource"]
                self.objects[key] = obj
            # History does not survive a restart: resuming from an older version gets 410,
            # as after an etcd compaction.
            self.compacted = self.rv

    def save(self):
        if not self.state_file:
            return
        objects = [dict(obj, _resource=key[0]) for key, obj in self.objects.items()]
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"rv": self.rv, "compacted": self.compacted, "objects": objects}, f)
        os.replace(tmp, self.state_file)

    def record(self, resource, namespace, name, kind, obj):
        self.history.append((self.rv, resource, namespace, name, {"type": kind, "object": obj}))
        if len(self.history) > HISTORY_LIMIT:
            dropped = self.history[: len(self.history) - HISTORY_LIMIT]
            self.history = self.history[len(dropped):]
            self.compacted = dropped[-1][0] + 1
        self.save()
        self.cond.notify_all()

    def next_rv(self):
        self.rv += 1
        return str(self.rv)


def matches(selector, namespace, name):
    for term in filter(None, (selector or "").split(",")):
        if "!=" in term:
            field, value = term.split("!=", 1)
            negate = True
        else:
            field, value = term.replace("==", "=").split("=", 1)
            negate = False
        actual = {"metadata.name": name, "metadata.namespace": namespace}.get(field.strip())
        if actual is None:
            return False
        if (actual == value.strip()) == negate:
            return False
    return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kube-api-emulator"
    store: Store = None  # set by serve()

    def log_message(self, fmt, *args):  # quiet
        pass

    # --- plumbing ---------------------------------------------------------------------------
    def body_json(self):
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else None

    def reply(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def fail(self, code, reason, message):
        self.reply(code, status(code, reason, message))

    def route(self):
        """(resource, namespace, name) for /api/v1/namespaces/NS/RESOURCE[/NAME], else None."""
        parts = [p for p in urlsplit(self.path).path.split("/") if p]
        if parts[:2] != ["api", "v1"]:
            return None
        rest = parts[2:]
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in RESOURCES:
            return rest[2], rest[1], rest[3] if len(rest) > 3 else None
        if len(rest) == 1 and rest[0] in RESOURCES:
            return rest[0], None, None
        return None

    def query(self):
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}

    def guarded(self, handler):
        store = self.store
        if store.delay:
            time.sleep(store.delay)
        route = self.route()
        if route is None:
            return self.fail(404, "NotFound", f"the server could not find the requested resource ({self.path})")
        resource = route[0]
        if resource in store.forbidden and self.headers.get("x-emulator-admin") != "1":
            return self.fail(
                403,
                "Forbidden",
                f'{resource} is forbidden: User "system:serviceaccount:test:llm-sidecar" cannot access resource "{resource}"',
            )
        handler(*route)

    # --- verbs ------------------------------------------------------------------------------
    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/version":
            return self.reply(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0-emulator"})
        if path == "/_emulator/watches":
            return self.reply(200, {"open": self.store.open_watches})
        self.guarded(self.get)

    def do_POST(self):
        path = urlsplit(self.path).path
        if path.startswith("/_emulator/"):
            return self.control(path[len("/_emulator/"):])
        self.guarded(self.create)

    def do_PATCH(self):
        self.guarded(self.patch)

    def do_PUT(self):
        self.guarded(self.replace)

    def do_DELETE(self):
        self.guarded(self.delete)

    def control(self, action):
        store = self.store
        q = self.query()
        with store.cond:
            if action == "forbid":
                resource = q.get("resource", "configmaps")
                if q.get("on", "1") in ("1", "true"):
                    store.forbidden.add(resource)
                else:
                    store.forbidden.discard(resource)
            elif action == "delay":
                store.delay = float(q.get("seconds", "0"))
            elif action in ("expire", "drop"):
                if action == "expire":
                    store.compacted = store.rv
                    store.history = [h for h in store.history if h[0] >= store.compacted]
                store.epoch += 1
                store.epoch_action = action
                store.cond.notify_all()
            else:
                return self.fail(404, "NotFound", f"no emulator action {action}")
        self.reply(200, {"ok": True, "resourceVersion": str(store.rv)})

    def get(self, resource, namespace, name):
        q = self.query()
        store = self.store
        if name is not None:
            with store.cond:
                obj = store.objects.get((resource, namespace, name))
            if obj is None:
                return self.fail(404, "NotFound", f'{resource} "{name}" not found')
            return self.reply(200, obj)
        if q.get("watch") in ("1", "true"):
            return self.watch(resource, namespace, q)
        selector = q.get("fieldSelector")
        with store.cond:
            items = [
                obj
                for (r, ns, n), obj in sorted(store.objects.items())
                if r == resource and (namespace is None or ns == namespace) and matches(selector, ns, n)
            ]
            rv = str(store.rv)
        self.reply(
            200,
            {
                "kind": RESOURCES[resource] + "List",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": rv},
                "items": items,
            },
        )

    def watch(self, resource, namespace, q):
        store = self.store
        selector = q.get("fieldSelector")
        since = q.get("resourceVersion") or "0"
        timeout = float(q.get("timeoutSeconds") or 300)
        deadline = time.monotonic() + timeout
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def send(event):
            data = (json.dumps(event) + "\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def wanted(r, ns, n):
            return r == resource and (namespace is None or ns == namespace) and matches(selector, ns, n)

        with store.cond:
            store.open_watches += 1
            epoch = store.epoch
        try:
            with store.cond:
                if since == "0":
                    # No version: the current state first, as ADDED events.
                    pending = [
                        {"type": "ADDED", "object": obj}
                        for (r, ns, n), obj in sorted(store.objects.items())
                        if wanted(r, ns, n)
                    ]
                    cursor = store.rv
                elif int(since) < store.compacted:
                    pending = [
                        {
                            "type": "ERROR",
                            "object": status(410, "Expired", f"too old resource version: {since} ({store.compacted})"),
                        }
                    ]
                    cursor = None
                else:
                    cursor = int(since)
                    pending = []
            for event in pending:
                send(event)
            while cursor is not None:
                with store.cond:
                    events = [(rv, e) for (rv, r, ns, n, e) in store.history if rv > cursor and wanted(r, ns, n)]
                    if not events and store.epoch == epoch:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        store.cond.wait(min(left, 1.0))
                        continue
                    action = store.epoch_action if store.epoch != epoch else None
                for rv, event in events:
                    send(event)
                    cursor = rv
                if action == "expire":
                    send({"type": "ERROR", "object": status(410, "Expired", "too old resource version")})
                    break
                if action == "drop":
                    # Cut the connection without ending the chunked body.
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
        finally:
            with store.cond:
                store.open_watches -= 1

    def create(self, resource, namespace, name):
        obj = self.body_json() or {}
        meta = obj.setdefault("metadata", {})
        namespace = namespace or meta.get("namespace") or "default"
        if not meta.get("name"):
            if not meta.get("generateName"):
                return self.fail(422, "Invalid", "metadata.name or metadata.generateName is required")
            meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        store = self.store
        with store.cond:
            key = (resource, namespace, meta["name"])
            if key in store.objects:
                return self.fail(409, "AlreadyExists", f'{resource} "{meta["name"]}" already exists')
            meta.update(
                namespace=namespace,
                uid=str(uuid.uuid4()),
                resourceVersion=store.next_rv(),
                creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            obj.setdefault("apiVersion", "v1")
            obj.setdefault("kind", RESOURCES[resource])
            store.objects[key] = obj
            store.record(resource, namespace, meta["name"], "ADDED", obj)
        self.reply(201, obj)

    def patch(self, resource, namespace, name):
        kind = (self.headers.get("content-type") or "").split(";")[0].strip()
        if kind not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            return self.fail(415, "UnsupportedMediaType", f"patch type {kind!r} is not supported by the emulator")
        patch = self.body_json() or {}
        store = self.store
        with store.cond:
            key = (resource, namespace, name)
            current = store.objects.get(key)
            if current is None:
                return self.fail(404, "NotFound", f'{resource} "{name}" not found')
            patch.get("metadata", {}).pop("resourceVersion", None)
            obj = merge_patch(current, patch)
            obj["metadata"]["resourceVersion"] = store.next_rv()
            store.objects[key] = obj
            store.record(resource, namespace, name, "MODIFIED", obj)
        self.reply(200, obj)

    def replace(self, resource, namespace, name):
        obj = self.body_json() or {}
        store = self.store
        with store.cond:
            key = (resource, namespace, name)
            current = store.objects.get(key)
            if current is None:
                return self.fail(404, "NotFound", f'{resource} "{name}" not found')
            wanted = obj.get("metadata", {}).get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                return self.fail(409, "Conflict", "the object has been modified; please apply your changes to the latest version")
            obj.setdefault("metadata", {}).update(
                name=name,
                namespace=namespace,
                uid=current["metadata"]["uid"],
                creationTimestamp=current["metadata"].get("creationTimestamp"),
                resourceVersion=store.next_rv(),
            )
            store.objects[key] = obj
            store.record(resource, namespace, name, "MODIFIED", obj)
        self.reply(200, obj)

    def delete(self, resource, namespace, name):
        store = self.store
        with store.cond:
            key = (resource, namespace, name)
            obj = store.objects.pop(key, None)
            if obj is None:
                return self.fail(404, "NotFound", f'{resource} "{name}" not found')
            obj = merge_patch(obj, {"metadata": {"resourceVersion": store.next_rv()}})
            store.record(resource, namespace, name, "DELETED", obj)
        self.reply(200, obj)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(port=0, state_file=None):
    """Starts the emulator in a background thread; returns (server, url)."""
    handler = type("BoundHandler", (Handler,), {"store": Store(state_file)})
    server = Server(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def kubeconfig(url, namespace="default"):
    """A kubeconfig (as YAML-compatible JSON) pointing at the emulator, no credentials."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": url}}],
            "users": [{"name": "emulator", "user": {}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace}}],
            "current-context": "emulator",
        }
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--state", default=None, help="file that keeps the objects across restarts")
    args = parser.parse_args()
    server, url = serve(args.port, args.state)
    print(f"kube-api emulator listening on {url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
