//! tern: an edge HTTP/TLS reverse proxy in the style of Fly.io's fly-proxy.
//!
//! Data flows one way: `listener → tls → http → routing → catalog`, with `upstream` beside
//! `http` (it sends what routing decided). The RIB feeds the catalog; `config`,
//! `duration`, `telemetry` and `error` are leaves. [`proxy`] is the composition root.

pub mod admin;
pub mod alloc;
pub mod autostart;
pub mod catalog;
pub mod clock;
pub mod config;
pub mod decl;
pub mod driver;
pub mod duration;
pub mod error;
mod head;
pub mod http;
pub mod listener;
pub mod model;
pub mod net;
pub mod proxy;
pub mod rib;
pub mod routing;
pub mod shutdown;
pub mod tasks;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod watchdog;
