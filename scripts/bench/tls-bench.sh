#!/usr/bin/env bash
# TLS side by side: the app ([tls], rustls) against nginx (OpenSSL) with the same certificate
# (a P-256 leaf signed by a throw-away CA), 2 workers each, both pinned as they would be.
#   - keep-alive req/s over TLS: wrk -t2 -c64;
#   - new TLS handshakes per second: wrk -t2 -c64 with `Connection: close`, every request a
#     new connection and a full handshake (wrk does not resume sessions);
# alternating app/nginx for ROUNDS rounds; medians of req/s and of server CPU µs per request,
# and the app/nginx ratios (the issue's targets: >= 1.0 keep-alive, >= 0.8 handshakes).
#   scripts/bench/tls-bench.sh BIN [seconds] [rounds]
set -euo pipefail
. "$(dirname "$0")/common.sh"
BIN=$1; DUR=${2:-5}; ROUNDS=${3:-3}
for c in wrk nginx openssl; do
    command -v "$c" >/dev/null || { echo "tls-bench: $c is needed (apt-get install $c)" >&2; exit 69; }
done
DIR=$(mktemp -d -p /tmp tls-bench.XXXX); chmod 700 "$DIR"
trap 'rm -rf "$DIR"' EXIT
APP_PORT=${APP_PORT:-18381}; NGX_PORT=${NGX_PORT:-18382}
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
}
NGINX
run() { # server mode -> "req/s cpu_us_per_req"
    local server=$1 mode=$2 master port pids c0 c1 out n rps hdr=()
    if [ "$server" = app ]; then
        "$BIN" serve --bind 127.0.0.1:$APP_PORT --config "$DIR/app.toml" \
            --control-socket "$DIR/ctl.sock" 2>/dev/null &
        master=$!; port=$APP_PORT
    else
        nginx -c "$DIR/nginx.conf" -p "$DIR/nginx" -g 'daemon off;' 2>/dev/null &
        master=$!; port=$NGX_PORT
    fi
    sleep 1
    pids=("$master" $(pgrep -P "$master"))
    [ "$mode" = close ] && hdr=(-H 'Connection: close')
    wrk -t2 -c64 -d1s "${hdr[@]}" "https://127.0.0.1:$port/" >/dev/null 2>&1   # warm-up
    c0=$(ticks "${pids[@]}")
    out=$(wrk -t2 -c64 -d"${DUR}s" "${hdr[@]}" "https://127.0.0.1:$port/")
    c1=$(ticks "${pids[@]}")
    kill -TERM "$master"; wait "$master" 2>/dev/null || true
    n=$(printf '%s\n' "$out" | awk '/requests in/ {print $1}')
    rps=$(printf '%s\n' "$out" | awk '/Requests\/sec/ {print $2}')
    awk -v r="$rps" -v c=$((c1 - c0)) -v n="$n" -v hz="$HZ" 'BEGIN { printf "%.0f %.2f\n", r, c * 1e6 / hz / n }'
}
for mode in ka close; do
    : > "$DIR/app-$mode"; : > "$DIR/nginx-$mode"
    for r in $(seq 1 "$ROUNDS"); do
        run app "$mode" >> "$DIR/app-$mode"
        run nginx "$mode" >> "$DIR/nginx-$mode"
    done
done
echo "TLS, wrk -t2 -c64 -d${DUR}s, 2 workers each, $ROUNDS rounds alternating (medians; CPU = server µs/request)"
for mode in ka close; do
    label=$([ "$mode" = ka ] && echo "keep-alive req/s" || echo "new handshakes/s (Connection: close)")
    ar=$(awk '{print $1}' "$DIR/app-$mode" | median); nr=$(awk '{print $1}' "$DIR/nginx-$mode" | median)
    ac=$(awk '{print $2}' "$DIR/app-$mode" | median); nc=$(awk '{print $2}' "$DIR/nginx-$mode" | median)
    printf '  %-38s app %8.0f (%5.1f µs)  nginx %8.0f (%5.1f µs)  ratio %.2f, CPU %.2f\n' \
        "$label" "$ar" "$ac" "$nr" "$nc" "$(awk -v a="$ar" -v b="$nr" 'BEGIN{print a/b}')" \
        "$(awk -v a="$ac" -v b="$nc" 'BEGIN{print a/b}')"
done
