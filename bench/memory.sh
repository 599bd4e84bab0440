#!/usr/bin/env bash
# Memory benchmark on loopback (issue 22): the release sidecar's VmRSS
#   idle       - ready, after one plain request
#   saturated  - the peak while wrk -t2 -c64 sends plain requests for SATURATE_SECONDS (5), as bench/run.sh
#   open       - with STREAMS (1000) concurrent streams open, each 40 chunks 500 ms apart (20 s)
#                from the fake provider, read once every stream has its first chunk
#   after      - AFTER_SECONDS (10) after those streams ended
# and ends with one machine-readable line
#   memory: idle_rss_mb=… streams=1000 open_rss_mb=… per_stream_kb=… after_rss_mb=… saturated_rss_mb=…
# with PASS/FAIL per target before it. A missed target does not fail the script; failed
# streams, wrk errors and a process that died do.
#
# Environment: STREAMS, STREAM_MODEL (tokens=40+chunk-delay=500), AFTER_SECONDS, SATURATE_SECONDS,
# LLM_SIDECAR_BIN and LLM_SIDECAR_FAKE_BIN (skip the build), SIDECAR_ENV (extra VAR=value settings
# for the sidecar only).
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH_DIR/.." && pwd)"
UTIL="$BENCH_DIR/benchutil.py"
STREAMS="${STREAMS:-1000}"
STREAM_MODEL="${STREAM_MODEL:-tokens=40+chunk-delay=500}"
AFTER_SECONDS="${AFTER_SECONDS:-10}"
SATURATE_SECONDS="${SATURATE_SECONDS:-5}"
READY_TIMEOUT=10

log() { echo "memory: $*" >&2; }
die() { echo "memory: FAILED: $*" >&2; exit 1; }

command -v python3 >/dev/null || die "python3 is required"
command -v wrk >/dev/null || die "wrk is required (apt-get install wrk)"
# Each stream is a client socket, a sidecar socket and an upstream socket, on both ends.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge $((STREAMS * 2 + 256)) ] || die "open-files limit $(ulimit -n) is too low for $STREAMS streams"

. "$BENCH_DIR/release.sh"
release_bins

TMP="$(mktemp -d "${TMPDIR:-/tmp}/llm-sidecar-memory.XXXXXX")"
FAKE_PID="" SIDECAR_PID=""
cleanup() {
    local pid
    for pid in "$SIDECAR_PID" "$FAKE_PID"; do [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "$SIDECAR_PID" "$FAKE_PID"; do [ -n "$pid" ] && wait "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
fail_with_log() { echo "---- $1 log ----" >&2; tail -n 40 "$2" >&2 || true; die "$3"; }
alive() { kill -0 "$1" 2>/dev/null || die "$2 died"; }
rss_mb() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

read -r FAKE_PORT SIDECAR_PORT ADMIN_PORT < <(python3 "$UTIL" ports 3)
"$FAKE_BIN" --listen "127.0.0.1:$FAKE_PORT" >"$TMP/fake.log" 2>&1 &
FAKE_PID=$!
python3 "$UTIL" wait-line "$TMP/fake.log" "fake provider listening on" "$READY_TIMEOUT" ||
    fail_with_log "fake provider" "$TMP/fake.log" "fake provider did not start"

"$BIN" default-config --upstream "http://127.0.0.1:$FAKE_PORT" >"$TMP/sidecar.yaml"
printf '  bench-slow-stream:\n    relay: { provider: holysheep, model: "%s" }\n' "$STREAM_MODEL" >>"$TMP/sidecar.yaml"
env ${SIDECAR_ENV:-} LLM_SIDECAR_CONFIGMAP=off LLM_SIDECAR_LISTEN="127.0.0.1:$SIDECAR_PORT" \
    LLM_SIDECAR_ADMIN_LISTEN="127.0.0.1:$ADMIN_PORT" RUST_LOG=warn \
    HOLYSHEEP_API_KEY=bench-key DEEPSEEK_API_KEY=bench-key MOONSHOT_API_KEY=bench-key \
    MINIMAX_API_KEY=bench-key GEMINI_API_KEY=bench-key OPENAI_API_KEY=bench-key \
    "$BIN" run --config "$TMP/sidecar.yaml" >"$TMP/sidecar.log" 2>&1 &
SIDECAR_PID=$!
python3 "$UTIL" wait-http "http://127.0.0.1:$ADMIN_PORT/ready" "$READY_TIMEOUT" ||
    fail_with_log sidecar "$TMP/sidecar.log" "sidecar did not become ready"
URL="http://127.0.0.1:$SIDECAR_PORT/v1/chat/completions"
python3 "$UTIL" post "$URL" 5 || die "the sidecar does not answer the benchmark request"
sleep 1
IDLE="$(rss_mb "$SIDECAR_PID")"
log "idle: ${IDLE} MB"

# Saturation: the peak of VmRSS sampled every 100 ms while wrk runs.
wrk -t2 -c64 -d"${SATURATE_SECONDS}s" --timeout 5s -s "$BENCH_DIR/post.lua" "$URL" >"$TMP/wrk.txt" 2>&1 &
WRK_PID=$!
PEAK=0
while kill -0 "$WRK_PID" 2>/dev/null; do
    PEAK="$(awk -v a="$PEAK" -v b="$(rss_mb "$SIDECAR_PID")" 'BEGIN { print (b > a ? b : a) }')"
    sleep 0.1
done
wait "$WRK_PID" || { cat "$TMP/wrk.txt" >&2; die "wrk failed"; }
RESULT="$(grep -m1 '^RESULT ' "$TMP/wrk.txt" || true)"
case "$RESULT" in *errors=0*) ;; *) cat "$TMP/wrk.txt" >&2; die "wrk: request errors ($RESULT)" ;; esac
alive "$SIDECAR_PID" sidecar

log "saturated: ${PEAK} MB; opening $STREAMS streams ($STREAM_MODEL)"
line="$(python3 "$BENCH_DIR/memory.py" "$URL" bench-slow-stream "$STREAMS" "$SIDECAR_PID" "$AFTER_SECONDS")" ||
    die "the stream driver failed"
log "streams: $line"
case "$line" in *failed=0*) ;; *) fail_with_log sidecar "$TMP/sidecar.log" "streams failed: $line" ;; esac
alive "$SIDECAR_PID" sidecar
OPEN="$(sed -n 's/.*open_rss_mb=\([0-9.]*\).*/\1/p' <<<"$line")"
AFTER="$(sed -n 's/.*after_rss_mb=\([0-9.]*\).*/\1/p' <<<"$line")"

python3 - "$IDLE" "$STREAMS" "$OPEN" "$AFTER" "$PEAK" <<'PY'
import sys
idle, streams, open_, after, sat = float(sys.argv[1]), int(sys.argv[2]), *map(float, sys.argv[3:])
per_stream_kb = (open_ - idle) * 1024 / streams
after_limit = 1.2 * idle + 5
checks = [
    (f"RSS with {streams} open streams {open_:.1f} MB <= 40 MB", open_ <= 40),
    (f"RSS after the streams {after:.1f} MB <= 1.2 x idle + 5 = {after_limit:.1f} MB", after <= after_limit),
    (f"RSS idle {idle:.1f} MB <= 12 MB", idle <= 12),
    (f"RSS under saturation {sat:.1f} MB <= 25 MB", sat <= 25),
]
for text, ok in checks:
    print(f"{'PASS' if ok else 'FAIL'}: {text}")
print(f"memory: idle_rss_mb={idle:.1f} streams={streams} open_rss_mb={open_:.1f} "
      f"per_stream_kb={per_stream_kb:.1f} after_rss_mb={after:.1f} saturated_rss_mb={sat:.1f}")
PY
