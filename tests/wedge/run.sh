#!/usr/bin/env bash
# Issue 11 acceptance, the watchdog half, against a real tern binary (README.md beside this):
#   deadlock, block-worker: wrk -c64 -t2 -d30s through tern, the fault injected at t=10 s;
#     detection, the bounce to a fresh pid, refused connections, failed requests, the
#     diagnostics file;
#   spin: the next new connection is closed within 2 s and counted, no bounce, wrk unaffected;
#   panic: a panicking background task is counted and tern keeps serving (skipped if no hook).
# Prints PASS/FAIL per acceptance line with its figures; exits non-zero on any FAIL.
#
# Usage: tests/wedge/run.sh TERN_BINARY
# Builds nothing. Needs target/release/examples/test_machine (cargo build --release --example
# test_machine) or TEST_MACHINE=path; wrk (installed from Debian if missing); python3.
# Env: WEDGE_ONLY (deadlock,block-worker,spin,panic), WEDGE_DURATION (30), WEDGE_INJECT_AT (10),
#      WEDGE_CONNS (64), WEDGE_THREADS (2), WEDGE_STALL_AFTER (2s), WRK_TIMEOUT (10s),
#      WEDGE_PANIC_PATH (/v1/debug/faults/panic), STRICT=1 (stop if the config is refused),
#      KEEP=1 (keep the run directory).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
[ $# -ge 1 ] || { echo "usage: $0 TERN_BINARY" >&2; exit 2; }
TERN="$(realpath "$1")"
[ -x "$TERN" ] || { echo "$TERN: not an executable" >&2; exit 2; }
TEST_MACHINE="${TEST_MACHINE:-$root/target/release/examples/test_machine}"
[ -x "$TEST_MACHINE" ] || { echo "no $TEST_MACHINE: cargo build --release --example test_machine" >&2; exit 2; }
. "$root/tests/wedge/lab.sh"
lab_tools
lab_run wedge "$here/driver.py" TERN="$TERN" TEST_MACHINE="$TEST_MACHINE"
