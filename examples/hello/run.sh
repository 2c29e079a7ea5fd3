#!/usr/bin/env bash
# README command 1: build tern, declare the example app (its machine asleep), and run
# `tern serve` on the embedded default (HTTP :8080, TLS :8443, admin :9090, RIB ./tern.db).
# The first request wakes the machine (tern runs examples/hello/app.py); 30 s after the last
# one, tern stops it again. Ctrl-C drains tern and stops the machine if it runs.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Cargo shows its progress: the first build compiles every dependency and takes minutes.
echo "Building tern (release). The first build takes several minutes; later ones, seconds." >&2
cargo build --release --bin tern
./target/release/tern apply examples/hello/hello.toml
cat <<'TOUR'

tern is starting; the app's machine is stopped. In another terminal:
  curl -H 'Host: hello.example.com' http://127.0.0.1:8080/          # wakes it (see tern's log)
  curl -s http://127.0.0.1:9090/v1/apps/hello                       # "state":"started"; 30 s idle later, "stopped"
  curl --cacert examples/hello/certs/ca.pem --resolve hello.example.com:8443:127.0.0.1 https://hello.example.com:8443/
  curl --http2 --cacert examples/hello/certs/ca.pem --resolve hello.example.com:8443:127.0.0.1 https://hello.example.com:8443/
  curl -N -H 'Host: hello.example.com' http://127.0.0.1:8080/events  # an open stream keeps it awake
Change the routing live: see "Change the routing while tern runs" in README.md.
Ctrl-C here ends open streams cleanly, lets requests in flight finish, stops the machine, exits 0.

TOUR
./target/release/tern serve
