#!/usr/bin/env bash
# e2e-systemd.sh - end-to-end test of app against a REAL systemd (as root).
#
# Boots a throw-away systemd (the host's own /lib/systemd/systemd) as PID 1 of a
# systemd-nspawn container whose root is a copy-on-write overlay of the host's
# "/" (writes land in a tmpfs; the host is never modified), with a private
# network namespace (only "lo": port 8080 inside does not collide with the
# host). Installs app there with scripts/install.sh, then runs what a user
# runs - systemctl start/reload/restart/stop, journalctl, kill - each as a
# check printing PASS/FAIL and its duration. All HTTP traffic stays on the
# container's loopback.
#
# Usage: sudo scripts/e2e-systemd.sh
# Environment:
#   APP_BIN=PATH       binary to test (default: cargo build --release, then
#                      target/release/app; E2E_BUILD=0 skips the build if it exists)
#   E2E_CHECKS="..."   run only these checks (names: analyze activation sandboxing
#                      journal reload reload-broken kill-worker access-log tls metrics watchdog
#                      restart stop docs deb)
#   APP_DEB=PATH       .deb for the deb check (default: scripts/package.sh --no-build
#                      on the host before the sandbox starts)
#   E2E_ACCEPT=round-robin  run with this accept strategy (default: app.toml's)
#   E2E_LOAD_RATE=100  requests/s of each of the 2 load clients (curl --rate)
#   E2E_LIFETIME=900   hard limit (s) for the sandbox, in case everything else fails
#   E2E_VERBOSE=1      show more command output (install, analyze, status, journal)
#
# Exit status: 0 if every check passed, 1 if any failed, 2 if the sandbox
# could not be set up. The sandbox is torn down on exit, on SIGINT/SIGTERM,
# and - by a detached reaper process - even if this script is SIGKILLed.
# Needs: root, systemd (252) on the host, overlayfs; installs
# systemd-container, curl, jq (and procps) with apt-get if they are missing.
# Intentional: `A && B || fail` (fail returns 1), word-splitting pid lists,
# single-quoted scripts run by `bash -c`, helpers called through wait_for.
# shellcheck disable=SC2015,SC2013,SC2016,SC2317
set -uo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
SRC=$(cd "$(dirname "$SELF")/.." && pwd)
STATE_BASE=${TMPDIR:-/tmp}
STATE_PREFIX=app-e2e.
LIFETIME=${E2E_LIFETIME:-900}
LOAD_RATE=${E2E_LOAD_RATE:-100}
VERBOSE=${E2E_VERBOSE:-0}
ALL_CHECKS="analyze activation sandboxing journal reload reload-broken kill-worker access-log tls metrics watchdog restart stop docs deb"
CHECKS=${E2E_CHECKS:-$ALL_CHECKS}
IN_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
STAGE=/var/tmp/app-e2e    # inside the container: units, install.sh, binary
URL=http://127.0.0.1:8080 # app.socket's default ListenStream=, container loopback

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
log() { printf '[e2e] %s\n' "$*" >&2; }
die() { printf '[e2e] ERROR: %s\n' "$*" >&2; exit 2; }

# The sandbox itself (overlay, nspawn, teardown, reaper, install) is shared
# with scripts/fleet.sh.
. "$SRC/scripts/lib/sandbox.sh"

if [ "${1:-}" = --reap ]; then sandbox_reap "$2"; exit 0; fi

on_exit() {
    local rc=$? t0
    trap - EXIT INT TERM
    # the checks run in a child (see main): stop it first, then the sandbox
    # (which also ends everything the child ran inside the container)
    if [ -n "${RUNNER:-}" ] && kill -0 "$RUNNER" 2>/dev/null; then
        log "interrupted: stopping the checks and tearing the sandbox down"
        kill -KILL "$RUNNER" 2>/dev/null
        wait "$RUNNER" 2>/dev/null   # (and no "Killed" message from bash)
    fi
    local passed=0 failed=0 total
    [ -n "${STATE:-}" ] && read -r passed failed 2>/dev/null < "$STATE/counts"
    if [ -n "${STATE:-}" ] && [ -d "$STATE" ]; then
        t0=$(now_ms)
        [ -n "${REAPER:-}" ] && kill "$REAPER" 2>/dev/null
        if teardown "$STATE"; then
            log "sandbox torn down in $(( $(now_ms) - t0 )) ms"
        else
            log "teardown incomplete: see above"; [ "$rc" = 0 ] && rc=2
        fi
    fi
    # the summary comes last, after the teardown; checks that did not run
    # (interrupted, or the sandbox could not be set up) count as failed
    total=$(wc -w <<< "$CHECKS")
    if [ "$rc" != 0 ] && [ $((passed + failed)) -lt "$total" ]; then
        log "$((total - passed - failed)) check(s) did not run"
        failed=$((total - passed))
    fi
    echo "e2e: $passed passed, $failed failed"
    [ "$rc" = 0 ] && [ "$failed" != 0 ] && rc=1
    exit "$rc"
}

# ---------------------------------------------------------------------------
# Check helpers
# ---------------------------------------------------------------------------
PASSED=0; FAILED=0; FAILED_NAMES=""
REASON=""
note() { printf '      %s\n' "$@"; }
show() { [ "$VERBOSE" = 1 ] && printf '%s\n' "$@" | sed 's/^/      | /'; return 0; }
fail() { REASON="$*"; return 1; }

# run_check NAME DESCRIPTION FUNCTION
run_check() {
    local name=$1 desc=$2 fn=$3 t0 ms rc
    case " $CHECKS " in *" $name "*) ;; *) return 0 ;; esac
    REASON=""
    t0=$(now_ms)
    if [ "${ACTIVATION_FAILED:-0}" = 1 ] && [ "$name" != analyze ]; then
        # everything else needs a running service: fail fast instead of
        # waiting for timeouts in every check
        REASON="not run: the service did not start (see the activation check)"; rc=1
    else
        "$fn"; rc=$?
    fi
    [ "$name" = activation ] && [ "$rc" != 0 ] && ACTIVATION_FAILED=1
    ms=$(( $(now_ms) - t0 ))
    if [ "$rc" = 0 ]; then
        PASSED=$((PASSED + 1)); printf 'PASS  %-14s %6d ms  %s\n' "$name" "$ms" "$desc"
    else
        FAILED=$((FAILED + 1)); FAILED_NAMES="$FAILED_NAMES $name"
        printf 'FAIL  %-14s %6d ms  %s\n' "$name" "$ms" "$desc"
        [ -n "$REASON" ] && printf '      reason: %s\n' "$REASON"
    fi
    echo "$PASSED $FAILED" > "$STATE/counts"
    return 0
}

prop() { IN systemctl show -p "$2" --value "$1" 2>/dev/null; }     # prop UNIT PROPERTY
journal_cursor() { IN journalctl -u app -n 0 --show-cursor -q 2>/dev/null | sed -n 's/^-- cursor: //p'; }
journal_since() { IN journalctl -u app --no-pager -q --after-cursor="$1" "${@:2}"; }

# http PATH -> "CODE BODY" (one request, fresh connection)
http() { IN curl -sS --max-time "${2:-10}" -w ' %{http_code}' "$URL$1" 2>&1; }

app_status_json() { IN timeout 10 app status --json 2>/dev/null; }
generation() {  # current generation from `app status --json`
    app_status_json | jq -r '(.generation // .status.generation // empty)' 2>/dev/null | head -n1
}
worker_pids() {  # serving workers of the current generation (app status --json),
                 # else the live (non-zombie) children of the master
    local m j
    j=$(app_status_json | jq -r '(.status // .) as $s | $s.workers[]?
        | select(.generation == $s.generation and (.state == "ready" or .state == "serving")) | .pid' 2>/dev/null)
    if [ -n "$j" ]; then printf '%s\n' "$j" | sort -n; return 0; fi
    m=$(prop app.service MainPID)
    [ -n "$m" ] && [ "$m" != 0 ] && IN ps -o pid=,stat= --ppid "$m" | awk '$2 !~ /^Z/ { print $1 }' | sort -n
}
wait_for() {  # wait_for TIMEOUT_S CMD...: poll every 0.1 s until CMD succeeds
    local deadline=$(( $(now_ms) + $1 * 1000 )); shift
    until "$@"; do [ "$(now_ms)" -lt "$deadline" ] || return 1; sleep 0.1; done
}
is_running() { [ "$(prop app.service ActiveState)/$(prop app.service SubState)" = active/running ]; }

# Load: 2 clients inside the container, each a loop of curl runs (50 requests
# per run, new connection each, --rate $LOAD_RATE/s) until a stop file exists.
# Every request writes one line "HTTP_CODE CURL_EXIT SECONDS ERROR" to the client's log.
LOADERS=""
load_start() {  # load_start TAG [PATH]
    local tag=$1 path=${2:-/} i
    LOAD_TAG=$tag
    IN rm -f "/run/e2e-stop-$tag"
    for i in 1 2; do
        # shellcheck disable=SC2016
        IN bash -c '
            stop=$1 url=$2 rate=$3; args=()
            for _ in $(seq 50); do args+=(-o /dev/null "$url"); done
            while [ ! -e "$stop" ]; do
                curl -s --max-time 20 --rate "$rate/s" -H "Connection: close" \
                    -w "%{http_code} %{exitcode} %{time_total} %{errormsg}\n" "${args[@]}"
            done' load "/run/e2e-stop-$tag" "$URL$path" "$LOAD_RATE" > "$STATE/load-$tag.$i" 2>&1 &
        LOADERS="$LOADERS $!"
    done
}
# load_stop: stop the clients, set LOAD_OK / LOAD_FAIL / LOAD_SUMMARY
load_stop() {
    local tag=$LOAD_TAG f
    IN touch "/run/e2e-stop-$tag"
    # shellcheck disable=SC2086
    wait $LOADERS 2>/dev/null; LOADERS=""
    f=$(cat "$STATE/load-$tag".*)
    LOAD_OK=$(printf '%s\n' "$f" | grep -c '^200 0 ')
    LOAD_FAIL=$(printf '%s\n' "$f" | grep -vc '^200 0 \|^$')
    LOAD_SUMMARY="$LOAD_OK ok, $LOAD_FAIL failed, slowest $(printf '%s\n' "$f" | awk '$3 > m { m = $3 } END { printf "%.3f", m }') s"
    if [ "$LOAD_FAIL" -gt 0 ]; then
        # group by code, curl exit status and message (not by time)
        LOAD_SUMMARY="$LOAD_SUMMARY ($(printf '%s\n' "$f" | grep -v '^200 0 \|^$' | awk '{ $3 = ""; print }' | sort | uniq -c | sort -rn | head -5 | sed 's/^ *//' | paste -sd ';' -))"
    fi
}

# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------
check_analyze() {  # systemd-analyze security + verify on the installed units
    local out exposure vout rc
    out=$(IN systemd-analyze security --no-pager app.service 2>&1)
    exposure=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for app.service: \([0-9.]*\).*/\1/p')
    show "$(printf '%s\n' "$out" | grep '✗')"
    note "systemd-analyze security app.service: exposure ${exposure:-?}"
    vout=$(IN systemd-analyze verify /etc/systemd/system/app.socket /etc/systemd/system/app.service 2>&1); rc=$?
    [ -n "$vout" ] && note "systemd-analyze verify said:" && printf '%s\n' "$vout" | sed 's/^/      | /'
    [ -n "$exposure" ] || fail "no exposure figure in: $(printf '%s\n' "$out" | tail -n 3)" || return 1
    awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }' || fail "exposure $exposure > 2.0" || return 1
    [ "$rc" = 0 ] && [ -z "$vout" ] || fail "systemd-analyze verify: rc=$rc, output not empty"
}

check_activation() {  # socket activation, status shows running + STATUS=
    local r st t0
    IN systemctl start app.socket || fail "systemctl start app.socket failed" || return 1
    [ "$(prop app.socket ActiveState)" = active ] || fail "app.socket not active" || return 1
    [ "$(prop app.service ActiveState)" = inactive ] || fail "app.service already $(prop app.service ActiveState) before the first connection" || return 1
    t0=$(now_ms)
    r=$(http / 15)
    note "first curl (activation): $(( $(now_ms) - t0 )) ms: ${r//$'\n'/ }"
    case "$r" in *" 200") ;; *) fail "curl $URL/ -> $r"; IN journalctl -u app --no-pager -n 30 | sed 's/^/      | /'; return 1 ;; esac
    case "$r" in *"from worker"*) ;; *) fail "unexpected body: $r"; return 1 ;; esac
    IN curl -sS -D - -o /dev/null "$URL/" | grep -qi '^x-worker:' || fail "no X-Worker header" || return 1
    st=$(IN systemctl status --no-pager -l app.service 2>&1)
    show "$st"
    printf '%s\n' "$st" | grep -q 'Active: active (running)' || fail "systemctl status: not 'active (running)': $(printf '%s\n' "$st" | grep Active:)" || return 1
    printf '%s\n' "$st" | grep -q '^ *Status: "' || fail "systemctl status shows no Status: line (STATUS=)" || return 1
    note "$(printf '%s\n' "$st" | grep -m1 '^ *Status:' | sed 's/^ *//')"
    note "workers: $(worker_pids | wc -l), generation $(generation)"
}

check_sandboxing() {  # the unit's hardening leaves the master what it needs
    local js main uid bad=0 w pid cpu allowed sock
    js=$(app_status_json)
    [ -n "$js" ] || fail "app status --json (as root, default control socket) gave nothing" || return 1
    main=$(prop app.service MainPID)
    uid=$(IN ps -o uid= -p "$main" | tr -d ' ')
    note "master $main runs as uid $uid ($(prop app.service User) DynamicUser=$(prop app.service DynamicUser))"
    [ -n "$uid" ] && [ "$uid" != 0 ] || fail "master runs as root" || bad=1
    # every worker pinned to its own CPU (sched_setaffinity under SystemCallFilter=)
    for w in $(printf '%s' "$js" | jq -r '(.status // .).workers[]? | "\(.pid):\(.cpu)"'); do
        pid=${w%%:*}; cpu=${w#*:}
        allowed=$(IN awk '/^Cpus_allowed_list:/ { print $2 }' "/proc/$pid/status")
        note "worker pid $pid: cpu $cpu, Cpus_allowed_list $allowed"
        [ "$allowed" = "$cpu" ] || { fail "worker $pid not pinned to CPU $cpu (allowed: $allowed)"; bad=1; }
    done
    # memory readings (/proc/<worker>/smaps_rollup under ProtectProc=invisible,
    # ProcSubset=pid); the master samples them once a second
    mem_read() {
        js=$(app_status_json)
        printf '%s' "$js" | jq -e '[(.status // .).workers[]? | select((.rss_bytes // 0) > 0 and .pss_bytes != null)]
            | length > 0' >/dev/null 2>&1
    }
    wait_for 3 mem_read || { fail "no worker memory readings (rss/pss) in app status --json"; bad=1; }
    note "worker memory: $(printf '%s' "$js" | jq -r '[(.status // .).workers[]? | "rss=\(.rss_bytes) pss=\(.pss_bytes)"] | join(", ")')"
    # a system call or file the sandbox denies shows up as EPERM/EACCES in the app's log
    w=$(IN journalctl -u app _SYSTEMD_UNIT=app.service --no-pager -o cat | grep -iE 'operation not permitted|permission denied|EPERM|EACCES' | head -n 3)
    [ -z "$w" ] || { fail "the app logged permission errors: $(printf '%s' "$w" | paste -sd '|' -)"; bad=1; }
    sock=$(IN stat -c '%a %U' /run/app/control.sock 2>&1)
    note "/run/app/control.sock: mode/owner $sock"
    case "$sock" in "600 "*) ;; *) fail "control socket is not mode 0600: $sock"; bad=1 ;; esac
    return "$bad"
}

check_journal() {  # master lines, worker lines, WORKER_ID=0 filter
    local main exp masters workers w0 other
    main=$(prop app.service MainPID)
    exp=$(IN journalctl -u app --no-pager -o export 2>/dev/null)
    # one record per entry: _PID, WORKER_ID (empty if none), _SYSTEMD_UNIT
    masters=$(printf '%s\n' "$exp" | awk -v m="$main" '
        /^$/ { if (u && p == m && w == "") n++; p = ""; w = ""; u = 0; next }
        /^_PID=/ { p = substr($0, 6) } /^WORKER_ID=/ { w = substr($0, 11) }
        /^_SYSTEMD_UNIT=app.service$/ { u = 1 }
        END { if (u && p == m && w == "") n++; print n + 0 }')
    workers=$(printf '%s\n' "$exp" | grep -c '^WORKER_ID=')
    note "journalctl -u app: $masters master lines (_PID=$main, no WORKER_ID), $workers worker lines (WORKER_ID=)"
    [ "$masters" -gt 0 ] || fail "no master lines in journalctl -u app" || return 1
    [ "$workers" -gt 0 ] || fail "no worker lines (with WORKER_ID=) in journalctl -u app" || return 1
    exp=$(IN journalctl -u app WORKER_ID=0 --no-pager -o export 2>/dev/null)
    w0=$(printf '%s\n' "$exp" | grep -c '^WORKER_ID=0$')
    other=$(printf '%s\n' "$exp" | grep -c '^__CURSOR=')
    local own
    own=$(printf '%s\n' "$exp" | awk '
        /^$/ { if (p != "" && p == wp) n++; p = ""; wp = ""; next }
        /^_PID=/ { p = substr($0, 6) } /^WORKER_PID=/ { wp = substr($0, 12) }
        END { if (p != "" && p == wp) n++; print n + 0 }')
    note "journalctl -u app WORKER_ID=0: $other lines, $w0 with WORKER_ID=0, $own logged by the worker process itself (_PID = WORKER_PID)"
    show "$(IN journalctl -u app WORKER_ID=0 --no-pager -o short-precise -n 5)"
    [ "$w0" -gt 0 ] || fail "journalctl -u app WORKER_ID=0 shows nothing" || return 1
    [ "$w0" = "$other" ] || fail "journalctl -u app WORKER_ID=0 shows $((other - w0)) lines of others"
}

check_reload() {  # systemctl reload under load: no failed request, new generation
    local g0 g1 main0 rc t0 ms state wgens
    g0=$(generation); main0=$(prop app.service MainPID)
    [ -n "$g0" ] || fail "app status --json shows no generation: $(app_status_json | head -c 300)" || return 1
    load_start reload
    sleep 1
    t0=$(now_ms)
    IN systemctl reload app; rc=$?
    ms=$(( $(now_ms) - t0 ))
    # right after `systemctl reload` returned: must be done already
    g1=$(generation); state=$(prop app.service ActiveState)/$(prop app.service SubState)
    # workers of the new generation vs. the pool size (old ones may still drain)
    wgens=$(app_status_json | jq -r --argjson g "${g1:-0}" '(.status // .) as $s
        | "\([$s.workers[]? | select(.generation == $g)] | length)/\($s.target_workers // "?")"' 2>/dev/null)
    sleep 1
    load_stop
    note "systemctl reload app: rc=$rc, $ms ms; at its return: generation $g0 -> $g1, ${wgens:-?} workers of generation $g1, state $state"
    note "load during reload: $LOAD_SUMMARY"
    [ "$rc" = 0 ] || fail "systemctl reload app failed (rc=$rc)" || return 1
    [ -n "$g1" ] && [ "$g1" -gt "$g0" ] || fail "generation not advanced when systemctl reload returned ($g0 -> $g1)" || return 1
    case "$wgens" in
        */\?|"") ;;
        *) [ "${wgens%/*}" -ge "${wgens#*/}" ] || fail "only $wgens workers of generation $g1 when reload returned" || return 1 ;;
    esac
    [ "$state" = active/running ] || fail "state $state right after reload returned" || return 1
    [ "$(prop app.service MainPID)" = "$main0" ] || fail "MainPID changed: reload restarted the master" || return 1
    [ "$LOAD_OK" -gt 0 ] && [ "$LOAD_FAIL" = 0 ] || fail "failed requests during reload: $LOAD_SUMMARY"
}

check_reload_broken() {  # reload with a broken config fails, service keeps serving
    local g0 g1 rc out t0 ms main0 cur
    g0=$(generation); main0=$(prop app.service MainPID)
    cur=$(journal_cursor)
    IN cp /etc/app/app.toml /run/app.toml.e2e-backup
    IN sh -c 'printf "this is [[ not = valid toml\nworkers = \"many\"\n" > /etc/app/app.toml'
    load_start broken
    sleep 0.5
    t0=$(now_ms)
    out=$(IN systemctl reload app 2>&1); rc=$?
    ms=$(( $(now_ms) - t0 ))
    sleep 0.5
    load_stop
    g1=$(generation)
    note "systemctl reload app (broken config): rc=$rc, $ms ms: ${out//$'\n'/ }"
    note "journal: $(journal_since "$cur" -o cat | grep -v -E '^(Reloading|Reloaded) ' | head -n 4 | cut -c1-200 | paste -sd '|' -)"
    note "load during failed reload: $LOAD_SUMMARY; generation $g0 -> $g1"
    IN cp /run/app.toml.e2e-backup /etc/app/app.toml
    [ "$rc" != 0 ] || fail "systemctl reload succeeded with a broken config" || return 1
    is_running || fail "service not running after the failed reload: $(prop app.service ActiveState)" || return 1
    [ "$(prop app.service MainPID)" = "$main0" ] || fail "MainPID changed after the failed reload" || return 1
    [ "$LOAD_OK" -gt 0 ] && [ "$LOAD_FAIL" = 0 ] || fail "failed requests: $LOAD_SUMMARY" || return 1
    # restored config: reload works again
    IN systemctl reload app || fail "reload after restoring the config failed" || return 1
    case "$(http /)" in *" 200") ;; *) fail "not serving after restoring the config" ;; esac
}

check_kill_worker() {  # SIGKILL of a worker: replaced, visible in the journal
    local before after victim cur t0 ms j n
    before=$(worker_pids)
    n=$(printf '%s\n' "$before" | grep -c .)
    victim=$(printf '%s\n' "$before" | head -n1)
    [ -n "$victim" ] || fail "no worker processes found" || return 1
    cur=$(journal_cursor)
    t0=$(now_ms)
    IN kill -KILL "$victim"
    replaced() {
        after=$(worker_pids)
        [ "$(printf '%s\n' "$after" | grep -c .)" -ge "$n" ] && ! printf '%s\n' "$after" | grep -qx "$victim" &&
            ! IN kill -0 "$victim" 2>/dev/null
    }
    wait_for 15 replaced || fail "worker $victim not replaced within 15 s (workers now: $(worker_pids | paste -sd ' ' -))" || return 1
    ms=$(( $(now_ms) - t0 ))
    note "worker pid $victim SIGKILLed, replaced after $ms ms (workers: $(printf '%s\n' "$before" | paste -sd ' ' -) -> $(printf '%s\n' "$after" | paste -sd ' ' -))"
    sleep 0.3
    # entries about the victim: its pid in the text or in a field (PID=, WORKER_PID=)
    j=$(journal_since "$cur" -o export | awk -v v="$victim" '
        function flush() { if (hit && msg != "") print msg; hit = 0; msg = "" }
        /^$/ { flush(); next }
        /^MESSAGE=/ { msg = substr($0, 9); if (index(msg, v)) hit = 1 }
        /^[A-Z][A-Z_]*=/ && $0 !~ /^_/ { split($0, kv, "="); if (kv[1] ~ /PID$/ && kv[2] == v) hit = 1 }
        END { flush() }')
    note "journal (pid $victim in the text or a PID field): $(printf '%s\n' "$j" | head -n 3 | cut -c1-200 | paste -sd '|' -)"
    [ -n "$j" ] || fail "the journal does not mention the killed worker (pid $victim): $(journal_since "$cur" -o cat | head -n 5 | paste -sd '|' -)" || return 1
    # The master's lines about it carry its WORKER_ID, so filtering on the slot shows why
    # it died: an entry from the master (_PID = MainPID) with WORKER_PID = the victim.
    local slot main about
    slot=$(journal_since "$cur" -o export | awk -v v="$victim" '
        /^$/ { if (wp == v && w != "") { print w; exit } w = ""; wp = ""; next }
        /^WORKER_ID=/ { w = substr($0, 11) } /^WORKER_PID=/ { wp = substr($0, 12) }')
    main=$(prop app.service MainPID)
    # Filtered by journalctl itself, as an operator would (no cursor: the pid is unique).
    about=$(IN journalctl -u app --no-pager -o export WORKER_ID="$slot" 2>/dev/null | awk -v v="$victim" -v m="$main" '
        /^$/ { if (wp == v && p == m) n++; wp = ""; p = ""; next }
        /^WORKER_PID=/ { wp = substr($0, 12) } /^_PID=/ { p = substr($0, 6) }
        END { if (wp == v && p == m) n++; print n + 0 }')
    note "journalctl -u app WORKER_ID=$slot: $about line(s) from the master (_PID=$main) about pid $victim"
    [ -n "$slot" ] && [ "$about" -gt 0 ] || fail "journalctl -u app WORKER_ID=${slot:-?} has no master line about pid $victim" || return 1
    case "$(http /)" in *" 200") ;; *) fail "not serving after the worker was replaced" ;; esac
}

check_tls() {  # [tls] with LoadCredential= under DynamicUser: https 200, key private, rotated by restart
    local d=/etc/app/tls mode exposure serial r
    IN mkdir -p "$d"; IN chmod 0700 "$d"
    IN sh -c "cd $d && umask 077 &&
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt -subj /CN=e2e-ca -days 2 &&
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > ext.cnf &&
        for s in 1001 2002; do
            openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout \$s.key -out \$s.csr -subj /CN=localhost &&
            openssl x509 -req -in \$s.csr -CA ca.crt -CAkey ca.key -set_serial 0x\$s -days 2 -extfile ext.cnf -out \$s.crt || exit 1
        done && cp 1001.crt tls.crt && cp 1001.key tls.key" >/dev/null 2>&1 || { fail "openssl could not make the test certificates"; return 1; }
    IN mkdir -p /etc/systemd/system/app.service.d
    IN sh -c 'printf "[Service]\nLoadCredential=tls.crt:/etc/app/tls/tls.crt\nLoadCredential=tls.key:/etc/app/tls/tls.key\nSockets=app-tls.socket\n" > /etc/systemd/system/app.service.d/tls.conf'
    IN sh -c 'printf "[Socket]\nListenStream=127.0.0.1:8443\nFileDescriptorName=https\nService=app.service\n" > /etc/systemd/system/app-tls.socket'
    IN cp /etc/app/app.toml /run/app.toml.e2e-tls
    IN sh -c 'printf "\n[tls]\ncert = \"credential:tls.crt\"\nkey = \"credential:tls.key\"\nsockets = [\"https\"]\n" >> /etc/app/app.toml'
    IN systemctl daemon-reload
    IN systemctl start app-tls.socket
    IN systemctl restart app.service
    tls_off() {
        IN cp /run/app.toml.e2e-tls /etc/app/app.toml
        IN rm -rf "$d"
        IN rm -f /etc/systemd/system/app.service.d/tls.conf
        IN systemctl stop app-tls.socket; IN rm -f /etc/systemd/system/app-tls.socket
        IN systemctl daemon-reload; IN systemctl restart app.service
    }
    tls_get() { IN curl -sS --max-time 10 --cacert "$d/ca.crt" -w ' %{http_code}' "https://127.0.0.1:8443$1" 2>&1; }
    served_serial() { IN sh -c "openssl s_client -connect 127.0.0.1:8443 -servername localhost </dev/null 2>/dev/null | openssl x509 -noout -serial" | sed 's/^serial=//'; }
    https_ok() { case "$(tls_get /)" in *" 200") return 0 ;; esac; return 1; }
    wait_for 10 https_ok
    r=$(tls_get /)
    note "curl --cacert https://127.0.0.1:8443/: $r; plain http://127.0.0.1:8080/: $(http /)"
    case "$r" in *" 200") ;; *) tls_off; fail "https -> $r: $(IN journalctl -u app --no-pager -n 5 -o cat | paste -sd '|' -)"; return 1 ;; esac
    mode=$(IN sh -c 'stat -c "%a %U" /run/credentials/app.service/tls.key' 2>&1)
    exposure=$(IN systemd-analyze security --no-pager app.service 2>&1 | sed -n 's/.*Overall exposure level for app.service: \([0-9.]*\).*/\1/p')
    serial=$(served_serial)
    note "credential tls.key: mode/owner $mode; exposure with LoadCredential= $exposure; serial served $serial"
    IN cp "$d/2002.crt" "$d/tls.crt"; IN cp "$d/2002.key" "$d/tls.key"
    IN systemctl restart app.service
    rotated_ok() { [ "$(served_serial)" = 2002 ]; }
    wait_for 10 rotated_ok
    local rotated; rotated=$(served_serial)
    note "after systemctl restart app with a new pair: serial $rotated, $(tls_get /)"
    tls_off
    case "$mode" in 400\ *|600\ *) ;; *) fail "credential mode/owner: $mode"; return 1 ;; esac
    awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }' || fail "exposure $exposure > 2.0 with LoadCredential=" || return 1
    [ "$serial" = 1001 ] || fail "served serial $serial, expected 1001" || return 1
    [ "$rotated" = 2002 ] || fail "after rotation served serial $rotated, expected 2002"
}

check_access_log() {  # [http] access_log: one journal entry per request, HTTP_* fields filter
    local n path fields
    IN cp /etc/app/app.toml /run/app.toml.e2e-access
    IN sh -c 'printf "[http]\naccess_log = true\n" > /etc/app/app.toml'
    IN systemctl reload app || { IN cp /run/app.toml.e2e-access /etc/app/app.toml; fail "reload with access_log = true failed"; return 1; }
    path="/users/$((100000 + RANDOM))"
    http "$path" >/dev/null
    http /users/1 >/dev/null
    sleep 0.5
    # Filtered by journalctl itself, as an operator would (no cursor: the path is unique).
    n=$(IN journalctl -u app --no-pager -o export HTTP_STATUS=404 2>/dev/null | grep -c "^HTTP_PATH=$path\$")
    fields=$(IN journalctl -u app --no-pager -o export HTTP_STATUS=404 2>/dev/null | grep -E '^(HTTP_[A-Z_]+|WORKER_ID)=' | sort -u | paste -sd ' ' -)
    note "journalctl -u app HTTP_STATUS=404: $n entry for $path; fields: $fields"
    IN cp /run/app.toml.e2e-access /etc/app/app.toml
    IN systemctl reload app || { fail "reload back to the shipped app.toml failed"; return 1; }
    [ "$n" = 1 ] || fail "expected 1 access entry for $path with HTTP_STATUS=404, got $n" || return 1
    case "$fields" in *HTTP_METHOD=GET*HTTP_STATUS=404*WORKER_ID=*) ;; *) fail "access entry lacks fields: $fields" ;; esac
}

check_metrics() {  # the shipped app-metrics.socket: the pool's series, counters rising, not on app.socket
    local murl=http://127.0.0.1:9090/metrics before after ctype main i r b_total b_target b_workers b_missing a_total
    # Python's OpenMetrics parser (python3-prometheus-client, present in the host's /): the
    # scrape on stdin, one line out: requests total, target, worker series, missing families.
    cat > "$ROOT$STAGE/parse-metrics.py" <<'PY'
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
want = ["app_http_requests", "app_http_request_duration_seconds", "app_http_connections_open",
        "app_worker_requests", "app_worker_accepted_connections", "app_worker_cpu_seconds",
        "app_worker_pss_bytes", "app_worker_heartbeat_rtt_seconds", "app_worker_restarts",
        "app_reloads", "app_generation", "app_workers_target", "app_restart_budget_used",
        "process_start_time_seconds"]
fams = {f.name: f for f in text_string_to_metric_families(sys.stdin.read())}
missing = [w for w in want if w not in fams]
if missing:
    print(0, 0, 0, ",".join(missing))
    sys.exit()
total = sum(s.value for s in fams["app_http_requests"].samples if s.name == "app_http_requests_total")
workers = {s.labels["worker"] for s in fams["app_worker_requests"].samples}
target = fams["app_workers_target"].samples[0].value
print(int(total), int(target), len(workers), "-")
PY
    scrape() { IN sh -c "curl -sS --max-time 10 $murl | /usr/bin/python3 $STAGE/parse-metrics.py" 2>&1; }
    # As a user starts it (also when this check runs alone): app.service wants the metrics
    # socket, and the first connection on app.socket starts the service.
    IN systemctl start app.socket
    serving() { case "$(http /)" in *" 200") return 0 ;; esac; return 1; }
    wait_for 15 serving || fail "app.socket does not serve: $(http /)" || return 1
    [ "$(prop app-metrics.socket ActiveState)" = active ] || fail "app-metrics.socket is $(prop app-metrics.socket ActiveState)" || return 1
    ctype=$(IN curl -sS --max-time 10 -o /dev/null -w '%{http_code} %{content_type}' "$murl" 2>&1)
    before=$(scrape)
    note "curl $murl: $ctype; parsed: $before (requests, target, worker series, missing)"
    case "$ctype" in "200 application/openmetrics-text"*) ;; *) fail "scrape answered $ctype" || return 1 ;; esac
    read -r b_total b_target b_workers b_missing <<<"$before"
    [ "$b_missing" = - ] || fail "missing families: $b_missing (parsed: $before)" || return 1
    [ "${b_workers:-0}" -ge "${b_target:-1}" ] && [ "${b_target:-0}" -ge 1 ] || fail "worker series $b_workers for a target of $b_target" || return 1
    for i in $(seq 20); do r=$(http /); case "$r" in *" 200") ;; *) fail "request $i on app.socket -> $r" || return 1 ;; esac; done
    after=$(scrape)
    read -r a_total _ _ _ <<<"$after"
    note "after 20 requests on app.socket: requests_total $b_total -> $a_total"
    # Nothing else is loading the service between the two scrapes, and scrapes do not count.
    [ "$((a_total - b_total))" = 20 ] || fail "requests_total rose by $((a_total - b_total)), expected 20" || return 1
    # app.socket serves the service (the demo's 404 for an unknown path), never the metrics.
    r=$(IN curl -sS --max-time 10 -w ' %{http_code}' "$URL/metrics" 2>&1)
    note "curl $URL/metrics (app.socket): ${r//$'\n'/ }"
    case "$r" in *app_http_requests*) fail "app.socket serves the metrics" || return 1 ;; esac
    case "$r" in *" 404") ;; *) fail "app.socket /metrics -> $r, expected the service's 404" || return 1 ;; esac
    # The master binds nothing of its own: the metrics socket is systemd's, passed in.
    main=$(prop app.service MainPID)
    note "app-metrics.socket listening: $(IN ss -Hltn 'sport = :9090' | awk '{print $4}' | paste -sd ' ' -); LISTEN_FDNAMES of the master: $(IN sh -c "tr '\0' '\n' < /proc/$main/environ" | sed -n 's/^LISTEN_FDNAMES=//p')"
}

check_watchdog() {  # SIGSTOP the master: watchdog kill + Restart=; clients wait
    local main0 main1 nr0 cur t0 ms codes ok bad j
    main0=$(prop app.service MainPID); nr0=$(prop app.service NRestarts)
    case "$main0" in ""|0) fail "app.service has no main process" || return 1 ;; esac
    cur=$(journal_cursor)
    t0=$(now_ms)
    IN kill -STOP "$main0"
    # clients connecting while the master hangs, is killed and restarted: one
    # every 0.5 s for 8 s; they must all be answered (by live workers, or by the
    # next master after waiting in app.socket's backlog)
    # shellcheck disable=SC2016
    IN bash -c 'for i in $(seq 16); do
            curl -s -o /dev/null --max-time 40 -w "%{http_code} %{exitcode} %{time_total} %{errormsg}\n" "$1" &
            sleep 0.5
        done; wait' clients "$URL/" > "$STATE/watchdog-clients" 2>&1 &
    local clients=$!
    restarted() { [ "$(prop app.service NRestarts)" -gt "$nr0" ] && is_running; }
    if ! wait_for 40 restarted; then
        IN kill -CONT "$main0" 2>/dev/null; wait "$clients"
        fail "no watchdog restart within 40 s (state $(prop app.service ActiveState)/$(prop app.service SubState), NRestarts $(prop app.service NRestarts))"
        return 1
    fi
    ms=$(( $(now_ms) - t0 ))
    main1=$(prop app.service MainPID)
    wait "$clients"
    codes=$(cat "$STATE/watchdog-clients")
    ok=$(printf '%s\n' "$codes" | grep -c '^200 0 ')
    bad=$(printf '%s\n' "$codes" | grep -vc '^200 0 \|^$')
    j=$(journal_since "$cur" -o cat)
    note "SIGSTOP master $main0 -> restarted as $main1 after $ms ms; NRestarts $nr0 -> $(prop app.service NRestarts)"
    note "journal: $(printf '%s\n' "$j" | grep -m2 -iE 'watchdog' | paste -sd '|' -)"
    note "clients during the outage: $ok ok, $bad failed; $(printf '%s\n' "$codes" | awk '$3 > 0.2 { n++ } END { print n + 0 }') waited > 0.2 s (in the backlog), slowest $(printf '%s\n' "$codes" | awk '{print $3}' | sort -n | tail -n1) s"
    show "$codes"
    [ "$main1" != "$main0" ] || fail "MainPID unchanged" || return 1
    printf '%s\n' "$j" | grep -q 'Watchdog timeout' || fail "no 'Watchdog timeout' in the journal" || return 1
    [ "$bad" = 0 ] && [ "$ok" -gt 0 ] || fail "clients failed during the outage: $(printf '%s\n' "$codes" | grep -v '^200 0 ' | sort | uniq -c | head -3 | paste -sd ';' -)"
}

check_restart() {  # systemctl restart under load: nothing refused or reset
    local main0 main1 rc t0 ms
    main0=$(prop app.service MainPID)
    load_start restart
    sleep 1
    t0=$(now_ms)
    IN systemctl restart app; rc=$?
    ms=$(( $(now_ms) - t0 ))
    sleep 1.5
    load_stop
    main1=$(prop app.service MainPID)
    note "systemctl restart app: rc=$rc, $ms ms; MainPID $main0 -> $main1"
    note "load during restart: $LOAD_SUMMARY"
    [ "$rc" = 0 ] || fail "systemctl restart app failed" || return 1
    [ "$main1" != "$main0" ] && is_running || fail "not running as a new master after restart" || return 1
    [ "$LOAD_OK" -gt 0 ] && [ "$LOAD_FAIL" = 0 ] || fail "failed requests during restart: $LOAD_SUMMARY"
}

check_stop() {  # systemctl stop during a slow request: the request completes
    local rc t0 ms r pid out
    case "$(http /)" in *" 200") ;; *) fail "not serving before the test" || return 1 ;; esac
    IN curl -s --max-time 30 -w ' %{http_code} %{exitcode} %{time_total}' -o /dev/null "$URL/sleep?ms=2000" \
        > "$STATE/slow" 2>&1 &
    pid=$!
    sleep 0.5
    t0=$(now_ms)
    out=$(IN systemctl stop app 2>&1); rc=$?   # (warns that app.socket can still activate it)
    ms=$(( $(now_ms) - t0 ))
    wait "$pid"
    r=$(cat "$STATE/slow")
    note "systemctl stop app: rc=$rc, $ms ms; slow request (2 s, started 0.5 s before): code/exit/time:$r"
    [ "$rc" = 0 ] || note "systemctl stop said: $out"
    note "state after stop: $(prop app.service ActiveState) (Result=$(prop app.service Result)); app.socket $(prop app.socket ActiveState)"
    [ "$rc" = 0 ] || fail "systemctl stop app failed" || return 1
    case "$r" in " 200 0 "*) ;; *) fail "slow request did not complete: $r" || return 1 ;; esac
    [ "$(prop app.service ActiveState)" = inactive ] || fail "app.service $(prop app.service ActiveState) after stop" || return 1
    [ "$(prop app.service Result)" = success ] || fail "stop result $(prop app.service Result) (timeout/kill?)" || return 1
    # the socket is still there: the next client starts the service again
    case "$(http / 15)" in *" 200") ;; *) fail "no re-activation through app.socket after stop" ;; esac
}

check_docs() {  # install.sh's man pages and completions
    local w out c
    w=$(IN man -w app 2>&1) || fail "man -w app: $w" || return 1
    out=$(IN env MANPAGER=cat MANWIDTH=100 man app 2>&1) || fail "man app failed: $(printf '%s' "$out" | head -c 200)" || return 1
    note "man -w app: $w; man app: $(printf '%s\n' "$out" | wc -l) lines; pages: $(IN ls /usr/local/share/man/man1 | grep '^app' | paste -sd ' ' -)"
    printf '%s\n' "$out" | grep -q 'EXIT STATUS' && printf '%s\n' "$out" | grep -q 'app-reload(1)' ||
        fail "man app lacks EXIT STATUS or app-reload(1)" || return 1
    IN env MANPAGER=cat man app-serve 2>/dev/null | grep -q -- '--workers' || fail "man app-serve shows no --workers" || return 1
    for c in /usr/local/share/bash-completion/completions/app /usr/local/share/zsh/site-functions/_app \
        /usr/local/share/fish/vendor_completions.d/app.fish; do
        IN test -s "$c" || fail "no completion file $c" || return 1
    done
    # bash: load the script and complete "app re<TAB>"
    c=$(IN bash -c '. /usr/local/share/bash-completion/completions/app || exit 1
        COMP_WORDS=(app re); COMP_CWORD=1; COMP_LINE="app re"; COMP_POINT=6
        _app app re app; echo "${COMPREPLY[*]}"' 2>&1)
    note "bash: app re<TAB> -> $c"
    [ "$c" = reload ] || fail "bash completion of 'app re' gave '$c'"
}

check_deb() {  # the .deb (scripts/package.sh) in place of install.sh's copy, then restored
    local sock0 out rc r w bad=0
    [ -n "${DEB:-}" ] || fail "no .deb: ${DEB_ERROR:-not built}" || return 1
    sock0=$(prop app.socket ActiveState)
    cp "$DEB" "$ROOT$STAGE/app.deb"
    # dpkg would ask about a config file it did not install: remove install.sh's copy first
    out=$(IN "$STAGE/scripts/install.sh" --uninstall --purge 2>&1) || fail "install.sh --uninstall: $out" || return 1
    deb_body; rc=$?
    # restore install.sh's copy (as stage_and_install left it) for any later check
    IN dpkg --purge app >/dev/null 2>&1
    out=$(IN "$STAGE/scripts/install.sh" --binary "$STAGE/app" 2>&1) || { fail "restoring install.sh's copy: $out"; bad=1; }
    [ -n "${E2E_ACCEPT:-}" ] && IN sed -i "s/^accept = .*/accept = \"$E2E_ACCEPT\"/" /etc/app/app.toml
    [ "$sock0" = active ] && { IN systemctl start app.socket || { fail "restarting app.socket after the deb check"; bad=1; }; }
    [ "$rc" = 0 ] && [ "$bad" = 0 ]
}

deb_body() {
    local out rc r st ms t0 listen
    t0=$(now_ms)
    out=$(IN env DEBIAN_FRONTEND=noninteractive dpkg -i "$STAGE/app.deb" 2>&1); rc=$?
    note "dpkg -i $(basename "$DEB"): rc=$rc, $(( $(now_ms) - t0 )) ms"
    [ "$rc" = 0 ] || fail "dpkg -i failed: $(printf '%s\n' "$out" | tail -n 3 | paste -sd '|' -)" || return 1
    st="$(IN systemctl is-enabled app.socket 2>&1)/$(IN systemctl is-enabled app.service 2>&1) $(prop app.socket ActiveState)/$(prop app.service ActiveState)"
    note "after install: enabled socket/service $st; $(prop app.service FragmentPath): $(prop app.service ExecStart | grep -o 'path=[^ ;]*' | head -n1)"
    # (app.service's [Install] has only Also=, so systemd calls it "indirect")
    case "$st" in "disabled/disabled inactive/inactive"|"disabled/indirect inactive/inactive") ;;
        *) fail "installing enabled or started something: $st" || return 1 ;; esac
    prop app.service ExecStart | grep -q 'path=/usr/bin/app ' || fail "ExecStart is not /usr/bin/app: $(prop app.service ExecStart)" || return 1
    IN dpkg-query -W -f='${Conffiles}' app | grep -q '/etc/app/app.toml' || fail "/etc/app/app.toml is not a conffile" || return 1
    r=$(IN man -w app 2>&1); note "man -w app: $r"
    case "$r" in /usr/share/man/man1/app.1*) ;; *) fail "man -w app: $r" || return 1 ;; esac
    IN systemctl start app.socket || fail "systemctl start app.socket failed" || return 1
    r=$(http / 15)
    note "curl /: ${r//$'\n'/ }"
    case "$r" in *" 200") ;; *) fail "no 200 from the packaged service: $r" || return 1 ;; esac
    t0=$(now_ms)
    out=$(IN systemctl reload app 2>&1); rc=$?
    ms=$(( $(now_ms) - t0 ))
    note "systemctl reload app: rc=$rc, $ms ms; $(IN app status 2>&1 | head -n1)"
    [ "$rc" = 0 ] || fail "systemctl reload app failed: $out" || return 1
    t0=$(now_ms)
    out=$(IN dpkg -r app 2>&1); rc=$?
    listen=$(IN ss -Hltn 'sport = :8080' 2>&1)
    st="$(prop app.service LoadState)/$(prop app.socket LoadState)"
    r=$(IN curl -s -o /dev/null --max-time 5 -w '%{exitcode}' "$URL/")
    note "dpkg -r app: rc=$rc, $(( $(now_ms) - t0 )) ms; units $st; listening on :8080: '${listen}'; curl exit $r; app processes: $(IN pgrep -xc app)"
    [ "$rc" = 0 ] || fail "dpkg -r app failed: $out" || return 1
    [ "$st" = not-found/not-found ] || fail "units still known after dpkg -r: $st" || return 1
    [ -z "$listen" ] && [ "$r" = 7 ] || fail "something still listens on :8080 after dpkg -r ($listen; curl exit $r)" || return 1
    ! IN pgrep -x app >/dev/null || fail "app processes left after dpkg -r: $(IN pgrep -xa app | paste -sd '|' -)" || return 1
    IN test ! -e /usr/bin/app || fail "/usr/bin/app left after dpkg -r" || return 1
    IN test -f /etc/app/app.toml || fail "dpkg -r removed the conffile /etc/app/app.toml" || return 1
    out=$(IN dpkg --purge app 2>&1); rc=$?
    note "dpkg --purge app: rc=$rc; /etc/app $(IN test -e /etc/app && echo present || echo gone)"
    [ "$rc" = 0 ] || fail "dpkg --purge app failed: $out" || return 1
    IN test ! -e /etc/app || fail "/etc/app left after dpkg --purge: $(IN ls -A /etc/app | paste -sd ' ' -)"
}

# build_deb: scripts/package.sh on the host (or APP_DEB); sets DEB or DEB_ERROR
build_deb() {
    local user=${SUDO_USER:-root} home out t0
    DEB=""; DEB_ERROR=""
    if [ -n "${APP_DEB:-}" ]; then
        [ -f "$APP_DEB" ] && DEB=$(readlink -f "$APP_DEB") || DEB_ERROR="APP_DEB=$APP_DEB is not a file"
        return 0
    fi
    home=$(getent passwd "$user" | cut -d: -f6)
    log "scripts/package.sh --no-build (the deb check) ..."
    t0=$(now_ms)
    if [ "$user" != root ] && [ "$(stat -c %U "$SRC")" = "$user" ]; then
        out=$(runuser -u "$user" -- env PATH="$home/.cargo/bin:$PATH" "$SRC/scripts/package.sh" --no-build 2>"$STATE_BASE/app-e2e-package.log")
    else
        out=$(env PATH="$home/.cargo/bin:$PATH" "$SRC/scripts/package.sh" --no-build 2>"$STATE_BASE/app-e2e-package.log")
    fi
    DEB=$(printf '%s\n' "$out" | tail -n1)
    if [ -z "$DEB" ] || [ ! -f "$DEB" ]; then
        DEB=""; DEB_ERROR="scripts/package.sh failed: $(tail -n 3 "$STATE_BASE/app-e2e-package.log" | paste -sd '|' -)"
        log "$DEB_ERROR"
    else
        log "built $DEB in $(( $(now_ms) - t0 )) ms"
    fi
    rm -f "$STATE_BASE/app-e2e-package.log"
}

# ---------------------------------------------------------------------------
main() {
    case "${1:-}" in
        -h|--help) sed -n '2,/^set -uo/p' "$SELF" | grep -v -e '^set ' -e 'shellcheck' -e '^# Intentional' \
                       -e '^# single-quoted' | sed 's/^# \{0,1\}//'; exit 0 ;;
        "") ;;
        *) die "unknown argument '$1' (see --help; configuration is by environment variables)" ;;
    esac
    [ "$(id -u)" = 0 ] || die "must run as root (mounts, namespaces, cgroups): sudo $0"
    local c
    for c in $CHECKS; do
        case " $ALL_CHECKS " in *" $c "*) ;; *) die "unknown check '$c' (known: $ALL_CHECKS)" ;; esac
    done
    ensure_tools
    find_binary
    case " $CHECKS " in *" deb "*) build_deb ;; esac
    cleanup_stale
    STATE=$(mktemp -d "$STATE_BASE/${STATE_PREFIX}XXXXXX") || die "mktemp failed"
    NAME=$(sandbox_name "$STATE")
    ROOT=$STATE/root
    echo "$$ $(pid_starttime $$)" > "$STATE/owner"
    trap on_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    # detached reaper: tears the sandbox down if this script is SIGKILLed
    setsid bash "$SELF" --reap "$STATE" </dev/null >/dev/null &
    REAPER=$!
    # The checks run in a child process and this one only waits: bash runs a
    # trap only after the foreground command has finished, but `wait` returns
    # at once, so SIGTERM/SIGINT tear the sandbox down immediately.
    ( trap - EXIT INT TERM; run_all ) &
    RUNNER=$!
    echo "$RUNNER $(pid_starttime "$RUNNER")" > "$STATE/runner"
    wait "$RUNNER"
}

run_all() {
    local t_all
    t_all=$(now_ms)
    boot_sandbox
    stage_and_install
    if [ -n "${E2E_ACCEPT:-}" ]; then   # test the other accept strategy
        IN sed -i "s/^#\{0,1\} *accept = .*/accept = \"$E2E_ACCEPT\"/" /etc/app/app.toml
        log "accept = \"$E2E_ACCEPT\" in /etc/app/app.toml"
    fi

    run_check analyze       "systemd-analyze security (exposure <= 2.0) and verify"          check_analyze
    run_check activation    "start app.socket; curl activates app; status active (running) + STATUS=" check_activation
    run_check sandboxing    "hardened unit: non-root, workers pinned, memory readable, socket 0600" check_sandboxing
    run_check journal       "journalctl -u app: master + worker lines; WORKER_ID=0 only worker 0" check_journal
    run_check reload        "systemctl reload under load: 0 failed, new generation on return"   check_reload
    run_check reload-broken "reload with a broken config fails; service keeps serving"           check_reload_broken
    run_check kill-worker   "SIGKILL a worker: replaced, in the journal, WORKER_ID= shows why"   check_kill_worker
    run_check access-log    "access_log = true: HTTP_STATUS=404 finds the request, with fields"   check_access_log
    run_check tls           "[tls] from LoadCredential= under DynamicUser: https, key private, rotation" check_tls
    run_check metrics       "app-metrics.socket: the pool's series parse, counters rise, not on app.socket" check_metrics
    run_check watchdog      "SIGSTOP master: watchdog kills, Restart= restarts, clients answered" check_watchdog
    run_check restart       "systemctl restart under load: nothing refused or reset"             check_restart
    run_check stop          "systemctl stop during a slow request: request completes"            check_stop
    run_check docs          "man app and the bash/zsh/fish completions from install.sh"         check_docs
    run_check deb           "the .deb: install enables nothing, serves, reloads; dpkg -r/--purge clean" check_deb

    if [ "$FAILED" -gt 0 ]; then
        log "failed:$FAILED_NAMES - last journal lines of app:"
        IN journalctl -u app --no-pager -n 40 -o short-precise >&2
    fi
    log "total $(( $(now_ms) - t_all )) ms (boot $BOOT_MS ms, install $INSTALL_MS ms)"
    [ "$FAILED" = 0 ]
}

main "$@"
