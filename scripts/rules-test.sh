#!/usr/bin/env bash
# promtool on deploy/prometheus-rule.yaml: `check rules` on its spec (annotations and all), then
# `promtool test rules` with every tests/prometheus/*.test.yaml against it. The unit tests
# check what each alert fires on, its `for` and labels; their copy of the rules leaves out the
# annotations (long templated prose, checked by `check rules`). A missing promtool fails.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null; then
  echo "rules-test: promtool is missing: install Debian's prometheus package (apt-get install prometheus; .ci/run does)" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The PrometheusRule's spec is a Prometheus rule file, indented two spaces under `spec:`.
python3 - deploy/prometheus-rule.yaml "$work/full.yaml" "$work/rules.yaml" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
start = next(i for i, l in enumerate(lines) if l.rstrip() == "spec:") + 1
spec = [l[2:] if l.startswith("  ") else l for l in lines[start:]]
open(sys.argv[2], "w").write("\n".join(spec) + "\n")
out, skip = [], None
for l in spec:
    indent = len(l) - len(l.lstrip())
    if skip is not None:
        if l.strip() == "" or indent > skip:
            continue
        skip = None
    if re.match(r"\s*annotations:\s*$", l):
        skip = indent
        continue
    out.append(l)
open(sys.argv[3], "w").write("\n".join(out) + "\n")
PY

promtool check rules "$work/full.yaml"
cp tests/prometheus/*.test.yaml "$work/"
promtool test rules "$work"/*.test.yaml
