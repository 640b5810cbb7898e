#!/usr/bin/env bash
# package.sh - build the Debian package of app with cargo-deb.
#
# Usage: scripts/package.sh [--no-build]
#   --no-build   package the existing release binary (default: cargo build --release first)
#   -h, --help   this text
#
# Writes target/pkg/ (generated from the release binary: the units with
# ExecStart=/usr/bin/app, the man pages, the bash/zsh/fish completions), then
# runs `cargo deb --no-build` with [package.metadata.deb] of Cargo.toml. The
# path of the .deb ($CARGO_TARGET_DIR or target, /debian/) is the last line on
# stdout. Installs cargo-deb (cargo install cargo-deb --locked) if missing.
#
# The package: /usr/bin/app, /lib/systemd/system/app.{service,socket},
# /etc/app/app.toml (conffile), man pages, completions. Installing it enables
# and starts nothing; `dpkg -r app` stops and disables the units; `dpkg --purge
# app` also removes /etc/app.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=1
say() { printf 'package.sh: %s\n' "$*" >&2; }
die() { printf 'package.sh: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) BUILD=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
    shift
done

command -v cargo >/dev/null || die "cargo not found"
TARGET=${CARGO_TARGET_DIR:-$SRC/target}
case "$TARGET" in /*) ;; *) TARGET=$SRC/$TARGET ;; esac
BIN=$TARGET/release/app
PKG=$SRC/target/pkg   # Cargo.toml's assets name target/pkg/... relative to the crate

if ! cargo deb --version >/dev/null 2>&1; then
    say "cargo-deb is missing: cargo install cargo-deb --locked (a few minutes)"
    cargo install cargo-deb --locked >&2 || die "cargo install cargo-deb --locked failed"
fi

if [ "$BUILD" = 1 ]; then
    say "cargo build --release"
    cargo build --release --quiet --manifest-path "$SRC/Cargo.toml" >&2 || die "cargo build --release failed"
fi
[ -x "$BIN" ] || die "no release binary at $BIN (cargo build --release)"

rm -rf "$PKG"
mkdir -p "$PKG/systemd" "$PKG/man" "$PKG/completions"
# The units in systemd/ are written for install.sh's /usr/local/bin/app.
for u in app.service app.socket app-metrics.socket app-agent.socket; do
    sed -e 's|/usr/local/bin/app|/usr/bin/app|g' "$SRC/systemd/$u" > "$PKG/systemd/$u"
done
grep -q '^ExecStart=/usr/bin/app ' "$PKG/systemd/app.service" || die "ExecStart= not rewritten to /usr/bin/app"
"$BIN" man --out "$PKG/man" || die "$BIN man --out failed"
"$BIN" completions bash > "$PKG/completions/app"
"$BIN" completions zsh > "$PKG/completions/_app"
"$BIN" completions fish > "$PKG/completions/app.fish"
say "generated $(find "$PKG" -type f | wc -l) files in $PKG"

out=$(cargo deb --no-build --manifest-path "$SRC/Cargo.toml" 2>&1) || { printf '%s\n' "$out" >&2; die "cargo deb failed"; }
printf '%s\n' "$out" | grep -v '\.deb$' >&2 || true
deb=$(printf '%s\n' "$out" | grep '\.deb$' | tail -n1)
[ -f "$deb" ] || die "cargo deb printed no .deb path: $out"
say "built $deb ($(stat -c %s "$deb") bytes)"
echo "$deb"
