#!/usr/bin/env bash
# Offline demo: the fake provider plays every upstream; the sidecar runs the embedded default
# config pointed at it; a chat request and a streamed one go through; then the routing flag is
# flipped in the config file and the next request goes to the official provider.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
start_all
URL="http://127.0.0.1:$PORT/v1/chat/completions"
BODY='{"model":"deepseek-v3.2","messages":[{"role":"user","content":"Say hello."}]}'

chat() {
  curl -sS -D "$WORK/headers" -o "$WORK/body" "$URL" -H 'content-type: application/json' \
    -H 'authorization: Bearer app-placeholder-key' -d "$BODY"
  provider=$(tr -d '\r' <"$WORK/headers" | sed -n 's/^x-llm-sidecar-provider: //p')
  path=$(tr -d '\r' <"$WORK/headers" | sed -n 's/^x-llm-sidecar-path: //p')
  model=$(tr -d '\r' <"$WORK/headers" | sed -n 's/^x-llm-sidecar-upstream-model: //p')
  echo "  answered by provider=$provider path=$path upstream_model=$model"
  echo "  content: $(jq -r '.choices[0].message.content' "$WORK/body")"
}

echo "== 1. chat request (holy_sheep_routing_enabled: true)"
chat
echo
echo "== 2. streamed request"
curl -sSN "$URL" -H 'content-type: application/json' \
  -d '{"model":"deepseek-v3.2","stream":true,"messages":[{"role":"user","content":"Say hello."}]}' |
  while IFS= read -r line; do
    case "$line" in
      "data: [DONE]") echo "  [DONE]" ;;
      data:*) printf '  chunk: %s\n' "$(printf '%s' "${line#data: }" | jq -c '.choices[0].delta.content // empty')" ;;
    esac
  done
echo
echo "== 3. flip the kill switch: holy_sheep_routing_enabled: false"
sed -i 's/^holy_sheep_routing_enabled: true/holy_sheep_routing_enabled: false/' "$WORK/routing.yaml"
for _ in $(seq 50); do
  gen=$(curl -fsS "http://127.0.0.1:$ADMIN_PORT/config" | jq -r .generation)
  [ "$gen" = 2 ] && break
  sleep 0.1
done
echo "  config generation is now $gen"
chat
echo
echo "== admin: http://127.0.0.1:$ADMIN_PORT/metrics (excerpt)"
curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" | grep '^llm_sidecar_requests_total' | sed 's/^/  /'
