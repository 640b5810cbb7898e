-- load.lua - wrk script for scripts/fleet.sh: a paced load (each connection
-- waits FLEET_DELAY_MS between its requests, so the rate is about
-- connections x 1000 / (FLEET_DELAY_MS + latency) and wrk does not take every
-- CPU of the machine), and one machine-readable summary line at the end.
--
-- Failed = responses outside 2xx/3xx (wrk's status errors; the service never
-- answers 3xx) + socket errors (connect, read, write) + requests slower than
-- wrk's --timeout. wrk counts them exactly; it prints this line also when it
-- is stopped with SIGINT, which is how fleet.sh ends a check's load.
local pause = tonumber(os.getenv("FLEET_DELAY_MS") or "10")

function delay()
   return pause
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "FLEET requests=%d failed=%d non2xx=%d connect=%d read=%d write=%d timeout=%d duration_us=%d p99_us=%d max_us=%d\n",
      summary.requests, e.status + e.connect + e.read + e.write + e.timeout,
      e.status, e.connect, e.read, e.write, e.timeout,
      summary.duration, latency:percentile(99), latency.max))
end
