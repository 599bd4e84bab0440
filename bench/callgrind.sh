#!/usr/bin/env bash
# Instructions per request of the release sidecar under callgrind: the sidecar on the embedded
# default config in front of the fake provider, one data-port worker, no access log. For plain
# and for streamed chat requests (deepseek-v3.2, one keep-alive connection): a warm-up, then
# ROUNDS rounds of N requests, each counted on its own (callgrind_control zeroes the counts,
# then dumps them after each round); the median round's instructions over N is a request's cost.
# CALLGRIND_N (2000), CALLGRIND_ROUNDS (3), CALLGRIND_WARMUP (200), CALLGRIND_OUT
# (bench/out/callgrind: the dumps, for callgrind_annotate --inclusive=yes), LLM_SIDECAR_BIN
# (default: the release build), CALLGRIND_ENV (extra VAR=value settings for the sidecar, e.g.
# the OTEL_* variables of a tracing setting).
set -euo pipefail
. "$(dirname "$0")/../scripts/lib.sh"
N=${CALLGRIND_N:-2000}
WARMUP=${CALLGRIND_WARMUP:-200}
ROUNDS=${CALLGRIND_ROUNDS:-3}
OUT=${CALLGRIND_OUT:-$ROOT/bench/out/callgrind}
command -v callgrind_control >/dev/null || { echo "callgrind.sh: needs valgrind" >&2; exit 1; }
trap cleanup EXIT
start_fake
write_config
mkdir -p "$OUT"
rm -f "$OUT"/callgrind.out*
# The config file is polled once an hour instead of four times a second: polls would be counted
# with the requests.
env ${CALLGRIND_ENV:-} LLM_SIDECAR_WORKERS=1 LLM_SIDECAR_CONFIG_POLL=60m RUST_LOG=warn LLM_SIDECAR_CONFIGMAP=off \
  LLM_SIDECAR_LISTEN="127.0.0.1:$PORT" LLM_SIDECAR_ADMIN_LISTEN="127.0.0.1:$ADMIN_PORT" \
  valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
  "$BIN" run --config "$WORK/routing.yaml" 2>"$WORK/sidecar.log" &
SIDECAR_PID=$!
for _ in $(seq 600); do
  curl -fsS "http://127.0.0.1:$ADMIN_PORT/ready" >/dev/null 2>&1 && break
  kill -0 "$SIDECAR_PID" 2>/dev/null || { cat "$WORK/sidecar.log" >&2; exit 1; }
  sleep 0.2
done
URL="http://127.0.0.1:$PORT/v1/chat/completions"

# Instructions in the newest dump.
last_dump_ir() {
  local dump
  dump=$(ls -v "$OUT"/callgrind.out.* | tail -1)
  sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$dump"
}

for kind in plain stream; do
  python3 "$ROOT/bench/callgrind.py" "$URL" "$WARMUP" "$kind"
  callgrind_control -z "$SIDECAR_PID" >/dev/null 2>&1
  rounds=()
  for round in $(seq "$ROUNDS"); do
    python3 "$ROOT/bench/callgrind.py" "$URL" "$N" "$kind"
    callgrind_control -d "$kind-$round" "$SIDECAR_PID" >/dev/null 2>&1
    rounds+=($(( $(last_dump_ir) / N )))
  done
  median=$(printf '%s\n' "${rounds[@]}" | sort -n | sed -n "$(( (ROUNDS + 1) / 2 ))p")
  echo "$kind: $median instructions per request (median of ${rounds[*]}, $N requests each)"
done
echo "dumps in $OUT (callgrind_annotate --inclusive=yes FILE)"
