#!/usr/bin/env bash
# A tern fleet on loopback (README.md beside this): a 3-member etcd cluster, edge-1 and edge-2
# (ams), worker-1 (ams) and worker-2 (fra), each on an address of its own in 127.0.0.0/8, and
# a demo app whose machines the workers run. Prints how to reach each edge, then stays in the
# foreground; Ctrl-C (or `examples/fleet/run.sh stop` from another terminal) stops everything
# it started and nothing else.
#
#   examples/fleet/run.sh [--release]     build (debug unless --release), start, apply, tour
#   examples/fleet/run.sh stop            stop the fleet another run.sh started
#   examples/fleet/run.sh revive          restart what was killed in it (a node, a member)
#
# Env: FLEET_NET (127.0.0: the first three octets of every address), FLEET_HEARTBEAT (500ms)
# and FLEET_DEAD_AFTER (1500ms) for every node's [backhaul], TERN and TEST_MACHINE (binaries
# to use instead of building).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
. "$here/tools.sh"

case "${1:-}" in
  stop | revive) exec python3 "$here/fleet.py" "$1" ;;
  --release) profile=release ;;
  "") profile=debug ;;
  *) echo "usage: $0 [--release] | stop | revive" >&2; exit 2 ;;
esac
fleet_tools
fleet_build "$profile"
# python3 runs the fleet and is its only parent: Ctrl-C reaches it (and every process it
# started, as one foreground group), and its cleanup stops what is left.
exec python3 -u "$here/fleet.py" up "$profile"
