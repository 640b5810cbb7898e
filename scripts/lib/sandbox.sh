# sandbox.sh - throw-away systemd hosts: a real systemd (the host's own) as PID
# 1 of a systemd-nspawn container whose root is a copy-on-write overlay of the
# host's "/" (writes land in a tmpfs; the host is never modified). Sourced by
# scripts/e2e-systemd.sh (one host, private network) and scripts/fleet.sh
# (several hosts sharing the host's network namespace, each on its own
# 127.0.0.N address). See ../shared/reference/systemd-sandbox/NOTES.md for
# what works on these machines and what does not.
#
# The sourcing script defines now_ms, log and die, and sets SRC, STATE_BASE,
# STATE_PREFIX, LIFETIME, VERBOSE, STAGE and IN_PATH. One sandbox is "current"
# at a time: STATE (its state dir), NAME, ROOT and INIT (host PID of its
# systemd), which every function here uses; a script with several sets them
# before each use. NSPAWN_NET is the network option of systemd-nspawn
# (default --private-network; empty = the host's network namespace).
# EXTRA_TOOLS lists "command:package" pairs ensure_tools installs if missing.
# Intentional: `A && B || fail`, word-splitting pid lists.
# shellcheck shell=bash disable=SC2015,SC2013,SC2086,SC2016,SC2153
NSPAWN_NET=${NSPAWN_NET---private-network}
[ -n "${EXTRA_TOOLS+x}" ] || EXTRA_TOOLS=()
# ---------------------------------------------------------------------------
# Sandbox: state dir, overlay, private cgroup, nspawn, teardown
# ---------------------------------------------------------------------------
# Every run has its own state dir $STATE_BASE/app-e2e.XXXXXX holding the
# overlay (tmpfs + overlay mount), pid files and logs; its name also names the
# machine and the private cgroups nspawn runs in.

cgroup_roots() {  # hierarchies where nspawn creates its payload/supervisor cgroups
    if [ "$(stat -f -c %T /sys/fs/cgroup 2>/dev/null)" = cgroup2fs ]; then
        echo /sys/fs/cgroup
    else
        local h
        for h in /sys/fs/cgroup/unified /sys/fs/cgroup/systemd; do
            mountpoint -q "$h" 2>/dev/null && echo "$h"
        done
    fi
    return 0
}

sandbox_name() { local n; n=$(basename "$1"); echo "${n//./-}"; }  # machine + cgroup name

pid_starttime() {  # start time of a live (non-zombie) process, to detect pid reuse
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    s=${s##*) }   # fields after "(comm)": state ... starttime is the 20th
    # shellcheck disable=SC2086
    set -- $s
    [ "$1" != Z ] && [ "$1" != X ] && echo "${20}"
}

owner_alive() {  # $1 = state dir: is the script that created it still running?
    local pid st
    read -r pid st < "$1/owner" 2>/dev/null || return 1
    [ -n "$pid" ] && [ -n "$st" ] && [ "$(pid_starttime "$pid")" = "$st" ]
}

is_nspawn_of() {  # $1 = pid, $2 = container root
    [ -n "$1" ] && [ -d "/proc/$1" ] || return 1
    [ "$(readlink "/proc/$1/exe" 2>/dev/null)" = "$(readlink -f "$(command -v systemd-nspawn)")" ] || return 1
    { tr '\0' ' ' < "/proc/$1/cmdline"; } 2>/dev/null | grep -qF -- "-D $2 "
}

is_container_init() {  # $1 = host pid: PID 1 of a child pid namespace?
    awk '/^NSpid:/ { exit !(NF == 3 && $3 == 1) }' "/proc/$1/status" 2>/dev/null
}

cg_pids() {  # $1 = cgroup name: host PIDs of everything in our private cgroups
    local r
    for r in $(cgroup_roots); do
        [ -d "$r/$1" ] && find "$r/$1" -name cgroup.procs -exec cat {} + 2>/dev/null
    done | sort -un
    return 0
}

kill_visitors() {  # $1 = host pid of the container's PID 1, $2 = sandbox name
    local ns d
    ns=$(readlink "/proc/$1/ns/pid") || return 0
    for d in /proc/[0-9]*; do
        [ "$(readlink "$d/ns/pid" 2>/dev/null)" = "$ns" ] || continue
        grep -q "/$2/" "$d/cgroup" 2>/dev/null && continue   # the container's own
        kill -KILL "${d#/proc/}" 2>/dev/null
    done
    return 0
}

# teardown STATE: stop the container (orderly, then by force), unmount, remove
# cgroups and the state dir. Safe to call twice and on half-built sandboxes.
teardown() {
    local st=$1 name root n p pids init="" i m r
    name=$(sandbox_name "$st")
    root=$st/root
    [ -d "$st" ] || return 0
    n=$(cat "$st/nspawn.pid" 2>/dev/null || true)
    if is_nspawn_of "$n" "$root"; then
        # Processes we nsenter'ed into the container (clients, load, systemctl)
        # live in its pid namespace but outside its cgroups; systemd's halt
        # would wait for them (tens of seconds), so they go first.
        for p in $(cat /proc/"$n"/task/*/children 2>/dev/null); do
            is_container_init "$p" && kill_visitors "$p" "$name"
        done
        # 1st SIGTERM: nspawn asks systemd for an orderly halt (units stopped)
        kill -TERM "$n" 2>/dev/null
        for i in $(seq 1 150); do is_nspawn_of "$n" "$root" || break; sleep 0.1; done
        if is_nspawn_of "$n" "$root"; then
            log "teardown: orderly halt took >15s, terminating the container"
            kill -TERM "$n" 2>/dev/null   # 2nd SIGTERM: immediate termination
            for i in $(seq 1 30); do is_nspawn_of "$n" "$root" || break; sleep 0.1; done
            kill -KILL "$n" 2>/dev/null
        fi
    fi
    # Leftovers in our cgroups (e.g. nspawn was SIGKILLed and the container's
    # systemd got orphaned): halt the container's PID 1, then SIGKILL the rest.
    pids=$(cg_pids "$name")
    for p in $pids; do is_container_init "$p" && init="$init $p"; done
    if [ -n "$init" ]; then
        log "teardown: halting orphaned container systemd (host PID$init)"
        # shellcheck disable=SC2086
        kill -s RTMIN+3 $init 2>/dev/null
        for i in $(seq 1 100); do [ -z "$(cg_pids "$name")" ] && break; sleep 0.1; done
    fi
    pids=$(cg_pids "$name")
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null; sleep 0.3
    fi
    # unmount everything below the state dir, deepest first
    for m in $(findmnt -rn -o TARGET | grep -E "^$st(/|$)" | sort -r); do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "teardown: cannot unmount $m"
    done
    for r in $(cgroup_roots); do
        [ -d "$r/$name" ] && find "$r/$name" -depth -type d -exec rmdir {} + 2>/dev/null
        [ -d "$r/$name" ] && log "teardown: cgroup $r/$name still busy"
    done
    rmdir "/run/systemd/nspawn/propagate/$name" 2>/dev/null
    if findmnt -rn -o TARGET | grep -qE "^$st(/|$)"; then
        log "teardown: mounts below $st remain; not removing it"; return 1
    fi
    rm -rf --one-file-system "$st"
    return 0
}

# sandbox_reap STATE: the body of a detached reaper process, which tears the
# sandbox down once the script that created it is gone (SIGKILL leaves no
# chance for an EXIT trap). Host processes the script started for the sandbox
# (load balancer, load generators) are listed as "PID STARTTIME" lines in
# STATE/extra-pids and killed too.
sandbox_reap() {
    local st=$1 t0 rp rst p s
    trap '' PIPE INT   # stderr may be a closed pipe by now; finish the job anyway
    while owner_alive "$st" && [ -d "$st" ]; do sleep 0.5; done
    [ -d "$st" ] || return 0
    t0=$(now_ms)
    # the script's child that runs the checks would go on poking the sandbox
    read -r rp rst 2>/dev/null < "$st/runner" && [ "$(pid_starttime "$rp")" = "$rst" ] && kill -KILL "$rp" 2>/dev/null
    while read -r p s; do
        [ -n "$p" ] && [ "$(pid_starttime "$p")" = "$s" ] && kill -KILL "$p" 2>/dev/null
    done 2>/dev/null < "$st/extra-pids"
    teardown "$st" && log "reaper: the script died; sandbox $(sandbox_name "$st") torn down in $(( $(now_ms) - t0 )) ms"
    return 0
}

cleanup_stale() {  # sandboxes of earlier runs whose script died
    local d
    for d in "$STATE_BASE/$STATE_PREFIX"*; do
        [ -d "$d" ] && [ -f "$d/owner" ] || continue
        owner_alive "$d" && continue
        log "removing the sandbox of an earlier run that died: $d"
        teardown "$d"
    done
    return 0
}

ensure_tools() {
    local pkgs=() v
    command -v systemd-nspawn >/dev/null || pkgs+=(systemd-container)
    command -v curl >/dev/null || pkgs+=(curl)
    command -v jq >/dev/null || pkgs+=(jq)
    command -v nsenter >/dev/null || pkgs+=(util-linux)
    command -v ps >/dev/null || pkgs+=(procps)
    for v in "${EXTRA_TOOLS[@]}"; do   # "command:package"
        command -v "${v%%:*}" >/dev/null || pkgs+=("${v#*:}")
    done
    [ ${#pkgs[@]} -eq 0 ] && return 0
    log "installing ${pkgs[*]} ..."
    # systemd-container must have the same version as systemd: ask for exactly
    # the installed one, so that apt does not upgrade the host's systemd.
    v=$(dpkg-query -W -f='${Version}' systemd 2>/dev/null || true)
    local i p pinned=()
    for p in "${pkgs[@]}"; do
        if [ "$p" = systemd-container ] && [ -n "$v" ]; then pinned+=("$p=$v"); else pinned+=("$p"); fi
    done
    # --no-install-recommends: no libnss-mymachines (it edits /etc/nsswitch.conf)
    for i in 1 2; do
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends \
            -o DPkg::Lock::Timeout=120 "${pinned[@]}" >/dev/null 2>&1 && return 0
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends \
            -o DPkg::Lock::Timeout=120 "${pkgs[@]}" >/dev/null 2>&1 && return 0
        [ "$i" = 1 ] && { log "apt-get install failed; running apt-get update"; timeout 600 apt-get update -qq >/dev/null 2>&1; }
    done
    die "could not install ${pkgs[*]} (apt-get install -y --no-install-recommends ${pkgs[*]})"
}

find_binary() {
    if [ -n "${APP_BIN:-}" ]; then
        [ -x "$APP_BIN" ] || die "APP_BIN=$APP_BIN is not an executable"
        BIN=$(readlink -f "$APP_BIN"); return 0
    fi
    local cargo user=${SUDO_USER:-root} home
    home=$(getent passwd "$user" | cut -d: -f6)
    cargo=$(command -v cargo || true)
    [ -z "$cargo" ] && [ -x "$home/.cargo/bin/cargo" ] && cargo=$home/.cargo/bin/cargo
    if [ "${E2E_BUILD:-1}" = 0 ] && [ -x "$SRC/target/release/app" ]; then
        log "E2E_BUILD=0: testing the existing $SRC/target/release/app"
    elif [ -n "$cargo" ]; then
        log "cargo build --release ..."
        local t0; t0=$(now_ms)
        if [ "$user" != root ] && [ "$(stat -c %U "$SRC")" = "$user" ]; then
            # build as the owner of the checkout, not as root
            runuser -u "$user" -- env PATH="$(dirname "$cargo"):$PATH" \
                "$cargo" build --release --quiet --manifest-path "$SRC/Cargo.toml" >&2 ||
                die "cargo build --release failed"
        else
            "$cargo" build --release --quiet --manifest-path "$SRC/Cargo.toml" >&2 ||
                die "cargo build --release failed"
        fi
        log "cargo build --release: $(( $(now_ms) - t0 )) ms"
    elif [ -x "$SRC/target/release/app" ]; then
        log "cargo not found: testing the existing $SRC/target/release/app"
    fi
    [ -x "$SRC/target/release/app" ] || die "no binary: build with cargo build --release or set APP_BIN"
    BIN=$SRC/target/release/app
}

nspawn_pid() { local n; n=$(cat "$STATE/nspawn.pid" 2>/dev/null) && is_nspawn_of "$n" "$ROOT" && echo "$n"; }

init_pid() {  # host PID of the container's systemd
    local n p
    n=$(nspawn_pid) || return 1
    for p in $(cat /proc/"$n"/task/*/children 2>/dev/null); do
        is_container_init "$p" && { echo "$p"; return 0; }
    done
    return 1
}

# IN CMD...: run CMD inside the container (all its namespaces, clean env),
# killed after IN_TIMEOUT seconds so that nothing can hang the run
IN_TIMEOUT=120
IN() {
    nsenter -t "$INIT" -a -- /usr/bin/env -i PATH="$IN_PATH" HOME=/root LANG=C.UTF-8 TERM=dumb \
        SYSTEMD_PAGER= PAGER=cat SYSTEMD_COLORS=0 timeout -k 5 "$IN_TIMEOUT" "$@"
}

boot_sandbox() {
    local t0 r cgprocs=() n="" tp c i st=""
    t0=$(now_ms)
    mkdir -p "$STATE/ovl" "$ROOT"
    # Copy-on-write view of the host's / (the root file system only: /work and
    # the checkout must be on it; we copy what we need in anyway, see stage()).
    # nspawn itself refuses -D / with --volatile=overlay, and --volatile=state
    # trips over the pre-populated /dev, so the overlay is built by hand.
    mount -t tmpfs -o mode=0755,size=2G "$NAME-ovl" "$STATE/ovl" || die "cannot mount tmpfs"
    mkdir -p "$STATE/ovl/upper" "$STATE/ovl/work"
    mount -t overlay "$NAME-root" -o "lowerdir=/,upperdir=$STATE/ovl/upper,workdir=$STATE/ovl/work" "$ROOT" ||
        die "cannot mount overlayfs"
    # Adjust the copy, never the host: own machine-id (else journals clash), no
    # host timers/sockets enabled, no trace of an app installed on the host.
    systemd-id128 new > "$ROOT/etc/machine-id"
    echo "$NAME" > "$ROOT/etc/hostname"
    rm -f "$ROOT"/etc/systemd/system/timers.target.wants/* "$ROOT"/etc/systemd/system/sockets.target.wants/*
    rm -rf "$ROOT"/etc/systemd/system/app.service.d "$ROOT"/etc/systemd/system/app.socket.d \
        "$ROOT"/etc/systemd/system/app.service "$ROOT"/etc/systemd/system/app.socket "$ROOT"/etc/app
    # nspawn runs from private cgroups (the host has no systemd to ask for one),
    # which is also how teardown finds everything that belongs to the sandbox.
    for r in $(cgroup_roots); do mkdir -p "$r/$NAME"; cgprocs+=("$r/$NAME/cgroup.procs"); done
    (
        for c in "${cgprocs[@]}"; do echo "$BASHPID" > "$c"; done
        # basic.target: do not start the host's enabled services (nginx, databases)
        exec setsid bash -c 'echo $$ > "$0/timeout.pid"; exec "$@"' "$STATE" \
            timeout -k 20 "$LIFETIME" systemd-nspawn -D "$ROOT" --boot --machine="$NAME" \
                --register=no --keep-unit --link-journal=no --console=read-only \
                --resolv-conf=off --timezone=off $NSPAWN_NET \
                -- systemd.unit=basic.target
    ) </dev/null >"$STATE/nspawn.log" 2>&1 &
    # not our job to wait for: teardown (or a check killing the host) ends it,
    # and bash would otherwise report "Killed" for it
    disown $! 2>/dev/null
    for i in $(seq 1 200); do
        tp=$(cat "$STATE/timeout.pid" 2>/dev/null || true)
        for c in $(cat /proc/"$tp"/task/*/children 2>/dev/null); do
            is_nspawn_of "$c" "$ROOT" && { n=$c; break; }
        done
        [ -n "$n" ] && break
        sleep 0.05
    done
    [ -n "$n" ] || { cat "$STATE/nspawn.log" >&2; die "systemd-nspawn did not start"; }
    echo "$n" > "$STATE/nspawn.pid"
    for i in $(seq 1 1200); do
        is_nspawn_of "$n" "$ROOT" || { cat "$STATE/nspawn.log" >&2; die "systemd-nspawn exited during boot"; }
        if INIT=$(init_pid); then
            st=$(timeout 5 nsenter -t "$INIT" -a /bin/systemctl is-system-running 2>/dev/null)
            case "$st" in running|degraded) break ;; esac
        fi
        sleep 0.05
    done
    case "$st" in
        running) ;;
        degraded) log "sandbox booted 'degraded':"; IN systemctl --no-pager --failed >&2 ;;
        *) cat "$STATE/nspawn.log" >&2; die "sandbox did not boot (state '$st')" ;;
    esac
    BOOT_MS=$(( $(now_ms) - t0 ))
    log "sandbox $NAME booted in $BOOT_MS ms (container PID 1 = host PID $INIT, systemd $(IN systemctl --version | awk 'NR==1{print $2}'))"
}

# Copy the binary and the project's files into the container (into the
# overlay's upper layer), so a concurrent cargo build on the host cannot change
# them under our feet, then install with the project's own install.sh.
stage_and_install() {
    local t0 out
    t0=$(now_ms)
    mkdir -p "$ROOT$STAGE/scripts" "$ROOT$STAGE/systemd"
    cp "$SRC/scripts/install.sh" "$ROOT$STAGE/scripts/"
    cp "$SRC"/systemd/*.socket "$SRC"/systemd/app.service "$SRC"/systemd/app.toml "$ROOT$STAGE/systemd/"
    cp "$BIN" "$ROOT$STAGE/app"
    if ! out=$(IN "$STAGE/scripts/install.sh" --binary "$STAGE/app" 2>&1); then
        printf '%s\n' "$out" >&2; die "scripts/install.sh failed inside the sandbox"
    fi
    [ "$VERBOSE" = 1 ] && printf '%s\n' "$out" | sed 's/^/    /' >&2
    printf '%s\n' "$out" | grep -q 'daemon-reload: done' || { printf '%s\n' "$out" >&2; die "install.sh did not daemon-reload"; }
    INSTALL_MS=$(( $(now_ms) - t0 ))
    log "installed with scripts/install.sh + daemon-reload in $INSTALL_MS ms"
}
