#!/usr/bin/env bash
# Issue 11 acceptance, the hitless-upgrade and drain half, against a real tern binary
# (README.md beside this):
#   upgrade: 500 SSE streams + 100 WebSockets + wrk -c32 through tern, then `tern upgrade`;
#     how and when every stream ended (histogram over the drain window), that each reconnected
#     at once and is open on the new process after the old one exits, failed requests and
#     refused connections;
#   drain: `tern drain`: /healthz 503 for drain_delay while the listeners still accept, then
#     the listeners close, exit 0.
# Prints PASS/FAIL per acceptance line with its figures; exits non-zero on any FAIL.
#
# Usage: tests/upgrade/run.sh TERN_BINARY
# Builds nothing. Needs target/release/examples/{test_machine,stream_load}
# (cargo build --release --example test_machine --example stream_load), or TEST_MACHINE= and
# STREAM_LOAD= paths; wrk (installed from Debian if missing); python3.
# Env: UPGRADE_MODE (upgrade | sigusr2 | sigterm: today's stop, to check the measurement),
#      UPGRADE_WINDOW (drain_window, 20s), UPGRADE_DRAIN_DELAY (5s), UPGRADE_SSE (500),
#      UPGRADE_WS (100), UPGRADE_CONNS (32), UPGRADE_SSE_GAP_MS (500), UPGRADE_ONLY
#      (upgrade,drain), DRAIN_SSE (20), DRAIN_WS (5), STRICT=1, KEEP=1 (keep the run directory).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
[ $# -ge 1 ] || { echo "usage: $0 TERN_BINARY" >&2; exit 2; }
TERN="$(realpath "$1")"
[ -x "$TERN" ] || { echo "$TERN: not an executable" >&2; exit 2; }
TEST_MACHINE="${TEST_MACHINE:-$root/target/release/examples/test_machine}"
STREAM_LOAD="${STREAM_LOAD:-$root/target/release/examples/stream_load}"
for b in "$TEST_MACHINE" "$STREAM_LOAD"; do
  [ -x "$b" ] || { echo "no $b: cargo build --release --example test_machine --example stream_load" >&2; exit 2; }
done
. "$root/tests/wedge/lab.sh"
lab_tools
# 600 streams, each a connection through tern and one from tern to the backend.
[ "$(ulimit -n)" -ge 8192 ] || ulimit -n 8192 2>/dev/null || true
lab_run upgrade "$here/driver.py" TERN="$TERN" TEST_MACHINE="$TEST_MACHINE" STREAM_LOAD="$STREAM_LOAD"
