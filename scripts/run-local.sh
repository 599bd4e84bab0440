#!/usr/bin/env bash
# Runs the sidecar in the foreground on the embedded default config, every provider pointed at a
# local fake provider, so it works offline. Ctrl-C stops both.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
start_all
cat <<MSG
llm-sidecar is serving on http://127.0.0.1:$PORT/v1 (admin http://127.0.0.1:$ADMIN_PORT), fake provider at $FAKE_URL.
Routing config: $WORK/routing.yaml (edit it: changes apply within a second).

  curl -s http://127.0.0.1:$PORT/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model":"deepseek-v3.2","messages":[{"role":"user","content":"hi"}]}'
  curl -s http://127.0.0.1:$ADMIN_PORT/config

Ctrl-C to stop. Sidecar log follows.
MSG
tail -f "$WORK/sidecar.log" &
wait "$SIDECAR_PID"
