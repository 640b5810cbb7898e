#!/usr/bin/env bash
# scripts/bench/pinning.sh — cpu_affinity under shared CPUs, against the anchors a Rust team
# would compare with. Self-contained; `scripts/bench.sh --compare` runs it at its end
# (BENCH_PINNING=0 skips it there). Everything it starts is stopped on exit.
# shellcheck disable=SC2086
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/scripts/bench
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/bench
WORKERS=2
DURATION=5
WARM=2
RUNS=3
CONNS=64
SCENARIOS=t2,t1,t1-c256,hog,busy
SERVERS_WANTED=app-auto,app-pin,app-none,bare,tokio-mt,nginx
HOG_CPU=1
BUILD=1

usage() {
    cat <<'EOF'
Usage: scripts/bench/pinning.sh [options]

Runs wrk against, side by side and interleaved run by run:
  app-auto   target/release/app serve --cpu-affinity auto (the default)
  app-pin    target/release/app serve --cpu-affinity pin (one CPU per worker, as before)
  app-none   target/release/app serve --cpu-affinity none (the scheduler places every worker):
             what auto should match under contention, so app-auto/app-none is the policy's cost
  bare       examples/bare_prefork: bind, fork N axum processes, no pinning, no supervision
  tokio-mt   examples/tokio_mt: the same axum GET / on tokio's multi-thread runtime (N threads)
  nginx      nginx `return 200`, worker_cpu_affinity auto (scripts/bench/nginx.conf.in)
in the scenarios
  t2         wrk -t2 -c64 (the client spread over the CPUs)
  t1         wrk -t1 -c64 (the client takes part of one CPU)
  t1-c256    wrk -t1 -c256
  hog        wrk -t2 -c64 with a CPU hog pinned to CPU 1 (`taskset -c 1` busy loop) for the
             whole scenario (started 2.5 s before the first run, as busy's hogs are)
  busy       wrk -t2 -c64 with a hog pinned to every CPU: no CPU idles, so auto should stay
             pinned (nothing to gain by widening). Before it, once the hog scenario's load
             has stopped, the bench waits (up to 60 s) for app-auto to pin its workers again,
             and reports how long that took.
Each run: WARM s of unmeasured load, then DURATION s measured; RUNS runs per server and
scenario; medians. Per run: req/s, p99, server CPU us/request (utime+stime of the server's
process tree; the hog and wrk excluded), Jain's fairness over per-worker requests and the
workers' affinity (mode/Cpus_allowed_list) at the start and end of the measured part (app),
and how many connections each server process held halfway through (`ss -p`). Ratios to
nginx, to tokio-mt and app-auto/app-pin.

The connection split matters under -t1: wrk's one thread needs a whole CPU, and two busy
workers beside it leave it two thirds of one, so a run where one process happened to take
(nearly) every connection (64/0, as the bare prefork's unbalanced accepts often give) lets
the client and that worker have a CPU each and is ~1.3x faster than an even split.
Writes target/bench/pinning.{json,txt}.

Options:
  --runs N          runs per server and scenario (default 3)
  --duration S      measured seconds per run (default 5)
  --warm S          unmeasured seconds before each run (default 2)
  --workers N       processes / threads per server (default 2)
  --scenarios LIST  default t2,t1,t1-c256,hog,busy
  --servers LIST    default app-auto,app-pin,app-none,bare,tokio-mt,nginx
  --hog-cpu N       CPU of the hog (default 1)
  --out DIR         output directory (default target/bench)
  --no-build        use the binaries already built
EOF
}
log() { printf '[pinning] %s\n' "$*" >&2; }
die() { printf '[pinning] error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case $1 in
    --runs) RUNS=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    --warm) WARM=$2; shift ;;
    --workers) WORKERS=$2; shift ;;
    --scenarios) SCENARIOS=$2; shift ;;
    --servers) SERVERS_WANTED=$2; shift ;;
    --hog-cpu) HOG_CPU=$2; shift ;;
    --out) OUT=$2; shift ;;
    --no-build) BUILD=0 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done
for t in wrk jq curl ss taskset; do command -v $t >/dev/null || die "$t is missing"; done
IFS=, read -r -a SCEN <<<"$SCENARIOS"
IFS=, read -r -a NAMES <<<"$SERVERS_WANTED"
CLK_TCK=$(getconf CLK_TCK)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/app-pinning.XXXXXX")
mkdir -p "$OUT"
RUNS_FILE=$TMP/runs.jsonl
: >"$RUNS_FILE"
declare -A PID PORT DIR
HOG=""

cleanup() {
    local rc=$? n
    trap - EXIT INT TERM
    [ -n "$HOG" ] && kill $HOG 2>/dev/null
    for n in "${!PID[@]}"; do
        [ -n "${PID[$n]}" ] || continue
        kill -TERM "${PID[$n]}" 2>/dev/null || true
    done
    sleep 0.5
    for n in "${!PID[@]}"; do
        [ -n "${PID[$n]}" ] || continue
        for p in $(tree "${PID[$n]}"); do kill -KILL "$p" 2>/dev/null || true; done
    done
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

tree() { # root and its descendants
    [ -d "/proc/$1" ] || return 0
    echo "$1"
    local c
    for c in $(ps --ppid "$1" -o pid= 2>/dev/null); do tree "$c"; done
}
ticks() { # utime+stime+cutime+cstime over pids
    local t=0 p s
    local -a f
    for p in "$@"; do
        s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        s=${s##*) }
        read -r -a f <<<"$s"
        t=$((t + f[11] + f[12] + f[13] + f[14]))
    done
    echo "$t"
}
free_port() {
    local p
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 10000))
        [ -z "$(ss -tanH "sport = :$p")" ] && { echo "$p"; return; }
    done
    die "no free port"
}

if [ "$BUILD" = 1 ]; then
    log "cargo build --release; cargo build --release --example tokio_mt --example bare_prefork"
    (cd "$ROOT" && cargo build --release && cargo build --release --example tokio_mt --example bare_prefork) >&2
fi
APP=$TARGET_DIR/release/app
EX=$TARGET_DIR/release/examples
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

start() { # name
    local n=$1 port d
    port=$(free_port)
    d=$TMP/$n
    mkdir -m 700 "$d"
    PORT[$n]=$port
    DIR[$n]=$d
    case $n in
    app-auto | app-pin | app-none)
        [ -x "$APP" ] || die "$APP missing"
        (cd "$d" && exec env -u NOTIFY_SOCKET -u LISTEN_FDS -u LISTEN_PID "$APP" serve --bind "127.0.0.1:$port" \
            --workers "$WORKERS" --control-socket "$d/control.sock" --cpu-affinity "${n#app-}") >"$d/log" 2>&1 &
        ;;
    bare) (exec "$EX/bare_prefork" "127.0.0.1:$port" "$WORKERS") >"$d/log" 2>&1 & ;;
    tokio-mt) (exec "$EX/tokio_mt" "127.0.0.1:$port" "$WORKERS") >"$d/log" 2>&1 & ;;
    nginx)
        [ -x "$NGINX" ] || die "nginx missing"
        mkdir -p "$d/logs"
        sed -e "s|@PREFIX@|$d|g" -e "s|@PORT@|$port|g" -e "s|@WORKERS@|$WORKERS|g" -e "s|@HTTP2@||g" \
            "$HERE/nginx.conf.in" >"$d/nginx.conf"
        (cd "$d" && exec "$NGINX" -p "$d/" -c "$d/nginx.conf" -e "$d/error.log" -g 'daemon off;') >"$d/log" 2>&1 &
        ;;
    *) die "unknown server $n" ;;
    esac
    PID[$n]=$!
    for _ in $(seq 200); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$port/" || true)" = 200 ] && break
        kill -0 "${PID[$n]}" 2>/dev/null || { cat "$d/log" >&2; die "$n exited"; }
        sleep 0.05
    done
    log "$n: pid ${PID[$n]} on port $port"
}

status_workers() { # app: [{id,pid,requests,cpus_allowed,affinity}]
    local n=$1
    case $n in app-*) ;; *) echo '[]'; return ;; esac
    "$APP" status --json --control-socket "${DIR[$n]}/control.sock" 2>/dev/null |
        jq -c '[.workers[] | {id, pid, requests, cpus_allowed, affinity}]' 2>/dev/null || echo '[]'
}

REPIN_S=null
wait_pinned() { # app-auto: seconds until every worker is pinned again (null: not within 60 s)
    # Polled from /proc with shell builtins only, twice a second: `app status` and jq in a
    # tight loop are themselves the foreign load that keeps the pool from being re-pinned.
    local t0 pids p line n one
    [ -n "${DIR[app-auto]:-}" ] || return 0
    pids=$(status_workers app-auto | jq -r '.[].pid')
    t0=$(date +%s%N)
    for _ in $(seq 120); do
        n=0 one=0
        for p in $pids; do
            n=$((n + 1))
            while IFS= read -r line; do
                case $line in Cpus_allowed_list:*) [[ ${line#*:} =~ ^[[:space:]]*[0-9]+$ ]] && one=$((one + 1)) ;; esac
            done <"/proc/$p/status"
        done
        if [ "$n" -gt 0 ] && [ "$one" = "$n" ]; then
            REPIN_S=$(( ($(date +%s%N) - t0) / 100000000 ))
            REPIN_S=$((REPIN_S / 10)).$((REPIN_S % 10))
            log "app-auto: every worker pinned again ${REPIN_S}s after the load stopped ($(status_workers app-auto | jq -r '[.[] | "\(.id):\(.affinity)/\(.cpus_allowed)"] | join(" ")'))"
            return 0
        fi
        sleep 0.5
    done
    REPIN_S=null
    log "app-auto: workers still widened 60 s after the load stopped: $(status_workers app-auto | jq -c .)"
}

run() { # server scenario rep
    local n=$1 sc=$2 rep=$3 url threads=2 conns=$CONNS pids t0 t1 s0 s1 out w sampler procs split
    url=http://127.0.0.1:${PORT[$n]}/
    case $sc in t1) threads=1 ;; t1-c256) threads=1; conns=256 ;; esac
    wrk -t"$threads" -c"$conns" -d"${WARM}s" "$url" >/dev/null 2>&1 || true
    pids=$(tree "${PID[$n]}")
    t0=$(ticks $pids)
    s0=$(status_workers "$n")
    out=$TMP/$n.$sc.$rep.wrk
    # Which process holds each connection, once, halfway through: with keep-alive the split
    # is fixed when wrk connects, and under -t1 it decides the run (see --help).
    (sleep "$(awk -v d="$DURATION" 'BEGIN { print d / 2 }')"
        ss -tnpH state established "( sport = :${PORT[$n]} )" >"$out.ss" 2>/dev/null || true) &
    sampler=$!
    wrk -t"$threads" -c"$conns" -d"${DURATION}s" --timeout 2s -s "$HERE/wrk-report.lua" "$url" >"$out" 2>&1 || true
    wait "$sampler" || true
    # Connections per process, largest first; a prefork's idle workers hold none and are not
    # in the sample, so its list is padded with zeros to the pool's size.
    case $n in tokio-mt) procs=1 ;; *) procs=$WORKERS ;; esac
    split=$(jq -Rsc --argjson procs "$procs" '[scan("pid=([0-9]+)") | .[0]] | group_by(.) | map(length)
        | sort | reverse | . + [range(0; $procs - length) | 0]' "$out.ss")
    pids=$(tree "${PID[$n]}")
    t1=$(ticks $pids)
    s1=$(status_workers "$n")
    w=$(sed -n 's/^WRKJSON //p' "$out" | tail -n 1)
    [ -n "$w" ] || { cat "$out" >&2; die "$n $sc: wrk failed"; }
    jq -cn --arg server "$n" --arg sc "$sc" --argjson rep "$rep" --argjson w "$w" --argjson t0 "$t0" --argjson t1 "$t1" \
        --argjson clk "$CLK_TCK" --argjson s0 "$s0" --argjson s1 "$s1" --argjson threads "$threads" --argjson conns "$conns" --argjson split "$split" '
        def jain: if length == 0 then null else (add) as $s | (map(. * .) | add) as $q
                  | if $q == 0 then null else ($s * $s) / (length * $q) end end;
        ([$s1[] as $b | ($s0[] | select(.id == $b.id and .pid == $b.pid) | .requests) as $a | $b.requests - $a]) as $req
        | ($w.err_connect + $w.err_read + $w.err_write + $w.err_timeout + $w.err_status) as $err
        | {server: $server, scenario: $sc, rep: $rep, wrk_threads: $threads, conns: $conns,
           requests: $w.requests, rps: ($w.requests / ($w.duration_us / 1e6)), p99_ms: ($w.lat_p99_us / 1000),
           errors: $err, cpu_us_per_req: (if $w.requests > 0 then ($t1 - $t0) / $clk * 1e6 / $w.requests else null end),
           worker_requests: $req, fairness: ($req | jain), connections_per_process: $split,
           affinity_start: [$s0[] | "\(.id):\(.affinity // "?")/\(.cpus_allowed // "?")"],
           affinity_end: [$s1[] | "\(.id):\(.affinity // "?")/\(.cpus_allowed // "?")"]}' >>"$RUNS_FILE"
    log "$(tail -n 1 "$RUNS_FILE" | jq -r '"\(.scenario) \(.server) run \(.rep): \(.rps | floor) req/s, p99 \(.p99_ms) ms, \(.cpu_us_per_req * 100 | round / 100) us/req, errors \(.errors)\(if (.affinity_end | length) > 0 then ", fairness \(.fairness // "-" | tostring | .[0:5]), affinity " + (.affinity_end | join(" ")) else "" end)"')"
}

for n in "${NAMES[@]}"; do start "$n"; done
sleep 1
log "uptime before the runs: $(uptime)"
for sc in "${SCEN[@]}"; do
    case $sc in
    hog)
        taskset -c "$HOG_CPU" sh -c 'while :; do :; done' &
        HOG=$!
        log "hog: pid $HOG busy on CPU $HOG_CPU"
        ;;
    busy)
        # The pool enters widened from the scenarios before (a widened worker stays widened
        # while its home CPU is busy); what this scenario asks is whether a pinned pool is
        # widened when no CPU idles, so it starts from a pinned pool.
        wait_pinned
        for c in $(seq 0 $(($(nproc) - 1))); do
            taskset -c "$c" sh -c 'while :; do :; done' &
            HOG="$HOG $!"
        done
        log "hogs: pids$HOG, one busy on every CPU"
        ;;
    esac
    # Two of the master's 1 s samples of the hogged host before any load: a sample that
    # straddles a hog's start still sees that CPU idle, and a policy fed it decides on a
    # host the scenario does not have.
    if [ -n "$HOG" ]; then sleep 2.5; fi
    for r in $(seq 1 "$RUNS"); do
        for n in "${NAMES[@]}"; do
            run "$n" "$sc" "$r"
            sleep 0.5
        done
    done
    if [ -n "$HOG" ]; then kill $HOG 2>/dev/null || true; wait $HOG 2>/dev/null || true; HOG=""; fi
done

for n in app-auto app-pin app-none; do
    [ -n "${DIR[$n]:-}" ] && { grep -E "widened|pinned to" "${DIR[$n]}/log" | sed "s/^/[$n] /" >"$TMP/$n.decisions" || true; }
done
jq -s --arg host "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) CPUs, $(uname -r)" \
    --arg git "$(cd "$ROOT" && git rev-parse --short HEAD)$(cd "$ROOT" && git diff --quiet HEAD -- src Cargo.toml || echo -dirty)" \
    --argjson dur "$DURATION" --argjson warm "$WARM" --argjson nruns "$RUNS" --argjson workers "$WORKERS" --argjson repin "$REPIN_S" --arg scenarios "$SCENARIOS" '
    def median: map(select(. != null)) | sort | length as $n
        | if $n == 0 then null elif $n % 2 == 1 then .[($n - 1) / 2] else (.[$n / 2 - 1] + .[$n / 2]) / 2 end;
    def r3: if . == null then null else (. * 1000 | round) / 1000 end;
    def ratio($a; $b): if $a == null or $b == null or $b == 0 then null else ($a / $b) | r3 end;
    . as $runs
    | ($runs | group_by(.scenario, .server) | map({scenario: .[0].scenario, server: .[0].server, runs: length,
        rps: (map(.rps) | median), p99_ms: (map(.p99_ms) | median), cpu_us_per_req: (map(.cpu_us_per_req) | median),
        fairness: (map(.fairness) | median), errors: (map(.errors) | add), rps_runs: map(.rps | floor), split_runs: map(.connections_per_process // [] | map(tostring) | join("/")),
        affinity_end: (last | .affinity_end)})) as $sum
    | def get($sc; $s): first($sum[] | select(.scenario == $sc and .server == $s)) // null;
      {meta: {host: $host, git: $git, duration_s: $dur, warm_s: $warm, runs: $nruns, workers: $workers, repin_after_load_s: $repin, scenarios: $scenarios},
       runs: $runs,
       summary: [$sum[] | . as $x | get($x.scenario; "nginx") as $ng | get($x.scenario; "tokio-mt") as $mt
                 | get($x.scenario; "app-pin") as $pin | get($x.scenario; "bare") as $bare | get($x.scenario; "app-none") as $none
                 | $x + {rps_vs_nginx: ratio($x.rps; $ng.rps), rps_vs_tokio_mt: ratio($x.rps; $mt.rps),
                          rps_vs_pin: ratio($x.rps; $pin.rps), rps_vs_bare: ratio($x.rps; $bare.rps), rps_vs_none: ratio($x.rps; $none.rps),
                          cpu_vs_nginx: ratio($x.cpu_us_per_req; $ng.cpu_us_per_req)}],
       targets: [($runs | map(.scenario) | unique)[] as $sc | get($sc; "app-auto") as $a | select($a != null)
                 | get($sc; "nginx") as $ng | get($sc; "tokio-mt") as $mt | get($sc; "app-pin") as $pin | get($sc; "bare") as $bare
                 | {scenario: $sc, target: ">= 0.95x bare prefork", value: ratio($a.rps; $bare.rps), ok: (ratio($a.rps; $bare.rps) | if . == null then null else . >= 0.95 end)},
                   {scenario: $sc, target: ">= 1.0x nginx", value: ratio($a.rps; $ng.rps), ok: (ratio($a.rps; $ng.rps) | if . == null then null else . >= 1.0 end)},
                   {scenario: $sc, target: "CPU/req <= 1.05x nginx", value: ratio($a.cpu_us_per_req; $ng.cpu_us_per_req), ok: (ratio($a.cpu_us_per_req; $ng.cpu_us_per_req) | if . == null then null else . <= 1.05 end)},
                   {scenario: $sc, target: ">= 1.0x tokio multi-thread", value: ratio($a.rps; $mt.rps), ok: (ratio($a.rps; $mt.rps) | if . == null then null else . >= 1.0 end)},
                   (select($sc != "t2" and $sc != "busy") | {scenario: $sc, target: ">= 1.25x app-pin (today)", value: ratio($a.rps; $pin.rps), ok: (ratio($a.rps; $pin.rps) | if . == null then null else . >= 1.25 end)}),
                   (select($sc == "t2") | {scenario: $sc, target: "fairness (Jain) >= 0.95", value: ($a.fairness | r3), ok: ($a.fairness | if . == null then null else . >= 0.95 end)}),
                   (select($sc == "t2") | {scenario: $sc, target: "workers pinned one per CPU at the end of every run", value: ([$runs[] | select(.scenario == "t2" and .server == "app-auto") | .affinity_end | join(" ")] | unique | join("; ")), ok: ([$runs[] | select(.scenario == "t2" and .server == "app-auto") | .affinity_end[] | test("pinned")] | all)}),
                   (select($sc == "busy") | [$runs[] | select(.scenario == "busy" and .server == "app-auto")] as $b
                    | {scenario: $sc, target: "no CPU idles: a pinned pool stays pinned in every run", value: ([$b[] | "\(.affinity_start | join(" ")) -> \(.affinity_end | join(" "))"] | unique | join("; ")),
                       ok: (if ($b | length) == 0 or ([$b[0].affinity_start[] | test("pinned")] | all | not) then null else ([$b[] | .affinity_end[] | test("pinned")] | all) end)})]}' \
    "$RUNS_FILE" >"$OUT/pinning.json"

{
    jq -r '.meta | "== cpu_affinity bench: \(.host); git \(.git); \(.workers) workers/threads; wrk, \(.warm_s) s warm-up + \(.duration_s) s per run, \(.runs) runs each, interleaved; medians",
        (if .repin_after_load_s == null then empty else "app-auto pinned its workers again \(.repin_after_load_s) s after the load before the busy scenario stopped (scenarios \(.scenarios))" end)' "$OUT/pinning.json"
    echo
    jq -r 'def f($d): if . == null then "-" else (. * pow(10; $d) | round / pow(10; $d) | tostring) end;
        (["scenario", "server", "req/s", "p99 ms", "CPU us/req", "x nginx", "x tokio-mt", "x app-pin", "x app-none", "x bare", "CPU x nginx", "fairness", "errors", "req/s per run", "connections per process, per run", "affinity at end"] | @tsv),
        (.summary | sort_by(.scenario, .server)[] | [.scenario, .server, (.rps | floor), (.p99_ms | f(2)), (.cpu_us_per_req | f(2)),
          (.rps_vs_nginx // "-"), (.rps_vs_tokio_mt // "-"), (.rps_vs_pin // "-"), (.rps_vs_none // "-"), (.rps_vs_bare // "-"), (.cpu_vs_nginx // "-"),
          (.fairness | f(3)), .errors, (.rps_runs | map(tostring) | join(" ")), (.split_runs | join(" ")), ((.affinity_end // []) | join(" ") | if . == "" then "-" else . end)] | @tsv)' "$OUT/pinning.json" |
        column -t -s $'\t'
    echo
    echo "-- targets (app-auto)"
    jq -r '(["scenario", "target", "value", "met"] | @tsv), (.targets[] | [.scenario, .target, (.value // "-" | tostring), (if .ok == null then "-" elif .ok then "yes" else "NO" end)] | @tsv)' "$OUT/pinning.json" | column -t -s $'\t'
    echo
    echo "-- affinity decisions logged by the masters"
    cat "$TMP"/*.decisions 2>/dev/null | sed -E 's/^(\[[a-z-]+\]) \[master\] [^ ]+ +INFO /\1 /' | tail -n 40 || true
} | tee "$OUT/pinning.txt"
log "results: $OUT/pinning.json, $OUT/pinning.txt"
