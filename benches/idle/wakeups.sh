#!/usr/bin/env bash
# How often an idle `tern serve` wakes: the context switches of all its threads (voluntary
# and not) over a window, per second, with each thread's share. An idle node should wake
# at most 10 times a second (issue 13).
#
# The node: the embedded default config (two workers on 2 cores, SQLite RIB, process driver),
# except that its listeners and admin take port 0 (127.0.0.1), and one app with one started
# machine (run by nobody: it is never contacted). Nothing is sent to it while it is measured.
#
#   benches/idle/wakeups.sh [path/to/tern]      # default target/release/tern
#   WINDOW=10 SETTLE=3 benches/idle/wakeups.sh
set -euo pipefail

tern=${1:-target/release/tern}
window=${WINDOW:-10}
settle=${SETTLE:-3}
tern=$(realpath "$tern")
dir=$(mktemp -d "${TMPDIR:-/tmp}/tern-idle.XXXXXX")
pid=
cleanup() {
  if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT

cat >"$dir/tern.toml" <<'TOML'
[[listen]]
addr = "127.0.0.1:0"

[[listen]]
addr = "127.0.0.1:0"
tls = true

[admin]
addr = "127.0.0.1:0"
TOML
cat >"$dir/app.toml" <<'TOML'
[[apps]]
name = "idle"
hostnames = ["idle.test"]
internal_port = 8080

[[machines]]
id = "idle-1"
app = "idle"
region = "ams"
addr = "127.0.0.1:9"
state = "started"
TOML

cd "$dir"
"$tern" apply -c tern.toml app.toml >/dev/null
"$tern" serve -c tern.toml >serve.log 2>&1 &
pid=$!
sleep "$settle"
kill -0 "$pid" 2>/dev/null || { cat serve.log; echo "tern serve exited" >&2; exit 1; }

# tid name switches, for every thread alive now.
switches() {
  for t in /proc/"$pid"/task/*; do
    local name v n
    name=$(cat "$t/comm" 2>/dev/null) || continue
    v=$(awk '/^voluntary_ctxt_switches/ {print $2}' "$t/status" 2>/dev/null) || continue
    n=$(awk '/^nonvoluntary_ctxt_switches/ {print $2}' "$t/status" 2>/dev/null) || continue
    echo "${t##*/} $name $((v + n))"
  done
}

switches >"$dir/before"
sleep "$window"
switches >"$dir/after"

awk -v window="$window" '
  NR == FNR { before[$1] = $3; next }
  { d = $3 - ($1 in before ? before[$1] : 0); by[$2] += d; total += d }
  END {
    for (name in by) if (by[name] > 0) printf "  %-22s %6.1f /s\n", name, by[name] / window
    printf "idle wakeups: %.1f /s (context switches of all threads over %d s)\n", total / window, window
  }' "$dir/before" "$dir/after"
