#!/usr/bin/env bash
# An anycast lab in network namespaces: a BIRD 2 router installing ECMP routes, two tern edges
# serving the same anycast address (10.99.0.1:80), each announced over BGP by its own BIRD
# only while its tern's /healthz answers 200, and a client namespace.
#
#   examples/anycast/lab.sh up        # build the lab (root; Debian: bird2, iproute2, curl, wrk)
#   examples/anycast/lab.sh drain     # wrk through the anycast address; `tern drain` on edge 1
#   examples/anycast/lab.sh down      # tear it all down (namespaces, processes, files)
#   examples/anycast/lab.sh check     # up, drain, down; exits 1 unless the drain lost nothing
#
#   LAB=tlab TERN=target/release/tern BACKEND=target/release/examples/bench_backend
#
#              client ns (10.0.0.2)
#                    |
#              router ns (10.0.0.1, 10.1.0.1, 10.2.0.1)  AS 65000, ECMP, L4 hash
#               /                      \
#   edge 1 ns (10.1.0.2)         edge 2 ns (10.2.0.2)    AS 65001 each
#   10.99.0.1 on lo, tern        10.99.0.1 on lo, tern
#   bird: 10.99.0.1/32 while     bird: the same
#   /healthz says 200
#
# Everything lives in namespaces this script creates; nothing touches the host's network.
set -euo pipefail
LAB=${LAB:-tlab}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TERN=${TERN:-$ROOT/target/release/tern}
BACKEND=${BACKEND:-$ROOT/target/release/examples/bench_backend}
WORK=/tmp/$LAB
ANYCAST=10.99.0.1
R=$LAB-r C=$LAB-c
EDGES=(1 2)

log() { printf '[lab %s] %s\n' "$(date +%H:%M:%S.%3N)" "$*" >&2; }
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
ms() { date +%s%3N; }

down() {
  local t0; t0=$(ms)
  for ns in "$C" "$R" "$LAB-e1" "$LAB-e2"; do
    # Deleting a namespace does not end its processes: kill them first.
    if ip netns pids "$ns" >/dev/null 2>&1; then
      ip netns pids "$ns" | xargs -r kill -9 2>/dev/null || true
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
  # The checkers and wrappers run in this namespace: only pids that are still this lab's.
  if [ -f "$WORK/pids" ]; then
    while read -r pid; do
      grep -qs -e lab.sh -e "$WORK" "/proc/$pid/cmdline" && kill -9 "$pid" 2>/dev/null || true
    done <"$WORK/pids"
  fi
  rm -rf "$WORK"
  log "down in $(($(ms) - t0)) ms"
}

# veth A-side in namespace $1 named $2 with $3, B-side in $4 named $5 with $6.
link() {
  ip link add "$2" netns "$1" type veth peer name "$5" netns "$4"
  nsx "$1" ip addr add "$3" dev "$2"; nsx "$1" ip link set "$2" up
  nsx "$4" ip addr add "$6" dev "$5"; nsx "$4" ip link set "$5" up
}

router_bird() {
  cat <<EOF
router id 10.0.0.1;
log "$WORK/bird-r.log" all;
protocol device {}
protocol kernel {
  ipv4 { import none; export all; };
  merge paths on;
}
EOF
  for i in "${EDGES[@]}"; do
    cat <<EOF
protocol bgp e$i {
  local 10.$i.0.1 as 65000;
  neighbor 10.$i.0.2 as 65001;
  hold time 3; keepalive time 1; connect retry time 1;
  ipv4 { import all; export none; };
}
EOF
  done
}

edge_bird() {
  cat <<EOF
router id 10.$1.0.2;
log "$WORK/bird-e$1.log" all;
protocol device {}
# Announced only while tern is healthy: the checker enables and disables it.
protocol static anycast {
  disabled;
  ipv4;
  route $ANYCAST/32 via "lo";
}
protocol bgp up {
  local 10.$1.0.2 as 65001;
  neighbor 10.$1.0.1 as 65000;
  hold time 3; keepalive time 1; connect retry time 1;
  ipv4 { import none; export where proto = "anycast"; next hop self; };
}
EOF
}

edge_tern() {
  local region=ams; [ "$1" = 2 ] && region=fra
  cat <<EOF
region = "$region"
node = "edge-$1"
[[listen]]
addr = "$ANYCAST:80"
freebind = true
[admin]
addr = "127.0.0.1:9090"
[rib]
path = "$WORK/e$1.db"
[shutdown]
drain_delay = "2s"
drain_window = "2s"
[log]
access = false
EOF
}

# Announces the anycast route while /healthz answers 200, withdraws it otherwise.
checker() {
  local i=$1 sock=$WORK/bird-e$1.ctl state=disable want
  # A failed look or birdc call is tried again on the next round, never the end of the loop.
  set +e
  while :; do
    if nsx "$LAB-e$i" curl -fsS -m 0.3 -o /dev/null http://127.0.0.1:9090/healthz 2>/dev/null; then want=enable; else want=disable; fi
    if [ "$want" != "$state" ]; then
      nsx "$LAB-e$i" birdc -s "$sock" "$want" anycast >/dev/null || continue
      state=$want
      log "edge $i: /healthz ${want/enable/200}; route ${want}d" >>"$WORK/checker-e$i.log" 2>&1
      printf '%s %s\n' "$(ms)" "$want" >>"$WORK/checker-e$i.events"
    fi
    sleep 0.05
  done
}

up() {
  local t0; t0=$(ms)
  for t in ip bird birdc curl wrk; do command -v "$t" >/dev/null || { echo "needs $t (Debian: iproute2 bird2 curl wrk)" >&2; exit 2; }; done
  [ -x "$TERN" ] && [ -x "$BACKEND" ] || { echo "build first: cargo build --release --bin tern --example bench_backend" >&2; exit 2; }
  [ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 2; }
  down 2>/dev/null
  mkdir -p "$WORK"
  for ns in "$C" "$R" "$LAB-e1" "$LAB-e2"; do ip netns add "$ns"; nsx "$ns" ip link set lo up; done
  link "$C" c0 10.0.0.2/24 "$R" r0 10.0.0.1/24
  nsx "$C" ip route add default via 10.0.0.1
  nsx "$R" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1
  router_bird >"$WORK/bird-r.conf"
  nsx "$R" bird -c "$WORK/bird-r.conf" -s "$WORK/bird-r.ctl" -P "$WORK/bird-r.pid"
  cat "$WORK/bird-r.pid" >>"$WORK/pids"
  for i in "${EDGES[@]}"; do
    local e=$LAB-e$i
    link "$R" "r$i" "10.$i.0.1/24" "$e" "e$i" "10.$i.0.2/24"
    nsx "$e" ip route add default via "10.$i.0.1"
    # tern binds the anycast address before lo has it (freebind); then the address comes up.
    edge_tern "$i" >"$WORK/e$i.toml"
    printf '[[apps]]\nname = "hello"\nhostnames = ["hello.test"]\n[[machines]]\nid = "hello-%s"\napp = "hello"\naddr = "127.0.0.1:8081"\nstate = "started"\n' "$i" >"$WORK/e$i.decl.toml"
    "$TERN" apply -c "$WORK/e$i.toml" "$WORK/e$i.decl.toml" >/dev/null
    nsx "$e" "$BACKEND" 127.0.0.1:8081 >"$WORK/backend-e$i.log" 2>&1 &
    echo $! >>"$WORK/pids"
    # Its exit status goes to tern-eN.rc when it ends.
    (
      nsx "$e" "$TERN" serve -c "$WORK/e$i.toml" >"$WORK/tern-e$i.log" 2>&1 &
      echo $! >"$WORK/tern-e$i.pid"
      rc=0; wait $! || rc=$?
      echo "$rc" >"$WORK/tern-e$i.rc"
    ) &
    echo $! >>"$WORK/pids"
    nsx "$e" ip addr add "$ANYCAST/32" dev lo
    edge_bird "$i" >"$WORK/bird-e$i.conf"
    nsx "$e" bird -c "$WORK/bird-e$i.conf" -s "$WORK/bird-e$i.ctl" -P "$WORK/bird-e$i.pid"
    cat "$WORK/bird-e$i.pid" >>"$WORK/pids"
    checker "$i" &
    echo $! >>"$WORK/pids"
  done
  # Up when the router has both next hops for the anycast address.
  local deadline=$(($(ms) + 30000))
  until [ "$(nsx "$R" ip route show "$ANYCAST" | grep -c nexthop)" = 2 ]; do
    [ "$(ms)" -lt "$deadline" ] || { echo "the router never had two next hops:"; nsx "$R" ip route; exit 1; } >&2
    sleep 0.05
  done
  log "up in $(($(ms) - t0)) ms: $(nsx "$R" ip route show "$ANYCAST" | tr -s ' \n' ' ')"
  # Both edges take new connections (the hash spreads source ports).
  local seen
  seen=$(for _ in $(seq 40); do nsx "$C" curl -s -o /dev/null -D - -H 'Host: hello.test' "http://$ANYCAST/"; done | tr -d '\r' | sed -n 's/^fly-request-id: .*-\([a-z]*\)$/\1/p' | sort | uniq -c | tr -s ' \n' ' ')
  log "40 new connections answered by region: $seen"
  # Both edges must take some, or a drain of edge 1 would prove nothing.
  grep -q ams <<<"$seen" && grep -q fra <<<"$seen" || { echo "one edge got none of 40 connections: $seen" >&2; exit 1; }
}

# Waits (polling every 10 ms) until the command succeeds, for at most $1 seconds.
until_within() {
  local deadline=$(($(ms) + $1 * 1000)); shift
  until "$@"; do
    [ "$(ms)" -lt "$deadline" ] || return 1
    sleep 0.01
  done
}
one_next_hop() { [ "$(nsx "$R" ip route show "$ANYCAST" | grep -c nexthop)" != 2 ]; }

# New connections (one request each) through the anycast address for 8 s; at 2 s edge 1 is
# drained. Reports wrk's errors, when the route went, and how edge 1's tern exited.
drain() {
  local out t_drain t_withdrawn t_exit rc
  nsx "$C" wrk -t1 -c16 -d8s -H 'Host: hello.test' -H 'Connection: close' "http://$ANYCAST/" >"$WORK/wrk.txt" 2>&1 &
  local wrk=$!
  sleep 2
  t_drain=$(ms)
  log "tern drain on edge 1"
  nsx "$LAB-e1" "$TERN" drain -c "$WORK/e1.toml" >"$WORK/drain.txt" 2>&1 &
  local drainer=$!
  until_within 10 one_next_hop || { echo "the route to edge 1 was not withdrawn within 10 s" >&2; exit 1; }
  t_withdrawn=$(ms)
  log "router: $(nsx "$R" ip route show "$ANYCAST" | tr -s ' \n' ' ')"
  # Started by `up`, tern is not this shell's child: its wrapper writes its exit status.
  until_within 30 test -s "$WORK/tern-e1.rc" || { echo "edge 1's tern did not exit within 30 s" >&2; exit 1; }
  t_exit=$(ms)
  rc=$(cat "$WORK/tern-e1.rc")
  wait "$drainer" || true
  wait "$wrk" || true
  out=$(cat "$WORK/wrk.txt")
  # wrk's "Socket errors: connect C, read R, write W, timeout T": a failed new connection is
  # C (or T: no answer); R and W are connections reset after they were made (an ECMP router
  # re-hashes flows in flight on the withdrawn edge to the other one, which resets them).
  local reqs errors resets non2xx
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  errors=$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $10}' <<<"$out")
  resets=$(awk '/Socket errors:/ {gsub(",", ""); print $6 + $8}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $5}' <<<"$out")
  log "withdrawn $((t_withdrawn - t_drain)) ms after tern drain; edge 1's tern exited with status $rc $((t_exit - t_drain)) ms after it"
  log "wrk: ${reqs:-0} new connections; failed (connect or timeout) ${errors:-0}, reset once made ${resets:-0}, non-2xx ${non2xx:-0}"
  echo "requests=${reqs:-0} errors=${errors:-0} non2xx=${non2xx:-0} resets=${resets:-0} withdrawn_ms=$((t_withdrawn - t_drain)) exit_status=$rc exited_ms=$((t_exit - t_drain))"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  drain) drain ;;
  check)
    trap down EXIT
    up
    result=$(drain)
    echo "$result"
    grep -q 'errors=0 non2xx=0 .*exit_status=0' <<<"$result" || exit 1
    ;;
  *) sed -n '2,22p' "$0"; exit 2 ;;
esac
