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
if ! command -v wrk >/dev/null; then
  echo "installing wrk" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
command -v python3 >/dev/null || { echo "python3 is needed" >&2; exit 2; }

mkdir -p "$root/target/wedge"
WORK="$(mktemp -d "$root/target/wedge/run-XXXXXX")"
driver=
cleanup() {
  # The driver kills what it started (it is a subreaper, so re-exec'd terns too); this is the
  # backstop if it could not: every pid it recorded, by pid.
  [ -n "$driver" ] && kill "$driver" 2>/dev/null && wait "$driver" 2>/dev/null
  if [ -f "$WORK/pids" ]; then
    while read -r p; do
      # Only if the pid still runs one of ours (a pid may have been reused since).
      [ -r "/proc/$p/cmdline" ] || continue
      if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qE "^($TERN|$TEST_MACHINE|wrk|${STREAM_LOAD:-/nonexistent}) "; then
        kill -9 "$p" 2>/dev/null || true
      fi
    done <"$WORK/pids"
  fi
  if [ -n "${KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

TERN="$TERN" TEST_MACHINE="$TEST_MACHINE" WORK="$WORK" python3 -u "$here/driver.py" &
driver=$!
set +e
wait "$driver"
rc=$?
set -e
driver=
exit "$rc"
