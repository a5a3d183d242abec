-- Prints wrk's own summary as one JSON line, with p99.9 (wrk's --latency stops at p99).
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'CALLOUTKIT {"requests": %d, "duration_us": %d, "errors": %d, ' ..
    '"p50": %d, "p99": %d, "p999": %d}\n',
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
