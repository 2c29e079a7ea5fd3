#!/usr/bin/env bash
# Outside conformance runs against a real tern, each beside the machine alone:
#   - smugglex (crates.io): its 10 request-smuggling checks, over plain HTTP and TLS.
#   - kosoku (PyPI): the Autobahn WebSocket cases 1-7 and 10, against a `websockets` echo
#     machine directly and through tern; the two reports must agree case by case.
# Exits non-zero on any smuggling finding or any WebSocket case whose outcome tern changes.
# Installs what it needs (cargo install, a Python venv) under target/conformance.
#
# Usage: tests/conformance/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
work="$root/target/conformance"
rm -rf "$work/run" && mkdir -p "$work/run"
run="$work/run"

command -v smugglex >/dev/null || cargo install smugglex --version 0.4.0 --locked
if [ ! -x "$work/venv/bin/kosoku" ]; then
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install -q kosoku==0.1.0 websockets==17.4
fi
cargo build -q --bin tern --example test_machine
tern="$root/target/debug/tern"
machine="$root/target/debug/examples/test_machine"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# Waits for a line matching $2 in file $1 and prints it.
wait_for() {
  for _ in $(seq 1 200); do
    if grep -q "$2" "$1" 2>/dev/null; then grep -m1 "$2" "$1"; return 0; fi
    sleep 0.05
  done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; return 1
}

# A certificate for "localhost", the name both tools reach tern by.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost" -keyout "$run/key.pem" -out "$run/cert.pem" 2>/dev/null

# The machines: the test backend for HTTP, a websockets echo server for WebSocket.
"$machine" 127.0.0.1:0 >"$run/http-machine.log" 2>&1 &
pids+=($!)
http_addr=$(wait_for "$run/http-machine.log" "listening on" | awk '{print $NF}')
"$work/venv/bin/python" tests/conformance/ws_echo.py 0 >"$run/ws-machine.log" 2>&1 &
pids+=($!)
ws_port=$(wait_for "$run/ws-machine.log" '^[0-9]')

cat >"$run/tern.toml" <<TOML
region = "ams"
[[listen]]
addr = "127.0.0.1:0"
[[listen]]
addr = "127.0.0.1:0"
tls = true
[admin]
addr = "127.0.0.1:0"
[rib]
path = "rib.db"
[log]
format = "json"
TOML
declare_machine() {
  cat >"$run/decl.toml" <<TOML
[[apps]]
name = "conf"
hostnames = ["localhost"]
idle_timeout = "20s"
[[machines]]
id = "m1"
app = "conf"
addr = "$1"
state = "started"
[[certificates]]
hostname = "localhost"
cert_file = "cert.pem"
key_file = "key.pem"
TOML
  "$tern" apply -c "$run/tern.toml" "$run/decl.toml" >/dev/null
}
declare_machine "$http_addr"
"$tern" serve -c "$run/tern.toml" 2>"$run/tern.log" &
pids+=($!)
listening() { wait_for "$run/tern.log" "\"message\":\"listening\".*$1" | sed 's/.*"addr":"\([^"]*\)".*/\1/'; }
plain=$(listening '"tls":false')
tls=$(listening '"tls":true')
echo "tern: http $plain, https $tls; machines: http $http_addr, websocket 127.0.0.1:$ws_port"

status=0
checks=cl-te,te-cl,te-te,h2c,h2,cl-edge,cl-0,0-cl,parser-discrepancy,h2-downgrade
echo "== smugglex ($checks)"
# /echo: a 200 from the machine for the checks' baseline requests.
for target in "http://localhost:${plain#*:}/echo" "https://localhost:${tls#*:}/echo"; do
  smugglex -c "$checks" -k --no-color -t 5 --format json -o "$run/smugglex-$(echo "$target" | cut -d: -f1).json" "$target" \
    >"$run/smugglex.out" 2>&1 || true
  found=$(python3 -c 'import json,sys
d=json.load(open(sys.argv[1]))
rs=d if isinstance(d,list) else d.get("results",[d])
cs=[c for r in rs for c in r.get("checks",[])]
print(sum(1 for c in cs if c.get("vulnerable")), len(cs))' "$run/smugglex-$(echo "$target" | cut -d: -f1).json")
  echo "  $target: ${found% *} findings in ${found#* } checks"
  found=${found% *}
  [ "$found" = 0 ] || { status=1; cat "$run/smugglex.out"; }
done

echo "== kosoku (Autobahn cases 1-7, 10)"
cases=(-i '1.*' -i '2.*' -i '3.*' -i '4.*' -i '5.*' -i '6.*' -i '7.*' -i '10.*')
"$work/venv/bin/kosoku" "ws://127.0.0.1:$ws_port" "${cases[@]}" -p 4 -o "$run/ws-direct" >"$run/ws-direct.out" 2>&1 || true
declare_machine "127.0.0.1:$ws_port"
# The running tern picks the new machine up within a poll.
for _ in $(seq 1 100); do
  curl -s "http://$(listening admin\":true)/v1/apps/conf" | grep -q "$ws_port" && break
  sleep 0.05
done
"$work/venv/bin/kosoku" "ws://localhost:${plain#*:}" "${cases[@]}" -p 4 -o "$run/ws-tern" >"$run/ws-tern.out" 2>&1 || true
python3 tests/conformance/compare.py "$run/ws-direct/index.json" "$run/ws-tern/index.json" || status=1
exit $status
