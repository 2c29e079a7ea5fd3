#!/usr/bin/env bash
# etcd outages under load (README.md beside this): the fleet of run.sh with steady load on
# both edges; one etcd member SIGKILLed, then all three for ALL_DOWN_S (30) seconds, then
# restarted; a change after recovery, timed; then a node's watch made to fall behind a
# compaction (its member frozen with SIGSTOP). Prints PASS/FAIL lines with their figures and
# exits non-zero on any FAIL.
#
#   examples/fleet/outage.sh [--debug]          (release build by default)
#
# Env: ALL_DOWN_S (30), LOAD_CONNS (16), LOAD_GAP_MS (5: the pause after each answer, per
# connection), FLEET_HEARTBEAT (500ms), FLEET_DEAD_AFTER (1500ms), FLEET_NET, TERN, TEST_MACHINE (see run.sh). Stops everything it started, on
# success, failure or Ctrl-C; takes about a minute and a half.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
. "$here/tools.sh"
profile=release
case "${1:-}" in
  --debug) profile=debug ;;
  "") ;;
  *) echo "usage: $0 [--debug]" >&2; exit 2 ;;
esac
fleet_tools
fleet_build "$profile"
exec python3 -u "$here/outage.py" "$profile"
