#!/usr/bin/env bash
# Cost of the metrics on the hot path: req/s and CPU µs/request of a release binary under
# wrk (keep-alive, 64 connections), with and without a scraper at 10 scrapes/s, and against
# a binary built without metrics (BASE_BIN), alternating runs on the same machine.
#   scripts/bench/metrics-cost.sh NEW_BIN [BASE_BIN] [seconds] [rounds]
# Also writes target/bench/metrics-samples.csv (one scrape a second during the last
# NEW run) for scripts/bench/metrics.gp.
set -euo pipefail
. "$(dirname "$0")/common.sh"
NEW=$1; BASE=${2:-}; DUR=${3:-5}; ROUNDS=${4:-3}
OUT=${OUT:-target/bench}; mkdir -p "$OUT"
DIR=$(mktemp -d -p /tmp metrics-bench.XXXX); chmod 700 "$DIR"
PORT=18181; MPORT=19191
run() { # label binary scrape(0|1)
  local label=$1 bin=$2 scrape=$3 margs=()
  [ "$label" != base ] && margs=(--metrics 127.0.0.1:$MPORT)
  "$bin" serve --bind 127.0.0.1:$PORT --workers 2 --control-socket "$DIR/ctl.sock" "${margs[@]}" 2>/dev/null &
  local master=$!; sleep 1
  local pids=("$master" $(pgrep -P "$master"))
  local sp=""
  if [ "$scrape" = 1 ]; then
    ( while :; do curl -s -o /dev/null 127.0.0.1:$MPORT/metrics; sleep 0.1; done ) & sp=$!
  fi
  if [ "$label" = new ] && [ -n "${SAMPLE:-}" ]; then
    ( t0=$(date +%s.%N); while :; do curl -s 127.0.0.1:$MPORT/metrics | awk -v t="$(date +%s.%N)" -v t0="$t0" '
        /^app_http_requests_total/ {r+=$2} /^app_http_request_duration_seconds_bucket\{le="0.0005"\}/ {b=$2}
        /^app_http_request_duration_seconds_count/ {c=$2}
        /^app_worker_requests_total\{worker="0"\}/ {w0=$2} /^app_worker_requests_total\{worker="1"\}/ {w1=$2}
        END {printf "%.2f %d %d %d %d %d\n", t-t0, r, b, c, w0, w1}' >> "$OUT/metrics-samples.csv"; sleep 1; done ) & SAMPLER=$!
  fi
  local c0; c0=$(ticks "${pids[@]}")
  local res; res=$(wrk -t2 -c64 -d"${DUR}s" http://127.0.0.1:$PORT/ | awk '/Requests\/sec/ {print $2} /requests in/ {print $1}')
  local c1; c1=$(ticks "${pids[@]}")
  [ -n "$sp" ] && kill "$sp"; [ -n "${SAMPLER:-}" ] && kill "$SAMPLER" && unset SAMPLER
  kill -TERM "$master"; wait "$master" 2>/dev/null || true
  local n rps; n=$(echo "$res" | sed -n 1p); rps=$(echo "$res" | sed -n 2p)
  local hz; hz=$(getconf CLK_TCK)
  printf "%-12s req/s %10s  server CPU µs/req %6.2f\n" "$label$([ "$scrape" = 1 ] && echo +scrape)" "$rps" \
    "$(echo "($c1 - $c0) * 1000000 / $hz / $n" | bc -l)"
}
: > "$OUT/metrics-samples.csv"
for r in $(seq "$ROUNDS"); do
  [ -n "$BASE" ] && run base "$BASE" 0
  run new "$NEW" 0
  SAMPLE=$([ "$r" = "$ROUNDS" ] && echo 1 || true) run new "$NEW" 1
done
rm -rf "$DIR"
