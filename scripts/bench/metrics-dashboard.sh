#!/usr/bin/env bash
# The dashboard's panels from a real run: the release binary with 2 workers and the metrics
# endpoint, scraped once a second while wrk loads it, with a reload, a SIGKILLed worker and a
# panicking request on the way; the scrapes go through Python's OpenMetrics parser
# (scripts/bench/metrics-samples.py) and gnuplot (scripts/bench/metrics.gp) draws the
# panels of scripts/grafana-dashboard.json.
#   scripts/bench/metrics-dashboard.sh BIN [PNG]
# Timeline (s): 0 idle; 3 wrk -c8; 11 wrk -c64 until 33; 17 `app reload`; 23 SIGKILL of a
# worker; 28 GET /chaos/panic; 33-36 idle.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BIN=$1; PNG=${2:-${CARGO_TARGET_DIR:-$ROOT/target}/bench/metrics.png}
for c in wrk curl gnuplot /usr/bin/python3; do
    command -v "$c" >/dev/null || { echo "metrics-dashboard: $c is needed" >&2; exit 69; }
done
/usr/bin/python3 -c 'import prometheus_client' 2>/dev/null ||
    { echo "metrics-dashboard: python3-prometheus-client is needed" >&2; exit 69; }
DIR=$(mktemp -d -p /tmp metrics-dashboard.XXXX); chmod 700 "$DIR"
SERVER=""; SCRAPER=""
cleanup() {
    [ -n "$SCRAPER" ] && kill "$SCRAPER" 2>/dev/null
    [ -n "$SERVER" ] && kill -TERM "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT
PORT=${PORT:-18481}; MPORT=${MPORT:-19491}
mkdir -p "$DIR/scrapes"
"$BIN" serve --bind 127.0.0.1:$PORT --workers 2 --metrics 127.0.0.1:$MPORT --chaos \
    --control-socket "$DIR/ctl.sock" 2>"$DIR/server.log" &
SERVER=$!
for _ in $(seq 100); do curl -s -o /dev/null "127.0.0.1:$PORT/" && break; sleep 0.05; done
(
    # On the second, so that rates divide by about 1 s.
    while :; do
        t=$(date +%s%3N)
        curl -s -m 1 -o "$DIR/scrapes/$t" "127.0.0.1:$MPORT/metrics" || rm -f "$DIR/scrapes/$t"
        sleep "$(awk -v t="$t" -v now="$(date +%s%3N)" 'BEGIN { s = (1000 - (now - t)) / 1000; print (s > 0 ? s : 0) }')"
    done
) &
SCRAPER=$!
at() { sleep "$(awk -v t0="$T0" -v at="$1" -v now="$(date +%s%3N)" 'BEGIN { s = t0 / 1000 + at - now / 1000; print (s > 0 ? s : 0) }')"; }
T0=$(date +%s%3N)
at 3; wrk -t2 -c8 -d8s "http://127.0.0.1:$PORT/" > "$DIR/wrk1.txt"
at 11; wrk -t2 -c64 -d22s "http://127.0.0.1:$PORT/" > "$DIR/wrk2.txt" &
WRK=$!
at 17; "$BIN" reload --control-socket "$DIR/ctl.sock" > "$DIR/reload.txt" 2>&1 || true
at 23; victim=$(pgrep -P "$SERVER" | head -1); kill -KILL "$victim"
at 28; curl -s -o /dev/null "127.0.0.1:$PORT/chaos/panic" || true
wait "$WRK"
at 36
kill "$SCRAPER"; wait "$SCRAPER" 2>/dev/null || true; SCRAPER=""
echo "metrics-dashboard: $(ls "$DIR/scrapes" | wc -l) scrapes; wrk -c8: $(awk '/Requests\/sec/ {print $2}' "$DIR/wrk1.txt") req/s, -c64: $(awk '/Requests\/sec/ {print $2}' "$DIR/wrk2.txt") req/s; $(tr '\n' ' ' < "$DIR/reload.txt")" >&2
/usr/bin/python3 "$HERE/metrics-samples.py" "$DIR/scrapes" 2 "$T0" > "$DIR/samples.dat"
mkdir -p "$(dirname "$PNG")"
cp "$DIR/samples.dat" "${PNG%.png}.dat"
gnuplot -e "in='$DIR/samples.dat'; out='$PNG'" "$HERE/metrics.gp"
echo "metrics-dashboard: $PNG (data: ${PNG%.png}.dat)" >&2
