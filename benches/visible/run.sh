#!/usr/bin/env bash
# From `tern apply` returning to the change being served through tern, while wrk loads it
# (visible.py beside this says how). Issue 13's target: p99 <= 5 ms.
#
#   benches/visible/run.sh [path/to/tern]   # default target/release/tern (build it first:
#                                           # cargo build --release --bin tern --example bench_backend)
# Env: CHANGES (200), CONNS (wrk's -c, 64), POLL_INTERVAL (sets [rib] poll_interval),
# STRICT=1 (exit 1 when the target is missed), KEEP=1 (keep the work directory).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
tern="$(realpath "${1:-$root/target/release/tern}")"
backend="${BACKEND:-$root/target/release/examples/bench_backend}"
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 2; }
exec python3 -u "$root/benches/visible/visible.py" "$tern" "$backend"
