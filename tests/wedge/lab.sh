# Shared by tests/wedge/run.sh and tests/upgrade/run.sh (sourced; as ternlab.py is for their
# drivers): the tools they need, a run directory, and a cleanup that leaves nothing running.
#
# lab_tools                 installs wrk from Debian if missing; checks for python3
# lab_run NAME DRIVER ENV…  runs DRIVER (python) in target/NAME/run-XXXXXX with ENV set and
#                           WORK pointing there; exits with its status, after cleaning up
#
# Needs TERN and TEST_MACHINE set (STREAM_LOAD if used): the cleanup's backstop kills only
# recorded pids still running one of those or wrk.

lab_tools() {
  if ! command -v wrk >/dev/null; then
    echo "installing wrk" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  fi
  command -v python3 >/dev/null || { echo "python3 is needed" >&2; exit 2; }
}

lab_cleanup() {
  # The driver kills what it started (it is a subreaper, so a tern started by tern too); this
  # is the backstop if it could not: every pid it recorded that still runs one of ours (a pid
  # may have been reused since).
  [ -n "${driver:-}" ] && kill "$driver" 2>/dev/null && wait "$driver" 2>/dev/null
  if [ -f "$WORK/pids" ]; then
    while read -r p; do
      [ -r "/proc/$p/cmdline" ] || continue
      if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null |
        grep -qE "^($TERN|$TEST_MACHINE|wrk|${STREAM_LOAD:-/nonexistent}) "; then
        kill -9 "$p" 2>/dev/null || true
      fi
    done <"$WORK/pids"
  fi
  if [ -n "${KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}

lab_run() {
  local name=$1 script=$2
  shift 2
  mkdir -p "$root/target/$name"
  WORK="$(mktemp -d "$root/target/$name/run-XXXXXX")"
  driver=
  trap lab_cleanup EXIT
  trap 'exit 130' INT TERM
  env "$@" WORK="$WORK" python3 -u "$script" &
  driver=$!
  set +e
  wait "$driver"
  local rc=$?
  set -e
  driver=
  exit "$rc"
}
