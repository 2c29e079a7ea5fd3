#!/usr/bin/env bash
# README command 1: build tern, start the example app's machine, declare it, and run
# `tern serve` on the embedded default (HTTP :8080, TLS :8443, admin :9090, RIB ./tern.db).
# Ctrl-C drains tern and stops the example machine.
set -euo pipefail
cd "$(dirname "$0")/../.."

cargo build --release --quiet --bin tern
python3 examples/hello/app.py --port 9001 --machine hello-1 --region local &
app=$!
trap 'kill "$app" 2>/dev/null || true' EXIT

./target/release/tern apply examples/hello/hello.toml
cat <<'TOUR'

tern is starting. In another terminal:
  curl -H 'Host: hello.example.com' http://127.0.0.1:8080/
  curl --cacert examples/hello/certs/ca.pem --resolve hello.example.com:8443:127.0.0.1 https://hello.example.com:8443/
  curl --http2 --cacert examples/hello/certs/ca.pem --resolve hello.example.com:8443:127.0.0.1 https://hello.example.com:8443/
  curl -N -H 'Host: hello.example.com' http://127.0.0.1:8080/events
  curl http://127.0.0.1:9090/v1/apps/hello

TOUR
./target/release/tern serve
