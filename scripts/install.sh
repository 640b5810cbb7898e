#!/usr/bin/env bash
# install.sh - install app (release binary, systemd units, example config) on
# this host, or remove it again. Idempotent: running it twice changes nothing
# the second time.
#
# Usage: scripts/install.sh [options]
#   --binary PATH     binary to install       (env APP_BIN;  default: target/release/app)
#   --prefix DIR      binary goes to DIR/bin  (env PREFIX;   default: /usr/local)
#   --unit-dir DIR    unit files go here      (env UNITDIR;  default: /etc/systemd/system)
#   --config-dir DIR  app.toml goes here      (env CONFDIR;  default: /etc/app)
#                     (only if absent: an existing config is never overwritten)
#   --destdir DIR     stage everything below DIR (packaging; implies --no-reload)
#   --enable          also `systemctl enable --now app.socket`
#   --no-reload       do not run `systemctl daemon-reload`
#   --no-docs         skip the man pages and shell completions
#   --uninstall       stop and disable the units, remove units, binary, man
#                     pages and completions
#                     (the config is kept; add --purge to remove it too)
#   -h, --help        this text
#
# Man pages (DIR/share/man/man1/app.1, app-<command>.1) and completions
# (bash: DIR/share/bash-completion/completions/app, zsh:
# DIR/share/zsh/site-functions/_app, fish:
# DIR/share/fish/vendor_completions.d/app.fish, DIR = --prefix) are generated
# by the binary itself (`app man --out`, `app completions SHELL`).
#
# A non-default --prefix or --config-dir is written into the installed
# app.service (ExecStart=/ExecReload=). daemon-reload is skipped with a message
# when systemd is not running (not PID 1 / not reachable).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$(cd "$HERE/.." && pwd)

BINARY=${APP_BIN:-$SRC/target/release/app}
PREFIX=${PREFIX:-/usr/local}
UNITDIR=${UNITDIR:-/etc/systemd/system}
CONFDIR=${CONFDIR:-/etc/app}
DESTDIR=${DESTDIR:-}
RELOAD=1
ENABLE=0
UNINSTALL=0
PURGE=0
DOCS=1

# The paths the unit files in systemd/ are written for.
DEFAULT_BIN=/usr/local/bin/app
DEFAULT_CONFIG=/etc/app/app.toml
UNITS=(app.socket app-metrics.socket app-agent.socket app.service)

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --binary) BINARY=${2:?--binary needs a path}; shift ;;
        --binary=*) BINARY=${1#*=} ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
        --prefix=*) PREFIX=${1#*=} ;;
        --unit-dir) UNITDIR=${2:?--unit-dir needs a directory}; shift ;;
        --unit-dir=*) UNITDIR=${1#*=} ;;
        --config-dir) CONFDIR=${2:?--config-dir needs a directory}; shift ;;
        --config-dir=*) CONFDIR=${1#*=} ;;
        --destdir) DESTDIR=${2:?--destdir needs a directory}; shift ;;
        --destdir=*) DESTDIR=${1#*=} ;;
        --enable) ENABLE=1 ;;
        --no-reload) RELOAD=0 ;;
        --uninstall) UNINSTALL=1 ;;
        --no-docs) DOCS=0 ;;
        --purge) PURGE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done

for d in "$PREFIX" "$UNITDIR" "$CONFDIR"; do
    case "$d" in /*) ;; *) die "directories must be absolute: $d" ;; esac
done
[ -n "$DESTDIR" ] && RELOAD=0
BIN_PATH=$PREFIX/bin/app
CONFIG_PATH=$CONFDIR/app.toml
MANDIR=$PREFIX/share/man/man1
# shell -> completion file
COMPLETIONS=(
    "bash:$PREFIX/share/bash-completion/completions/app"
    "zsh:$PREFIX/share/zsh/site-functions/_app"
    "fish:$PREFIX/share/fish/vendor_completions.d/app.fish"
)
# man pages removed on --uninstall even when the binary is gone
KNOWN_PAGES=(app.1 app-serve.1 app-check.1 app-status.1 app-reload.1 app-scale.1 app-completions.1)

# systemd is usable if it is the running init (sd_booted(3)) and answers.
systemd_up() {
    [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 &&
        timeout 10 systemctl show --property=Version >/dev/null 2>&1
}

daemon_reload() {
    [ "$RELOAD" = 1 ] || { say "skipping systemctl daemon-reload (--no-reload/--destdir)"; return 0; }
    if systemd_up; then
        systemctl daemon-reload && say "systemctl daemon-reload: done"
    else
        say "systemd is not running here (not PID 1 or not reachable): skipping daemon-reload"
        return 1
    fi
}

# put_file SRC DEST MODE: atomically replace DEST with SRC unless identical.
# (rename, never overwrite in place: a running binary keeps its old inode)
put_file() {
    local src=$1 dest=$2 mode=$3 tmp
    if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
        say "unchanged  $dest"
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    tmp=$(mktemp "$dest.XXXXXX")
    if ! { cp "$src" "$tmp" && chmod "$mode" "$tmp" && mv -f "$tmp" "$dest"; }; then
        rm -f "$tmp"; die "cannot write $dest"
    fi
    say "installed  $dest"
}

remove_file() {
    if [ -e "$1" ] || [ -L "$1" ]; then rm -f "$1"; say "removed    $1"; fi
    return 0
}

# install_docs TMPDIR: man pages and completions, generated by $BINARY
install_docs() {
    local tmpd=$1 f c
    [ "$DOCS" = 1 ] || return 0
    mkdir -p "$tmpd/man"
    if ! "$BINARY" man --out "$tmpd/man" >/dev/null 2>&1; then
        say "$BINARY cannot generate man pages here (app man --out): skipping man pages and completions"
        return 0
    fi
    for f in "$tmpd"/man/*.1; do put_file "$f" "$DESTDIR$MANDIR/${f##*/}" 0644; done
    for c in "${COMPLETIONS[@]}"; do
        "$BINARY" completions "${c%%:*}" > "$tmpd/completion" || die "app completions ${c%%:*} failed"
        put_file "$tmpd/completion" "$DESTDIR${c#*:}" 0644
    done
}

remove_docs() {
    local pages=("${KNOWN_PAGES[@]}") tmpd f c
    # the installed binary knows its own pages (commands added later included)
    if [ -x "$DESTDIR$BIN_PATH" ] && tmpd=$(mktemp -d); then
        if "$DESTDIR$BIN_PATH" man --out "$tmpd" >/dev/null 2>&1; then
            for f in "$tmpd"/*.1; do pages+=("${f##*/}"); done
        fi
        rm -rf "$tmpd"
    fi
    for f in $(printf '%s\n' "${pages[@]}" | sort -u); do remove_file "$DESTDIR$MANDIR/$f"; done
    for c in "${COMPLETIONS[@]}"; do remove_file "$DESTDIR${c#*:}"; done
}

do_install() {
    if [ ! -f "$BINARY" ] || [ ! -x "$BINARY" ]; then
        die "no executable at $BINARY (build it: cargo build --release, or pass --binary PATH)"
    fi
    local u tmpd
    tmpd=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$tmpd'" EXIT
    put_file "$BINARY" "$DESTDIR$BIN_PATH" 0755
    for u in "${UNITS[@]}"; do
        [ -f "$SRC/systemd/$u" ] || die "missing $SRC/systemd/$u"
        # point the units at the chosen binary/config paths
        sed -e "s|$DEFAULT_BIN|$BIN_PATH|g" -e "s|$DEFAULT_CONFIG|$CONFIG_PATH|g" \
            "$SRC/systemd/$u" > "$tmpd/$u"
        put_file "$tmpd/$u" "$DESTDIR$UNITDIR/$u" 0644
    done
    install_docs "$tmpd"
    if [ -e "$DESTDIR$CONFIG_PATH" ]; then
        say "kept       $DESTDIR$CONFIG_PATH (existing config is not overwritten)"
    else
        # 0644: the service runs as a dynamic (unprivileged) user and must read it
        put_file "$SRC/systemd/app.toml" "$DESTDIR$CONFIG_PATH" 0644
    fi
    daemon_reload || true
    if [ "$ENABLE" = 1 ]; then
        if systemd_up; then
            systemctl enable --now app.socket
        else
            say "systemd is not running: cannot enable app.socket"
        fi
    elif systemd_up && [ -z "$DESTDIR" ]; then
        if systemctl is-active --quiet app.service; then
            say "app.service is running: systemctl reload app rolls the workers onto the new binary (the master keeps the old one until systemctl restart app)"
        elif ! systemctl is-enabled --quiet app.socket 2>/dev/null; then
            say "next: systemctl enable --now app.socket   (then: curl http://127.0.0.1:8080/)"
        fi
    fi
}

do_uninstall() {
    local u
    if [ -z "$DESTDIR" ] && [ -e "$UNITDIR/app.service" ] && systemd_up; then
        # stop the socket too, or the next connection would start the service again
        systemctl disable --now app.socket app.service >/dev/null 2>&1 || true
        systemctl stop app.service app.socket >/dev/null 2>&1 || true
        # the service's other sockets, whose units are about to be removed
        systemctl stop app-metrics.socket app-agent.socket >/dev/null 2>&1 || true
        say "stopped and disabled app.socket app.service"
    fi
    for u in "${UNITS[@]}"; do remove_file "$DESTDIR$UNITDIR/$u"; done
    remove_docs
    remove_file "$DESTDIR$BIN_PATH"
    if [ "$PURGE" = 1 ]; then
        remove_file "$DESTDIR$CONFIG_PATH"
        rmdir "$DESTDIR$CONFDIR" 2>/dev/null || true
    elif [ -e "$DESTDIR$CONFIG_PATH" ]; then
        say "kept       $DESTDIR$CONFIG_PATH (use --purge to remove it)"
    fi
    daemon_reload || true
    if [ -z "$DESTDIR" ] && systemd_up; then
        systemctl reset-failed app.service app.socket >/dev/null 2>&1 || true
    fi
}

if [ "$UNINSTALL" = 1 ]; then do_uninstall; else do_install; fi
