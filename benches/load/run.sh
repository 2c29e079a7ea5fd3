#!/usr/bin/env bash
# Load harness: tern, nginx and HAProxy side by side in front of the same backend, on
# loopback, under the same load; prints req/s, p99 and the ratios.
#
#   benches/load/run.sh [seconds-per-run]          (default 10)
#   ROUNDS=3 CONNS=64 benches/load/run.sh          (rounds per scenario, connections)
#
# Each scenario runs ROUNDS times with the proxy order rotated, and the median of each
# proxy's runs is reported, so the noise of a shared machine and the order of runs even out.
# Needs wrk, h2load (nghttp2-client), nginx and haproxy; installs them from Debian if missing.
# All three proxies: access logs off, keep-alive to the backend, 2 worker threads/processes,
# TLS 1.3 with the same ECDSA P-256 certificate. A 2-core machine runs the load generator,
# the proxy and the backend at once: read the ratios, not the absolute numbers.
set -euo pipefail
cd "$(dirname "$0")/../.."
DUR=${1:-10}
CONNS=${CONNS:-64}
ROUNDS=${ROUNDS:-3}

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

cargo build --release --quiet --bin tern --example bench_backend
TERN=${TERN:-target/release/tern}
BACKEND=target/release/examples/bench_backend

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
[ -n "${KEEP:-}" ] && trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; echo "kept $work"' EXIT

# No port is picked by binding and releasing (another process could take it in between): the
# backend and tern listen on port 0 and report their addresses; nginx and HAProxy are handed
# sockets already listening on port 0 (with_sockets.py below), which they inherit. It execs the
# server, so the pid recorded for cleanup is the server's.
#
# with_sockets.py NAME BACKLOG N TEMPLATE OUT -- CMD...: listens on N loopback sockets (port 0),
# writes their ports to $work/NAME.ports, renders TEMPLATE into OUT (@PORTi@ and @FDi@ replaced),
# then execs CMD with the sockets open, their descriptors also in $NGINX (nginx's way to inherit
# listening sockets; HAProxy takes them as "bind fd@N").
cat > "$work/with_sockets.py" <<'PY'
import os, socket, sys
name, backlog, n, template, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
cmd = sys.argv[sys.argv.index("--") + 1:]
socks = []
for _ in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(backlog)
    os.set_inheritable(s.fileno(), True)
    socks.append(s)
text = open(template).read()
for i, s in enumerate(socks):
    text = text.replace(f"@PORT{i}@", str(s.getsockname()[1])).replace(f"@FD{i}@", str(s.fileno()))
open(out, "w").write(text)
open(os.path.join(os.path.dirname(out), name + ".ports"), "w").write("".join(f"{s.getsockname()[1]}\n" for s in socks))
env = dict(os.environ, NGINX="".join(f"{s.fileno()};" for s in socks))
os.execvpe(cmd[0], cmd, env)
PY
# The Nth port (from 1) with_sockets wrote for NAME, once it is there.
port_of() {
  for _ in $(seq 1 200); do [ -s "$work/$1.ports" ] && { sed -n "${2}p" "$work/$1.ports"; return 0; }; sleep 0.05; done
  echo "$1 never reported its ports" >&2; return 1
}
# Waits until URL answers (curl -k: any certificate; the sockets listen before the server runs).
wait_http() { for _ in $(seq 1 200); do curl -sfk -o /dev/null "$1" && return 0; sleep 0.05; done; echo "$1 never answered" >&2; return 1; }

# One certificate for all three, for "localhost" (so clients send SNI and resolve it).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
cat "$work/cert.pem" "$work/key.pem" > "$work/combined.pem"

"$BACKEND" 127.0.0.1:0 2>"$work/backend.log" & pids+=($!)
BPORT=
for _ in $(seq 1 200); do
  BPORT=$(sed -n 's/^bench_backend listening on 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$work/backend.log")
  [ -n "$BPORT" ] && break; sleep 0.05
done
[ -n "$BPORT" ] || { echo "the backend never reported its port" >&2; exit 1; }

# tern: port 0, addresses read from its "listening" log lines.
cat > "$work/tern.toml" <<TOML
region = "bench"
[[listen]]
addr = "127.0.0.1:0"
[[listen]]
addr = "127.0.0.1:0"
tls = true
[admin]
addr = "127.0.0.1:0"
[rib]
path = "$work/tern.db"
[log]
format = "json"
level = "warn,tern::listener=info"
access = false
TOML
cat > "$work/decl.toml" <<TOML
[[apps]]
name = "bench"
hostnames = ["localhost"]
[[machines]]
id = "backend"
app = "bench"
addr = "127.0.0.1:$BPORT"
state = "started"
[[certificates]]
hostname = "localhost"
cert_file = "$work/cert.pem"
key_file = "$work/key.pem"
TOML
"$TERN" apply -c "$work/tern.toml" "$work/decl.toml" >/dev/null
TOKIO_WORKER_THREADS=2 "$TERN" serve -c "$work/tern.toml" 2>"$work/tern.log" & pids+=($!)
# tern_port true|false: the port of tern's TLS or plain listener, from its log.
tern_port() {
  for _ in $(seq 1 200); do
    local p
    p=$(grep '"message":"listening"' "$work/tern.log" | grep -v '"admin":true' | grep "\"tls\":$1" \
      | sed -n 's/.*"addr":"127\.0\.0\.1:\([0-9]*\)".*/\1/p' | head -1)
    [ -n "$p" ] && { echo "$p"; return 0; }; sleep 0.05
  done
  echo "tern never reported its listeners" >&2; return 1
}
T_HTTP=$(tern_port false); T_TLS=$(tern_port true)
wait_http "http://localhost:$T_HTTP/"; wait_http "https://localhost:$T_TLS/"

# nginx: 511 is its default backlog.
mkdir -p "$work/nginx"
cat > "$work/nginx.conf.in" <<CONF
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream backend { server 127.0.0.1:$BPORT; keepalive 256; }
  server {
    listen 127.0.0.1:@PORT0@;
    listen 127.0.0.1:@PORT1@ ssl http2;
    server_name localhost;
    ssl_certificate $work/cert.pem;
    ssl_certificate_key $work/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
CONF
python3 "$work/with_sockets.py" nginx 511 2 "$work/nginx.conf.in" "$work/nginx.conf" -- \
  "$NGINX" -p "$work/nginx" -c "$work/nginx.conf" -g 'daemon off;' & pids+=($!)
N_HTTP=$(port_of nginx 1); N_TLS=$(port_of nginx 2)
wait_http "http://localhost:$N_HTTP/"; wait_http "https://localhost:$N_TLS/"

# HAProxy: its backlog defaults to maxconn.
cat > "$work/haproxy.cfg.in" <<CONF
global
  nbthread 2
  maxconn 4096
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  option forwardfor
  http-reuse always
frontend plain
  bind fd@@FD0@
  default_backend app
frontend tls
  bind fd@@FD1@ ssl crt $work/combined.pem alpn h2,http/1.1
  default_backend app
backend app
  server b1 127.0.0.1:$BPORT maxconn 2000
CONF
python3 "$work/with_sockets.py" haproxy 4096 2 "$work/haproxy.cfg.in" "$work/haproxy.cfg" -- \
  "$HAPROXY" -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 & pids+=($!)
H_HTTP=$(port_of haproxy 1); H_TLS=$(port_of haproxy 2)
wait_http "http://localhost:$H_HTTP/"; wait_http "https://localhost:$H_TLS/"

# name url tool -> "rps p99_ms errors"
measure() {
  local tool=$1 url=$2 out
  if [ "$tool" = wrk ]; then
    wrk -t1 -c"$CONNS" -d2s "$url" >/dev/null 2>&1 || true   # warm-up
    out=$(wrk -t1 -c"$CONNS" -d"${DUR}s" --latency "$url" 2>&1)
    local rps p99 errs
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub("us","",v); v/=1000} else if (v ~ /ms$/) {sub("ms","",v)} else if (v ~ /s$/) {sub("s","",v); v*=1000}; print v}' <<<"$out")
    errs=$(awk '/Non-2xx/ {print $5} /Socket errors/ {print "sock"}' <<<"$out" | head -1)
    echo "${rps:-0} ${p99:-0} ${errs:-0}"
  else
    # h2load once hung past its -D against nginx: bounded, a hung round reports 0 req/s.
    timeout 30 h2load -c"$CONNS" -m8 -t1 -D 2 "$url" >/dev/null 2>&1 || true
    out=$(timeout $((DUR + 30)) h2load -c"$CONNS" -m8 -t1 -D "$DUR" "$url" 2>&1 || true)
    local rps mean fail
    rps=$(awk '/finished in/ {gsub(",","",$4); print $4}' <<<"$out")
    mean=$(awk '/time for request:/ {v=$6; if (v ~ /us$/) {sub("us","",v); v/=1000} else if (v ~ /ms$/) {sub("ms","",v)}; print v}' <<<"$out")
    fail=$(awk '/^requests:/ {print $10}' <<<"$out")
    echo "${rps:-0} ${mean:-0} ${fail:-0}"
  fi
}

# The median run (by req/s) of a list of "rps lat err" lines.
median() { sort -n -k1,1 | awk '{a[NR]=$0} END {print a[int((NR+1)/2)]}'; }

declare -A R
run() {  # scenario tool tern-url nginx-url haproxy-url
  local s=$1 tool=$2
  local -A urls=([tern]=$3 [nginx]=$4 [haproxy]=$5) runs=()
  local order=(tern nginx haproxy)
  for ((r = 0; r < ROUNDS; r++)); do
    for ((i = 0; i < 3; i++)); do
      local p=${order[$(((i + r) % 3))]}
      runs[$p]+="$(measure "$tool" "${urls[$p]}")"$'\n'
    done
  done
  for p in tern nginx haproxy; do R[$s,$p]=$(printf '%s' "${runs[$p]}" | median); done
}
run "HTTP/1.1 keep-alive" wrk "http://localhost:$T_HTTP/" "http://localhost:$N_HTTP/" "http://localhost:$H_HTTP/"
run "HTTP/1.1 over TLS" wrk "https://localhost:$T_TLS/" "https://localhost:$N_TLS/" "https://localhost:$H_TLS/"
run "HTTP/2 over TLS" h2load "https://localhost:$T_TLS/" "https://localhost:$N_TLS/" "https://localhost:$H_TLS/"
direct=$(measure wrk "http://127.0.0.1:$BPORT/")

echo
echo "load: median of $ROUNDS runs of ${DUR}s each, $CONNS connections, $(nproc) cores, backend alone: $(awk '{printf "%.0f req/s", $1}' <<<"$direct")"
printf "%-22s %-8s %12s %12s %8s %14s %14s\n" scenario proxy "req/s" "p99 ms" errors "tern/nginx" "tern/haproxy"
for s in "HTTP/1.1 keep-alive" "HTTP/1.1 over TLS" "HTTP/2 over TLS"; do
  read -r trps tlat terr <<<"${R[$s,tern]}"
  read -r nrps nlat nerr <<<"${R[$s,nginx]}"
  read -r hrps hlat herr <<<"${R[$s,haproxy]}"
  lat=p99; [[ $s == HTTP/2* ]] && lat=mean
  printf "%-22s %-8s %12.0f %12.2f %8s %14.2f %14.2f\n" "$s" tern "$trps" "$tlat" "$terr" \
    "$(awk -v a="$trps" -v b="$nrps" 'BEGIN{print (b>0)?a/b:0}')" "$(awk -v a="$trps" -v b="$hrps" 'BEGIN{print (b>0)?a/b:0}')"
  printf "%-22s %-8s %12.0f %12.2f %8s\n" "" nginx "$nrps" "$nlat" "$nerr"
  printf "%-22s %-8s %12.0f %12.2f %8s\n" "" haproxy "$hrps" "$hlat" "$herr"
done
echo "(latency column: wrk p99 for HTTP/1.1; h2load mean per request for HTTP/2, which reports no percentiles)"
