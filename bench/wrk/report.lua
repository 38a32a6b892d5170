-- wrk script for bench/run: adds the session cookie and the CSRF header, and writes the result
-- (with p99.9, which wrk's own summary lacks) as one JSON object to $WRK_OUT.
local cookie = os.getenv("WRK_COOKIE")
if cookie and #cookie > 0 then
  wrk.headers["Cookie"] = cookie
end
if os.getenv("WRK_CSRF") == "1" then
  wrk.headers["X-CSRF"] = "1"
end

function done(summary, latency, requests)
  local e = summary.errors
  local f = assert(io.open(os.getenv("WRK_OUT"), "w"))
  f:write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
  f:close()
end
