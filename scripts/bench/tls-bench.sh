#!/usr/bin/env bash
# TLS side by side: the app ([tls], rustls) against nginx (OpenSSL) with the same certificate
# (a P-256 leaf signed by a throw-away CA), 2 workers each, both pinned as they would be.
#   - keep-alive req/s over TLS: wrk -t2 -c64;
#   - new TLS handshakes per second: wrk -t2 -c64 with `Connection: close`, every request a
#     new connection and a full handshake (wrk does not resume sessions);
#   - new TLS connections per second with session resumption, TLS 1.3 and 1.2: the bench's
#     own client (scripts/bench/tls_load.rs, 64 connections on 2 threads, one shared session
#     cache, each connection a handshake + one `Connection: close` request), against nginx
#     with `ssl_session_cache shared` and tickets on (a second listener); it reports the
#     fraction of handshakes that resumed on each server; and the same client with its cache
#     off (full handshakes) as the like-for-like reference for wrk's figure;
# alternating app/nginx for ROUNDS rounds; medians of req/s and of server CPU µs per request,
# and the app/nginx ratios (the issue's targets: >= 1.0 keep-alive, >= 0.8 handshakes).
#   scripts/bench/tls-bench.sh BIN [seconds] [rounds]
# TLS_LOAD=path: the client (default: cargo build --release --example tls_load, and that).
# TLS_MODES="ka close full13 resume13 resume12": which measurements (default all).
set -euo pipefail
. "$(dirname "$0")/common.sh"
BIN=$1; DUR=${2:-5}; ROUNDS=${3:-3}
for c in wrk nginx openssl; do
    command -v "$c" >/dev/null || { echo "tls-bench: $c is needed (apt-get install $c)" >&2; exit 69; }
done
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
MODES=${TLS_MODES:-ka close full13 resume13 resume12}
case " $MODES " in *" full13 "*|*" resume1"*)
    if [ -z "${TLS_LOAD:-}" ]; then
        (cd "$ROOT" && cargo build --release --quiet --example tls_load) >&2
        TLS_LOAD=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/tls_load
    fi ;;
esac
DIR=$(mktemp -d -p /tmp tls-bench.XXXX); chmod 700 "$DIR"
trap 'rm -rf "$DIR"' EXIT
APP_PORT=${APP_PORT:-18381}; NGX_PORT=${NGX_PORT:-18382}; NGX_RPORT=${NGX_RPORT:-18383}
HZ=$(getconf CLK_TCK)
(
    cd "$DIR"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key \
        -out ca.crt -subj /CN=bench-ca -days 2
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout tls.key \
        -out tls.csr -subj /CN=localhost
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > ext.cnf
    openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -set_serial 1 -days 2 \
        -extfile ext.cnf -out tls.crt
) >/dev/null 2>&1
printf 'workers = 2\n[tls]\ncert = "%s/tls.crt"\nkey = "%s/tls.key"\n' "$DIR" "$DIR" > "$DIR/app.toml"
mkdir -p "$DIR/nginx"
cat > "$DIR/nginx.conf" <<NGINX
worker_processes 2;
worker_cpu_affinity auto;
worker_rlimit_nofile 65536;
pid $DIR/nginx/nginx.pid;
error_log $DIR/nginx/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $DIR/nginx/cb; proxy_temp_path $DIR/nginx/p;
    fastcgi_temp_path $DIR/nginx/f; uwsgi_temp_path $DIR/nginx/u; scgi_temp_path $DIR/nginx/s;
    server {
        listen 127.0.0.1:$NGX_PORT ssl backlog=4096;
        ssl_certificate $DIR/tls.crt;
        ssl_certificate_key $DIR/tls.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache off;
        ssl_session_tickets off;
        location / { default_type text/plain; return 200 "hello\n"; }
    }
    # Resumption as nginx users turn it on: a cache shared by the workers, and tickets (whose
    # key the master makes at start, so every worker opens every ticket).
    server {
        listen 127.0.0.1:$NGX_RPORT ssl backlog=4096;
        ssl_certificate $DIR/tls.crt;
        ssl_certificate_key $DIR/tls.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_tickets on;
        location / { default_type text/plain; return 200 "hello\n"; }
    }
}
NGINX
run() { # server mode -> "req/s cpu_us_per_req [resumed_fraction]"
    local server=$1 mode=$2 master port pids c0 c1 out n rps hdr=() resumed=""
    if [ "$server" = app ]; then
        "$BIN" serve --bind 127.0.0.1:$APP_PORT --config "$DIR/app.toml" \
            --control-socket "$DIR/ctl.sock" 2>/dev/null &
        master=$!; port=$APP_PORT
    else
        nginx -c "$DIR/nginx.conf" -p "$DIR/nginx" -g 'daemon off;' 2>/dev/null &
        master=$!; port=$NGX_PORT
        case $mode in resume*) port=$NGX_RPORT ;; esac
    fi
    sleep 1
    pids=("$master" $(pgrep -P "$master"))
    case $mode in
    ka|close)
        [ "$mode" = close ] && hdr=(-H 'Connection: close')
        wrk -t2 -c64 -d1s "${hdr[@]}" "https://127.0.0.1:$port/" >/dev/null 2>&1   # warm-up
        c0=$(ticks "${pids[@]}")
        out=$(wrk -t2 -c64 -d"${DUR}s" "${hdr[@]}" "https://127.0.0.1:$port/")
        c1=$(ticks "${pids[@]}")
        n=$(printf '%s\n' "$out" | awk '/requests in/ {print $1}')
        rps=$(printf '%s\n' "$out" | awk '/Requests\/sec/ {print $2}')
        ;;
    *)
        local args=(--addr "127.0.0.1:$port" --ca "$DIR/ca.crt" --conns 64 --threads 2)
        case $mode in
        full13) args+=(--tls 1.3 --no-resume) ;;
        resume13) args+=(--tls 1.3) ;;
        resume12) args+=(--tls 1.2) ;;
        esac
        "$TLS_LOAD" "${args[@]}" --duration 1 >/dev/null   # warm-up
        c0=$(ticks "${pids[@]}")
        out=$("$TLS_LOAD" "${args[@]}" --duration "$DUR")
        c1=$(ticks "${pids[@]}")
        n=$(printf '%s\n' "$out" | sed -n 's/.*requests=\([0-9]*\).*/\1/p')
        rps=$(printf '%s\n' "$out" | sed -n 's/.*rps=\([0-9]*\).*/\1/p')
        resumed=$(printf '%s\n' "$out" | sed -n 's/.*resumed=\([0-9.]*\).*/\1/p')
        ;;
    esac
    kill -TERM "$master"; wait "$master" 2>/dev/null || true
    awk -v r="$rps" -v c=$((c1 - c0)) -v n="$n" -v hz="$HZ" -v f="$resumed" \
        'BEGIN { printf "%.0f %.2f %s\n", r, c * 1e6 / hz / n, f }'
}
for mode in $MODES; do
    : > "$DIR/app-$mode"; : > "$DIR/nginx-$mode"
    for r in $(seq 1 "$ROUNDS"); do
        run app "$mode" >> "$DIR/app-$mode"
        run nginx "$mode" >> "$DIR/nginx-$mode"
    done
done
echo "TLS, 2 workers each, 64 connections, $DUR s a run, $ROUNDS rounds alternating app/nginx (medians; CPU = server µs/request)"
for mode in $MODES; do
    case $mode in
    ka) label="keep-alive req/s (wrk)" ;;
    close) label="new handshakes/s, full (wrk)" ;;
    full13) label="TLS 1.3 new conns/s, full (tls_load)" ;;
    resume13) label="TLS 1.3 new conns/s, resumed (tls_load)" ;;
    resume12) label="TLS 1.2 new conns/s, resumed (tls_load)" ;;
    esac
    ar=$(awk '{print $1}' "$DIR/app-$mode" | median); nr=$(awk '{print $1}' "$DIR/nginx-$mode" | median)
    ac=$(awk '{print $2}' "$DIR/app-$mode" | median); nc=$(awk '{print $2}' "$DIR/nginx-$mode" | median)
    printf '  %-40s app %8.0f (%5.1f µs)  nginx %8.0f (%5.1f µs)  ratio %.2f, CPU %.2f\n' \
        "$label" "$ar" "$ac" "$nr" "$nc" "$(awk -v a="$ar" -v b="$nr" 'BEGIN{print a/b}')" \
        "$(awk -v a="$ac" -v b="$nc" 'BEGIN{print a/b}')"
    printf '  %-40s app runs: %s; nginx runs: %s\n' "" "$(awk '{print $1}' "$DIR/app-$mode" | paste -sd ' ' -)" \
        "$(awk '{print $1}' "$DIR/nginx-$mode" | paste -sd ' ' -)"
    case $mode in resume*)
        printf '  %-40s resumed: app %s, nginx %s (median fraction of handshakes)\n' "" \
            "$(awk '{print $3}' "$DIR/app-$mode" | median)" "$(awk '{print $3}' "$DIR/nginx-$mode" | median)" ;;
    esac
done
