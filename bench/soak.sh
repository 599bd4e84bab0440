#!/usr/bin/env bash
# Soak test on loopback (`make soak`; not part of `make test`): the release sidecar in front of
# the fake provider, each its own process, driven by examples/soak.rs for SOAK_SECONDS with
# open-loop mixed plain and streamed chat traffic at SOAK_RPS, a routing-config change every
# second and a provider fault every 10 s. The driver prints each injected fault, a progress line
# every 10 s, then the report: requests counted by the client and by the sidecar, unexpected
# errors, faults hidden and surfaced, reloads, RSS and open fds at the start and the end; its
# last line is machine-readable (`soak: seconds=… sent=… … result=pass`) and the whole report is
# kept in bench/out/soak.txt. Exits 1 when a request was lost or skipped, the counts disagree,
# an error was not caused by an injected fault, a config write did not go live, or RSS grew by
# SOAK_MAX_RSS_GROWTH_MB or more. What counts as what: the header of examples/soak.rs.
#
# Environment: SOAK_SECONDS (600), SOAK_RPS (1000), SOAK_WARMUP (60: the same schedule, one round
# of every fault, before the start is measured), SOAK_MAX_IN_FLIGHT (512),
# SOAK_FAULT_SECONDS (3), SOAK_MAX_RSS_GROWTH_MB (5); LLM_SIDECAR_BIN, LLM_SIDECAR_FAKE_BIN and
# SOAK_BIN skip the build (the fake provider defaults to llm-sidecar-fake-provider and the driver
# to examples/soak next to LLM_SIDECAR_BIN); CARGO_TARGET_DIR.
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH_DIR/.." && pwd)"

log() { echo "soak: $*" >&2; }
die() { echo "soak: FAILED: $*" >&2; exit 1; }

if [ -n "${LLM_SIDECAR_BIN:-}" ]; then
    SOAK_BIN="${SOAK_BIN:-$(dirname "$LLM_SIDECAR_BIN")/examples/soak}"
else
    . "$BENCH_DIR/release.sh"
    release_build soak
    LLM_SIDECAR_BIN="$RELEASE_DIR/llm-sidecar"
    SOAK_BIN="$RELEASE_DIR/examples/soak"
fi
[ -x "$LLM_SIDECAR_BIN" ] || die "no executable at $LLM_SIDECAR_BIN"
LLM_SIDECAR_FAKE_BIN="${LLM_SIDECAR_FAKE_BIN:-$(dirname "$LLM_SIDECAR_BIN")/llm-sidecar-fake-provider}"
[ -x "$LLM_SIDECAR_FAKE_BIN" ] || die "no executable at $LLM_SIDECAR_FAKE_BIN (cargo build --release --bin llm-sidecar-fake-provider)"
[ -x "$SOAK_BIN" ] || die "no executable at $SOAK_BIN (cargo build --release --example soak)"

# Up to SOAK_MAX_IN_FLIGHT client connections plus as many upstream ones: more than a soft
# limit of 1024 descriptors.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# The fake provider and the sidecar as scripts/lib.sh starts them for `make run`, on free ports,
# without an access-log line per request.
read -r PORT ADMIN_PORT < <(python3 "$BENCH_DIR/benchutil.py" ports 2)
export LLM_SIDECAR_BIN LLM_SIDECAR_FAKE_BIN PORT ADMIN_PORT RUST_LOG=warn
. "$ROOT/scripts/lib.sh"

on_exit() {
    local status=$?
    if [ "$status" -ne 0 ] && [ -s "$WORK/sidecar.log" ]; then
        echo "---- sidecar log (last 40 lines) ----" >&2
        tail -n 40 "$WORK/sidecar.log" >&2 || true
    fi
    cleanup
    exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_fake
write_config
start_sidecar
log "sidecar pid $SIDECAR_PID on 127.0.0.1:$PORT (admin :$ADMIN_PORT), fake provider at $FAKE_URL"

status=0
"$SOAK_BIN" "127.0.0.1:$PORT" "127.0.0.1:$ADMIN_PORT" "$WORK/routing.yaml" "$SIDECAR_PID" |
    tee "$WORK/report.txt" || status=$?
mkdir -p "$BENCH_DIR/out"
cp "$WORK/report.txt" "$BENCH_DIR/out/soak.txt"
kill -0 "$SIDECAR_PID" 2>/dev/null || die "the sidecar is gone"
kill -0 "$FAKE_PID" 2>/dev/null || die "the fake provider is gone"
exit "$status"
