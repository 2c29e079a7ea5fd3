#!/usr/bin/env bash
# Session affinity acceptance run against a real tern (two nodes on one SQLite RIB):
#   - MCP matrix: Python and TypeScript SDK clients x Python and TypeScript SDK servers x
#     {HTTP/1.1, TLS, HTTP/2 over TLS}, SESSIONS_N sessions each, every session's requests
#     alternating between the two nodes;
#   - forged / truncated / other-app tokens (404 session_invalid, no machine reached);
#   - a session whose machine is pruned (404 session_gone, then a fresh session works);
#   - autostop (suspend) mid-session (the woken request reaches the session's machine);
#   - Chromium EventSource with cookie affinity (20 of 20 events from one machine);
#   - the Python SDK's DNS-rebinding 421 (docs/mcp.md).
# Prints a results table and a one-line summary; exits non-zero on any failure.
# Installs what it needs (a Python venv, an npm project, Debian chromium) under target/sessions.
#
# Usage: tests/sessions/run.sh [TERN_BINARY]     (default: builds target/release/tern)
# Env: SESSIONS_N (50), SESSIONS_CONCURRENCY (4), SESSIONS_MACHINES (3; 1 = harness self-check),
#      SESSIONS_ONLY (matrix,rebind,invalid,prune,eventsource,autostop), SESSIONS_MODES (http,https,h2)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."
root=$(pwd)
work="$root/target/sessions"
mkdir -p "$work"

# Python: the official MCP SDK, httpx with HTTP/2, trustme for the run's CA.
if ! cmp -s "$here/requirements.txt" "$work/venv/requirements.txt" 2>/dev/null; then
  rm -rf "$work/venv"
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
  cp "$here/requirements.txt" "$work/venv/requirements.txt"
fi
# Node: the official MCP SDK, undici, express; the harness's .mjs files run from beside them.
mkdir -p "$work/node"
if ! cmp -s "$here/js/package-lock.json" "$work/node/package-lock.json" 2>/dev/null || [ ! -d "$work/node/node_modules" ]; then
  cp "$here/js/package.json" "$here/js/package-lock.json" "$work/node/"
  (cd "$work/node" && npm ci --no-audit --no-fund --loglevel=error)
fi
cp "$here"/js/*.mjs "$work/node/"
# Chromium for the EventSource scenario.
if ! command -v chromium >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

if [ $# -ge 1 ]; then
  tern="$(realpath "$1")"
else
  cargo build -q --release --bin tern
  tern="$root/target/release/tern"
fi

TERN="$tern" exec "$work/venv/bin/python" "$here/driver.py"
