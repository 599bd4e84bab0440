#!/usr/bin/env bash
# What one large request body costs the other requests of a single-worker sidecar (a pod with a
# CPU limit under one core): small requests' latency on their own, then while another
# connection keeps posting 8 MiB bodies. LLM_SIDECAR_BIN picks the binary (default: release).
set -euo pipefail
. "$(dirname "$0")/../scripts/lib.sh"
export LLM_SIDECAR_WORKERS=1
trap cleanup EXIT
start_fake
write_config
start_sidecar
python3 "$ROOT/bench/bigbody.py" "http://127.0.0.1:$PORT/v1/chat/completions"
