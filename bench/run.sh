#!/usr/bin/env bash
# Load benchmark on loopback: wrk against three targets, interleaved in one run:
#   direct  - the fake provider itself            (POST /holysheep/v1/chat/completions;
#             the llm-sidecar-fake-provider binary)
#   nginx   - nginx reverse proxy in front of it  (same path, nothing rewritten)
#   sidecar - llm-sidecar in front of it          (POST /v1/chat/completions, model deepseek-v3.2)
#   stack   - examples/stack_floor.rs in front of it: the sidecar's own server loop and
#             upstream pool doing only the data flow, none of its work; the stack's floor
#   traced  - the same with trace export on: OTLP/HTTP to a sink in nginx (every span exported)
#   sampled - the same with 10 % of requests sampled (parentbased_traceidratio 0.1)
#   baseline - only with BASELINE_BIN: another build of the sidecar (e.g. an older commit, built by
#             bench/baseline.sh) on its own default config, for CPU per request against this one
# Prints req/s, p50 and p99 per target, CPU per request saturated and at a fixed load (PACE_MS),
# the sidecar's peak RSS, and ends with one line
#   bench: direct_rps=… nginx_rps=… sidecar_rps=… … sampled_tracing_cost=… sidecar_cpu_us=… stack_cpu_us=… nginx_cpu_us=… sampled_cpu_us=… paced_rps=… paced_sidecar_cpu_us=… …
# On a small box the load generator, upstream and proxy share the cores: compare the sidecar
# with nginx (the practical floor for a proxy here), not with direct.
#
# Environment: ROUNDS (4; odd rounds run the targets in order, even rounds in reverse, so a
# neighbour's load that comes and goes falls on both sides of each comparison), DURATION seconds per run (5), WARMUP seconds per target (1),
# THREADS (2), CONNECTIONS (64), PACE_MS (8: the pause before each request in the fixed-load
# runs, about 6 500 req/s with 64 connections), NGINX_WORKERS (auto), LLM_SIDECAR_BIN, LLM_SIDECAR_FAKE_BIN and
# STACK_FLOOR_BIN (skip the build; the fake provider defaults to llm-sidecar-fake-provider and the
# floor to examples/stack_floor next to LLM_SIDECAR_BIN),
# STREAMS (200 concurrent streams in the streaming case), CARGO_TARGET_DIR (where cargo builds), SIDECAR_ENV (extra VAR=value settings for the sidecar
# only, e.g. "LLM_SIDECAR_WORKERS=1"), BASELINE_BIN (a second sidecar build to compare with).
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH_DIR/.." && pwd)"
UTIL="$BENCH_DIR/benchutil.py"
LUA="$BENCH_DIR/post.lua"

ROUNDS="${ROUNDS:-4}"
DURATION="${DURATION:-5}"
WARMUP="${WARMUP:-1}"
THREADS="${THREADS:-2}"
CONNECTIONS="${CONNECTIONS:-64}"
# `auto` = one worker per core (2 here), as the sidecar runs one data-port worker thread per
# core: neither is handicapped.
NGINX_WORKERS="${NGINX_WORKERS:-auto}"
READY_TIMEOUT=10

log() { echo "bench: $*" >&2; }
die() { echo "bench: FAILED: $*" >&2; exit 1; }

# --- tools -------------------------------------------------------------------------------
# Debian installs nginx in /usr/sbin, which a non-root PATH may lack.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin" ;; esac
command -v python3 >/dev/null || die "python3 is required"

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx)
if ((${#missing[@]})); then
    log "installing wrk and nginx (missing: ${missing[*]})"
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "not root and no sudo: install ${missing[*]} yourself"
        SUDO=(sudo)
    fi
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends wrk nginx
    command -v wrk >/dev/null || die "wrk is still not on PATH after apt-get install"
    command -v nginx >/dev/null || die "nginx is still not on PATH after apt-get install"
fi

# --- build -------------------------------------------------------------------------------
if [ -n "${LLM_SIDECAR_BIN:-}" ]; then
    BIN="$LLM_SIDECAR_BIN"
    FAKE_BIN="${LLM_SIDECAR_FAKE_BIN:-$(dirname "$BIN")/llm-sidecar-fake-provider}"
    STACK_BIN="${STACK_FLOOR_BIN:-$(dirname "$BIN")/examples/stack_floor}"
else
    . "$BENCH_DIR/release.sh"
    release_build stack_floor
    BIN="$RELEASE_DIR/llm-sidecar"
    FAKE_BIN="${LLM_SIDECAR_FAKE_BIN:-$RELEASE_DIR/llm-sidecar-fake-provider}"
    STACK_BIN="$RELEASE_DIR/examples/stack_floor"
fi
[ -x "$BIN" ] || die "no executable at $BIN"
[ -x "$FAKE_BIN" ] || die "no executable at $FAKE_BIN (cargo build --release --bin llm-sidecar-fake-provider)"
[ -x "$STACK_BIN" ] || die "no executable at $STACK_BIN (cargo build --release --example stack_floor)"

# --- processes and cleanup ---------------------------------------------------------------
TMP="$(mktemp -d "${TMPDIR:-/tmp}/llm-sidecar-bench.XXXXXX")"
FAKE_PID="" NGINX_PID="" SIDECAR_PID="" TRACED_PID="" SAMPLED_PID="" STACK_PID="" BASELINE_PID=""

cleanup() {
    local pid
    for pid in "$BASELINE_PID" "$STACK_PID" "$SAMPLED_PID" "$TRACED_PID" "$SIDECAR_PID" "$NGINX_PID" "$FAKE_PID"; do
        [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "$BASELINE_PID" "$STACK_PID" "$SAMPLED_PID" "$TRACED_PID" "$SIDECAR_PID" "$NGINX_PID" "$FAKE_PID"; do
        [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Show a process's log and fail.
fail_with_log() { # NAME LOGFILE MESSAGE
    echo "---- $1 log ($2) ----" >&2
    tail -n 40 "$2" >&2 || true
    die "$3"
}
alive() { kill -0 "$1" 2>/dev/null; }

read -r FAKE_PORT NGINX_PORT SIDECAR_PORT ADMIN_PORT TRACED_PORT TRACED_ADMIN_PORT SAMPLED_PORT SAMPLED_ADMIN_PORT STACK_PORT BASELINE_PORT BASELINE_ADMIN_PORT < <(python3 "$UTIL" ports 11)

# Fake provider.
"$FAKE_BIN" --listen "127.0.0.1:$FAKE_PORT" >"$TMP/fake.log" 2>&1 &
FAKE_PID=$!
python3 "$UTIL" wait-line "$TMP/fake.log" "fake provider listening on" "$READY_TIMEOUT" ||
    fail_with_log "fake provider" "$TMP/fake.log" "fake provider did not start"

# nginx: everything it writes stays inside the temp dir. As root its workers run as `nobody`,
# so the dir must be traversable.
mkdir -p "$TMP/nginx"
chmod 755 "$TMP" "$TMP/nginx"
sed -e "s|@DIR@|$TMP/nginx|g" -e "s|@LISTEN@|$NGINX_PORT|g" \
    -e "s|@UPSTREAM@|$FAKE_PORT|g" -e "s|@WORKERS@|$NGINX_WORKERS|g" \
    "$BENCH_DIR/nginx.conf.tmpl" >"$TMP/nginx/nginx.conf"
nginx -p "$TMP/nginx" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf" -t >"$TMP/nginx/test.log" 2>&1 ||
    fail_with_log nginx "$TMP/nginx/test.log" "generated nginx config is invalid"
nginx -p "$TMP/nginx" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf" >"$TMP/nginx/stdout.log" 2>&1 &
NGINX_PID=$!
python3 "$UTIL" wait-tcp "$NGINX_PORT" "$READY_TIMEOUT" ||
    fail_with_log nginx "$TMP/nginx/error.log" "nginx did not start"

# Sidecar, with the embedded routes pointed at the fake provider and dummy provider keys.
"$BIN" default-config --upstream "http://127.0.0.1:$FAKE_PORT" >"$TMP/sidecar.yaml"
# A streaming route for the stream case: 20 chunks, 10 ms apart (routes are the last section).
STREAM_MODEL='tokens=20+chunk-delay=10'
printf '  bench-stream:\n    relay: { provider: holysheep, model: "%s" }\n' "$STREAM_MODEL" >>"$TMP/sidecar.yaml"
# RUST_LOG=warn: no access log line per request, like nginx's `access_log off`.
start_sidecar() { # PORT ADMIN_PORT LOG [VAR=value...]
    start_build "$BIN" "$TMP/sidecar.yaml" "$@"
}
start_build() { # BINARY CONFIG PORT ADMIN_PORT LOG [VAR=value...]
    local bin="$1" config="$2" port="$3" admin="$4" logfile="$5"
    shift 5
    env ${SIDECAR_ENV:-} "$@" LLM_SIDECAR_CONFIGMAP=off LLM_SIDECAR_LISTEN="127.0.0.1:$port" \
        LLM_SIDECAR_ADMIN_LISTEN="127.0.0.1:$admin" \
        RUST_LOG=warn \
        HOLYSHEEP_API_KEY=bench-key DEEPSEEK_API_KEY=bench-key MOONSHOT_API_KEY=bench-key \
        MINIMAX_API_KEY=bench-key GEMINI_API_KEY=bench-key OPENAI_API_KEY=bench-key \
        "$bin" run --config "$config" >"$logfile" 2>&1 &
}
start_sidecar "$SIDECAR_PORT" "$ADMIN_PORT" "$TMP/sidecar.log"
SIDECAR_PID=$!
python3 "$UTIL" wait-http "http://127.0.0.1:$ADMIN_PORT/ready" "$READY_TIMEOUT" ||
    fail_with_log sidecar "$TMP/sidecar.log" "sidecar did not become ready"
# The traced sidecar: every request sampled, spans exported over OTLP/HTTP to nginx's sink.
start_sidecar "$TRACED_PORT" "$TRACED_ADMIN_PORT" "$TMP/traced.log" \
    OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$NGINX_PORT" \
    OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf OTEL_BSP_SCHEDULE_DELAY=1000
TRACED_PID=$!
python3 "$UTIL" wait-http "http://127.0.0.1:$TRACED_ADMIN_PORT/ready" "$READY_TIMEOUT" ||
    fail_with_log traced "$TMP/traced.log" "traced sidecar did not become ready"
# The sampled sidecar: one request in ten traced, the usual production setting.
start_sidecar "$SAMPLED_PORT" "$SAMPLED_ADMIN_PORT" "$TMP/sampled.log" \
    OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$NGINX_PORT" \
    OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf OTEL_BSP_SCHEDULE_DELAY=1000 \
    OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.1
SAMPLED_PID=$!
python3 "$UTIL" wait-http "http://127.0.0.1:$SAMPLED_ADMIN_PORT/ready" "$READY_TIMEOUT" ||
    fail_with_log sampled "$TMP/sampled.log" "sampled sidecar did not become ready"

# The stack's floor: the sidecar's server loop and upstream pool, none of its work.
"$STACK_BIN" "127.0.0.1:$STACK_PORT" "127.0.0.1:$FAKE_PORT" /holysheep/v1/chat/completions >"$TMP/stack.log" 2>&1 &
STACK_PID=$!
python3 "$UTIL" wait-tcp "$STACK_PORT" "$READY_TIMEOUT" ||
    fail_with_log stack "$TMP/stack.log" "the stack floor did not start"

# The baseline build, on the config its own binary writes (an older build may not know newer
# fields), with the same streaming route.
if [ -n "${BASELINE_BIN:-}" ]; then
    [ -x "$BASELINE_BIN" ] || die "no executable at BASELINE_BIN=$BASELINE_BIN"
    "$BASELINE_BIN" default-config --upstream "http://127.0.0.1:$FAKE_PORT" >"$TMP/baseline.yaml"
    printf '  bench-stream:\n    relay: { provider: holysheep, model: "%s" }\n' "$STREAM_MODEL" >>"$TMP/baseline.yaml"
    start_build "$BASELINE_BIN" "$TMP/baseline.yaml" "$BASELINE_PORT" "$BASELINE_ADMIN_PORT" "$TMP/baseline.log"
    BASELINE_PID=$!
    python3 "$UTIL" wait-http "http://127.0.0.1:$BASELINE_ADMIN_PORT/ready" "$READY_TIMEOUT" ||
        fail_with_log baseline "$TMP/baseline.log" "the baseline sidecar did not become ready"
fi

declare -A URL=(
    [direct]="http://127.0.0.1:$FAKE_PORT/holysheep/v1/chat/completions"
    [nginx]="http://127.0.0.1:$NGINX_PORT/holysheep/v1/chat/completions"
    [sidecar]="http://127.0.0.1:$SIDECAR_PORT/v1/chat/completions"
    [stack]="http://127.0.0.1:$STACK_PORT/v1/chat/completions"
    [traced]="http://127.0.0.1:$TRACED_PORT/v1/chat/completions"
    [sampled]="http://127.0.0.1:$SAMPLED_PORT/v1/chat/completions"
    [baseline]="http://127.0.0.1:$BASELINE_PORT/v1/chat/completions"
)
# The compared pairs sit next to each other: sidecar and sampled (tracing's cost), sidecar and
# baseline (CPU against another build).
TARGETS=(direct nginx stack traced sampled sidecar)
[ -n "$BASELINE_PID" ] && TARGETS+=(baseline)

# One request through each target must succeed before any load.
for t in "${TARGETS[@]}"; do
    python3 "$UTIL" post "${URL[$t]}" 5 || die "$t does not answer the benchmark request"
done

# --- load --------------------------------------------------------------------------------
RESULTS="$TMP/results.txt"
: >"$RESULTS"

# CPU time (utime + stime, all threads) of the processes serving TARGET, in clock ticks: the
# proxy itself (for nginx its master and workers), not the fake provider behind it.
CLK_TCK="$(getconf CLK_TCK)"
target_pids() {
    case "$1" in
        nginx) echo "$NGINX_PID" $(pgrep -P "$NGINX_PID" 2>/dev/null) ;;
        sidecar) echo "$SIDECAR_PID" ;;
        stack) echo "$STACK_PID" ;;
        traced) echo "$TRACED_PID" ;;
        sampled) echo "$SAMPLED_PID" ;;
        baseline) echo "$BASELINE_PID" ;;
        *) ;;
    esac
}
cpu_ticks() {
    local total=0 pid
    for pid in $(target_pids "$1"); do
        [ -r "/proc/$pid/stat" ] || continue
        total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
    done
    echo "$total"
}

# run_wrk TARGET SECONDS [PACE_MS] -> sets RESULT to "rps=… p50_ms=… … cpu_us=…" (cpu_us: the target's
# CPU time per request, none for direct); fails on any error.
run_wrk() {
    local target="$1" seconds="$2" pace="${3:-}" out errors before after requests
    before="$(cpu_ticks "$target")"
    out="$(BENCH_PACE_MS="$pace" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${seconds}s" --timeout 5s -s "$LUA" "${URL[$target]}" 2>&1)" ||
        { echo "$out" >&2; die "wrk failed against $target"; }
    RESULT="$(grep -m1 '^RESULT ' <<<"$out" | sed 's/^RESULT //')" ||
        { echo "$out" >&2; die "no RESULT line from wrk against $target"; }
    after="$(cpu_ticks "$target")"
    requests="$(sed -n 's/.*requests=\([0-9]*\).*/\1/p' <<<"$RESULT")"
    if [ -n "$(target_pids "$target")" ] && [ "${requests:-0}" -gt 0 ]; then
        RESULT="$RESULT cpu_us=$(awk -v t="$((after - before))" -v hz="$CLK_TCK" -v n="$requests" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')"
    fi
    errors="$(sed -n 's/.*errors=\([0-9]*\).*/\1/p' <<<"$RESULT")"
    if [ "${errors:-1}" != 0 ]; then
        echo "$out" >&2
        die "$target: $RESULT (request errors or non-2xx responses)"
    fi
    for pid in "$FAKE_PID" "$NGINX_PID" "$SIDECAR_PID" "$STACK_PID" "$TRACED_PID" "$SAMPLED_PID" $BASELINE_PID; do
        alive "$pid" || die "a benchmark process (pid $pid) died during the $target run"
    done
}

log "wrk -t$THREADS -c$CONNECTIONS, $ROUNDS rounds x ${DURATION}s per target, ${WARMUP}s warm-up each"
for t in "${TARGETS[@]}"; do
    run_wrk "$t" "$WARMUP"
done
# rounds LABEL FILE PACE_MS TARGET... -> ROUNDS rounds of a run per target, appended to FILE:
# odd rounds in order, even rounds in reverse. PACE_MS "" runs saturated.
rounds() {
    local label="$1" file="$2" pace="$3" round t i
    shift 3
    local targets=("$@") order
    for ((round = 1; round <= ROUNDS; round++)); do
        order=("${targets[@]}")
        if ((round % 2 == 0)); then
            order=()
            for ((i = ${#targets[@]} - 1; i >= 0; i--)); do order+=("${targets[i]}"); done
        fi
        for t in "${order[@]}"; do
            run_wrk "$t" "$DURATION" "$pace"
            echo "$t round=$round $RESULT" >>"$file"
            printf '%s %d %-8s %s\n' "$label" "$round" "$t" "$RESULT"
        done
    done
}
rounds round "$RESULTS" "" "${TARGETS[@]}"

# CPU per request at a fixed load. Saturated, CPU per request falls as req/s rises (more
# requests per wake-up and per system call), so two builds that reach different rates are not
# compared like for like; here every connection pauses PACE_MS before each request, and all
# targets carry the same load, well under what any of them can take.
PACE_MS="${PACE_MS:-8}"
PACED_TARGETS=(nginx stack sampled sidecar)
[ -n "$BASELINE_PID" ] && PACED_TARGETS+=(baseline)
PACED="$TMP/paced.txt"
: >"$PACED"
log "the same at a fixed load: each connection pauses ${PACE_MS} ms before each request"
rounds paced "$PACED" "$PACE_MS" "${PACED_TARGETS[@]}"

# Streaming: STREAMS concurrent streams, direct and through the sidecar, interleaved.
STREAMS="${STREAMS:-200}"
declare -A STREAM_URL=(
    [direct]="http://127.0.0.1:$FAKE_PORT/holysheep/v1/chat/completions"
    [sidecar]="http://127.0.0.1:$SIDECAR_PORT/v1/chat/completions"
)
declare -A STREAM_MODEL_FOR=([direct]="$STREAM_MODEL" [sidecar]="bench-stream")
: >"$TMP/streams.txt"
# One warm-up round, printed but not counted, like the wrk warm-up: it fills the sidecar's
# upstream pool; the first burst of new upstream connections is slower (see the README).
for t in direct sidecar; do
    printf 'stream warm-up %-8s %s\n' "$t" "$(python3 "$BENCH_DIR/streams.py" "${STREAM_URL[$t]}" "${STREAM_MODEL_FOR[$t]}" "$STREAMS")"
done
for ((round = 1; round <= ROUNDS; round++)); do
    for t in direct sidecar; do
        line="$(python3 "$BENCH_DIR/streams.py" "${STREAM_URL[$t]}" "${STREAM_MODEL_FOR[$t]}" "$STREAMS")"
        printf 'stream round %d %-8s %s\n' "$round" "$t" "$line"
        case "$line" in *failed=0*) ;; *) die "$t streams failed: $line" ;; esac
        echo "$t $line" >>"$TMP/streams.txt"
    done
done
STREAM_SUMMARY="$(python3 - "$TMP/streams.txt" "$STREAMS" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    target, *fields = line.split()
    kv = dict(f.split("=") for f in fields)
    rows.setdefault(target, []).append(kv)
med = lambda t, k: statistics.median(float(r[k]) for r in rows[t])
d50, d99 = med("direct", "ttfb_p50_ms"), med("direct", "ttfb_p99_ms")
s50, s99 = med("sidecar", "ttfb_p50_ms"), med("sidecar", "ttfb_p99_ms")
print(f"stream: streams={sys.argv[2]} direct_ttfb_p50_ms={d50:.2f} direct_ttfb_p99_ms={d99:.2f} "
      f"sidecar_ttfb_p50_ms={s50:.2f} sidecar_ttfb_p99_ms={s99:.2f} "
      f"added_ttfb_p50_ms={s50 - d50:.2f} added_ttfb_p99_ms={s99 - d99:.2f}")
PY
)"

alive "$SIDECAR_PID" || die "sidecar is gone before its RSS could be read"
RSS_MB="$(awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$SIDECAR_PID/status")"
[ -n "$RSS_MB" ] || die "could not read VmHWM of the sidecar"

# What became of the traced sidecar's spans: exported, dropped (queue full) or failed.
SPANS="$(python3 "$UTIL" spans "http://127.0.0.1:$TRACED_ADMIN_PORT/metrics")" ||
    die "could not read the traced sidecar's span counters"
SUMMARY="$(python3 "$UTIL" summary "$RESULTS" "$PACED" "$RSS_MB" "$SPANS")"
mkdir -p "$BENCH_DIR/out"
tail -n 1 <<<"$SUMMARY" >"$BENCH_DIR/out/last.txt"
echo "$STREAM_SUMMARY"
echo "$SUMMARY"
