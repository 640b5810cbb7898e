#!/usr/bin/env bash
# scripts/bench/instructions.sh LABEL BIN [N] — instructions per request in a worker, counted
# by valgrind's callgrind: immune to the noise of a shared machine, so small changes to the
# per-request and per-connection path can be compared (wall-clock runs cannot see 3 % here).
#
# Starts `BIN serve --workers 1` with its worker under callgrind, warms it, then sends N
# (default 5000) sequential `GET /` requests over one keep-alive connection, and N more with
# `Connection: close` (a connection each), zeroing and dumping the counters around each, and
# prints instructions per request. BIN is any program built on the library (or an older
# build: the command line it needs is `serve --workers --bind --heartbeat-interval
# --ready-timeout`), or examples/bare_prefork (the same axum `GET /` without supervision,
# run as one process: the floor the library's per-request path is compared with). Counts include the event loop's turns, which depend a little on timing
# (about ±1 % on the close path between runs). Needs valgrind, gcc and python3.
#
#   scripts/bench/instructions.sh hello target/release/examples/hello
set -euo pipefail
label=$1 bin=$(realpath "$2") n=${3:-5000}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/instructions
out=${CARGO_TARGET_DIR:-$here/../../../target}/instructions/$label
rm -rf "$out" && mkdir -p "$out"
shim=$out/exec-under-callgrind.so
gcc -shared -fPIC -O2 -o "$shim" "$here/exec-under-callgrind.c" -ldl
port=$((20000 + RANDOM % 20000))
while [ -n "$(ss -ltnH "sport = :$port")" ]; do port=$((20000 + RANDOM % 20000)); done
if [ "$(basename "$bin")" = bare_prefork ]; then
    valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.%p" "$bin" "127.0.0.1:$port" 0 >"$out/log" 2>&1 &
    master=$!
else
    CALLGRIND_DIR=$out LD_PRELOAD=$shim "$bin" serve --workers 1 --bind "127.0.0.1:$port" \
        --heartbeat-interval 10s --ready-timeout 120s >"$out/log" 2>&1 &
    master=$!
fi
trap 'kill -TERM $master 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.5; done
if [ "$(basename "$bin")" = bare_prefork ]; then worker=$master; else worker=$(pgrep -P $master | head -n 1); fi
[ -n "$worker" ] || { tail "$out/log" >&2; exit 1; }
python3 "$here/client.py" ka "$port" 200
python3 "$here/client.py" close "$port" 200
for mode in ka close; do
    callgrind_control -z "$worker" >/dev/null 2>&1
    python3 "$here/client.py" "$mode" "$port" "$n"
    callgrind_control -d "$mode" "$worker" >/dev/null 2>&1
done
kill -TERM $master 2>/dev/null || true
wait $master || true
i=0
for mode in ka close; do
    i=$((i + 1))
    ir=$(awk '/^(summary|totals):/ { print $2; exit }' "$out/callgrind.$worker.$i")
    echo "$label $mode instructions/request $((ir / n)) ($out/callgrind.$worker.$i)"
done
