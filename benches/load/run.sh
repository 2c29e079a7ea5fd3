#!/usr/bin/env bash
# Load harness: tern, nginx and HAProxy side by side in front of the same backend, on
# loopback, measured by the CPU time each proxy spends (issue 13's method); prints a ratio
# table in Markdown.
#
#   benches/load/run.sh [seconds-per-run]                (or DUR=…; default 10)
#   ROUNDS=3 CONNS=64 IDLE_CONNS=10000 benches/load/run.sh
#   TERN=/path/to/tern TERN_BEFORE=/path/to/old/tern benches/load/run.sh
#   FLOOR=1 …                                            (adds the floor: examples/bench_floor.rs,
#                                                        a bare relay, what a request costs at
#                                                        the least on Tokio; not in h2 or idle)
#   SKIP_IDLE=1 SKIP_RATE=1 KEEP=1 …                     (skip parts; keep the work dir)
#   SCENARIOS="h1 tls" RATE=10000 …                      (some scenarios; a fixed rate of your own)
#   IDLE_PROXIES="tern" IDLE_MODES=plain IDLE_ARGS="--requests 0" …   (the idle run for some
#                                                        proxies and modes: tls, plain, h2,
#                                                        sse, sse-tls, sse-h2; bench_idle's
#                                                        options)
#   STREAM_CONNS=4000 …                                  (streams held in each sse mode;
#                                                        default 4000, at most IDLE_CONNS)
#   IDLE_SMAPS=1 KEEP=1 …                               (each idle run's /proc/PID/smaps before
#                                                        and after, kept in the work directory)
#   INSTR=1 INSTR_PROXIES="tern nginx" INSTR_N=20000 …   (adds user-space instructions per
#   INSTR_MODES="h1 tls h2" …                            GET, each proxy under callgrind;
#                                                        installs valgrind; h1 by default,
#                                                        tls and h2 as the scenarios of
#                                                        those names send them)
#   PEER_SUITES=TLS_AES_128_GCM_SHA256 …                 (nginx's and HAProxy's TLS 1.3 suites,
#                                                        OpenSSL's names: tern picks AES-128-GCM
#                                                        for wrk and h2load, the peers their first
#                                                        choice, AES-256-GCM, unless told)
#
# CPU 0 (PIN_LOAD) runs the backend (an nginx with one worker answering 1 KiB) and every load
# generator; CPU 1 (PIN_PROXY) runs the proxy under test, each proxy with one worker, all of
# them started at once but only one loaded at a time. A proxy's cost is its CPU time (utime +
# stime from /proc/PID/stat, over all its processes and threads) across each timed run:
# requests completed per proxy-CPU-second, which does not depend on who else shares the
# machine the way req/s does.
#
# 1. Five throughput scenarios, each ROUNDS rounds of DUR seconds per proxy, the proxy order
#    rotated each round, the median round per proxy reported: HTTP/1.1 keep-alive (wrk),
#    TLS 1.3 keep-alive (wrk), TLS 1.3 with a new connection per request (wrk,
#    "Connection: close": handshakes per CPU-second), HTTP/2 over TLS (h2load, 8 streams),
#    and HTTP/1.1 keep-alive POSTs of a 180-byte JSON-RPC body with its Content-Length (wrk:
#    what an MCP client sends).
# 2. Fixed-rate latency: each proxy driven at half the req/s nginx reached in the HTTP/1.1
#    scenario, open loop (examples/bench_rate.rs, latency from each request's due time),
#    ROUNDS rotated rounds, the median p99 reported.
# 3. Idle memory: each proxy restarted fresh, then IDLE_CONNS keep-alive connections opened,
#    one request on each, all held idle (examples/bench_idle.rs); RSS per connection is the
#    growth of the proxy's summed VmRSS ÷ connections, read IDLE_SETTLE (15) s after the last
#    connection's request, once both readings have settled. Three times: HTTP/1.1 over TLS,
#    plain HTTP/1.1, and HTTP/2 over TLS (ALPN h2, as browsers connect). Then idle streams:
#    STREAM_CONNS SSE responses that send one event and then nothing for an hour (from a
#    second backend, tern's test machine, on the load CPU), one per connection, each held
#    open with its body unread, over plain HTTP/1.1, TLS and HTTP/2; RSS per stream, and the proxy's
#    CPU while they sit idle (a proxy should not wake for a silent stream).
# 4. With INSTR=1, instructions: each proxy under callgrind, user-space instructions per
#    keep-alive GET over HTTP/1.1, and with INSTR_MODES over TLS and HTTP/2 too (a count that
#    does not vary from run to run; see instructions()).
#
# All proxies: access logs off, keep-alive to the backend, TLS 1.3 only with the same ECDSA
# P-256 certificate, idle keep-alive timeouts of 300 s (so the idle run's connections stay).
# No fixed ports: the backend, nginx and HAProxy inherit sockets listening on port 0
# (with_sockets.py below), tern listens on port 0 and reports its addresses in its log.
# Needs wrk, h2load (nghttp2-client), nginx, haproxy and taskset; installs them from Debian if
# missing. Raises its open-file limit to 65536 where it may (else to the hard limit).
set -euo pipefail
cd "$(dirname "$0")/../.."
DUR=${1:-${DUR:-10}}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
IDLE_CONNS=${IDLE_CONNS:-10000}
IDLE_SETTLE=${IDLE_SETTLE:-15}
# At most IDLE_CONNS, so that a quick pass with fewer connections holds fewer streams too.
STREAM_CONNS=${STREAM_CONNS:-$((IDLE_CONNS < 4000 ? IDLE_CONNS : 4000))}
PIN_LOAD=${PIN_LOAD:-0}
PIN_PROXY=${PIN_PROXY:-1}
started=$SECONDS
load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v taskset >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
[ "$(nproc --all)" -ge 2 ] || { echo "needs 2 CPUs: the proxy on one, backend and load on the other" >&2; exit 1; }

# The proxies inherit the limit (tern does not raise its own; nginx's worker and HAProxy are
# told it), so each can hold IDLE_CONNS connections plus its listeners and backend pool.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
FDS=$(ulimit -n)
if [ "$FDS" -lt $((IDLE_CONNS + 1000)) ]; then
  echo "open-file limit $FDS is too low for IDLE_CONNS=$IDLE_CONNS" >&2; exit 1
fi
# A stream holds two descriptors in the proxy: the client's and the backend's.
if [ "$FDS" -lt $((2 * STREAM_CONNS + 1000)) ]; then
  echo "open-file limit $FDS is too low for STREAM_CONNS=$STREAM_CONNS" >&2; exit 1
fi

if [ -z "${TERN:-}" ]; then
  cargo build --release --quiet --bin tern --example bench_idle --example bench_rate --example test_machine ${FLOOR:+--example bench_floor}
  TERN=target/release/tern
else
  cargo build --release --quiet --example bench_idle --example bench_rate --example test_machine ${FLOOR:+--example bench_floor}
fi
STREAMS_BIN=target/release/examples/test_machine
IDLE_BIN=target/release/examples/bench_idle
RATE_BIN=target/release/examples/bench_rate
declare -A BIN=([tern]=$TERN)
PROXIES=(tern nginx haproxy)
if [ -n "${TERN_BEFORE:-}" ]; then BIN[tern-before]=$TERN_BEFORE; PROXIES=(tern tern-before nginx haproxy); fi
# FLOOR=1 adds the floor (examples/bench_floor.rs): a bare HTTP/1.1 relay on Tokio, one task
# per connection, what a request costs at the least in Rust on this machine. It runs the h1,
# tls and tls-new scenarios and the fixed rate; it has no HTTP/2 nor request bodies and is left
# out of the idle runs.
if [ -n "${FLOOR:-}" ]; then BIN[floor]=target/release/examples/bench_floor; PROXIES+=(floor); fi
# serves KIND P: whether proxy P takes part in scenario KIND.
serves() { [ "$2" != floor ] || { [ "$1" != h2 ] && [ "$1" != post ]; }; }
CLK_TCK=$(getconf CLK_TCK)

work=$(mktemp -d)
raw=$work/raw.log
declare -A PID HTTP TLS
cleanup() {
  for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "kept $work (raw figures: $raw)" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
load() { taskset -c "$PIN_LOAD" "$@"; }
log() { echo "$*" >>"$raw"; }
log "# $(date -u +%FT%TZ) commit=$(git rev-parse --short HEAD 2>/dev/null || echo ?) DUR=$DUR ROUNDS=$ROUNDS CONNS=$CONNS IDLE_CONNS=$IDLE_CONNS tern=$TERN ${TERN_BEFORE:+tern-before=$TERN_BEFORE}"

# with_sockets.py NAME BACKLOG N TEMPLATE OUT -- CMD...: listens on N loopback sockets (port 0),
# writes their ports to dirname(OUT)/NAME.ports, renders TEMPLATE into OUT (@PORTi@ and @FDi@
# replaced), then execs CMD with the sockets open, their descriptors also in $NGINX (nginx's
# way to inherit listening sockets; HAProxy takes them as "bind fd@N"). No port is picked by
# binding and releasing it, which another process could take in between. It execs the server
# (as taskset does), so the pid the script records is the server's.
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
# How many times (20 a second) a server is looked at before it is given up on; raised for
# one under valgrind, which starts far slower.
TRIES=200
# port_of FILE N: the Nth port (from 1) with_sockets wrote to FILE, once it is there.
port_of() {
  for _ in $(seq 1 200); do [ -s "$1" ] && { sed -n "${2}p" "$1"; return 0; }; sleep 0.05; done
  echo "$1 never appeared" >&2; return 1
}
# Waits until URL answers (curl -k: any certificate; the sockets listen before the server runs).
wait_http() { for _ in $(seq 1 "$TRIES"); do curl -sfk -o /dev/null "$1" && return 0; sleep 0.05; done; echo "$1 never answered" >&2; return 1; }

# One certificate for every proxy, for "localhost" (so clients send SNI and resolve it).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
cat "$work/cert.pem" "$work/key.pem" > "$work/combined.pem"

# The backend: nginx, one worker on the load CPU, 1 KiB from memory on every request.
start_backend() {
  local d=$work/backend
  mkdir -p "$d"
  cat > "$d/nginx.conf.in" <<CONF
worker_processes 1;
worker_rlimit_nofile $FDS;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  default_type text/plain;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {
    listen 127.0.0.1:@PORT0@;
    location / { return 200 "$(head -c 1024 /dev/zero | tr '\0' x)"; }
  }
}
CONF
  taskset -c "$PIN_LOAD" python3 "$work/with_sockets.py" backend 4096 1 "$d/nginx.conf.in" "$d/nginx.conf" -- \
    "$NGINX" -p "$d" -c "$d/nginx.conf" -g 'daemon off;' & PID[backend]=$!
  BPORT=$(port_of "$d/backend.ports" 1)
  wait_http "http://127.0.0.1:$BPORT/"
  [ "$(curl -s "http://127.0.0.1:$BPORT/" | wc -c)" -eq 1024 ] || { echo "backend body is not 1 KiB" >&2; exit 1; }
}

# The streams' backend, for the idle-stream modes: tern's test machine, on the load CPU, on a
# port of its own choosing. STREAM_PATH is an SSE stream that sends one event, then nothing
# for an hour: a stream with nothing to say once it has begun (nginx sends no HTTP/2 response
# head before the first byte of its body, so a stream silent from the start never opens there).
STREAM_PATH='/ticks?n=2&gap_ms=3600000'
start_streams_backend() {
  local d=$work/streams
  mkdir -p "$d"
  taskset -c "$PIN_LOAD" "$STREAMS_BIN" 127.0.0.1:0 2>"$d/log" & PID[streams]=$!
  for _ in $(seq 1 200); do
    SPORT=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$d/log")
    [ -z "$SPORT" ] || break; sleep 0.05
  done
  [ -n "$SPORT" ] || { echo "the streams' backend never listened: $(cat "$d/log")" >&2; exit 1; }
  wait_http "http://127.0.0.1:$SPORT/id"
}

# tern (or tern-before): one worker, port 0, its addresses read from its "listening" lines.
# Its watchdog only logs a wedge: on a machine this busy its heartbeat can lag past 2 s, and a
# bounce would swap the process being measured for a fresh one. Wedges are counted (stop) and
# reported under the table.
start_tern() {
  local name=$1 d=$work/$1 bin=${BIN[$1]}
  rm -rf "$d"; mkdir -p "$d"
  cat > "$d/tern.toml" <<TOML
region = "bench"
workers = 1
[[listen]]
addr = "127.0.0.1:0"
[[listen]]
addr = "127.0.0.1:0"
tls = true
[admin]
addr = "127.0.0.1:0"
[rib]
path = "$d/tern.db"
[log]
format = "json"
level = "warn,tern::listener=info"
access = false
[limits]
keepalive_timeout = "300s"
header_read_timeout = "300s"
[watchdog]
action = "log"
TOML
  cat > "$d/decl.toml" <<TOML
[[apps]]
name = "bench"
hostnames = ["localhost"]${STREAMING:+
idle_timeout = \"300s\"}
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
  "$bin" apply -c "$d/tern.toml" "$d/decl.toml" >/dev/null
  taskset -c "$PIN_PROXY" ${WRAP[@]+"${WRAP[@]}"} "$bin" serve -c "$d/tern.toml" 2>"$d/tern.log" & PID[$name]=$!
  HTTP[$name]=$(tern_port "$d/tern.log" false); TLS[$name]=$(tern_port "$d/tern.log" true)
}
# tern_port LOG true|false: the port of tern's TLS or plain listener, from its log.
tern_port() {
  for _ in $(seq 1 "$TRIES"); do
    local p
    p=$(grep '"message":"listening"' "$1" | grep -v '"admin":true' | grep "\"tls\":$2" \
      | sed -n 's/.*"addr":"127\.0\.0\.1:\([0-9]*\)".*/\1/p' | head -1 || true)
    [ -n "$p" ] && { echo "$p"; return 0; }; sleep 0.05
  done
  echo "tern never reported its listeners ($1)" >&2; return 1
}

# nginx: one worker; 511 is its default backlog.
start_nginx() {
  local d=$work/nginx
  rm -rf "$d"; mkdir -p "$d"
  cat > "$d/nginx.conf.in" <<CONF
worker_processes 1;
worker_rlimit_nofile $FDS;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections $((FDS - 100)); }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  upstream backend { server 127.0.0.1:$BPORT; keepalive 256; }
  server {
    listen 127.0.0.1:@PORT0@;
    listen 127.0.0.1:@PORT1@ ssl http2;
    server_name localhost;
    ssl_certificate $work/cert.pem;
    ssl_certificate_key $work/key.pem;
    ssl_protocols TLSv1.3;${PEER_SUITES:+
    ssl_conf_command Ciphersuites $PEER_SUITES;}
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;${STREAMING:+
      proxy_buffering off;
      proxy_read_timeout 300s;}
    }
  }
}
CONF
  taskset -c "$PIN_PROXY" python3 "$work/with_sockets.py" nginx 511 2 "$d/nginx.conf.in" "$d/nginx.conf" -- \
    ${WRAP[@]+"${WRAP[@]}"} "$NGINX" -p "$d" -c "$d/nginx.conf" -g 'daemon off;' & PID[nginx]=$!
  HTTP[nginx]=$(port_of "$d/nginx.ports" 1); TLS[nginx]=$(port_of "$d/nginx.ports" 2)
}

# HAProxy: one thread; its backlog is the sockets' (4096). It counts two descriptors per
# connection (client and server) and would refuse to start with a maxconn over half the
# open-file limit; "no strict-limits" lets it start, and idle client connections need one each.
start_haproxy() {
  local d=$work/haproxy
  rm -rf "$d"; mkdir -p "$d"
  cat > "$d/haproxy.cfg.in" <<CONF
global
  nbthread 1
  no strict-limits
  maxconn $((FDS - 1000))
  ssl-default-bind-options ssl-min-ver TLSv1.3${PEER_SUITES:+
  ssl-default-bind-ciphersuites $PEER_SUITES}
defaults
  mode http
  maxconn $((FDS - 1000))
  timeout connect 5s
  timeout client 300s
  timeout server ${STREAMING:+300s}${STREAMING:-60s}
  timeout http-keep-alive 300s
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
  server b1 127.0.0.1:$BPORT maxconn ${STREAMING:+$FDS}${STREAMING:-2000}
CONF
  taskset -c "$PIN_PROXY" python3 "$work/with_sockets.py" haproxy 4096 2 "$d/haproxy.cfg.in" "$d/haproxy.cfg" -- \
    ${WRAP[@]+"${WRAP[@]}"} "$HAPROXY" -f "$d/haproxy.cfg" -db >"$d/haproxy.log" 2>&1 & PID[haproxy]=$!
  HTTP[haproxy]=$(port_of "$d/haproxy.ports" 1); TLS[haproxy]=$(port_of "$d/haproxy.ports" 2)
}

start() {
  case $1 in
    tern | tern-before | floor) start_tern "$1" ;;
    nginx) start_nginx ;;
    haproxy) start_haproxy ;;
  esac
  local path=${STREAMING:+/id}
  wait_http "http://localhost:${HTTP[$1]}${path:-/}"; wait_http "https://localhost:${TLS[$1]}${path:-/}"
  local brief proto
  brief=$(openssl s_client -brief -connect "127.0.0.1:${TLS[$1]}" -servername localhost </dev/null 2>&1)
  proto=$(sed -n 's/^Protocol version: //p' <<<"$brief")
  [ "$proto" = TLSv1.3 ] || { echo "$1 negotiated ${proto:-nothing}, not TLSv1.3" >&2; exit 1; }
  SUITE[$1]=$(sed -n 's/^Ciphersuite: //p' <<<"$brief")
}
declare -A SUITE
declare -A WEDGED
stop() {
  kill "${PID[$1]}" 2>/dev/null || true; wait "${PID[$1]}" 2>/dev/null || true; unset "PID[$1]"
  if [ -f "$work/$1/tern.log" ]; then
    WEDGED[$1]=$((${WEDGED[$1]:-0} + $(grep -c '"message":"wedged' "$work/$1/tern.log" || true)))
  fi
}

# The proxy's processes: its main process and all descendants (nginx's workers).
tree_pids() { echo "$1"; local c; for c in $(pgrep -P "$1" || true); do tree_pids "$c"; done; }
# CPU ticks of the proxy's processes (a process's threads included): utime + stime (fields 14
# and 15 of /proc/PID/stat) with `cpu_ticks`, stime alone (the kernel's share) with `sys_ticks`.
# The comm field is cut off first, as it may hold spaces; FIELDS counts from the state field.
stat_ticks() {
  local t=0 p f
  for p in $(tree_pids "$1"); do
    f=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null) || continue
    t=$((t + $(awk "{print $2}" <<<"$f")))
  done
  echo "$t"
}
cpu_ticks() { stat_ticks "$1" '$12 + $13'; }
sys_ticks() { stat_ticks "$1" '$13'; }
# KiB summed over the proxy's processes: VmRSS from status, or Pss from smaps_rollup.
rss_kib() { local p; for p in $(tree_pids "$1"); do cat "/proc/$p/status" 2>/dev/null; done | awk '/^VmRSS:/ {s += $2} END {print s + 0}'; }
pss_kib() { local p; for p in $(tree_pids "$1"); do cat "/proc/$p/smaps_rollup" 2>/dev/null; done | awk '/^Pss:/ {s += $2} END {print s + 0}'; }
fds() { local p n=0; for p in $(tree_pids "$1"); do n=$((n + $(ls "/proc/$p/fd" 2>/dev/null | wc -l))); done; echo "$n"; }

# One timed run against proxy P; prints "per_cpu_s cpu_s wall_rps errors requests sys_s", the
# first figure being requests answered 2xx ÷ the proxy's CPU seconds over the run. The
# tool's full output goes to runs/.
# run_wrk P SECONDS URL [wrk args…]
run_wrk() {
  local p=$1 secs=$2 url=$3 t0 t1 s0 s1 out; shift 3
  t0=$(cpu_ticks "${PID[$p]}"); s0=$(sys_ticks "${PID[$p]}")
  out=$(load wrk -t1 -c"$CONNS" -d"${secs}s" "$@" "$url" 2>&1) || true
  t1=$(cpu_ticks "${PID[$p]}"); s1=$(sys_ticks "${PID[$p]}")
  echo "$out" >>"$work/runs/$p.txt"
  awk -v dt=$((t1 - t0)) -v ds=$((s1 - s0)) -v hz="$CLK_TCK" '
    /requests in/ {reqs = $1}
    /Requests\/sec/ {rps = $2}
    /Non-2xx or 3xx responses:/ {bad = $5}
    /Socket errors:/ {gsub(",", ""); sock = $4 + $6 + $8 + $10}
    END {cpu = dt / hz; good = reqs - bad; printf "%.0f %.2f %.0f %d %d %.2f\n", (cpu > 0) ? good / cpu : 0, cpu, rps, bad + sock, good, ds / hz}' <<<"$out"
}
# run_h2load P SECONDS URL: the same from h2load (HTTP/2, 8 streams per connection).
run_h2load() {
  local p=$1 secs=$2 url=$3 t0 t1 s0 s1 out
  t0=$(cpu_ticks "${PID[$p]}"); s0=$(sys_ticks "${PID[$p]}")
  # h2load once hung past its -D against nginx: bounded, a hung run reports its errors.
  out=$(load timeout $((secs + 30)) h2load -c"$CONNS" -m8 -t1 -D "$secs" "$url" 2>&1) || true
  t1=$(cpu_ticks "${PID[$p]}"); s1=$(sys_ticks "${PID[$p]}")
  echo "$out" >>"$work/runs/$p.txt"
  grep -q '^Application protocol: h2$' <<<"$out" || { echo "h2load did not speak h2 to $p: $out" >&2; exit 1; }
  awk -v dt=$((t1 - t0)) -v ds=$((s1 - s0)) -v hz="$CLK_TCK" '
    /^finished in/ {gsub(",", ""); rps = $4}
    /^requests:/ {good = $8; err = $10 + $12 + $14}
    /^status codes:/ {bad = $5 + $7 + $9}
    END {cpu = dt / hz; good -= bad; printf "%.0f %.2f %.0f %d %d %.2f\n", (cpu > 0) ? good / cpu : 0, cpu, rps, err + bad, good, ds / hz}' <<<"$out"
}
# measure KIND P SECONDS: one run of a throughput scenario.
measure() {
  case $1 in
    h1) run_wrk "$2" "$3" "http://localhost:${HTTP[$2]}/" ;;
    tls) run_wrk "$2" "$3" "https://localhost:${TLS[$2]}/" ;;
    tls-new) run_wrk "$2" "$3" "https://localhost:${TLS[$2]}/" -H 'Connection: close' ;;
    h2) run_h2load "$2" "$3" "https://localhost:${TLS[$2]}/" ;;
    post) run_wrk "$2" "$3" "http://localhost:${HTTP[$2]}/" -s "$work/post.lua" ;;
  esac
}
# The post scenario's request: an MCP client's JSON-RPC call, 180 bytes with Content-Length.
cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello from a benchmark client, a couple hundred bytes as MCP clients send"}}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
LUA

# R[KIND,P]: one line per round. Round r starts with proxy r (mod the count), so each proxy
# runs first, second and last in turn; the first round's runs get a 2 s warm-up each.
declare -A R
scenario() {
  local kind=$1 n=${#PROXIES[@]} r i p line
  echo "$kind: $ROUNDS × ${DUR}s per proxy" >&2
  for ((r = 0; r < ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
      p=${PROXIES[$(((i + r) % n))]}
      serves "$kind" "$p" || continue
      [ "$r" -gt 0 ] || measure "$kind" "$p" 2 >/dev/null
      echo "== $kind round $r" >>"$work/runs/$p.txt"
      line=$(measure "$kind" "$p" "$DUR")
      R[$kind,$p]+="$line"$'\n'
      log "$kind round=$r proxy=$p per_cpu_s,cpu_s,wall_rps,errors,requests,sys_s: $line"
    done
  done
}
# The median round (by the first field) of R[KIND,P], and its errors summed over all rounds.
median() { printf '%s' "${R[$1,$2]}" | sort -n -k1,1 | awk '{a[NR] = $0} END {print a[int((NR + 1) / 2)]}'; }
errors() { printf '%s' "${R[$1,$2]}" | awk -v c="${3:-4}" '{s += $c} END {print s + 0}'; }

# Fixed rate: bench_rate at RATE req/s against P's plain listener; R[rate,P] gets
# "p99_ms p50_ms p999_ms cpu_s errors sent_rps lag_p99_ms client_bound behind". A round is
# client-bound when bench_rate's own lag (p99), less the 2 ms its timer's grain accounts for,
# was over half the p99 it measured: CPU 0 was too busy, and the latency is bench_rate's as
# much as the proxy's. It is behind when under
# 95% of the schedule went out: responses came too late for the rest to be sent in time.
rate_round() {
  local p=$1 rate=$2 t0 t1 out
  t0=$(cpu_ticks "${PID[$p]}")
  out=$(load "$RATE_BIN" --addr "127.0.0.1:${HTTP[$p]}" --rate "$rate" --conns "$CONNS" --duration "$DUR" 2>&1) || true
  t1=$(cpu_ticks "${PID[$p]}")
  echo "$out" >>"$work/runs/$p.txt"
  grep -q '^sent=' <<<"$out" || { echo "bench_rate failed against $p: $out" >&2; exit 1; }
  sed -n 's/^sent=.*errors=\([0-9]*\) rate=\([0-9]*\) p50_us=\([0-9]*\) p99_us=\([0-9]*\) p999_us=\([0-9]*\) .*lag_p99_us=\([0-9]*\).*/\4 \3 \5 \1 \2 \6/p' <<<"$out" \
    | awk -v dt=$((t1 - t0)) -v hz="$CLK_TCK" -v want="$rate" '{
        printf "%.3f %.3f %.3f %.2f %d %d %.3f %d %d\n", $1 / 1000, $2 / 1000, $3 / 1000, dt / hz, $4, $5, $6 / 1000,
          ($6 - 2000 > $1 / 2) ? 1 : 0, ($5 < 0.95 * want) ? 1 : 0}'
}
fixed_rate() {
  local rate=$1 n=${#PROXIES[@]} r i p line
  echo "fixed rate: $rate req/s, $ROUNDS × ${DUR}s per proxy" >&2
  for ((r = 0; r < ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
      p=${PROXIES[$(((i + r) % n))]}
      echo "== rate round $r" >>"$work/runs/$p.txt"
      line=$(rate_round "$p" "$rate")
      R[rate,$p]+="$line"$'\n'
      log "rate=$rate round=$r proxy=$p p99_ms,p50_ms,p999_ms,cpu_s,errors,sent_rps,lag_p99_ms,client_bound,behind: $line"
    done
  done
}

# The proxy's RSS once it stops moving: read every half second until two readings differ by
# under 0.1% (+64 KiB), at most 20 s.
settled_rss() {
  local prev=-1 cur d
  for _ in $(seq 1 40); do
    cur=$(rss_kib "$1")
    d=$((cur - prev)); d=${d#-}
    [ "$prev" -ge 0 ] && [ "$d" -le $((prev / 1000 + 64)) ] && break
    prev=$cur; sleep 0.5
  done
  echo "$cur"
}
# Idle memory: P restarted fresh (so earlier runs' memory does not count), its settled RSS
# read, IDLE_CONNS connections opened (one request each) and held, its RSS read again. In the
# sse modes P is started in front of the streams' backend (streaming settings on: nginx's
# proxy_buffering off, 300 s limits) and STREAM_CONNS streams are held instead.
# R[idle-MODE,P] gets "rss_kib_per_conn pss_kib_per_conn held errors cpu_ms_per_s", the last
# being P's CPU over the IDLE_SETTLE seconds they sat idle.
idle_run() {
  local p=$1 mode=$2 port flag="" rss0 pss0 fd0 rss1 pss1 fd1 ipid out t0 c0 c1 conns=$IDLE_CONNS
  local STREAMING="" BPORT=$BPORT
  local stream=()
  case $mode in sse*) STREAMING=1; BPORT=$SPORT; conns=$STREAM_CONNS; stream=(--stream --path "$STREAM_PATH") ;; esac
  stop "$p"; start "$p"
  port=${HTTP[$p]}
  case $mode in
    tls | sse-tls) port=${TLS[$p]}; flag+=" --tls" ;;
    h2 | sse-h2) port=${TLS[$p]}; flag+=" --h2" ;;
  esac
  rss0=$(settled_rss "${PID[$p]}"); pss0=$(pss_kib "${PID[$p]}"); fd0=$(fds "${PID[$p]}")
  [ -z "${IDLE_SMAPS:-}" ] || cat "/proc/${PID[$p]}/smaps" >"$work/runs/$p-$mode.smaps0"
  rm -f "$work/idle.in"; mkfifo "$work/idle.in"
  t0=$SECONDS
  taskset -c "$PIN_LOAD" "$IDLE_BIN" --addr "127.0.0.1:$port" $flag --conns "$conns" "${stream[@]}" ${IDLE_ARGS:-} <"$work/idle.in" >"$work/idle.out" 2>&1 & ipid=$!
  exec 7>"$work/idle.in"
  until grep -q '^ready' "$work/idle.out"; do
    kill -0 "$ipid" 2>/dev/null || { echo "bench_idle died: $(cat "$work/idle.out")" >&2; exit 1; }
    [ $((SECONDS - t0)) -lt 300 ] || { echo "bench_idle not ready after 300 s" >&2; exit 1; }
    sleep 0.2
  done
  local opened=$((SECONDS - t0))
  # Idle means idle for a while: a proxy may give memory back some time after a connection
  # goes quiet (tern parks it after 1 s; its allocator returns the pages on a later wake).
  c0=$(cpu_ticks "${PID[$p]}")
  sleep "$IDLE_SETTLE"
  c1=$(cpu_ticks "${PID[$p]}")
  rss1=$(settled_rss "${PID[$p]}"); pss1=$(pss_kib "${PID[$p]}"); fd1=$(fds "${PID[$p]}")
  [ -z "${IDLE_SMAPS:-}" ] || cat "/proc/${PID[$p]}/smaps" >"$work/runs/$p-$mode.smaps1"
  exec 7>&-
  wait "$ipid" || true
  out=$(cat "$work/idle.out")
  echo "== idle $mode" >>"$work/runs/$p.txt"; echo "$out" >>"$work/runs/$p.txt"
  local ok errs closed
  ok=$(sed -n 's/^ready ok=\([0-9]*\).*/\1/p' <<<"$out"); errs=$(sed -n 's/^ready ok=[0-9]* errors=\([0-9]*\).*/\1/p' <<<"$out")
  closed=$(sed -n 's/^held=[0-9]* closed=\([0-9]*\)/\1/p' <<<"$out")
  [ "${closed:-1}" -eq 0 ] || { echo "$p closed ${closed:-?} of its idle $mode connections during the run" >&2; exit 1; }
  [ "${ok:-0}" -gt 0 ] || { echo "bench_idle opened nothing to $p: $out" >&2; exit 1; }
  log "idle-$mode proxy=$p conns=$ok errors=$errs opened_in=${opened}s rss_kib=$rss0->$rss1 pss_kib=$pss0->$pss1 fds=$fd0->$fd1 idle_cpu_ticks=$((c1 - c0))/${IDLE_SETTLE}s"
  R[idle-$mode,$p]=$(awk -v a="$rss0" -v b="$rss1" -v c="$pss0" -v d="$pss1" -v n="$ok" -v e="$errs" \
    -v t=$((c1 - c0)) -v hz="$CLK_TCK" -v w="$IDLE_SETTLE" \
    'BEGIN {printf "%.2f %.2f %d %d %.2f\n", (b - a) / n, (d - c) / n, n, e, t * 1000 / hz / w}')
}

# Table cells: a number with thousands separators (FORMAT int) or printf's FORMAT; a ratio.
num() {
  awk -v v="$1" -v f="$2" 'BEGIN {
    if (f != "int") { printf f "\n", v; exit }
    s = sprintf("%.0f", v); o = ""
    while (length(s) > 3) { o = "," substr(s, length(s) - 2) o; s = substr(s, 1, length(s) - 3) }
    print s o }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a != "" && b > 0) printf "%.2f\n", a / b; else print "–"}'; }
# row LABEL KIND FORMAT ERROR-FIELD: each proxy's median, errors (over all rounds) beside it.
row() {
  local label=$1 kind=$2 fmt=$3 ec=$4 p e line="| $1 |"
  local -A v=()
  for p in "${PROXIES[@]}"; do
    if [ -z "${R[$kind,$p]:-}" ]; then line+=" – |"; continue; fi
    v[$p]=$(median "$kind" "$p" | awk '{print $1}')
    e=$(errors "$kind" "$p" "$ec")
    line+=" $(num "${v[$p]}" "$fmt")"
    [ "$e" -eq 0 ] || line+=" (**$e errors**)"
    if [ "$kind" = rate ]; then
      e=$(errors rate "$p" 8)
      [ "$e" -eq 0 ] || line+=" (**client-bound in $e of $ROUNDS**)"
      e=$(errors rate "$p" 9)
      [ "$e" -eq 0 ] || line+=" (**behind schedule in $e of $ROUNDS**)"
    fi
    line+=" |"
  done
  line+=" $(ratio "${v[tern]:-}" "${v[nginx]:-}") | $(ratio "${v[tern]:-}" "${v[haproxy]:-}") |"
  [ -z "${TERN_BEFORE:-}" ] || line+=" $(ratio "${v[tern]:-}" "${v[tern-before]:-}") |"
  [ -z "${FLOOR:-}" ] || line+=" $(ratio "${v[tern]:-}" "${v[floor]:-}") | $(ratio "${v[floor]:-}" "${v[nginx]:-}") | $(ratio "${v[floor]:-}" "${v[haproxy]:-}") |"
  echo "$line"
}
table() {
  local head="| scenario |" rule="|---|" p
  declare -A title=([tern]=tern [tern-before]=tern-before [nginx]=nginx [haproxy]=HAProxy [floor]=floor)
  for p in "${PROXIES[@]}"; do head+=" ${title[$p]} |"; rule+="---:|"; done
  head+=" tern ÷ nginx | tern ÷ HAProxy |"; rule+="---:|---:|"
  [ -z "${TERN_BEFORE:-}" ] || { head+=" tern ÷ tern-before |"; rule+="---:|"; }
  [ -z "${FLOOR:-}" ] || { head+=" tern ÷ floor | floor ÷ nginx | floor ÷ HAProxy |"; rule+="---:|---:|---:|"; }
  echo "$head"; echo "$rule"
  row "HTTP/1.1 keep-alive 1 KiB (req per CPU-s)" h1 int 4
  row "TLS 1.3 keep-alive (req per CPU-s)" tls int 4
  row "TLS 1.3 new connection per request (handshakes per CPU-s)" tls-new int 4
  row "HTTP/2 over TLS (req per CPU-s)" h2 int 4
  row "HTTP/1.1 keep-alive POST, JSON-RPC body (req per CPU-s)" post int 4
  row "RSS per idle TLS keep-alive connection (KiB)" idle-tls %.1f 4
  row "RSS per idle plain keep-alive connection (KiB)" idle-plain %.1f 4
  row "RSS per idle HTTP/2 connection over TLS (KiB)" idle-h2 %.1f 4
  row "RSS per idle SSE stream, HTTP/1.1 (KiB)" idle-sse %.1f 4
  row "RSS per idle SSE stream, HTTP/1.1 over TLS (KiB)" idle-sse-tls %.1f 4
  row "RSS per idle SSE stream, HTTP/2 over TLS (KiB)" idle-sse-h2 %.1f 4
  row "p99 at half of nginx's max rate (ms)" rate %.2f 5
  row "user-space instructions per HTTP/1.1 GET (callgrind; fewer is better)" instr-h1 int 2
  row "user-space instructions per TLS 1.3 keep-alive GET (callgrind)" instr-tls int 2
  row "user-space instructions per HTTP/2 GET over TLS, 8 streams (callgrind)" instr-h2 int 2
}
# What the table leaves out: wall-clock req/s, the fixed-rate run's other percentiles, Pss.
details() {
  local p k m
  echo
  echo "Median rounds, wall-clock req/s (proxy CPU-s in the run):"
  for k in h1 tls tls-new h2 post; do
    line="  $k:"
    for p in "${PROXIES[@]}"; do
      [ -n "${R[$k,$p]:-}" ] || continue
      m=$(median "$k" "$p"); line+=" $p $(num "$(awk '{print $3}' <<<"$m")" int) ($(awk '{print $2}' <<<"$m") s);"
    done
    echo "$line"
  done
  line="TLS 1.3 suite an OpenSSL client (wrk, h2load) gets:"
  for p in "${PROXIES[@]}"; do [ -z "${SUITE[$p]:-}" ] || line+=" $p ${SUITE[$p]};"; done
  echo "$line"
  echo "Median rounds, proxy CPU per request (µs), user + kernel:"
  for k in h1 tls tls-new h2 post; do
    line="  $k:"
    for p in "${PROXIES[@]}"; do
      [ -n "${R[$k,$p]:-}" ] || continue
      line+=$(median "$k" "$p" | awk -v p="$p" '$5 > 0 {printf " %s %.1f + %.1f;", p, ($2 - $6) * 1e6 / $5, $6 * 1e6 / $5}')
    done
    echo "$line"
  done
  if [ -n "${RATE_RPS:-}" ]; then
    echo "Fixed rate $(num "$RATE_RPS" int) req/s (${RATE:+set by RATE, not }half of nginx's HTTP/1.1 wall-clock req/s), median round by p99:"
    for p in "${PROXIES[@]}"; do
      m=$(median rate "$p")
      awk -v p="$p" '{printf "  %s: p50 %.2f ms, p99 %.2f ms, p99.9 %.2f ms, sent %d req/s, proxy CPU %.2f s, errors %d, bench_rate lag p99 %.2f ms\n", p, $2, $1, $3, $6, $4, $5, $7}' <<<"$m"
    done
  fi
  for p in "${!WEDGED[@]}"; do
    [ "${WEDGED[$p]}" -eq 0 ] || echo "WARNING: $p's watchdog reported ${WEDGED[$p]} wedge(s) (its log: \"wedged\"); figures taken meanwhile are suspect"
  done
  if [ -z "${SKIP_IDLE:-}" ]; then
    echo "Idle connections ($IDLE_CONNS each, streams $STREAM_CONNS${IDLE_ARGS:+, bench_idle $IDLE_ARGS}), KiB per connection as RSS / Pss, and the proxy's CPU over the ${IDLE_SETTLE} s they sat idle (ms per s):"
    for p in "${PROXIES[@]}"; do
      line=""
      for mode in tls plain h2 sse sse-tls sse-h2; do
        [ -z "${R[idle-$mode,$p]:-}" ] || line+=" $mode $(awk '{print $1 " / " $2 ", " $5 " ms/s"}' <<<"${R[idle-$mode,$p]}");"
      done
      [ -z "$line" ] || echo "  $p:${line%;}"
    done
  fi
}

mkdir -p "$work/runs"
start_backend
for p in "${PROXIES[@]}"; do start "$p"; done
for p in backend "${PROXIES[@]}"; do
  log "$p pid=${PID[$p]} http=${HTTP[$p]:-$BPORT} tls=${TLS[$p]:-} cpus=$(sed -n 's/^Cpus_allowed_list:\s*//p' "/proc/${PID[$p]}/status")"
done
for kind in ${SCENARIOS-h1 tls tls-new h2 post}; do scenario "$kind"; done
if [ -z "${SKIP_RATE:-}" ]; then
  if [ -n "${RATE:-}" ]; then
    RATE_RPS=$RATE
  else
    [ -n "${R[h1,nginx]:-}" ] || { echo "the fixed-rate run needs the h1 scenario (nginx's max rate) or RATE" >&2; exit 1; }
    RATE_RPS=$(median h1 nginx | awk '{printf "%d", $3 / 2}')
  fi
  fixed_rate "$RATE_RPS"
fi
# Instructions: each proxy restarted under callgrind (valgrind), INSTR_WARM then
# INSTR_WARM + INSTR_N keep-alive GETs in two whole lives, stopped gracefully so callgrind
# writes its counts; the difference of their totals over INSTR_N is the user-space
# instructions per proxied request, over all the proxy's processes and threads. Deterministic
# where CPU time on a shared VM is not (it settles a few-percent change), but a count, not a
# time: memory stalls, system calls and the kernel's work are not in it. INSTR=1 turns it on;
# INSTR_PROXIES="tern nginx" for some proxies only; INSTR_MODES="h1 tls h2" for HTTP/1.1
# (the default), HTTP/1.1 over TLS 1.3 and HTTP/2 over TLS 1.3 with 8 streams a connection,
# all from h2load with 16 connections (the TLS handshakes are in the warm-up's count too, so
# they cancel out).
INSTR_N=${INSTR_N:-20000}
INSTR_WARM=${INSTR_WARM:-2000}
instr_life() {
  local p=$1 mode=$2 n=$3 d=$work/cg/$1-$2-$3
  # Writable by all: nginx's worker runs as nobody. ($work itself is only searchable by
  # others, not listable.)
  rm -rf "$d"; mkdir -p "$d"; chmod 1777 "$d" "$work/cg"; chmod o+x "$work"
  WRAP=(valgrind --tool=callgrind --trace-children=yes "--callgrind-out-file=$d/out.%p")
  TRIES=3000 start "$p" >/dev/null; unset WRAP
  local how
  case $mode in
    h1) how=(--h1 "http://localhost:${HTTP[$p]}/") ;;
    tls) how=(--h1 "https://localhost:${TLS[$p]}/") ;;
    h2) how=(-m 8 "https://localhost:${TLS[$p]}/") ;;
    *) echo "instructions: no mode $mode (h1, tls, h2)" >&2; exit 1 ;;
  esac
  load h2load -n "$n" -c 16 -t1 "${how[@]}" >>"$work/runs/$p.txt" 2>&1
  grep -q "succeeded, 0 failed" <(tail -n 20 "$work/runs/$p.txt") || { echo "instructions: $mode requests to $p failed" >&2; exit 1; }
  # nginx's worker writes its counts only in a graceful stop: told to stop fast, its master
  # kills a worker still busy exiting (as one under valgrind is).
  local pids q left; pids=$(tree_pids "${PID[$p]}")
  if [ "$p" = nginx ]; then kill -QUIT "${PID[$p]}"; else kill "${PID[$p]}"; fi
  # Every process of the proxy gone (each writes its counts as it exits), then stopped as usual.
  for _ in $(seq 1 600); do
    left=0; for q in $pids; do [ ! -e "/proc/$q" ] || left=1; done
    [ "$left" = 1 ] || break; sleep 0.1
  done
  stop "$p"
  cat "$d"/out.* | awk '/^totals:/ {s += $2} END {printf "%d", s}'
}
instructions() {
  command -v valgrind >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
  }
  local p a b mode
  for p in ${INSTR_PROXIES:-${PROXIES[@]}}; do
    serves h1 "$p" || continue
    stop "$p"
    for mode in ${INSTR_MODES:-h1}; do
      serves "$mode" "$p" || continue
      echo "instructions: $p under callgrind, $mode, $INSTR_WARM and $((INSTR_WARM + INSTR_N)) requests" >&2
      a=$(instr_life "$p" "$mode" "$INSTR_WARM"); b=$(instr_life "$p" "$mode" $((INSTR_WARM + INSTR_N)))
      [ "$b" -gt "$a" ] || { echo "instructions: no counts from the process that served $p's requests" >&2; exit 1; }
      R[instr-$mode,$p]="$(((b - a) / INSTR_N)) 0"$'\n'
      log "instructions proxy=$p mode=$mode warm_total=$a total=$b per_request=${R[instr-$mode,$p]}"
    done
    start "$p"
  done
}
[ -z "${INSTR:-}" ] || instructions
if [ -z "${SKIP_IDLE:-}" ]; then
  IDLE_MODES=${IDLE_MODES:-tls plain h2 sse sse-tls sse-h2}
  case " $IDLE_MODES " in *" sse"*) start_streams_backend ;; esac
  for p in ${IDLE_PROXIES:-${PROXIES[@]/floor/}}; do
    echo "idle: $p, $IDLE_CONNS connections, $STREAM_CONNS streams each: $IDLE_MODES" >&2
    for mode in $IDLE_MODES; do idle_run "$p" "$mode"; done
  done
fi
for p in "${PROXIES[@]}"; do stop "$p"; done

echo
echo "Load, tern at $(git rev-parse --short HEAD 2>/dev/null || echo ?) ($TERN${TERN_BEFORE:+, tern-before $TERN_BEFORE}): median of $ROUNDS rounds of ${DUR}s, $CONNS connections; backend and load on CPU $PIN_LOAD, each proxy alone on CPU $PIN_PROXY with one worker; $((SECONDS - started)) s in all; load average $load_at_start at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end."
echo
table
details
