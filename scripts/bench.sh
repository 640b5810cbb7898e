#!/usr/bin/env bash
# scripts/bench.sh — load-test the prefork service with wrk and (with --compare) the
# same load, in the same run, against nginx, Node.js cluster (rr and none) and PM2.
# Run `scripts/bench.sh --help` for the options. Everything it starts is stopped on exit.
# Unquoted pid lists are split on purpose; `A && B || true` is used as "B if A, never fail".
# shellcheck disable=SC2086,SC2046,SC2015,SC2116
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$ROOT/scripts/bench
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/bench
CACHE=${BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/app-bench}

WORKERS=2
DURATION=5
CONNS=1,16,64,256
MODES=ka,close
EVENT_DURATION=8
EVENT_CONNS=64
WRK_THREADS=2
WRK_TIMEOUT=2s
URL=""
TARGET_PID=""
PORT=""
COMPARE=0
RELOAD=0
CHAOS=0
QUICK=0
JSON_OUT=""
PNG_COPY=""
BUILD=1
INSTALL=1
ONLY=""
ACCEPT=""
CONTROL_SOCKET=""
KEEP_TMP=0
H2=0
ACCESS_LOG=0
TLS_BENCH=0
METRICS_COST=0
H2_CONNS=16
H2_STREAMS=16
BASELINE_REV=""
PAIR_RUNS=3
PAIR_CONNS=64
APP_ARGS=()
APP_BIN_ARG=""
ORIG_ARGS="$*"

usage() {
    cat <<'EOF'
Usage: scripts/bench.sh [options]

Builds the release binary, starts `target/release/app serve --bind 127.0.0.1:PORT --workers 2`
on a free port (checking with `ss` that the listener is really the process it started), and
runs wrk at several concurrencies with and without keep-alive. Prints a table of req/s,
p50/p99 latency, errors (non-2xx + socket errors), server CPU time per request (utime+stime of
master and workers, children included, from /proc), memory (RSS and PSS from
/proc/PID/smaps_rollup, master + workers; idle and under load), per-worker request counts
and Jain's fairness index. Writes target/bench/results.json and target/bench/bench.png.

Options:
  --compare            also run nginx, Node cluster (NODE_CLUSTER_SCHED_POLICY=rr and none)
                       and PM2 cluster mode, same load, same worker count, interleaved
                       run by run; prints ratios project/reference and the issue-6 targets;
                       implies --h2 (unless --quick)
  --h2                 HTTP/2 cleartext with prior knowledge (h2c): h2load (nghttp2-client)
                       against the project and against a second nginx whose listener has
                       `http2` (same config otherwise, same worker count), alternating
                       app nginx app nginx, --runs runs each; medians and the ratio app/nginx
  --h2-conns N         h2load clients (-c, default 16)
  --h2-streams N       h2load concurrent streams per client (-m, default 16)
  --baseline-rev REV   before/after: build REV's release binary in a git worktree under
                       target/bench/baseline/ (its own target dir), start it the same way
                       (`app serve --bind ... --workers N`) and run HTTP/1.1 keep-alive and
                       `Connection: close` at --pair-conns, alternating current baseline,
                       --runs runs each; medians of req/s and CPU us/req, ratio current/baseline
                       against the issue's bound (neither may be more than 3 % worse)
  --tls                also TLS against nginx (OpenSSL) with the same certificate: keep-alive
                       req/s, new full handshakes/s, and new connections/s with session
                       resumption, TLS 1.3 and 1.2 (scripts/bench/tls-bench.sh)
  --access-log         also measure the access log's cost: the app with [http] access_log off
                       and on, alternating (scripts/bench/access-log-cost.sh)
  --metrics            also measure the metrics' cost (scripts/bench/metrics-cost.sh: no endpoint,
                       endpoint, endpoint scraped 10/s, and a copy built with counting bypassed,
                       alternating; CPU per scrape; callgrind instructions per request) and draw
                       the dashboard's panels from a run with a reload and a kill
                       (scripts/bench/metrics-dashboard.sh -> target/bench/metrics.png)
  --runs N             runs per server for --h2 and --baseline-rev (default 3)
  --pair-conns N       wrk connections for --baseline-rev (default 64)
  --reload             during a load run, SIGHUP the master every second (nginx: SIGHUP,
                       Node cluster: SIGHUP -> rolling restart, PM2: `pm2 reload`); count failures
  --chaos              during a load run, SIGKILL a random worker every second; count failures
  --quick              smoke mode: 3 s runs, 64 connections only, no references (< 30 s)
  --url URL            bench a running server instead of starting one (no build); CPU and
                       memory need its master pid: --pid PID, else found via `ss -ltnp`
  --pid PID            master pid of the server given with --url
  --control-socket P   control socket of the server given with --url (for `app status --json`)
  --port N             port for the project's server (default: a free one, picked at random)
  --workers N          worker processes for every server (default 2)
  --duration S         seconds per load run (default 5)
  --conns LIST         comma-separated concurrencies (default 1,16,64,256)
  --modes LIST         ka, close or both (default ka,close); close sends `Connection: close`
  --event-duration S   seconds per --reload/--chaos run (default 8)
  --event-conns N      connections for --reload/--chaos runs (default 64)
  --threads N          wrk threads (default 2; never more than the connections)
  --accept LIST        run the project once per accept strategy (APP_ACCEPT=shared,round-robin)
  --only LIST          restrict to these servers: app,nginx,node-rr,node-none,pm2
                       (nginx also covers the --h2 instance, nginx-h2)
  --app-arg ARG        extra argument for `app serve` (repeatable)
  --app-bin PATH       serve this program instead of target/release/app (any program built on
                       the library, e.g. target/release/examples/hello: the library around a
                       plain service_fn, as the baseline's hand-written demo was); with the
                       default build, also builds the release examples
  --json FILE          also write the JSON results to FILE
  --png FILE           also copy the plot to FILE
  --out DIR            output directory (default target/bench)
  --no-build           do not run `cargo build --release`
  --no-install         do not install missing tools (wrk, jq, gnuplot, nginx, pm2)
  --keep-tmp           keep the temp dir (server logs, wrk outputs)
  -h, --help           this text

Examples:
  scripts/bench.sh --quick
  scripts/bench.sh --compare --json target/bench/compare.json
  scripts/bench.sh --compare --reload --chaos --conns 64
  scripts/bench.sh --h2 --baseline-rev HEAD~1 --runs 5
EOF
}

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case $1 in
    --compare) COMPARE=1 ;;
    --h2) H2=1 ;;
    --access-log) ACCESS_LOG=1 ;;
    --tls) TLS_BENCH=1 ;;
    --metrics) METRICS_COST=1 ;;
    --h2-conns) H2_CONNS=$2; shift ;;
    --h2-streams) H2_STREAMS=$2; shift ;;
    --baseline-rev) BASELINE_REV=$2; shift ;;
    --runs) PAIR_RUNS=$2; shift ;;
    --pair-conns) PAIR_CONNS=$2; shift ;;
    --reload) RELOAD=1 ;;
    --chaos) CHAOS=1 ;;
    --quick) QUICK=1 ;;
    --url) URL=$2; shift ;;
    --pid) TARGET_PID=$2; shift ;;
    --control-socket) CONTROL_SOCKET=$2; shift ;;
    --port) PORT=$2; shift ;;
    --workers) WORKERS=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    --conns) CONNS=$2; shift ;;
    --modes) MODES=$2; shift ;;
    --event-duration) EVENT_DURATION=$2; shift ;;
    --event-conns) EVENT_CONNS=$2; shift ;;
    --threads) WRK_THREADS=$2; shift ;;
    --accept) ACCEPT=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --app-arg) APP_ARGS+=("$2"); shift ;;
    --app-bin) APP_BIN_ARG=$2; shift ;;
    --json) JSON_OUT=$2; shift ;;
    --png) PNG_COPY=$2; shift ;;
    --out) OUT=$2; shift ;;
    --no-build) BUILD=0 ;;
    --no-install) INSTALL=0 ;;
    --keep-tmp) KEEP_TMP=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done

[ "$COMPARE" = 1 ] && [ "$QUICK" = 0 ] && H2=1
if [ "$QUICK" = 1 ]; then
    DURATION=3
    CONNS=64
    EVENT_DURATION=4
    if [ "$COMPARE" = 1 ]; then log "--quick: references skipped"; fi
    COMPARE=0
fi
IFS=, read -r -a CONN_LIST <<<"$CONNS"
IFS=, read -r -a MODE_LIST <<<"$MODES"
for m in "${MODE_LIST[@]}"; do case $m in ka | close) ;; *) die "--modes: ka and/or close, not '$m'" ;; esac; done
for c in "${CONN_LIST[@]}" "$EVENT_CONNS" "$WORKERS" "$DURATION" "$EVENT_DURATION" "$WRK_THREADS" \
    "$H2_CONNS" "$H2_STREAMS" "$PAIR_RUNS" "$PAIR_CONNS"; do
    [[ $c =~ ^[0-9]+$ && $c -gt 0 ]] || die "not a positive integer: '$c'"
done

CLK_TCK=$(getconf CLK_TCK)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/app-bench.XXXXXX")
mkdir -p "$OUT"
RESULTS=$TMP/runs.jsonl
EVENTS=$TMP/events.jsonl
IDLE=$TMP/idle.jsonl
H2RUNS=$TMP/h2.jsonl
PAIRS=$TMP/pairs.jsonl
: >"$RESULTS"
: >"$EVENTS"
: >"$IDLE"
: >"$H2RUNS"
: >"$PAIRS"

# ---------------------------------------------------------------- servers' state
SERVERS=()            # names, in run order
declare -A S_KIND     # app | nginx | node | pm2 | url
declare -A S_PORT S_URL S_PID S_DIR S_SOCK S_STATUS S_POLICY S_ACCEPT
declare -A S_BIN      # app kind: the binary (the baseline's differs)
declare -A S_H2       # 1: the server's listener speaks h2c only (nginx `listen ... http2`)
declare -A S_NOSWEEP  # 1: not in the concurrency sweep / events (only in --h2 or --baseline-rev runs)
USED_PORTS=()
BG_PIDS=()

# ---------------------------------------------------------------- cleanup
stop_server() {
    local name=$1 root=${S_PID[$1]:-} kind=${S_KIND[$1]} pids
    [ -n "$root" ] || return 0
    case $kind in
    url) return 0 ;;
    pm2)
        PM2_HOME=${S_DIR[$name]}/pm2 "$PM2" kill >/dev/null 2>&1 || true
        ;;
    esac
    pids=$(tree_pids "$root")
    kill -TERM "$root" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$root" 2>/dev/null || break
        sleep 0.1
    done
    # whatever is left of the tree (a master that ignored TERM, orphaned workers)
    for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
    wait "$root" 2>/dev/null || true
    S_PID[$name]=""
}

cleanup() {
    local rc=$? n p
    trap - EXIT INT TERM
    for p in "${BG_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for n in "${SERVERS[@]}"; do stop_server "$n" || true; done
    if [ "$KEEP_TMP" = 1 ]; then log "temp dir kept: $TMP"; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- tools
APT_UPDATED=0
apt_install() {
    [ "$INSTALL" = 1 ] || return 1
    command -v apt-get >/dev/null || return 1
    [ "$(id -u)" = 0 ] || { log "not root: cannot apt-get install $*"; return 1; }
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
        APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1
}
need() { # need CMD PKG...: make CMD available or die
    local cmd=$1 pkg
    shift
    command -v "$cmd" >/dev/null && return 0
    for pkg in "$@"; do apt_install "$pkg" && command -v "$cmd" >/dev/null && return 0; done
    die "$cmd is missing (apt-get install $*)"
}
need wrk wrk
need jq jq
need curl curl
need ss iproute2
need ps procps
if ! command -v gnuplot >/dev/null; then apt_install gnuplot-nox || log "gnuplot missing: no plot"; fi
[ "$H2" = 1 ] && need h2load nghttp2-client
[ -n "$BASELINE_REV" ] && need git git

# ---------------------------------------------------------------- /proc helpers
tree_pids() { # root and all its descendants, one per line
    [ -d "/proc/$1" ] || return 0
    ps -e -o pid=,ppid= | awk -v r="$1" '
        { par[$1] = $2; ids[NR] = $1 }
        END {
            t[r] = 1; changed = 1
            while (changed) {
                changed = 0
                for (i in ids) { x = ids[i]; if (!(x in t) && (par[x] in t)) { t[x] = 1; changed = 1 } }
            }
            for (x in t) print x
        }'
}
child_pids() { ps --ppid "$1" -o pid= 2>/dev/null | tr -d ' ' || true; }
cpu_ticks() { # utime+stime+cutime+cstime summed over the given pids
    local total=0 p s
    local -a f
    for p in "$@"; do
        s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        s=${s##*) }
        read -r -a f <<<"$s"
        total=$((total + f[11] + f[12] + f[13] + f[14]))
    done
    echo "$total"
}
proc_ticks_json() { # {"pid": utime+stime, ...} for the given pids
    local p s out=""
    local -a f
    for p in "$@"; do
        s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        s=${s##*) }
        read -r -a f <<<"$s"
        out+="\"$p\":$((f[11] + f[12])),"
    done
    echo "{${out%,}}"
}
mem_json() { # {"rss_kb":..,"pss_kb":..,"procs":..} summed over the tree of $1
    local p n=0 files=()
    for p in $(tree_pids "$1"); do
        [ -r "/proc/$p/smaps_rollup" ] && files+=("/proc/$p/smaps_rollup") && n=$((n + 1))
    done
    if [ "$n" = 0 ]; then echo '{"rss_kb":null,"pss_kb":null,"procs":0}'; return; fi
    cat "${files[@]}" 2>/dev/null | awk -v n="$n" '
        /^Rss:/ { r += $2 } /^Pss:/ { p += $2 }
        END { printf "{\"rss_kb\":%d,\"pss_kb\":%d,\"procs\":%d}\n", r, p, n }'
}
listener_pids() { ss -ltnpH "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u || true; }

pick_port() { # sets PICKED to a port nobody listens on
    local p lo=32768 span
    # below the ephemeral range, so no client socket (wrk's, TIME_WAIT) can hold the port
    read -r lo _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
    span=$((lo - 20000))
    [ "$span" -ge 1000 ] || { lo=65000; span=$((lo - 61000)) && lo=65000; }
    for _ in $(seq 1 500); do
        p=$((lo - 1 - RANDOM % span))
        [[ " ${USED_PORTS[*]} " == *" $p "* ]] && continue
        if [ -z "$(ss -tanH "sport = :$p" 2>/dev/null)" ]; then
            USED_PORTS+=("$p")
            PICKED=$p
            return 0
        fi
    done
    die "no free port found"
}

check_owner() { # every listener on the server's port must be in the tree we started
    local name=$1 port=${S_PORT[$1]} root=${S_PID[$1]} tree p pids
    pids=$(listener_pids "$port")
    [ -n "$pids" ] || die "$name: nothing listens on port $port"
    tree=$(tree_pids "$root")
    for p in $pids; do
        if ! grep -qx "$p" <<<"$tree"; then
            die "$name: port $port is (also) held by pid $p ($(cat /proc/"$p"/comm 2>/dev/null)), not by the server we started (pid $root)"
        fi
    done
    log "$name: port $port belongs to pid(s) $(echo $pids) in the tree of $root"
}

wait_ready() { # wait for 200 on the server's URL while its root process lives
    local name=$1 url=${S_URL[$1]} root=${S_PID[$1]} code copt=()
    [ "${S_H2[$1]:-0}" = 1 ] && copt=(--http2-prior-knowledge)
    for _ in $(seq 1 300); do
        if [ -n "$root" ] && ! kill -0 "$root" 2>/dev/null; then
            log "$name exited during startup; its log:"
            tail -n 30 "${S_DIR[$name]}/log" >&2 2>/dev/null || true
            die "$name did not start"
        fi
        code=$(curl -s "${copt[@]}" -o /dev/null -w '%{http_code}' --max-time 1 "$url" 2>/dev/null || true)
        if [ "$code" = 200 ]; then return 0; fi
        sleep 0.05
    done
    tail -n 30 "${S_DIR[$name]}/log" >&2 2>/dev/null || true
    die "$name: no 200 from $url within 15 s"
}

wait_workers() { # the tree must show the master plus N workers (nginx: N workers, pm2: N apps)
    local name=$1 n
    for _ in $(seq 1 100); do
        n=$(child_pids "${S_PID[$name]}" | wc -l)
        [ "$n" -ge "$WORKERS" ] && return 0
        sleep 0.1
    done
    log "warning: $name has $n worker processes, expected $WORKERS"
}

# ---------------------------------------------------------------- servers
add_server() { # name kind
    SERVERS+=("$1")
    S_KIND[$1]=$2
    S_DIR[$1]=$TMP/$1
    mkdir -m 700 "$TMP/$1" # the control socket's directory must be 0700 (app refuses 0755)
}

APP_BIN=${APP_BIN_ARG:-$TARGET_DIR/release/app}
start_app() {
    local name=$1 dir=${S_DIR[$1]} bin=${S_BIN[$1]:-$APP_BIN} port args=()
    if [ -n "$PORT" ] && [ "$name" = "${SERVERS[0]}" ]; then
        [ -z "$(ss -ltnH "sport = :$PORT")" ] || die "port $PORT is already in use: $(ss -ltnpH "sport = :$PORT")"
        port=$PORT
        USED_PORTS+=("$port")
    else
        pick_port
        port=$PICKED
    fi
    S_PORT[$name]=$port
    S_URL[$name]=http://127.0.0.1:$port/
    S_SOCK[$name]=$dir/control.sock
    args=(serve --bind "127.0.0.1:$port" --workers "$WORKERS")
    if "$bin" serve --help 2>&1 | grep -q -- '--control-socket'; then
        args+=(--control-socket "$dir/control.sock")
    fi
    local envs=(RUNTIME_DIRECTORY="$dir" XDG_RUNTIME_DIR="$dir")
    [ -n "${S_ACCEPT[$name]:-}" ] && envs+=(APP_ACCEPT="${S_ACCEPT[$name]}")
    log "$name: ${envs[*]} $bin ${args[*]} ${APP_ARGS[*]}"
    (cd "$dir" && exec env -u NOTIFY_SOCKET -u LISTEN_FDS -u LISTEN_PID "${envs[@]}" "$bin" "${args[@]}" "${APP_ARGS[@]}") >"$dir/log" 2>&1 &
    S_PID[$name]=$!
}

start_nginx() {
    local name=$1 dir=${S_DIR[$1]}
    pick_port
    S_PORT[$name]=$PICKED
    S_URL[$name]=http://127.0.0.1:$PICKED/
    mkdir -p "$dir/logs"
    local http2=""
    [ "${S_H2[$name]:-0}" = 1 ] && http2=" http2" # nginx 1.22: a plain listener with http2 is h2c, prior knowledge only
    sed -e "s|@PREFIX@|$dir|g" -e "s|@PORT@|$PICKED|g" -e "s|@WORKERS@|$WORKERS|g" -e "s|@HTTP2@|$http2|g" \
        "$HERE/nginx.conf.in" >"$dir/nginx.conf"
    log "$name: $NGINX -p $dir/ -c $dir/nginx.conf -e $dir/error.log -g 'daemon off;'"
    (cd "$dir" && exec "$NGINX" -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;') >"$dir/log" 2>&1 &
    S_PID[$name]=$!
}

start_node() {
    local name=$1 dir=${S_DIR[$1]}
    pick_port
    S_PORT[$name]=$PICKED
    S_URL[$name]=http://127.0.0.1:$PICKED/
    log "$name: NODE_CLUSTER_SCHED_POLICY=${S_POLICY[$name]} PORT=$PICKED WORKERS=$WORKERS node $HERE/node-cluster.js"
    (cd "$dir" && exec env NODE_ENV=production NODE_CLUSTER_SCHED_POLICY="${S_POLICY[$name]}" PORT="$PICKED" \
        WORKERS="$WORKERS" node "$HERE/node-cluster.js") >"$dir/log" 2>&1 &
    S_PID[$name]=$!
}

start_pm2() {
    local name=$1 dir=${S_DIR[$1]}
    pick_port
    S_PORT[$name]=$PICKED
    S_URL[$name]=http://127.0.0.1:$PICKED/
    mkdir -p "$dir/pm2"
    log "$name: PM2_HOME=$dir/pm2 pm2 start $HERE/pm2.config.js (cluster, -i $WORKERS, port $PICKED)"
    (cd "$dir" && PM2_HOME=$dir/pm2 BENCH_PORT=$PICKED BENCH_WORKERS=$WORKERS "$PM2" start "$HERE/pm2.config.js" --no-color) >"$dir/log" 2>&1 ||
        { cat "$dir/log" >&2; die "pm2 start failed"; }
    S_PID[$name]=$(cat "$dir/pm2/pm2.pid")
}

status_json() { # per-worker requests of the project's server, [] when unavailable
    local name=$1 sock=${S_SOCK[$1]:-} bin=${S_BIN[$1]:-${APP_STATUS_BIN:-}}
    [ -n "$sock" ] && [ -n "$bin" ] || { echo '[]'; return; }
    "$bin" status --json --control-socket "$sock" 2>/dev/null |
        jq -c '[.workers[]? | {id: (.id|tostring), pid, requests}] | map(select(.requests != null))' 2>/dev/null || echo '[]'
}

# ---------------------------------------------------------------- which servers
if [ -n "$URL" ]; then
    add_server url url
    S_URL[url]=$URL
    hostport=${URL#*://}
    hostport=${hostport%%/*}
    S_PORT[url]=${hostport##*:}
    if [ -n "$TARGET_PID" ]; then
        S_PID[url]=$TARGET_PID
    else
        pids=$(listener_pids "${S_PORT[url]}")
        for p in $pids; do # the listener whose parent is not a listener: the master
            pp=$(ps -o ppid= -p "$p" | tr -d ' ')
            grep -qx "$pp" <<<"$pids" || { S_PID[url]=$p; break; }
        done
        [ -n "${S_PID[url]:-}" ] && log "url: master pid ${S_PID[url]} (from ss)" || log "url: no local pid found: CPU and memory not measured"
    fi
    if [ -n "$CONTROL_SOCKET" ]; then
        S_SOCK[url]=$CONTROL_SOCKET
        APP_STATUS_BIN=$APP_BIN
    fi
    BUILD=0
fi

want() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

if [ -z "$URL" ] && want app; then
    if [ "$BUILD" = 1 ]; then
        log "cargo build --release"
        (cd "$ROOT" && cargo build --release) >&2 || die "cargo build --release failed"
        if [ -n "$APP_BIN_ARG" ]; then
            (cd "$ROOT" && cargo build --release --examples) >&2 || die "cargo build --release --examples failed"
        fi
    fi
    [ -x "$APP_BIN" ] || die "$APP_BIN not found (build it, or use --url)"
    APP_STATUS_BIN=$APP_BIN
    if [ -n "$ACCEPT" ]; then
        IFS=, read -r -a accepts <<<"$ACCEPT"
        for a in "${accepts[@]}"; do
            add_server "app-$a" app
            S_ACCEPT[app-$a]=$a
        done
    else
        add_server app app
    fi
fi

if [ "$COMPARE" = 1 ]; then
    if want nginx; then
        NGINX=$(command -v nginx || echo /usr/sbin/nginx)
        [ -x "$NGINX" ] || apt_install nginx-light || apt_install nginx || true
        NGINX=$(command -v nginx || echo /usr/sbin/nginx)
        if [ -x "$NGINX" ]; then add_server nginx nginx; else log "nginx unavailable: skipped"; fi
    fi
    if want node-rr || want node-none || want pm2; then
        command -v node >/dev/null || apt_install nodejs npm || true
    fi
    if command -v node >/dev/null; then
        if want node-rr; then add_server node-rr node; S_POLICY[node-rr]=rr; fi
        if want node-none; then add_server node-none node; S_POLICY[node-none]=none; fi
        if want pm2; then
            PM2=$(command -v pm2 || true)
            if [ -z "$PM2" ] && [ -x "$CACHE/npm/node_modules/.bin/pm2" ]; then PM2=$CACHE/npm/node_modules/.bin/pm2; fi
            if [ -z "$PM2" ] && [ "$INSTALL" = 1 ] && command -v npm >/dev/null; then
                log "npm install pm2 into $CACHE/npm"
                mkdir -p "$CACHE/npm"
                (cd "$CACHE/npm" && npm install --prefix . --no-audit --no-fund --loglevel=error pm2) >&2 || true
                [ -x "$CACHE/npm/node_modules/.bin/pm2" ] && PM2=$CACHE/npm/node_modules/.bin/pm2
            fi
            if [ -n "$PM2" ]; then add_server pm2 pm2; else log "pm2 unavailable: skipped"; fi
        fi
    else
        log "node unavailable: Node cluster and PM2 skipped"
    fi
fi
CUR=""                # the project's server that --h2 and --baseline-rev measure
for n in "${SERVERS[@]}"; do
    if [ "${S_KIND[$n]}" = app ] || [ "${S_KIND[$n]}" = url ]; then CUR=$n; break; fi
done

if [ "$H2" = 1 ]; then
    [ -n "$CUR" ] || die "--h2: no project server to bench (check --only)"
    if want nginx || want nginx-h2; then
        NGINX=$(command -v nginx || echo /usr/sbin/nginx)
        [ -x "$NGINX" ] || apt_install nginx-light || apt_install nginx || true
        NGINX=$(command -v nginx || echo /usr/sbin/nginx)
        if [ -x "$NGINX" ] && "$NGINX" -V 2>&1 | grep -q -- '--with-http_v2_module'; then
            add_server nginx-h2 nginx
            S_H2[nginx-h2]=1
            S_NOSWEEP[nginx-h2]=1
        else
            log "nginx with http_v2 unavailable: --h2 runs the project only"
        fi
    fi
fi

BASE_SHA=""
BASE_SUBJECT=""
BASE_BIN=""
build_baseline() { # git worktree of REV under target/bench/baseline/SHA, its own target dir
    local wt log
    BASE_SHA=$(cd "$ROOT" && git rev-parse --verify --quiet "$BASELINE_REV^{commit}") ||
        die "--baseline-rev: '$BASELINE_REV' is not a commit of $ROOT"
    BASE_SUBJECT=$(cd "$ROOT" && git log -1 --format=%s "$BASE_SHA")
    wt=$TARGET_DIR/bench/baseline/$BASE_SHA
    log=$TARGET_DIR/bench/baseline/build-$BASE_SHA.log
    mkdir -p "$TARGET_DIR/bench/baseline"
    # reuse the worktree if it is one (a .git file) at the right commit; else (re)create it
    if [ ! -f "$wt/.git" ] || [ "$(git -C "$wt" rev-parse HEAD 2>/dev/null || true)" != "$BASE_SHA" ]; then
        (cd "$ROOT" && git worktree prune) || true
        rm -rf "$wt"
        log "git worktree add --detach $wt $BASE_SHA"
        (cd "$ROOT" && git worktree add --detach "$wt" "$BASE_SHA") >&2 || die "git worktree add failed"
    fi
    if [ "$BUILD" = 1 ] || [ ! -x "$wt/target/release/app" ]; then
        log "baseline $BASELINE_REV (${BASE_SHA:0:12}): cargo build --release in $wt (log: $log)"
        (cd "$wt" && env -u CARGO_TARGET_DIR cargo build --release) >"$log" 2>&1 ||
            { tail -n 30 "$log" >&2; die "baseline build failed"; }
    fi
    BASE_BIN=$wt/target/release/app
    [ -x "$BASE_BIN" ] || die "$BASE_BIN not found"
    if cmp -s "$BASE_BIN" "${S_BIN[$CUR]:-$APP_BIN}"; then log "warning: the baseline binary is identical to the current one"; fi
}
if [ -n "$BASELINE_REV" ]; then
    [ -n "$CUR" ] || die "--baseline-rev: no project server to compare (check --only)"
    build_baseline
    add_server baseline app
    S_BIN[baseline]=$BASE_BIN
    S_NOSWEEP[baseline]=1
fi
[ "${#SERVERS[@]}" -gt 0 ] || die "no server to bench"
SWEEP=()
for n in "${SERVERS[@]}"; do [ "${S_NOSWEEP[$n]:-0}" = 1 ] || SWEEP+=("$n"); done

# ---------------------------------------------------------------- start them all
for n in "${SERVERS[@]}"; do
    case ${S_KIND[$n]} in
    app) start_app "$n" ;;
    nginx) start_nginx "$n" ;;
    node) start_node "$n" ;;
    pm2) start_pm2 "$n" ;;
    url) continue ;;
    esac
    wait_ready "$n"
    wait_workers "$n"
    check_owner "$n"
done
for n in "${SERVERS[@]}"; do
    if [ "${S_KIND[$n]}" = app ] || [ "${S_KIND[$n]}" = url ]; then
        if [ "$(status_json "$n")" != '[]' ]; then S_STATUS[$n]=1; else S_STATUS[$n]=0; fi
        if [ "${S_KIND[$n]}" = app ] && [ "${S_STATUS[$n]}" = 0 ]; then
            log "$n: \`app status --json\` gives no per-worker requests yet: fairness from a sample of X-Worker headers"
        fi
    fi
done

sleep 1 # settle before measuring idle memory
for n in "${SERVERS[@]}"; do
    [ -n "${S_PID[$n]:-}" ] || continue
    jq -cn --arg server "$n" --argjson mem "$(mem_json "${S_PID[$n]}")" \
        --argjson workers "$(child_pids "${S_PID[$n]}" | wc -l)" \
        '{server: $server, workers: $workers} + $mem' >>"$IDLE"
done

# ---------------------------------------------------------------- one load run
xworker_sample() { # counts of X-Worker over 200 fresh connections -> {"id": n}
    curl -s -o /dev/null -H 'Connection: close' --max-time 10 -w '%header{x-worker}\n' "$1?bench_sample=[1-200]" 2>/dev/null |
        jq -Rsc 'split("\n") | map(select(length > 0)) | group_by(.) | map({key: .[0], value: length}) | from_entries' || echo '{}'
}

do_event() { # one reload or chaos action against a server
    local name=$1 what=$2 root=${S_PID[$1]} victims v
    case $what in
    reload)
        if [ "${S_KIND[$name]}" = pm2 ]; then
            PM2_HOME=${S_DIR[$name]}/pm2 "$PM2" reload bench >/dev/null 2>&1 || true
        else
            kill -HUP "$root" 2>/dev/null || true
        fi
        ;;
    chaos)
        mapfile -t victims < <(child_pids "$root")
        [ "${#victims[@]}" -gt 0 ] || return 0
        v=${victims[RANDOM % ${#victims[@]}]}
        kill -KILL "$v" 2>/dev/null || true
        ;;
    esac
}

event_loop() { # do_event every second while wrk runs; prints the number of events
    local name=$1 what=$2 dur=$3 n=0 end
    end=$((SECONDS + dur - 1))
    sleep 0.5
    while [ "$SECONDS" -lt "$end" ]; do
        do_event "$name" "$what"
        n=$((n + 1))
        sleep 1
    done
    echo "$n"
}

run_load() { # name mode conns duration [event] -> appends a JSON object to RESULTS or EVENTS
    local name=$1 mode=$2 conns=$3 dur=$4 event=${5:-} root=${S_PID[$1]:-} url=${S_URL[$1]}
    local threads=$WRK_THREADS base=$TMP/$1.$2.$3${5:+.$5}${RUN_REP:+.r$RUN_REP}
    local hdr=() t0=null t1=null w0='{}' w1='{}' s0='[]' s1='[]' memf=$base.mem xwf=$base.xw evf=$base.ev
    local bgs=() wrkjson rc=0 pids
    [ "$threads" -le "$conns" ] || threads=$conns
    [ "$mode" = close ] && hdr=(-H 'Connection: close')
    echo '{}' >"$memf"
    echo 'null' >"$xwf"
    echo 0 >"$evf"
    if [ -n "$root" ]; then
        pids=$(tree_pids "$root")
        t0=$(cpu_ticks $pids)
        w0=$(proc_ticks_json $(child_pids "$root"))
        (sleep "$(awk -v d="$dur" 'BEGIN { print d * 0.6 }')" && mem_json "$root" >"$memf") &
        bgs+=($!)
    fi
    if [ "${S_STATUS[$name]:-0}" = 1 ]; then
        s0=$(status_json "$name")
    elif [ "${S_KIND[$name]}" = app ] && [ -z "$event" ] && [ -z "${RUN_REP:-}" ]; then
        (sleep "$(awk -v d="$dur" 'BEGIN { print d * 0.3 }')" && xworker_sample "$url" >"$xwf") &
        bgs+=($!)
    fi
    if [ -n "$event" ]; then
        event_loop "$name" "$event" "$dur" >"$evf" &
        bgs+=($!)
    fi
    BG_PIDS=("${bgs[@]}")
    wrk -t"$threads" -c"$conns" -d"${dur}s" --timeout "$WRK_TIMEOUT" -s "$HERE/wrk-report.lua" "${hdr[@]}" "$url" >"$base.wrk" 2>&1 || rc=$?
    for p in "${bgs[@]}"; do wait "$p" 2>/dev/null || true; done
    BG_PIDS=()
    if [ -n "$root" ]; then
        if [ "$event" = chaos ] || [ "$event" = reload ]; then sleep 1.5; fi # let the pool heal before reading it
        pids=$(tree_pids "$root")
        t1=$(cpu_ticks $pids)
        w1=$(proc_ticks_json $(child_pids "$root"))
    fi
    [ "${S_STATUS[$name]:-0}" = 1 ] && s1=$(status_json "$name")
    wrkjson=$(sed -n 's/^WRKJSON //p' "$base.wrk" | tail -n 1)
    if [ -z "$wrkjson" ]; then
        log "$name $mode c=$conns: wrk failed (rc $rc):"
        sed 's/^/    /' "$base.wrk" >&2
        wrkjson='{"requests":0,"duration_us":1,"err_connect":0,"err_read":0,"err_write":0,"err_timeout":0,"err_status":0}'
    fi
    local alive=true outf=${RUN_OUT:-$RESULTS}
    [ -n "$event" ] && outf=$EVENTS
    [ -z "$root" ] || kill -0 "$root" 2>/dev/null || alive=false
    jq -cn --arg server "$name" --arg mode "$mode" --argjson conns "$conns" --argjson threads "$threads" \
        --argjson dur "$dur" --arg event "$event" --argjson w "$wrkjson" --argjson t0 "$t0" --argjson t1 "$t1" \
        --argjson clk "$CLK_TCK" --argjson w0 "$w0" --argjson w1 "$w1" --argjson s0 "$s0" --argjson s1 "$s1" \
        --argjson mem "$(cat "$memf")" --argjson xw "$(cat "$xwf")" --argjson events "$(cat "$evf")" \
        --argjson alive "$alive" --argjson rep "${RUN_REP:-null}" --argjson nworkers "$( [ -n "$root" ] && child_pids "$root" | wc -l || echo null)" '
        def jain: if length == 0 then null else (add) as $s | (map(. * .) | add) as $q
                  | if $q == 0 then null else ($s * $s) / (length * $q) end end;
        ($w.err_connect + $w.err_read + $w.err_write + $w.err_timeout) as $sock
        | ($w.requests / ($w.duration_us / 1e6)) as $rps
        | (if $t0 != null and $t1 != null and $w.requests > 0
             then ($t1 - $t0) / $clk * 1e6 / $w.requests else null end) as $cpu
        # per-worker requests: deltas of `app status --json`, matched by worker id and pid
        | ([$s1[] as $b | ($s0[] | select(.id == $b.id and .pid == $b.pid) | .requests) as $a
            | {id: $b.id, requests: ($b.requests - $a)}]) as $req
        | (if ($req | length) > 0 then {src: "status", counts: ($req | map(.requests))}
           elif $xw != null and ($xw | length) > 0 then {src: "x-worker sample", counts: ($xw | to_entries | sort_by(.key) | map(.value))}
           else {src: null, counts: []} end) as $fr
        | ([$w1 | to_entries[] | select($w0[.key] != null) | .value - $w0[.key]]) as $wcpu
        | {server: $server, mode: $mode, keepalive: ($mode == "ka"), conns: $conns, wrk_threads: $threads,
           rep: $rep,
           duration_s: ($w.duration_us / 1e6), event: (if $event == "" then null else $event end), events: $events,
           requests: $w.requests, rps: $rps,
           p50_ms: (if $w.lat_p50_us then $w.lat_p50_us / 1000 else null end),
           p90_ms: (if $w.lat_p90_us then $w.lat_p90_us / 1000 else null end),
           p99_ms: (if $w.lat_p99_us then $w.lat_p99_us / 1000 else null end),
           p999_ms: (if $w.lat_p999_us then $w.lat_p999_us / 1000 else null end),
           max_ms: (if $w.lat_max_us then $w.lat_max_us / 1000 else null end),
           errors: ($w.err_status + $sock), err_status: $w.err_status, err_socket: $sock,
           err_detail: {connect: $w.err_connect, read: $w.err_read, write: $w.err_write, timeout: $w.err_timeout},
           cpu_s: (if $t0 != null and $t1 != null then ($t1 - $t0) / $clk else null end),
           cpu_us_per_req: $cpu,
           loaded_rss_kb: $mem.rss_kb, loaded_pss_kb: $mem.pss_kb,
           worker_requests: $fr.counts, fairness_src: $fr.src, fairness_req: ($fr.counts | jain),
           worker_cpu_ticks: $wcpu, fairness_cpu: (if ($wcpu | add // 0) > 0 then ($wcpu | jain) else null end),
           alive_after: $alive, workers_after: $nworkers}' >>"$outf"
    local last
    last=$(tail -n 1 "$outf")
    log "$(jq -r '"\(.server) \(.mode) c=\(.conns)\(if .event then " " + .event + " x\(.events)" else "" end): \(.rps | floor) req/s, p99 \(.p99_ms) ms, errors \(.errors), cpu \(.cpu_us_per_req // "-" | if type == "number" then (. * 10 | round / 10 | tostring) else . end) us/req"' <<<"$last")"
}

# ---------------------------------------------------------------- the runs
log "servers: ${SWEEP[*]}; workers $WORKERS; ${DURATION}s per run; conns ${CONNS}; modes ${MODES}"
for mode in "${MODE_LIST[@]}"; do
    for c in "${CONN_LIST[@]}"; do
        for n in "${SWEEP[@]}"; do # interleaved: every server sees the same moment's noise
            run_load "$n" "$mode" "$c" "$DURATION"
            sleep 0.5
        done
    done
done
# ---------------------------------------------------------------- --h2: h2load, alternating
h2_time_ms() { # h2load's "123us" / "4.56ms" / "1.2s" -> ms
    awk -v v="$1" 'BEGIN { if (v ~ /us$/) m = v / 1000; else if (v ~ /ms$/) m = v + 0; else if (v ~ /s$/) m = v * 1000; else m = -1
        if (m < 0) print "null"; else printf "%.4f\n", m }'
}
run_h2() { # name rep -> appends a JSON object to H2RUNS
    local name=$1 rep=$2 root=${S_PID[$1]:-} url=${S_URL[$1]} t0=null t1=null pids out rc=0
    local threads=$WRK_THREADS
    [ "$threads" -le "$H2_CONNS" ] || threads=$H2_CONNS
    out=$TMP/$name.h2.r$rep.out
    if [ -n "$root" ]; then pids=$(tree_pids "$root"); t0=$(cpu_ticks $pids); fi
    # duration-based, no warm-up inside the measured run (run_h2_warm does that), so the
    # server's CPU delta and the request count cover the same interval
    h2load -t "$threads" -c "$H2_CONNS" -m "$H2_STREAMS" -D "$DURATION" "$url" >"$out" 2>&1 || rc=$?
    if [ -n "$root" ]; then pids=$(tree_pids "$root"); t1=$(cpu_ticks $pids); fi
    local fin reqs codes tfr proto secs rps total ndone ok failed errored timeout mean sd max
    fin=$(grep -m1 '^finished in' "$out" || true)     # finished in 5.00s, 97260.40 req/s, 3.62MB/s
    reqs=$(grep -m1 '^requests:' "$out" || true)      # requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
    codes=$(grep -m1 '^status codes:' "$out" || true) # status codes: N 2xx, N 3xx, N 4xx, N 5xx
    tfr=$(grep -m1 '^time for request:' "$out" || true)
    proto=$(sed -n 's/^Application protocol: *//p' "$out" | head -n 1)
    if [ -z "$fin" ] || [ -z "$reqs" ]; then
        log "$name h2 run $rep: h2load failed (rc $rc):"
        sed 's/^/    /' "$out" >&2
        fin="finished in 1s, 0 req/s, 0B/s"
        reqs="requests: 0 total, 0 started, 0 done, 0 succeeded, 0 failed, 0 errored, 0 timeout"
    fi
    secs=$(awk '{ v = $3; sub(/s,$/, "", v); print v + 0 }' <<<"$fin")
    rps=$(awk '{ print $4 + 0 }' <<<"$fin")
    read -r total ndone ok failed errored timeout < <(awk -F'[:,] *' '{ for (i = 2; i <= NF; i++) { split($i, a, " "); v[a[2]] = a[1] + 0 }
        print v["total"] + 0, v["done"] + 0, v["succeeded"] + 0, v["failed"] + 0, v["errored"] + 0, v["timeout"] + 0 }' <<<"$reqs")
    local c2=0 c3=0 c4=0 c5=0
    [ -n "$codes" ] && read -r c2 c3 c4 c5 < <(awk -F'[:,] *' '{ print $2 + 0, $3 + 0, $4 + 0, $5 + 0 }' <<<"$codes")
    mean=null sd=null max=null
    if [ -n "$tfr" ]; then # time for request: min max mean sd +/-sd
        read -r _ _ _ _ max mean sd _ <<<"$tfr"
        max=$(h2_time_ms "$max"); mean=$(h2_time_ms "$mean"); sd=$(h2_time_ms "$sd")
    fi
    jq -cn --arg server "$name" --argjson rep "$rep" --arg proto "$proto" --argjson secs "$secs" --argjson rps "$rps" \
        --argjson total "$total" --argjson ndone "$ndone" --argjson ok "$ok" --argjson failed "$failed" \
        --argjson errored "$errored" --argjson timeout "$timeout" --argjson c2 "$c2" --argjson c3 "$c3" \
        --argjson c4 "$c4" --argjson c5 "$c5" --argjson mean "$mean" --argjson sd "$sd" --argjson max "$max" \
        --argjson t0 "$t0" --argjson t1 "$t1" --argjson clk "$CLK_TCK" \
        --argjson conns "$H2_CONNS" --argjson streams "$H2_STREAMS" --argjson threads "$threads" '
        {server: $server, rep: $rep, protocol: $proto, conns: $conns, streams: $streams, h2load_threads: $threads,
         duration_s: $secs, requests: $ndone, succeeded: $ok, rps: $rps,
         failed: $failed, errored: $errored, timeout: $timeout,
         errors: ($failed + $errored + $timeout + $c3 + $c4 + $c5), status: {"2xx": $c2, "3xx": $c3, "4xx": $c4, "5xx": $c5},
         mean_ms: $mean, sd_ms: $sd, max_ms: $max,
         cpu_s: (if $t0 != null and $t1 != null then ($t1 - $t0) / $clk else null end),
         cpu_us_per_req: (if $t0 != null and $t1 != null and $ndone > 0 then ($t1 - $t0) / $clk * 1e6 / $ndone else null end)}' >>"$H2RUNS"
    [ "$ok" -gt 0 ] || log "warning: $name h2 run $rep: no request succeeded (does the server speak h2c with prior knowledge?)"
    log "$(tail -n 1 "$H2RUNS" | jq -r '"\(.server) h2 run \(.rep) (\(.protocol)): \(.rps | floor) req/s, mean \(.mean_ms) ms, errors \(.errors), cpu \(.cpu_us_per_req // "-" | if type == "number" then (. * 10 | round / 10 | tostring) else . end) us/req"')"
}
run_h2_warm() { # 1 s untimed h2 load, so the first measured run is not a cold one
    h2load -t 1 -c "$H2_CONNS" -m "$H2_STREAMS" -D 1 "${S_URL[$1]}" >"$TMP/$1.h2.warm" 2>&1 ||
        { log "$1: h2load warm-up failed:"; sed 's/^/    /' "$TMP/$1.h2.warm" >&2; }
}
if [ "$H2" = 1 ]; then
    H2_SERVERS=("$CUR")
    [ -n "${S_KIND[nginx-h2]:-}" ] && H2_SERVERS+=(nginx-h2)
    log "--h2: ${H2_SERVERS[*]}; h2load -c $H2_CONNS -m $H2_STREAMS -D $DURATION, $PAIR_RUNS runs each, alternating"
    for n in "${H2_SERVERS[@]}"; do run_h2_warm "$n"; done
    for r in $(seq 1 "$PAIR_RUNS"); do
        for n in "${H2_SERVERS[@]}"; do
            run_h2 "$n" "$r"
            sleep 0.5
        done
    done
fi

# ---------------------------------------------------------------- --baseline-rev: before/after
if [ -n "$BASELINE_REV" ]; then
    log "--baseline-rev $BASELINE_REV (${BASE_SHA:0:12}): $CUR vs baseline, c=$PAIR_CONNS, ka and close, $PAIR_RUNS runs each, alternating"
    for n in "$CUR" baseline; do # warm both the same way: 1 s of keep-alive load
        wrk -t"$WRK_THREADS" -c"$PAIR_CONNS" -d1s "${S_URL[$n]}" >/dev/null 2>&1 || true
    done
    for r in $(seq 1 "$PAIR_RUNS"); do
        for mode in ka close; do
            for n in "$CUR" baseline; do
                RUN_OUT=$PAIRS RUN_REP=$r run_load "$n" "$mode" "$PAIR_CONNS" "$DURATION"
                sleep 0.5
            done
        done
    done
fi

for ev in reload chaos; do
    [ "$ev" = reload ] && [ "$RELOAD" = 0 ] && continue
    [ "$ev" = chaos ] && [ "$CHAOS" = 0 ] && continue
    for mode in "${MODE_LIST[@]}"; do
        for n in "${SWEEP[@]}"; do
            [ -n "${S_PID[$n]:-}" ] || { log "$n: no pid, --$ev skipped"; continue; }
            run_load "$n" "$mode" "$EVENT_CONNS" "$EVENT_DURATION" "$ev"
            sleep 0.5
        done
    done
done

# ---------------------------------------------------------------- report
meta=$(jq -cn \
    --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --arg cpu "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)" \
    --argjson nproc "$(nproc)" \
    --arg kernel "$(uname -sr)" \
    --arg mem "$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)" \
    --arg git "$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$ROOT" && git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo -dirty)" \
    --arg wrk "$(wrk -v 2>&1 | head -n 1 | awk '{ print $2 }')" \
    --arg nginx "$( [ -n "${NGINX:-}" ] && "$NGINX" -v 2>&1 | sed 's|.*/||' || true)" \
    --arg node "$(command -v node >/dev/null && node --version || true)" \
    --arg pm2 "$( [ -n "${PM2:-}" ] && PM2_HOME=$TMP/pm2-version "$PM2" --version 2>/dev/null | tail -n 1 || true)" \
    --arg h2load "$( [ "$H2" = 1 ] && h2load --version 2>/dev/null | awk '{ print $2; exit }' || true)" \
    --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
    --argjson workers "$WORKERS" --argjson duration "$DURATION" --argjson threads "$WRK_THREADS" \
    --arg cmd "scripts/bench.sh $ORIG_ARGS" \
    '{date: $date, cpu: $cpu, nproc: $nproc, kernel: $kernel, memory: $mem, git: $git, workers: $workers,
      command: $cmd, duration_s: $duration, wrk_threads: $threads, loadavg_at_end: $load,
      versions: {wrk: $wrk, nginx: $nginx, node: $node, pm2: $pm2, h2load: $h2load}}')

# ratios and targets are computed from the runs by one jq program
REPORT=$OUT/results.json
jq -n --argjson meta "$meta" --slurpfile idle "$IDLE" --slurpfile runs "$RESULTS" --slurpfile events "$EVENTS" \
    --slurpfile h2runs "$H2RUNS" --slurpfile pairs "$PAIRS" --argjson h2on "$H2" \
    --arg cur "$CUR" --arg brev "$BASELINE_REV" --arg bsha "$BASE_SHA" --arg bsubj "$BASE_SUBJECT" --arg bbin "$BASE_BIN" \
    --argjson pconns "$PAIR_CONNS" --argjson nruns "$PAIR_RUNS" --argjson h2c "$H2_CONNS" --argjson h2m "$H2_STREAMS" '
    def r3: if . == null then null else (. * 1000 | round) / 1000 end;
    def median: map(select(. != null)) | sort | length as $n
        | if $n == 0 then null elif $n % 2 == 1 then .[($n - 1) / 2] else (.[$n / 2 - 1] + .[$n / 2]) / 2 end;
    def ratio($a; $b): if $a == null or $b == null or $b == 0 then null else ($a / $b) | r3 end;
    def find($s; $m; $c): first($runs[] | select(.server == $s and .mode == $m and .conns == $c)) // null;
    ($runs | map(.server) | unique) as $names
    | ($names | map(select(test("^(app|url)")))) as $apps
    | ($names | map(select(test("^(app|url)") | not))) as $refs
    | ([$apps[] as $a | $refs[] as $r | $runs[] | select(.server == $a) as $x
        | find($r; $x.mode; $x.conns) as $y | select($y != null)
        | {app: $a, ref: $r, mode: $x.mode, conns: $x.conns,
           rps: ratio($x.rps; $y.rps), cpu_us_per_req: ratio($x.cpu_us_per_req; $y.cpu_us_per_req),
           p99: ratio($x.p99_ms; $y.p99_ms)}]) as $ratios
    | ([$apps[] as $a
        | find($a; "ka"; 64) as $k | find($a; "close"; 64) as $cl
        | find("nginx"; "ka"; 64) as $nk | find("nginx"; "close"; 64) as $nc
        | find("node-rr"; "ka"; 64) as $rr | find("node-none"; "ka"; 64) as $nn
        | first($idle[] | select(.server == $a)) as $id
        | ( {target: "server CPU per request <= nginx (ka, 64)", value: ratio($k.cpu_us_per_req; $nk.cpu_us_per_req), goal: "<= 1", ok: (ratio($k.cpu_us_per_req; $nk.cpu_us_per_req) | if . == null then null else . <= 1 end)},
            {target: "req/s >= nginx (ka, 64)", value: ratio($k.rps; $nk.rps), goal: ">= 1", ok: (ratio($k.rps; $nk.rps) | if . == null then null else . >= 1 end)},
            {target: "req/s >= 1.6x Node cluster rr (ka, 64)", value: ratio($k.rps; $rr.rps), goal: ">= 1.6", ok: (ratio($k.rps; $rr.rps) | if . == null then null else . >= 1.6 end)},
            {target: "req/s >= 1.6x Node cluster none (ka, 64)", value: ratio($k.rps; $nn.rps), goal: ">= 1.6", ok: (ratio($k.rps; $nn.rps) | if . == null then null else . >= 1.6 end)},
            {target: "p99 <= 3 ms (ka, 64)", value: ($k.p99_ms | r3), goal: "<= 3 ms", ok: ($k.p99_ms | if . == null then null else . <= 3 end)},
            {target: "no keep-alive conn/s >= 0.9x nginx (close, 64)", value: ratio($cl.rps; $nc.rps), goal: ">= 0.9", ok: (ratio($cl.rps; $nc.rps) | if . == null then null else . >= 0.9 end)},
            {target: "fairness (Jain, requests) >= 0.95 (ka, 64)", value: ($k.fairness_req | r3), goal: ">= 0.95", ok: ($k.fairness_req | if . == null then null else . >= 0.95 end), note: $k.fairness_src},
            {target: "idle RSS master + \($id.workers) workers <= 8 MiB", value: (if $id.rss_kb then ($id.rss_kb / 1024 | r3) else null end), goal: "<= 8 MiB", ok: (if $id.rss_kb then $id.rss_kb <= 8192 else null end)}
          ) | . + {app: $a}]) as $targets
    | (if $h2on == 1 then
        ($h2runs | group_by(.server) | map({server: .[0].server, protocol: .[0].protocol, runs: length,
            rps_median: (map(.rps) | median), rps_min: (map(.rps) | min), rps_max: (map(.rps) | max),
            cpu_us_per_req_median: (map(.cpu_us_per_req) | median), mean_ms_median: (map(.mean_ms) | median),
            errors: (map(.errors) | add)})) as $sum
        | (first($sum[] | select(.server == $cur)) // null) as $a
        | (first($sum[] | select(.server == "nginx-h2")) // null) as $n
        | {params: {tool: "h2load", mode: "h2c prior knowledge", conns: $h2c, streams_per_conn: $h2m,
                    duration_s: $meta.duration_s, runs_per_server: $nruns, order: "alternating"},
           runs: $h2runs, summary: $sum,
           ratio: {app: $cur, ref: "nginx-h2", rps: ratio($a.rps_median; $n.rps_median),
                   cpu_us_per_req: ratio($a.cpu_us_per_req_median; $n.cpu_us_per_req_median)}}
       else null end) as $h2
    | (if $brev != "" then
        ($pairs | group_by(.server, .mode) | map({server: .[0].server, mode: .[0].mode, conns: .[0].conns, runs: length,
            rps_median: (map(.rps) | median), rps_min: (map(.rps) | min), rps_max: (map(.rps) | max),
            cpu_us_per_req_median: (map(.cpu_us_per_req) | median), p99_ms_median: (map(.p99_ms) | median),
            errors: (map(.errors) | add)})) as $sum
        | {rev: $brev, sha: $bsha, subject: $bsubj, binary: $bbin, current: $cur, current_git: $meta.git,
           params: {conns: $pconns, wrk_threads: $meta.wrk_threads, duration_s: $meta.duration_s, runs_per_server: $nruns, order: "alternating"},
           runs: $pairs, summary: $sum,
           ratios: [("ka", "close") as $m
             | (first($sum[] | select(.server == $cur and .mode == $m)) // null) as $c
             | (first($sum[] | select(.server == "baseline" and .mode == $m)) // null) as $b
             | select($c != null and $b != null)
             | ratio($c.rps_median; $b.rps_median) as $rr | ratio($c.cpu_us_per_req_median; $b.cpu_us_per_req_median) as $cr
             | {mode: $m, conns: $pconns, rps: $rr, cpu_us_per_req: $cr,
                rps_ok: (if $rr == null then null else $rr >= 0.97 end),
                cpu_ok: (if $cr == null then null else $cr <= 1.03 end)}]}
       else null end) as $base
    | {meta: $meta, idle: $idle, runs: $runs, events: $events, ratios: $ratios, targets: $targets}
      + (if $h2 != null then {h2: $h2} else {} end) + (if $base != null then {baseline: $base} else {} end)' >"$REPORT"
[ -n "$JSON_OUT" ] && { mkdir -p "$(dirname "$JSON_OUT")"; cp "$REPORT" "$JSON_OUT"; }

table() { # TSV on stdin -> aligned columns
    awk -F'\t' '{ for (i = 1; i <= NF; i++) { c[NR, i] = $i; if (length($i) > w[i]) w[i] = length($i) } if (NF > nf) nf = NF; n = NR }
        END { for (r = 1; r <= n; r++) { line = ""; for (i = 1; i <= nf; i++) line = line (i < nf ? sprintf("%-" w[i] "s  ", c[r, i]) : c[r, i]); sub(/ +$/, "", line); print line } }'
}

{
    echo
    echo "== $(jq -r '.meta | "\(.cpu), \(.nproc) CPUs, \(.memory), \(.kernel); wrk \(.versions.wrk) -t\(.wrk_threads), \(.duration_s) s per run, \(.workers) workers; git \(.git)"' "$REPORT")"
    echo
    echo "-- load runs (errors = non-2xx + socket errors; CPU = master+workers utime+stime per request; memory at 60% of the run)"
    jq -r '
        def f($d): if . == null then "-" else (. * pow(10; $d) | round / pow(10; $d) | tostring) end;
        (["server", "keep-alive", "conns", "req/s", "p50 ms", "p99 ms", "errors", "CPU us/req", "RSS MiB", "PSS MiB", "fair(req)", "fair(cpu)", "per-worker requests"] | @tsv),
        (.runs | sort_by(.mode != "ka", .conns) | .[]
         | [.server, (if .keepalive then "yes" else "no" end), .conns, (.rps | floor), (.p50_ms | f(3)), (.p99_ms | f(3)),
            .errors, (.cpu_us_per_req | f(1)), (if .loaded_rss_kb then .loaded_rss_kb / 1024 else null end | f(1)),
            (if .loaded_pss_kb then .loaded_pss_kb / 1024 else null end | f(1)), (.fairness_req | f(3)), (.fairness_cpu | f(3)),
            (if (.worker_requests | length) > 0 then (.worker_requests | map(tostring) | join("/")) + (if .fairness_src == "status" then "" else " (" + .fairness_src + ")" end) else "-" end)]
         | @tsv)' "$REPORT" | table
    echo
    echo "-- idle memory (master + workers, after start, before load)"
    jq -r '(["server", "processes", "RSS MiB", "PSS MiB"] | @tsv),
        (.idle[] | [.server, .procs, (if .rss_kb then (.rss_kb / 1024 * 100 | round / 100) else "-" end), (if .pss_kb then (.pss_kb / 1024 * 100 | round / 100) else "-" end)] | @tsv)' "$REPORT" | table
    if [ "$(jq '.ratios | length' "$REPORT")" -gt 0 ]; then
        echo
        echo "-- ratios project/reference (req/s: >1 is better; CPU us/req and p99: <1 is better)"
        jq -r '(["project", "reference", "keep-alive", "conns", "req/s", "CPU/req", "p99"] | @tsv),
            (.ratios | sort_by(.ref, .mode != "ka", .conns) | .[] | [.app, .ref, (if .mode == "ka" then "yes" else "no" end), .conns, (.rps // "-"), (.cpu_us_per_req // "-"), (.p99 // "-")] | @tsv)' "$REPORT" | table
    fi
    if [ "$(jq '.events | length' "$REPORT")" -gt 0 ]; then
        echo
        echo "-- --reload / --chaos (failed = non-2xx + socket errors)"
        jq -r '(["server", "event", "keep-alive", "conns", "events", "requests", "failed", "non-2xx", "connect", "read", "write", "timeout", "req/s", "workers after", "alive"] | @tsv),
            (.events[] | [.server, .event, (if .keepalive then "yes" else "no" end), .conns, .events, .requests, .errors, .err_status,
              .err_detail.connect, .err_detail.read, .err_detail.write, .err_detail.timeout, (.rps | floor), (.workers_after // "-"), .alive_after] | @tsv)' "$REPORT" | table
    fi
    if [ "$(jq '.h2 != null' "$REPORT")" = true ]; then
        echo
        jq -r '.h2.params | "-- HTTP/2 h2c (prior knowledge): h2load -c \(.conns) -m \(.streams_per_conn) -D \(.duration_s), \(.runs_per_server) runs per server, alternating; medians"' "$REPORT"
        jq -r 'def f($d): if . == null then "-" else (. * pow(10; $d) | round / pow(10; $d) | tostring) end;
            (["server", "protocol", "runs", "req/s median", "min", "max", "mean ms", "CPU us/req", "errors", "req/s per run"] | @tsv),
            (.h2.summary[] as $s | [$s.server, $s.protocol, $s.runs, ($s.rps_median | floor), ($s.rps_min | floor), ($s.rps_max | floor),
              ($s.mean_ms_median | f(3)), ($s.cpu_us_per_req_median | f(2)), $s.errors,
              ([.h2.runs[] | select(.server == $s.server) | .rps | floor | tostring] | join(" "))] | @tsv)' "$REPORT" | table
        jq -r '.h2.ratio | "ratio \(.app)/nginx (h2): req/s \(.rps // "-"), CPU/req \(.cpu_us_per_req // "-")"' "$REPORT"
    fi
    if [ "$(jq '.baseline != null' "$REPORT")" = true ]; then
        echo
        jq -r '.baseline | "-- before/after: \(.current) (git \(.current_git)) vs baseline \(.rev) = \(.sha[0:12]) \"\(.subject)\"; wrk -c\(.params.conns) -t\(.params.wrk_threads), \(.params.duration_s) s, \(.params.runs_per_server) runs each, alternating; medians"' "$REPORT"
        jq -r 'def f($d): if . == null then "-" else (. * pow(10; $d) | round / pow(10; $d) | tostring) end;
            (["server", "keep-alive", "conns", "runs", "req/s median", "min", "max", "CPU us/req", "p99 ms", "errors", "req/s per run"] | @tsv),
            (. as $r | $r.baseline.summary | sort_by(.mode != "ka", .server == "baseline") | .[] as $s
             | [$s.server, (if $s.mode == "ka" then "yes" else "no" end), $s.conns, $s.runs, ($s.rps_median | floor), ($s.rps_min | floor),
                ($s.rps_max | floor), ($s.cpu_us_per_req_median | f(2)), ($s.p99_ms_median | f(3)), $s.errors,
                ([$r.baseline.runs[] | select(.server == $s.server and .mode == $s.mode) | .rps | floor | tostring] | join(" "))] | @tsv)' "$REPORT" | table
        jq -r '(["current/baseline", "keep-alive", "req/s", "req/s >= 0.97", "CPU/req", "CPU/req <= 1.03"] | @tsv),
            (.baseline.ratios[] | ["", (if .mode == "ka" then "yes" else "no" end), (.rps // "-"),
              (if .rps_ok == null then "-" elif .rps_ok then "yes" else "NO" end), (.cpu_us_per_req // "-"),
              (if .cpu_ok == null then "-" elif .cpu_ok then "yes" else "NO" end)] | @tsv)' "$REPORT" | table
    fi
    if [ "$(jq '[.targets[] | select(.value != null)] | length' "$REPORT")" -gt 0 ]; then
        echo
        echo "-- issue-6 targets (one run, 2 workers, 64 connections)"
        jq -r '(["project", "target", "value", "goal", "met"] | @tsv),
            (.targets[] | select(.value != null) | [.app, .target, .value, .goal, (if .ok == null then "-" elif .ok then "yes" else "NO" end)] | @tsv)' "$REPORT" | table
    fi
    echo
} | tee "$OUT/results.txt"

# ---------------------------------------------------------------- plot
if command -v gnuplot >/dev/null; then
    mkdir -p "$OUT/plot"
    names=$(jq -r '.runs | map(.server) | unique | .[]' "$REPORT")
    for n in $names; do
        jq -r --arg s "$n" '
            [.runs[] | select(.server == $s)] as $r
            | ($r | map(.conns) | unique)[] as $c
            | [$c,
               (first($r[] | select(.conns == $c and .mode == "ka") | .rps) // "NaN"),
               (first($r[] | select(.conns == $c and .mode == "ka") | .p99_ms) // "NaN"),
               (first($r[] | select(.conns == $c and .mode == "close") | .rps) // "NaN"),
               (first($r[] | select(.conns == $c and .mode == "close") | .p99_ms) // "NaN")]
            | map(tostring) | join(" ")' "$REPORT" >"$OUT/plot/$n.dat"
    done
    title=$(jq -r '.meta | "scripts/bench.sh: \(.workers) workers each, wrk -t\(.wrk_threads), \(.duration_s) s per point; \(.cpu), \(.nproc) CPUs (git \(.git))"' "$REPORT")
    if gnuplot -e "outfile='$OUT/bench.png'; datadir='$OUT/plot'; servers='$(echo $names)'; title='${title//\'/}'" "$HERE/plot.gp" 2>"$TMP/gnuplot.err"; then
        log "plot: $OUT/bench.png"
        if [ -n "$PNG_COPY" ]; then mkdir -p "$(dirname "$PNG_COPY")"; cp "$OUT/bench.png" "$PNG_COPY"; log "plot copied to $PNG_COPY"; fi
    else
        log "gnuplot failed:"
        cat "$TMP/gnuplot.err" >&2
    fi
fi
log "results: $REPORT (table: $OUT/results.txt)${JSON_OUT:+, copied to $JSON_OUT}"
if [ "$ACCESS_LOG" = 1 ]; then
    log "access log cost (scripts/bench/access-log-cost.sh)"
    "$HERE/access-log-cost.sh" "$APP_BIN" "$DURATION" "$PAIR_RUNS" | tee -a "$OUT/results.txt"
fi
if [ "$METRICS_COST" = 1 ]; then
    log "metrics cost (scripts/bench/metrics-cost.sh)"
    OUT=$OUT BYPASS_BUILD=1 "$HERE/metrics-cost.sh" "$APP_BIN" "$DURATION" "$PAIR_RUNS" | tee -a "$OUT/results.txt"
    log "metrics dashboard (scripts/bench/metrics-dashboard.sh)"
    "$HERE/metrics-dashboard.sh" "$APP_BIN" "$OUT/metrics.png"
fi
if [ "$TLS_BENCH" = 1 ]; then
    log "TLS against nginx (scripts/bench/tls-bench.sh)"
    "$HERE/tls-bench.sh" "$APP_BIN" "$DURATION" "$PAIR_RUNS" | tee -a "$OUT/results.txt"
fi

# ---------------------------------------------------------------- cpu_affinity anchors (issue 14)
# --compare also runs scripts/bench/pinning.sh (self-contained): app with cpu_affinity auto
# and pin, a bare prefork, axum on tokio's multi-thread runtime and nginx, under wrk -t2, -t1,
# -t1 -c256 and a CPU hog on CPU 1. BENCH_PINNING=0 skips it.
if [ "$COMPARE" = 1 ] && [ "${BENCH_PINNING:-1}" = 1 ] && [ -z "$URL" ]; then
    for n in "${SERVERS[@]}"; do stop_server "$n" || true; done
    log "cpu_affinity scenarios: scripts/bench/pinning.sh (BENCH_PINNING=0 skips them)"
    pin_args=(--workers "$WORKERS" --duration "$DURATION" --out "$OUT")
    [ "$BUILD" = 1 ] || pin_args+=(--no-build)
    "$HERE/pinning.sh" "${pin_args[@]}"
fi
