#!/usr/bin/env bash
# Cost of the access log at full load: the same release binary with `[http] access_log` off
# and on (lines to a file, as by hand; journald under systemd costs more), wrk keep-alive with
# 64 connections, alternating off/on for ROUNDS rounds on the same machine; medians of req/s
# and of server CPU µs per request, and the on/off ratios.
#   scripts/bench/access-log-cost.sh BIN [seconds] [rounds]
set -euo pipefail
. "$(dirname "$0")/common.sh"
BIN=$1; DUR=${2:-5}; ROUNDS=${3:-3}
command -v wrk >/dev/null || { echo "access-log-cost: wrk is needed (apt-get install wrk)" >&2; exit 69; }
DIR=$(mktemp -d -p /tmp access-log-bench.XXXX); chmod 700 "$DIR"
trap 'rm -rf "$DIR"' EXIT
PORT=${PORT:-18281}
HZ=$(getconf CLK_TCK)
printf '[http]\naccess_log = false\n' > "$DIR/off.toml"
printf '[http]\naccess_log = true\n' > "$DIR/on.toml"
run() { # mode -> "req/s cpu_us_per_req"
    local mode=$1 master pids c0 c1 out n rps
    "$BIN" serve --bind 127.0.0.1:$PORT --workers 2 --config "$DIR/$mode.toml" \
        --control-socket "$DIR/ctl.sock" 2>"$DIR/$mode.log" &
    master=$!
    sleep 1
    pids=("$master" $(pgrep -P "$master"))
    wrk -t2 -c64 -d1s http://127.0.0.1:$PORT/ >/dev/null   # warm-up
    c0=$(ticks "${pids[@]}")
    out=$(wrk -t2 -c64 -d"${DUR}s" http://127.0.0.1:$PORT/)
    c1=$(ticks "${pids[@]}")
    kill -TERM "$master"; wait "$master" 2>/dev/null || true
    n=$(printf '%s\n' "$out" | awk '/requests in/ {print $1}')
    rps=$(printf '%s\n' "$out" | awk '/Requests\/sec/ {print $2}')
    awk -v r="$rps" -v c=$((c1 - c0)) -v n="$n" -v hz="$HZ" 'BEGIN { printf "%.0f %.2f\n", r, c * 1e6 / hz / n }'
}
: > "$DIR/off.txt"; : > "$DIR/on.txt"
for r in $(seq 1 "$ROUNDS"); do
    run off >> "$DIR/off.txt"
    run on >> "$DIR/on.txt"
done
lines=$(wc -l < "$DIR/on.log")
off_r=$(awk '{print $1}' "$DIR/off.txt" | median); on_r=$(awk '{print $1}' "$DIR/on.txt" | median)
off_c=$(awk '{print $2}' "$DIR/off.txt" | median); on_c=$(awk '{print $2}' "$DIR/on.txt" | median)
echo "access log, wrk -t2 -c64 -d${DUR}s keep-alive, 2 workers, $ROUNDS rounds alternating (medians)"
printf '  off: %8.0f req/s  %6.2f CPU µs/req   (runs: %s)\n' "$off_r" "$off_c" "$(awk '{print $1}' "$DIR/off.txt" | paste -sd ' ' -)"
printf '  on:  %8.0f req/s  %6.2f CPU µs/req   (runs: %s; %s log lines in the last run)\n' "$on_r" "$on_c" "$(awk '{print $1}' "$DIR/on.txt" | paste -sd ' ' -)" "$lines"
awk -v a="$on_r" -v b="$off_r" -v c="$on_c" -v d="$off_c" 'BEGIN { printf "  on/off: req/s %.3f, CPU per request %.3f\n", a / b, c / d }'
