-- wrk script for bench/cache.sh: the same deterministic chat completion every time. With the
-- CACHE_HEADER environment variable set (e.g. "refresh"), it goes as x-llm-sidecar-cache.
wrk.method = "POST"
wrk.body = '{"model":"deepseek-v3.2","temperature":0,"messages":[{"role":"user","content":"Say hello."}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer app-key"
local asked = os.getenv("CACHE_HEADER")
if asked and asked ~= "" then
  wrk.headers["x-llm-sidecar-cache"] = asked
end

function done(summary, latency, requests)
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.timeout + e.status
  local rps = 0
  if summary.duration > 0 then
    rps = summary.requests / (summary.duration / 1e6)
  end
  io.write(string.format(
    "RESULT rps=%.2f p50_ms=%.3f p99_ms=%.3f requests=%d errors=%d non2xx=%d\n",
    rps, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.requests, errors, e.status))
end
