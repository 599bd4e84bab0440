-- wrk script for bench/run.sh: a non-streaming chat completion POST to the URL's path.
-- No request() hook, so wrk builds the request once and reuses it.
wrk.method = "POST"
wrk.body = '{"model":"deepseek-v3.2","messages":[{"role":"user","content":"Say hello."}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer app-key"

-- BENCH_PACE_MS: each connection pauses that long before each request, so the offered load is
-- fixed (connections / (pause + latency)) instead of as much as the target can take.
local pace = tonumber(os.getenv("BENCH_PACE_MS") or "")
if pace then
  function delay()
    return pace
  end
end

-- One machine-readable line. Latency percentiles come in microseconds;
-- summary.errors.status counts responses with status > 399.
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
