//! Integration tests: one binary (one link step), real servers on port 0, real TLS with
//! generated certificates, a real SQLite RIB, real clients (reqwest, tokio-tungstenite,
//! rustls) and the real `tern` binary where the process matters.

// Test helpers fail loudly by design; a long match of backend routes reads best whole.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

mod backend;
mod harness;

mod anycast;
mod catalog;
mod corrosion;
mod corrosion_standin;
mod declared;
mod drain;
mod eject;
mod errors;
mod etcd;
mod fleet;
mod hostile;
mod http;
mod lifecycle;
mod machines_api;
mod ops;
mod private;
mod proxy_protocol;
mod replay;
mod rib;
mod session_keys;
mod sessions;
mod shutdown;
mod steer;
mod streams;
mod tcp;
mod tls;
mod upgrade;
mod wake;
mod watchdog;
