#!/usr/bin/env bash
# Cost of the metrics, three ways, on the same machine:
#   1. wall clock: wrk -t2 -c64 keep-alive against 2 workers, alternating per round
#        off      no metrics endpoint (workers still count: the page also feeds `app status`)
#        on       --metrics 127.0.0.1:MPORT, nobody scraping
#        scraped  --metrics, and a scraper asking 10 times a second during the wrk run (one
#                 keep-alive connection, as Prometheus scrapes)
#        bypass   a build whose workers count nothing (only when BYPASS_BIN is given or
#                 built, see below), to put a number on the counting itself
#      medians of req/s and of server CPU µs per request, and the ratios;
#   2. CPU per scrape: server CPU (ns, /proc/PID/task/*/schedstat) for 2000 scrapes on one
#      keep-alive connection of an idle pool, less the same pool idle for as long;
#   3. instructions per request (valgrind --tool=callgrind, 1 worker): counting on against
#      bypassed, as the difference is well below the wall-clock noise of a shared 2-core box.
#   scripts/bench/metrics-cost.sh BIN [seconds] [rounds]
# BYPASS_BIN=path uses that binary for "bypass"; BYPASS_BUILD=1 builds it first: a copy of
# this tree under $OUT/metrics-bypass whose workers never map the metrics page and take no
# clock readings for it (the two edits are checked; there is no such switch in the product);
# BYPASS_BUILD=only builds it and exits. CALLGRIND=0 skips part 3.
set -euo pipefail
. "$(dirname "$0")/common.sh"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=$1; DUR=${2:-5}; ROUNDS=${3:-3}
OUT=${OUT:-${CARGO_TARGET_DIR:-$ROOT/target}/bench}; mkdir -p "$OUT"
for c in wrk curl; do
    command -v "$c" >/dev/null || { echo "metrics-cost: $c is needed (apt-get install $c)" >&2; exit 69; }
done
DIR=$(mktemp -d -p /tmp metrics-bench.XXXX); chmod 700 "$DIR"
SERVER=""; HELPER=""
cleanup() {
    [ -n "$HELPER" ] && kill "$HELPER" 2>/dev/null
    [ -n "$SERVER" ] && kill -TERM "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT
PORT=${PORT:-18181}; MPORT=${MPORT:-19191}
HZ=$(getconf CLK_TCK)

BYPASS=${BYPASS_BIN:-}
if [ -z "$BYPASS" ] && [ "${BYPASS_BUILD:-0}" != 0 ]; then
    src=$OUT/metrics-bypass/src
    rm -rf "$src"; mkdir -p "$src"
    (cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$src"
    # Workers that never map the page count nothing (every counting call returns at its
    # first check), and requests skip the two clock readings the duration histogram takes.
    grep -q 'crate::metrics::init_worker(' "$src/src/worker/mod.rs"
    sed -i 's/crate::metrics::init_worker(/crate::metrics::init_worker_bypassed(/' "$src/src/worker/mod.rs"
    sed -i 's/^pub(crate) fn init_worker(/#[allow(dead_code)]\npub(crate) fn init_worker(/' "$src/src/metrics/mod.rs"
    printf '\npub(crate) fn init_worker_bypassed(_: BorrowedFd<'"'"'_>, _: usize) -> std::io::Result<()> {\n    Ok(())\n}\n' >> "$src/src/metrics/mod.rs"
    grep -q 'let meter = measured.then' "$src/src/worker/http.rs"
    sed -i 's/let meter = measured.then/let meter = false.then/' "$src/src/worker/http.rs"
    echo "metrics-cost: building the bypassed copy in $src" >&2
    bt=$OUT/metrics-bypass/target
    # Start from this tree's release build: only the crate itself is compiled again.
    main_release=${CARGO_TARGET_DIR:-$ROOT/target}/release
    if [ ! -d "$bt/release" ] && [ -d "$main_release" ]; then mkdir -p "$bt" && cp -a "$main_release" "$bt/"; fi
    (cd "$src" && CARGO_TARGET_DIR=$bt cargo build --release --quiet)
    BYPASS=$bt/release/app
    [ "$BYPASS_BUILD" = only ] && { echo "$BYPASS"; exit 0; }
fi

# CPU of a process tree in ns (every thread of every process).
cpu_ns() {
    local t=0 p v
    for p in "$@"; do
        v=$(cat /proc/"$p"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {print s + 0}')
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

start() { # binary workers metrics(0|1)
    local margs=()
    [ "$3" = 1 ] && margs=(--metrics 127.0.0.1:$MPORT)
    "$1" serve --bind 127.0.0.1:$PORT --workers "$2" --control-socket "$DIR/ctl.sock" \
        "${margs[@]}" 2>>"$DIR/server.log" &
    SERVER=$!
    local i
    for i in $(seq 100); do
        curl -s -o /dev/null "127.0.0.1:$PORT/" && break
        sleep 0.05
    done
    sleep 0.3
}
stop() {
    kill -TERM "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=""
}

run() { # mode -> "req/s cpu_us_per_req"
    local mode=$1 bin=$BIN metrics=1 pids c0 c1 out n rps
    case $mode in off) metrics=0 ;; bypass) bin=$BYPASS; metrics=0 ;; esac
    start "$bin" 2 "$metrics"
    pids=("$SERVER" $(pgrep -P "$SERVER"))
    wrk -t2 -c64 -d1s http://127.0.0.1:$PORT/ >/dev/null   # warm-up
    if [ "$mode" = scraped ]; then
        # As Prometheus scrapes: one keep-alive connection, here 10 times a second (one
        # client process, not a process per scrape, whose start-up would cost more CPU than
        # the scrape on the same two cores).
        curl -s --rate 10/s "127.0.0.1:$MPORT/metrics?[1-100000]" >/dev/null &
        HELPER=$!
    fi
    c0=$(ticks "${pids[@]}")
    out=$(wrk -t2 -c64 -d"${DUR}s" http://127.0.0.1:$PORT/)
    c1=$(ticks "${pids[@]}")
    if [ -n "$HELPER" ]; then kill "$HELPER"; wait "$HELPER" 2>/dev/null || true; HELPER=""; fi
    stop
    n=$(printf '%s\n' "$out" | awk '/requests in/ {print $1}')
    rps=$(printf '%s\n' "$out" | awk '/Requests\/sec/ {print $2}')
    awk -v r="$rps" -v c=$((c1 - c0)) -v n="$n" -v hz="$HZ" 'BEGIN { printf "%.0f %.3f\n", r, c * 1e6 / hz / n }'
}

MODES="off on scraped"
[ -n "$BYPASS" ] && MODES="$MODES bypass"
for m in $MODES; do : > "$DIR/$m.txt"; done
for r in $(seq 1 "$ROUNDS"); do
    for m in $MODES; do run "$m" >> "$DIR/$m.txt"; done
done
med() { awk -v k="$2" '{print $k}' "$DIR/$1.txt" | median; }
runs() { awk '{print $1}' "$DIR/$1.txt" | paste -sd ' ' -; }
echo "metrics, wrk -t2 -c64 -d${DUR}s keep-alive, 2 workers, $ROUNDS rounds alternating $MODES (medians)"
for m in $MODES; do
    printf '  %-8s %8.0f req/s  %6.3f CPU µs/req   (runs: %s)\n' "$m" "$(med "$m" 1)" "$(med "$m" 2)" "$(runs "$m")"
done
ratio() { awk -v a="$(med "$1" 1)" -v b="$(med "$2" 1)" -v c="$(med "$1" 2)" -v d="$(med "$2" 2)" \
    'BEGIN { printf "req/s %.3f, CPU per request %.3f", a / b, c / d }'; }
echo "  on/off:      $(ratio on off)"
echo "  scraped/on:  $(ratio scraped on)   (10 scrapes/s during the run)"
[ -n "$BYPASS" ] && echo "  on/bypass:   $(ratio on bypass)   (counting on against compiled out)"

# ---- CPU per scrape, idle pool -------------------------------------------------------------
N=2000
start "$BIN" 2 1
pids=("$SERVER" $(pgrep -P "$SERVER"))
curl -s -o /dev/null "127.0.0.1:$MPORT/metrics"
size=$(curl -s "127.0.0.1:$MPORT/metrics" | wc -c)
c0=$(cpu_ns "${pids[@]}"); t0=$(date +%s%N)
curl -s "127.0.0.1:$MPORT/metrics?[1-$N]" >/dev/null
c1=$(cpu_ns "${pids[@]}"); t1=$(date +%s%N)
sleep "$(awk -v d=$((t1 - t0)) 'BEGIN {print d / 1e9}')"
c2=$(cpu_ns "${pids[@]}")
stop
awk -v busy=$((c1 - c0)) -v idle=$((c2 - c1)) -v n=$N -v s="$size" -v ms=$(((t1 - t0) / 1000000)) 'BEGIN {
    us = (busy - idle) / n / 1000
    printf "  per scrape:  %.0f µs server CPU (%d scrapes of %d bytes on one connection in %d ms, idle pool); at 10/s that is %.2f %% of one CPU\n", us, n, s, ms, us * 10 / 1e4
}'

# ---- instructions per request (callgrind) ---------------------------------------------------
if [ "${CALLGRIND:-1}" = 1 ] && command -v valgrind >/dev/null && command -v callgrind_control >/dev/null &&
    command -v cc >/dev/null; then
    # The master starts workers by exec of /proc/self/fd/N (the binary it holds open), which
    # valgrind cannot follow (the descriptor is gone when its launcher looks): a preloaded
    # shim, for this measurement only, execs the path that descriptor names instead.
    cat > "$DIR/shim.c" <<'C'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <string.h>
#include <unistd.h>
static const char *resolve(const char *path, char *buf) {
    if (strncmp(path, "/proc/self/fd/", 14) != 0) return path;
    ssize_t n = readlink(path, buf, PATH_MAX - 1);
    if (n <= 0) return path;
    buf[n] = 0;
    return buf;
}
int execvp(const char *file, char *const argv[]) {
    char buf[PATH_MAX];
    int (*real)(const char *, char *const[]) = dlsym(RTLD_NEXT, "execvp");
    return real(resolve(file, buf), argv);
}
int execve(const char *file, char *const argv[], char *const envp[]) {
    char buf[PATH_MAX];
    int (*real)(const char *, char *const[], char *const[]) = dlsym(RTLD_NEXT, "execve");
    return real(resolve(file, buf), argv, envp);
}
C
    cc -shared -fPIC -O2 -o "$DIR/shim.so" "$DIR/shim.c" -ldl
    NREQ=2000
    ir_per_request() { # binary -> instructions per request in the worker
        local bin=$1 worker file
        rm -f "$DIR"/cg.*
        LD_PRELOAD=$DIR/shim.so valgrind --tool=callgrind --trace-children=yes \
            --callgrind-out-file="$DIR/cg.%p" \
            "$bin" serve --bind 127.0.0.1:$PORT --workers 1 --control-socket "$DIR/ctl.sock" \
            --heartbeat-interval 5s --heartbeat-misses 10 --ready-timeout 60s 2>>"$DIR/valgrind.log" &
        SERVER=$!
        for _ in $(seq 600); do curl -s -o /dev/null "127.0.0.1:$PORT/" && break; sleep 0.1; done
        worker=$(pgrep -P "$SERVER")
        curl -s "127.0.0.1:$PORT/?[1-200]" >/dev/null   # warm-up
        # Counting from zero to a dump around exactly NREQ requests on one keep-alive
        # connection: start-up and warm-up stay out.
        callgrind_control -z "$worker" >/dev/null 2>&1
        curl -s "127.0.0.1:$PORT/?[1-$NREQ]" >/dev/null
        callgrind_control -d "$worker" >/dev/null 2>&1
        stop
        file=$(grep -l '^desc: Trigger: dump' "$DIR"/cg."$worker"* | head -1)
        awk -v n=$NREQ '/^totals:/ {print $2 / n; exit}' "$file"
    }
    on_ir=$(ir_per_request "$BIN")
    if [ -n "$BYPASS" ]; then
        by_ir=$(ir_per_request "$BYPASS")
        awk -v a="$on_ir" -v b="$by_ir" -v n=$NREQ 'BEGIN {
            printf "  instructions per request (callgrind, 1 worker, %d keep-alive requests): counting on %.0f, bypassed %.0f: %+.0f (%+.2f %%)\n", n, a, b, a - b, (a - b) * 100 / b }'
    else
        printf '  instructions per request (callgrind, 1 worker, %d keep-alive requests): %.0f\n' $NREQ "$on_ir"
    fi
fi
