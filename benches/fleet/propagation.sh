#!/usr/bin/env bash
# Propagation of `tern apply` across a fleet (README.md beside this): the fleet of
# examples/fleet (3 etcd members, 4 tern nodes on loopback), CHANGES one-app applies, and for
# each the time until every node serves it; beside it, etcd's own put -> watch latency to the
# same four places. Prints p50/p90/p99/max and the ratio; the target is p99 <= 100 ms.
#
#   benches/fleet/propagation.sh [--debug]      (release build by default)
#
# Env: CHANGES (200), POLL_GAP_MS (0.5: the pause between two polls of one node),
# STRICT=1 (exit 1 when the target is missed), FLEET_NET, TERN, TEST_MACHINE (see
# examples/fleet/run.sh). Stops everything it started, on success, failure or Ctrl-C.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
. "$root/examples/fleet/tools.sh"
profile=release
case "${1:-}" in
  --debug) profile=debug ;;
  "") ;;
  *) echo "usage: $0 [--debug]" >&2; exit 2 ;;
esac
fleet_tools
fleet_build "$profile"
exec python3 -u "$here/propagation.py" "$profile"
