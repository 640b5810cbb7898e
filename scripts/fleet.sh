#!/usr/bin/env bash
# fleet.sh - a fleet of app hosts behind HAProxy, end to end (as root).
#
# Boots FLEET_HOSTS (default 3) throw-away systemd hosts - the host's own
# systemd as PID 1 of systemd-nspawn containers over copy-on-write overlays of
# "/", as scripts/e2e-systemd.sh does (scripts/lib/sandbox.sh) - that share the
# host's network namespace, host N listening on its own loopback address
# 127.0.0.(10+N): app.socket on :8080, app-metrics.socket on :9090 and the
# agent-check socket app-agent.socket on :9091, set by drop-ins. Installs app
# on each with scripts/install.sh, runs HAProxy (scripts/fleet/haproxy.cfg:
# health checks on /.well-known/ready, agent-check, retries, redispatch) on
# 127.0.0.1:FLEET_PORT in front, and under a continuous load through HAProxy
# (wrk with scripts/fleet/load.lua: every non-2xx answer and socket error
# counted) runs each check as a timed PASS/FAIL with its figures:
#
#   balance   every host in rotation and served, the load rate reached
#   upgrade   a new build (same source, another commit string) installed and
#             `systemctl reload app` host by host: 0 failed, every worker of
#             every host runs the new file
#   restart   `systemctl restart app` host by host (drain_delay, then stop):
#             0 failed, HAProxy took each host out and back
#   host-lost the last host's container SIGKILLed (nspawn and everything in it):
#             at most the requests in flight on it fail, HAProxy takes it out
#             within its check bound, a new boot of it comes back into rotation
#   config    [service] greeting changed in every host's app.toml + reload on
#             all hosts at once: every worker of every host answers with it;
#             the ms from the first host to the last
#
# Every address is in 127.0.0.0/8 and all traffic goes to loopback. Ends with
# "fleet: N passed, M failed"; exit 0 if all passed, 1 if any failed, 64
# (EX_USAGE) for a bad argument or FLEET_* value, 77 (EX_NOPERM) when not run
# as root, 69 (EX_UNAVAILABLE) if the fleet could not be set up (a tool, a
# port, a boot or an install). Everything is torn down on exit, on SIGINT/SIGTERM
# and - by detached reapers - if this script is SIGKILLed.
#
# Usage: sudo scripts/fleet.sh
# Environment:
#   APP_BIN=PATH          binary to test (default: cargo build --release)
#   FLEET_NEW_BIN=PATH    the "new build" for the upgrade check (default: a
#                         release build with APP_BUILD_COMMIT=<commit>-fleet;
#                         FLEET_REBUILD=0 uses a copy of APP_BIN with a marker
#                         appended instead: a new file, the same version)
#   FLEET_HOSTS=3         number of hosts (1-9: 127.0.0.11 .. 127.0.0.19)
#   FLEET_PORT=8000       HAProxy's port on 127.0.0.1 (statistics on +1)
#   FLEET_CONNS=20        load connections; FLEET_DELAY_MS=10 pause between
#                         a connection's requests; FLEET_MIN_RATE=1000 req/s
#                         the balance, upgrade and restart checks must reach
#   FLEET_CHECKS="..."    run only these checks (balance upgrade restart
#                         host-lost config)
#   FLEET_LIFETIME=1200   hard limit (s) for each container
#   FLEET_VERBOSE=1       more output
# Needs: root, systemd 252 on the host, overlayfs; installs systemd-container,
# curl, jq, haproxy and wrk with apt-get if they are missing.
# Intentional: `A && B || fail`, word-splitting pid lists, helpers through wait_for.
# shellcheck disable=SC2015,SC2086,SC2317
set -uo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
SRC=$(cd "$(dirname "$SELF")/.." && pwd)
STATE_BASE=${TMPDIR:-/tmp}
STATE_PREFIX=app-fleet.
LIFETIME=${FLEET_LIFETIME:-1200}
VERBOSE=${FLEET_VERBOSE:-0}
HOSTS=${FLEET_HOSTS:-3}
PORT=${FLEET_PORT:-8000}
STATS_PORT=$((PORT + 1))
CONNS=${FLEET_CONNS:-20}
DELAY_MS=${FLEET_DELAY_MS:-10}
MIN_RATE=${FLEET_MIN_RATE:-1000}
ALL_CHECKS="balance upgrade restart host-lost config"
CHECKS=${FLEET_CHECKS:-$ALL_CHECKS}
IN_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
STAGE=/var/tmp/app-fleet   # inside each container: units, install.sh, binaries
FRONT=http://127.0.0.1:$PORT
# HAProxy's check bound: inter 500ms x fall 2, plus one interval for a check
# that was just passing when the host died, plus its 1 s check timeout.
TAKE_OUT_BOUND_MS=2500
NSPAWN_NET=""                        # the host's network namespace
EXTRA_TOOLS=(haproxy:haproxy wrk:wrk)

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
log() { printf '[fleet] %s\n' "$*" >&2; }
die() { printf '[fleet] ERROR: %s\n' "$*" >&2; exit 69; }
usage() { printf '[fleet] ERROR: %s\n' "$*" >&2; exit 64; }

. "$SRC/scripts/lib/sandbox.sh"

if [ "${1:-}" = --reap ]; then sandbox_reap "$2"; exit 0; fi

addr() { echo "127.0.0.$((10 + $1))"; }   # host N's loopback address

# ---------------------------------------------------------------------------
# Hosts
# ---------------------------------------------------------------------------
# H_STATE[i] / H_INIT[i]: host i's state dir and the host PID of its systemd.
declare -a H_STATE H_INIT

use_host() {  # make host $1 the sandbox the library's functions act on
    STATE=${H_STATE[$1]}; NAME=$(sandbox_name "$STATE"); ROOT=$STATE/root; INIT=${H_INIT[$1]:-}
}
INH() { local i=$1; shift; use_host "$i"; IN "$@"; }   # INH HOST CMD...

# Host processes (HAProxy, wrk) are recorded for the reapers and on_exit.
track_pid() { echo "$1 $(pid_starttime "$1")" >> "$RUN/extra-pids"; }

new_state_dir() {  # a state dir owned by this script, with its own reaper
    local st
    st=$(mktemp -d "$STATE_BASE/${STATE_PREFIX}XXXXXX") || die "mktemp failed"
    echo "$$ $(pid_starttime $$)" > "$st/owner"
    [ -f "$RUN/runner" ] && cp "$RUN/runner" "$st/runner"
    setsid bash "$SELF" --reap "$st" </dev/null >/dev/null 2>&1 &
    echo "$st"
}

boot_host() {  # boot_host I: boot, install, configure and start host I
    local i=$1 a t0 st
    a=$(addr "$i")
    t0=$(now_ms)
    st=$(new_state_dir)
    H_STATE[i]=$st; H_INIT[i]=""
    use_host "$i"
    boot_sandbox
    H_INIT[i]=$INIT
    stage_and_install
    # Its own addresses (the containers share one network namespace); the
    # control socket lives in each container's own /run.
    IN mkdir -p /etc/systemd/system/app.socket.d /etc/systemd/system/app-metrics.socket.d \
        /etc/systemd/system/app-agent.socket.d /etc/systemd/system/app.service.d
    printf '[Socket]\nListenStream=\nListenStream=%s:8080\n' "$a" |
        IN sh -c 'cat > /etc/systemd/system/app.socket.d/fleet.conf'
    printf '[Socket]\nListenStream=\nListenStream=%s:9090\n' "$a" |
        IN sh -c 'cat > /etc/systemd/system/app-metrics.socket.d/fleet.conf'
    printf '[Socket]\nListenStream=\nListenStream=%s:9091\n' "$a" |
        IN sh -c 'cat > /etc/systemd/system/app-agent.socket.d/fleet.conf'
    printf '[Unit]\nWants=app-agent.socket\nAfter=app-agent.socket\n[Service]\nSockets=app-agent.socket\n' |
        IN sh -c 'cat > /etc/systemd/system/app.service.d/fleet.conf'
    IN systemctl daemon-reload || die "host $i: daemon-reload failed"
    IN systemctl start app.socket app-metrics.socket app-agent.socket app.service ||
        { IN journalctl -u app --no-pager -n 30 >&2; die "host $i: app did not start"; }
    wait_for 20 host_ready "$i" || die "host $i: $a:8080/.well-known/ready never answered 200"
    log "host $i ($a) booted and serving in $(( $(now_ms) - t0 )) ms ($(INH "$i" app --version))"
}

host_ready() { [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://$(addr "$1"):8080/.well-known/ready")" = 200 ]; }

ports_free() {  # nothing on this machine listens where the fleet will
    local i busy
    busy=$(ss -Hltn 2>/dev/null | awk '{print $4}')
    for p in "127.0.0.1:$PORT" "127.0.0.1:$STATS_PORT"; do
        grep -qxF "$p" <<< "$busy" && die "$p is in use: set FLEET_PORT"
    done
    for i in $(seq 1 "$HOSTS"); do
        for p in 8080 9090 9091; do
            grep -qxF "$(addr "$i"):$p" <<< "$busy" && die "$(addr "$i"):$p is in use"
        done
    done
    return 0
}

# ---------------------------------------------------------------------------
# HAProxy, statistics, load
# ---------------------------------------------------------------------------
start_haproxy() {
    local cfg=$RUN/haproxy.cfg i servers=""
    for i in $(seq 1 "$HOSTS"); do
        servers="$servers    server app$i $(addr "$i"):8080 check\n"
    done
    # the shipped example, with our ports and one server line per host
    awk -v servers="$servers" '
        /^    server app[0-9]+ / { if (!done) { printf "%s", servers; done = 1 } next }
        { print }' "$SRC/scripts/fleet/haproxy.cfg" |
        sed -e "s/127\.0\.0\.1:8000/127.0.0.1:$PORT/" -e "s/127\.0\.0\.1:8001/127.0.0.1:$STATS_PORT/" > "$cfg"
    haproxy -c -q -f "$cfg" || die "haproxy -c rejected $cfg"
    haproxy -db -f "$cfg" > "$RUN/haproxy.log" 2>&1 &
    HAPROXY=$!
    track_pid "$HAPROXY"
    wait_for 20 all_up || { cat "$RUN/haproxy.log" >&2; stats_table >&2; die "HAProxy does not see every host UP"; }
    log "HAProxy $(haproxy -v | awk 'NR==1{print $3}') on 127.0.0.1:$PORT (statistics on :$STATS_PORT), $HOSTS host(s) UP"
}

stats_csv() { curl -s -m 2 "http://127.0.0.1:$STATS_PORT/stats;csv"; }
# server state (UP, DOWN, DRAIN, MAINT, "UP 1/2", ...) and total sessions
hap_status() { stats_csv | awk -F, -v s="app$1" '$1 == "app" && $2 == s { print $18 }'; }
hap_sessions() { stats_csv | awk -F, -v s="app$1" '$1 == "app" && $2 == s { print $8 }'; }
# requests HAProxy retried on a server (wretr) and redispatched away from it (wredis)
hap_retries() { stats_csv | awk -F, -v s="app$1" '$1 == "app" && $2 == s { print $16 + 0, $17 + 0 }'; }
stats_table() { stats_csv | awk -F, '$1 == "app" { printf "  %s %s weight=%s sessions=%s\n", $2, $18, $19, $8 }'; }
is_up() { [ "$(hap_status "$1")" = UP ]; }
is_down() { case "$(hap_status "$1")" in DOWN*) return 0 ;; *) return 1 ;; esac; }
all_up() { local i; for i in $(seq 1 "$HOSTS"); do is_up "$i" || return 1; done; }

LOAD_PID=""
load_start() {  # wrk through HAProxy until load_stop (at most 600 s)
    FLEET_DELAY_MS=$DELAY_MS wrk -t1 -c"$CONNS" -d600s --timeout 10s -s "$SRC/scripts/fleet/load.lua" \
        "$FRONT/" > "$RUN/load.out" 2>&1 &
    LOAD_PID=$!
    track_pid "$LOAD_PID"
}
# load_stop: sets LOAD_REQ, LOAD_FAILED, LOAD_RATE and LOAD_SUMMARY
load_stop() {
    local line secs i
    kill -INT "$LOAD_PID" 2>/dev/null
    for i in $(seq 1 100); do kill -0 "$LOAD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$LOAD_PID" 2>/dev/null
    wait "$LOAD_PID" 2>/dev/null
    LOAD_PID=""
    line=$(grep '^FLEET ' "$RUN/load.out" | tail -n1)
    if [ -z "$line" ]; then
        LOAD_REQ=0; LOAD_FAILED=-1; LOAD_RATE=0
        LOAD_SUMMARY="no summary from wrk: $(tail -n3 "$RUN/load.out" | paste -sd' ' -)"
        return 0
    fi
    LOAD_REQ=$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' <<< "$line")
    LOAD_FAILED=$(sed -n 's/.* failed=\([0-9]*\).*/\1/p' <<< "$line")
    secs=$(sed -n 's/.* duration_us=\([0-9]*\).*/\1/p' <<< "$line")
    LOAD_RATE=$(( LOAD_REQ * 1000000 / (secs > 0 ? secs : 1) ))
    LOAD_SUMMARY="$LOAD_REQ requests, $LOAD_FAILED failed, $LOAD_RATE req/s ($(cut -d' ' -f4-8 <<< "$line"), p99 $(( $(sed -n 's/.* p99_us=\([0-9]*\).*/\1/p' <<< "$line") / 1000 )) ms)"
}
# 0 failed at the required rate: the targets of the balance, upgrade and restart
# checks (host-lost and config are judged on failures; their rate is reported)
load_ok() {
    [ "$LOAD_FAILED" = 0 ] || fail "$LOAD_FAILED failed requests: $LOAD_SUMMARY" || return 1
    [ "$LOAD_RATE" -ge "$MIN_RATE" ] || fail "load rate $LOAD_RATE req/s < $MIN_RATE: $LOAD_SUMMARY"
}

# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------
PASSED=0; FAILED=0; FAILED_NAMES=""; REASON=""
note() { printf '      %s\n' "$@"; }
fail() { REASON="$*"; return 1; }
wait_for() {  # wait_for TIMEOUT_S CMD...: poll every 0.1 s until CMD succeeds
    local deadline=$(( $(now_ms) + $1 * 1000 )); shift
    until "$@"; do [ "$(now_ms)" -lt "$deadline" ] || return 1; sleep 0.1; done
}

run_check() {  # run_check NAME DESCRIPTION FUNCTION
    local name=$1 desc=$2 fn=$3 t0 ms rc
    case " $CHECKS " in *" $name "*) ;; *) return 0 ;; esac
    REASON=""
    t0=$(now_ms)
    "$fn"; rc=$?
    [ -n "$LOAD_PID" ] && load_stop   # a check that failed half-way
    ms=$(( $(now_ms) - t0 ))
    if [ "$rc" = 0 ]; then
        PASSED=$((PASSED + 1)); printf 'PASS  %-10s %6d ms  %s\n' "$name" "$ms" "$desc"
    else
        FAILED=$((FAILED + 1)); FAILED_NAMES="$FAILED_NAMES $name"
        printf 'FAIL  %-10s %6d ms  %s\n' "$name" "$ms" "$desc"
        [ -n "$REASON" ] && printf '      reason: %s\n' "$REASON"
        stats_table
    fi
    echo "$PASSED $FAILED" > "$RUN/counts"
    return 0
}

check_balance() {  # every host UP and served; the load rate is reached
    local i before=() after d
    all_up || fail "not every host UP: $(stats_table | paste -sd' ' -)" || return 1
    for i in $(seq 1 "$HOSTS"); do before[i]=$(hap_sessions "$i"); done
    load_start; sleep 3; load_stop
    note "load through HAProxy for 3 s: $LOAD_SUMMARY"
    for i in $(seq 1 "$HOSTS"); do
        after=$(hap_sessions "$i"); d=$(( after - before[i] ))
        note "host $i ($(addr "$i")): $d new HAProxy sessions"
        [ "$d" -gt 0 ] || fail "host $i got no traffic" || return 1
    done
    load_ok
}

# The new build: the same source with another commit string, so that every
# worker can be seen to run it (app status), or a given binary.
NEW_BIN=""
new_build() {
    local commit cargo user=${SUDO_USER:-root} home t0
    if [ -n "${FLEET_NEW_BIN:-}" ]; then NEW_BIN=$(readlink -f "$FLEET_NEW_BIN"); return 0; fi
    NEW_BIN=$RUN/app-new
    if [ "${FLEET_REBUILD:-1}" = 0 ]; then
        cp "$BIN" "$NEW_BIN" && printf '\nfleet.sh new build %s\n' "$(date +%s%N)" >> "$NEW_BIN"
        return
    fi
    home=$(getent passwd "$user" | cut -d: -f6)
    cargo=$(command -v cargo || true)
    [ -z "$cargo" ] && [ -x "$home/.cargo/bin/cargo" ] && cargo=$home/.cargo/bin/cargo
    [ -n "$cargo" ] || die "no cargo to build the new version: set FLEET_NEW_BIN or FLEET_REBUILD=0"
    commit=$(git -C "$SRC" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)-fleet
    log "building the new version (APP_BUILD_COMMIT=$commit) ..."
    t0=$(now_ms)
    if [ "$user" != root ] && [ "$(stat -c %U "$SRC")" = "$user" ]; then
        runuser -u "$user" -- env PATH="$(dirname "$cargo"):$PATH" APP_BUILD_COMMIT="$commit" \
            "$cargo" build --release --quiet --manifest-path "$SRC/Cargo.toml" >&2
    else
        APP_BUILD_COMMIT="$commit" "$cargo" build --release --quiet --manifest-path "$SRC/Cargo.toml" >&2
    fi || die "cargo build --release of the new version failed"
    cp "${CARGO_TARGET_DIR:-$SRC/target}/release/app" "$NEW_BIN" || die "no new binary"
    log "new version built in $(( $(now_ms) - t0 )) ms: $("$NEW_BIN" --version)"
}

# every worker of host $1 runs the file now at /usr/local/bin/app, and reports $2
host_runs_new() {
    local i=$1 want=$2 j pids p ino wino bad=0
    j=$(INH "$i" app status --json) || { REASON="host $i: app status failed"; return 1; }
    ino=$(INH "$i" stat -c %i /usr/local/bin/app)
    pids=$(jq -r '.workers[] | .pid' <<< "$j")
    [ -n "$pids" ] || { REASON="host $i: no workers"; return 1; }
    for p in $pids; do
        wino=$(INH "$i" stat -L -c %i "/proc/$p/exe" 2>/dev/null)
        [ "$wino" = "$ino" ] || bad=$((bad + 1))
    done
    [ "$bad" = 0 ] || { REASON="host $i: $bad worker(s) not running the new file"; return 1; }
    [ -z "$want" ] || [ "$(jq -r '[.generations[].version] | unique | join(",")' <<< "$j")" = "$want" ] ||
        { REASON="host $i: generations report $(jq -c '[.generations[].version]' <<< "$j"), want $want"; return 1; }
    return 0
}

check_upgrade() {  # new build on every host, reload host by host: 0 failed
    local i t0 ms want out
    new_build
    want=$("$NEW_BIN" --version | sed 's/^app //')
    [ "$want" != "$("$BIN" --version | sed 's/^app //')" ] || want=""   # a copy: prove by file only
    note "new build: ${want:-a copy of the old one with a marker (same version string)}"
    load_start; sleep 1
    for i in $(seq 1 "$HOSTS"); do
        use_host "$i"
        cp "$NEW_BIN" "$ROOT$STAGE/app-new"
        t0=$(now_ms)
        out=$(IN "$STAGE/scripts/install.sh" --binary "$STAGE/app-new" --no-docs 2>&1) ||
            { printf '%s\n' "$out" >&2; fail "host $i: install.sh failed"; return 1; }
        IN systemctl reload app || fail "host $i: systemctl reload app failed" || return 1
        ms=$(( $(now_ms) - t0 ))
        host_runs_new "$i" "$want" || return 1
        note "host $i: installed + systemctl reload in $ms ms; every worker runs the new build (gen $(INH "$i" app status --json | jq .generation))"
        wait_for 10 is_up "$i" || fail "host $i not UP after its reload" || return 1
        sleep 0.5
    done
    BIN=$NEW_BIN   # the release a host booted from now on gets
    sleep 1; load_stop
    note "load during the rolling upgrade: $LOAD_SUMMARY"
    load_ok
}

check_restart() {  # systemctl restart host by host, with drain: 0 failed
    local i t0 ms rc seen back pid
    all_up || fail "not every host UP before: $(stats_table | paste -sd' ' -)" || return 1
    load_start; sleep 1
    for i in $(seq 1 "$HOSTS"); do
        use_host "$i"
        t0=$(now_ms)
        IN systemctl restart app & pid=$!
        # HAProxy must see the host leave (DRAIN from the agent, DOWN from the
        # check) while it still serves, then come back.
        seen=""
        while kill -0 "$pid" 2>/dev/null && [ $(( $(now_ms) - t0 )) -lt 60000 ]; do
            case "$(hap_status "$i")" in DRAIN*|DOWN*|MAINT*) [ -z "$seen" ] && seen="$(hap_status "$i") after $(( $(now_ms) - t0 )) ms" ;; esac
            sleep 0.1
        done
        wait "$pid"; rc=$?
        ms=$(( $(now_ms) - t0 ))
        [ "$rc" = 0 ] || fail "host $i: systemctl restart app failed (rc $rc)" || return 1
        [ -n "$seen" ] || fail "host $i: HAProxy never took it out during the restart" || return 1
        wait_for 30 is_up "$i" || fail "host $i not back UP within 30 s of its restart" || return 1
        back=$(( $(now_ms) - t0 ))
        note "host $i: out of rotation ($seen), systemctl restart $ms ms, back UP after $back ms"
    done
    sleep 1; load_stop
    note "load during the rolling restart: $LOAD_SUMMARY"
    load_ok
}

check_host_lost() {  # SIGKILL a whole host: only its in-flight requests fail
    local i=$HOSTS n t0 out_ms kill_list old_state t1 before r0 r1
    all_up || fail "not every host UP before: $(stats_table | paste -sd' ' -)" || return 1
    load_start; sleep 1.5
    read -r -a r0 <<< "$(hap_retries "$i")"
    use_host "$i"
    old_state=$STATE
    n=$(nspawn_pid) || fail "host $i: no nspawn process" || return 1
    kill_list="$n $(cg_pids "$NAME")"
    t0=$(now_ms)
    kill -KILL $kill_list 2>/dev/null
    wait_for 10 is_down "$i" || fail "host $i still $(hap_status "$i") 10 s after it was killed" || return 1
    out_ms=$(( $(now_ms) - t0 ))
    sleep 1; load_stop
    read -r -a r1 <<< "$(hap_retries "$i")"
    note "killed host $i ($(addr "$i")): nspawn + $(wc -w <<< "$kill_list") process(es) SIGKILLed; HAProxy marked it DOWN after $out_ms ms (bound $TAKE_OUT_BOUND_MS ms)"
    note "load across the loss: $LOAD_SUMMARY"
    note "requests that met the dead host: HAProxy retried $(( r1[0] - r0[0] )) and redispatched $(( r1[1] - r0[1] )) of them to another host"
    note "failed requests: $LOAD_FAILED (bound: $CONNS, one in flight per client connection at most)"
    # Judged after the host is back, so that a failure here does not leave
    # the next checks a host short.
    local verdict=""
    [ "$LOAD_FAILED" -ge 0 ] && [ "$LOAD_FAILED" -le "$CONNS" ] || verdict="$LOAD_FAILED failed, more than the $CONNS that can be in flight"
    [ "$out_ms" -le "$TAKE_OUT_BOUND_MS" ] || verdict="${verdict:+$verdict; }taken out after $out_ms ms > $TAKE_OUT_BOUND_MS ms"
    # It comes back: a new boot of the host (a fresh overlay, installed again).
    teardown "$old_state" || fail "could not tear down the killed host" || return 1
    t1=$(now_ms)
    boot_host "$i"
    before=$(hap_sessions "$i")
    load_start
    wait_for 30 is_up "$i" || fail "host $i not UP within 30 s of its new boot" || return 1
    note "host $i booted again and UP in HAProxy $(( $(now_ms) - t1 )) ms after the new boot began"
    wait_for 10 sessions_above "$i" "$before" || fail "host $i UP but given no traffic" || return 1
    sleep 1; load_stop
    note "load after its return: $LOAD_SUMMARY"
    [ -z "$verdict" ] || fail "$verdict" || return 1
    [ "$LOAD_FAILED" = 0 ] || fail "$LOAD_FAILED failed after its return: $LOAD_SUMMARY"
}
sessions_above() { [ "$(hap_sessions "$1")" -gt "$2" ]; }

# every worker of host $1 answers GET / with greeting $2 (fresh connections)
host_greets() {
    local i=$1 g=$2 n seen="" r w body
    n=$(INH "$i" app status --json | jq '.serving_workers')
    for _ in $(seq 1 200); do
        r=$(curl -s -m 2 -D - "http://$(addr "$i"):8080/") || continue
        body=$(tail -n1 <<< "$r")
        case "$body" in "$g from worker"*) ;; *) REASON="host $i answered '$body'"; return 1 ;; esac
        w=$(sed -n 's/^x-worker: *\([0-9]*\).*/\1/Ip' <<< "$r")
        case " $seen " in *" $w "*) ;; *) seen="$seen $w" ;; esac
        [ "$(wc -w <<< "$seen")" -ge "$n" ] && return 0
    done
    REASON="host $i: only workers$seen of $n answered in 200 requests"; return 1
}

check_config() {  # a [service] change pushed to every host: every worker serves it
    local g i t0 first=0 last=0 t pids=() rc ok
    all_up || fail "not every host UP before: $(stats_table | paste -sd' ' -)" || return 1
    g="fleet$(date +%s)"
    load_start; sleep 1
    t0=$(now_ms)
    # All hosts at once, as a deploy tool pushing a config would: edit, reload.
    for i in $(seq 1 "$HOSTS"); do
        (
            use_host "$i"
            IN sed -i "s/^# greeting = .*/greeting = \"$g\"/" /etc/app/app.toml &&
                IN systemctl reload app && now_ms > "$RUN/config-done.$i"
        ) &
        pids+=($!)
    done
    rc=0; for t in "${pids[@]}"; do wait "$t" || rc=1; done
    [ "$rc" = 0 ] || fail "an edit or reload failed" || return 1
    for i in $(seq 1 "$HOSTS"); do
        t=$(( $(cat "$RUN/config-done.$i") - t0 ))
        [ "$first" = 0 ] || [ "$t" -lt "$first" ] && first=$t
        [ "$t" -gt "$last" ] && last=$t
        host_greets "$i" "$g" || return 1
        note "host $i: reloaded $t ms after the push began; all $(INH "$i" app status --json | jq '.serving_workers') workers answer '$g from worker N'"
    done
    ok=$(for _ in $(seq 1 30); do curl -s -m 2 "$FRONT/"; done | grep -c "^$g from worker")
    sleep 1; load_stop
    note "new setting everywhere: first host $first ms, last host $last ms after the push (first -> last: $(( last - first )) ms); through HAProxy $ok/30 answers carry it"
    note "load during the change: $LOAD_SUMMARY"
    [ "$ok" = 30 ] || fail "only $ok/30 answers through HAProxy carry the new greeting" || return 1
    [ "$LOAD_FAILED" = 0 ] || fail "$LOAD_FAILED failed requests: $LOAD_SUMMARY"
}

# ---------------------------------------------------------------------------
on_exit() {
    local rc=$? t0 d p s passed=0 failed=0 total owner
    trap - EXIT INT TERM
    if [ -n "${RUNNER:-}" ] && kill -0 "$RUNNER" 2>/dev/null; then
        log "interrupted: stopping the checks and tearing the fleet down"
        kill -KILL "$RUNNER" 2>/dev/null
        wait "$RUNNER" 2>/dev/null
    fi
    t0=$(now_ms)
    if [ -n "${RUN:-}" ] && [ -d "$RUN" ]; then
        read -r passed failed 2>/dev/null < "$RUN/counts"
        while read -r p s; do
            [ -n "$p" ] && [ "$(pid_starttime "$p")" = "$s" ] && kill -KILL "$p" 2>/dev/null
        done 2>/dev/null < "$RUN/extra-pids"
    fi
    # every state dir this run made (hosts booted again included), all at
    # once (each halt waits for its app's drain_delay), then RUN
    owner="$$ $(pid_starttime $$)"
    local tds=()
    for d in "$STATE_BASE/$STATE_PREFIX"*; do
        [ -d "$d" ] && [ "$d" != "${RUN:-}" ] && [ "$(cat "$d/owner" 2>/dev/null)" = "$owner" ] || continue
        teardown "$d" & tds+=($!)
    done
    for p in "${tds[@]}"; do
        wait "$p" || { log "a teardown was incomplete (see above)"; [ "$rc" = 0 ] && rc=69; }
    done
    [ -n "${RUN:-}" ] && [ -d "$RUN" ] && rm -rf --one-file-system "$RUN"
    log "fleet torn down in $(( $(now_ms) - t0 )) ms"
    total=$(wc -w <<< "$CHECKS")
    if [ "$rc" != 0 ] && [ $((passed + failed)) -lt "$total" ]; then
        log "$((total - passed - failed)) check(s) did not run"
        failed=$((total - passed))
    fi
    echo "fleet: $passed passed, $failed failed"
    [ "$rc" = 0 ] && [ "$failed" != 0 ] && rc=1
    exit "$rc"
}

main() {
    case "${1:-}" in
        -h|--help) sed -n '2,/^set -uo/p' "$SELF" | grep -v -e '^set ' -e 'shellcheck' -e '^# Intentional' |
                       sed 's/^# \{0,1\}//'; exit 0 ;;
        "") ;;
        *) usage "unknown argument '$1' (see --help; configuration is by environment variables)" ;;
    esac
    case "$HOSTS" in [1-9]) ;; *) usage "FLEET_HOSTS must be 1-9 (127.0.0.11 .. 127.0.0.19)" ;; esac
    case "$PORT" in [1-9][0-9][0-9]|[1-9][0-9][0-9][0-9]|[1-5][0-9][0-9][0-9][0-9]) ;; *) usage "FLEET_PORT must be 100-59999" ;; esac
    local c
    for c in $CHECKS; do
        case " $ALL_CHECKS " in *" $c "*) ;; *) usage "unknown check '$c' (known: $ALL_CHECKS)" ;; esac
    done
    for c in "$CONNS" "$DELAY_MS" "$MIN_RATE"; do
        case "$c" in ''|*[!0-9]*) usage "FLEET_CONNS, FLEET_DELAY_MS and FLEET_MIN_RATE must be numbers" ;; esac
    done
    [ "$(id -u)" = 0 ] || { printf '[fleet] ERROR: must run as root (mounts, namespaces, cgroups): sudo %s\n' "$0" >&2; exit 77; }
    ensure_tools
    find_binary
    cleanup_stale
    ports_free
    RUN=$(mktemp -d "$STATE_BASE/${STATE_PREFIX}XXXXXX") || die "mktemp failed"
    echo "$$ $(pid_starttime $$)" > "$RUN/owner"
    : > "$RUN/extra-pids"
    trap on_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    setsid bash "$SELF" --reap "$RUN" </dev/null >/dev/null 2>&1 &
    # The checks run in a child and this process only waits, so that SIGTERM
    # and SIGINT tear the fleet down at once (see e2e-systemd.sh).
    ( trap - EXIT INT TERM; run_all ) &
    RUNNER=$!
    echo "$RUNNER $(pid_starttime "$RUNNER")" > "$RUN/runner"
    wait "$RUNNER"
}

run_all() {
    local t_all i
    t_all=$(now_ms)
    # The release under test, kept apart from target/ (the upgrade check
    # builds the next one there); a host booted later gets the current one.
    cp "$BIN" "$RUN/app-old" || die "cannot copy $BIN"
    BIN=$RUN/app-old
    for i in $(seq 1 "$HOSTS"); do boot_host "$i"; done
    start_haproxy
    run_check balance   "every host in rotation and served; >= $MIN_RATE req/s through HAProxy"     check_balance
    run_check upgrade   "new build on every host, systemctl reload host by host: 0 failed"          check_upgrade
    run_check restart   "systemctl restart host by host (drain_delay): 0 failed, out and back"       check_restart
    run_check host-lost "container SIGKILLed: only in-flight requests fail, out in time, comes back" check_host_lost
    run_check config    "[service] greeting pushed to every host + reload: every worker serves it"   check_config
    log "total $(( $(now_ms) - t_all )) ms"
    [ "$FAILED" = 0 ]
}

main "$@"
