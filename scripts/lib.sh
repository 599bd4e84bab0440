# Shared by the demo and local-run scripts: start the fake provider and the sidecar on loopback.
# Settings: LLM_SIDECAR_BIN (default: the release build), LLM_SIDECAR_FAKE_BIN (default: the
# llm-sidecar-fake-provider binary next to LLM_SIDECAR_BIN), PORT (4000), ADMIN_PORT (4001).

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${LLM_SIDECAR_BIN:-$ROOT/target/release/llm-sidecar}
FAKE_BIN=${LLM_SIDECAR_FAKE_BIN:-$(dirname "$BIN")/llm-sidecar-fake-provider}
PORT=${PORT:-4000}
ADMIN_PORT=${ADMIN_PORT:-4001}
WORK=$(mktemp -d)

cleanup() {
  for pid in ${SIDECAR_PID:-} ${FAKE_PID:-}; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}

# Starts the fake provider (its own binary, not part of the sidecar's) on a free port and sets FAKE_URL.
start_fake() {
  if [ ! -x "$FAKE_BIN" ]; then
    echo "no fake provider at $FAKE_BIN (cargo build --release --bin llm-sidecar-fake-provider)" >&2
    return 1
  fi
  "$FAKE_BIN" --listen 127.0.0.1:0 >"$WORK/fake.out" 2>"$WORK/fake.log" &
  FAKE_PID=$!
  for _ in $(seq 100); do
    FAKE_URL=$(sed -n 's/^fake provider listening on //p' "$WORK/fake.out")
    [ -n "$FAKE_URL" ] && return 0
    sleep 0.1
  done
  echo "the fake provider did not start:" >&2; cat "$WORK/fake.log" >&2; return 1
}

# Writes the embedded default config, every provider pointed at the fake, to $WORK/routing.yaml.
write_config() {
  "$BIN" default-config --upstream "$FAKE_URL" >"$WORK/routing.yaml"
}

# Dummy provider keys: the fake provider accepts any key.
export HOLYSHEEP_API_KEY=demo-relay-key DEEPSEEK_API_KEY=demo-deepseek-key \
  MOONSHOT_API_KEY=demo-moonshot-key MINIMAX_API_KEY=demo-minimax-key \
  GEMINI_API_KEY=demo-gemini-key OPENAI_API_KEY=demo-openai-key

# Starts the sidecar on $PORT/$ADMIN_PORT with $WORK/routing.yaml and waits until it is ready.
start_sidecar() {
  LLM_SIDECAR_CONFIGMAP=off LLM_SIDECAR_LISTEN="127.0.0.1:$PORT" LLM_SIDECAR_ADMIN_LISTEN="127.0.0.1:$ADMIN_PORT" \
    "$BIN" run --config "$WORK/routing.yaml" 2>"$WORK/sidecar.log" &
  SIDECAR_PID=$!
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$ADMIN_PORT/ready" >/dev/null 2>&1 && return 0
    kill -0 "$SIDECAR_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "the sidecar did not become ready:" >&2; cat "$WORK/sidecar.log" >&2; return 1
}

# Everything a script needs: cleanup on exit, the fake provider, the config, the sidecar.
start_all() {
  trap cleanup EXIT
  start_fake
  write_config
  start_sidecar
}
