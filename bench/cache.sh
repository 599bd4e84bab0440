#!/usr/bin/env bash
# A cache hit against a miss, on loopback: wrk (2 threads, 32 connections, DURATION seconds
# each, interleaved twice) posts the same deterministic chat completion to a route whose answers
# are cached. "hit": served from the cache. "miss": the same request with
# `x-llm-sidecar-cache: refresh`, so every one asks the fake provider and stores the answer.
# Prints one line: bench-cache: hit_rps=… hit_p50_ms=… hit_p99_ms=… miss_rps=… miss_p50_ms=… miss_p99_ms=…
# LLM_SIDECAR_BIN picks the binary (default: a release build).
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
DURATION=${DURATION:-5}
log() { echo "bench-cache: $*" >&2; }
die() { echo "bench-cache: FAILED: $*" >&2; exit 1; }

if ! command -v wrk >/dev/null; then
  log "installing wrk"
  SUDO=()
  [ "$(id -u)" -ne 0 ] && SUDO=(sudo)
  "${SUDO[@]}" apt-get update -q
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wrk
fi
if [ -z "${LLM_SIDECAR_BIN:-}" ]; then
  ROOT=$(cd "$BENCH_DIR/.." && pwd)
  . "$BENCH_DIR/release.sh"
  release_build stack_floor
  export LLM_SIDECAR_BIN="$RELEASE_DIR/llm-sidecar"
fi
. "$BENCH_DIR/../scripts/lib.sh"
trap cleanup EXIT
start_fake
cat >"$WORK/routing.yaml" <<YAML
providers:
  holysheep:
    kind: relay
    base_url: $FAKE_URL/holysheep/v1
    api_key: { env: HOLYSHEEP_API_KEY }
routes:
  deepseek-v3.2:
    relay: { provider: holysheep, model: deepseek-v3.2, price: { input: 0.27, output: 1.1 } }
    cache: { ttl: 10m, max_stale: 24h }
YAML
start_sidecar
URL="http://127.0.0.1:$PORT/v1/chat/completions"

run() { # $1: the x-llm-sidecar-cache header ("" for none)
  CACHE_HEADER="$1" wrk -t2 -c32 -d"${DURATION}s" -s "$BENCH_DIR/cache.lua" "$URL" | sed -n 's/^RESULT //p'
}
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" <<<"$2"; }

# Warm up and store the answer once.
curl -fsS -H 'content-type: application/json' -d '{"model":"deepseek-v3.2","temperature":0,"messages":[{"role":"user","content":"Say hello."}]}' "$URL" >/dev/null
best_hit="" best_miss=""
for round in 1 2; do
  hit=$(run "")
  miss=$(run refresh)
  log "round $round: hit $hit; miss $miss"
  [ "$(field errors "$hit")" = 0 ] || die "hit run had errors: $hit"
  [ "$(field errors "$miss")" = 0 ] || die "miss run had errors: $miss"
  best_hit=$(printf '%s\n%s\n' "$best_hit" "$hit" | sort -t= -k2 -g | tail -1)
  best_miss=$(printf '%s\n%s\n' "$best_miss" "$miss" | sort -t= -k2 -g | tail -1)
done
hits=$(curl -fsS "http://127.0.0.1:$ADMIN_PORT/stats" | python3 -c 'import json,sys; r=json.load(sys.stdin)["cache"]["routes"]["deepseek-v3.2"]; print(r["hits"], r["misses"])')
log "cache counts (hits misses): $hits"
echo "bench-cache: hit_rps=$(field rps "$best_hit") hit_p50_ms=$(field p50_ms "$best_hit") hit_p99_ms=$(field p99_ms "$best_hit") miss_rps=$(field rps "$best_miss") miss_p50_ms=$(field p50_ms "$best_miss") miss_p99_ms=$(field p99_ms "$best_miss")"
