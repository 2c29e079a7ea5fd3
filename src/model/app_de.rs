//! How an [`AppSpec`] is read, from declarations (TOML) and the RIB (JSON) alike.
//!
//! A mirror of `AppSpec` exists for one quirk: CONTRACT.md's example writes
//! `replay_buffer = "1MiB"` right after the `[apps.affinity]` header, which in TOML puts it
//! *inside* `[apps.affinity]`, while its comment says it belongs to `[[apps]]`. Both places
//! are accepted; the value moves to the top level here, so nothing past this module sees
//! the difference, and the RIB only ever holds the top-level field. Serde cannot move a
//! value between tables by itself, hence the mirror: add a field to both structs (the
//! conversion below names every field, so forgetting one does not compile).

use std::time::Duration;

use serde::Deserialize;

use super::session::{de_size_opt, default_affinity_headers, default_replay_buffer};
use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApp {
    name: String,
    #[serde(default = "default_org")]
    org: String,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    primary_region: Option<String>,
    #[serde(default = "default_internal_port")]
    internal_port: u16,
    #[serde(default)]
    auto_stop: AutoStop,
    #[serde(default = "yes")]
    auto_start: bool,
    #[serde(default)]
    min_machines_running: u32,
    #[serde(default = "default_idle_timeout", deserialize_with = "de_duration")]
    idle_timeout: Duration,
    #[serde(default)]
    concurrency: Concurrency,
    #[serde(default = "default_auto_stop_after", deserialize_with = "de_duration")]
    auto_stop_after: Duration,
    #[serde(default = "default_kill_timeout", deserialize_with = "de_duration")]
    kill_timeout: Duration,
    #[serde(default = "default_wake_timeout", deserialize_with = "de_duration")]
    wake_timeout: Duration,
    #[serde(default = "default_start_timeout", deserialize_with = "de_duration")]
    start_timeout: Duration,
    #[serde(default = "default_max_pending")]
    max_pending: u32,
    #[serde(default)]
    wake_ignore_user_agents: Vec<String>,
    #[serde(default)]
    checks: Vec<Check>,
    #[serde(default)]
    http_options: HttpOptions,
    #[serde(default)]
    affinity: RawAffinity,
    #[serde(default, deserialize_with = "de_size_opt")]
    replay_buffer: Option<u64>,
    #[serde(default)]
    replay_cache: Vec<ReplayCacheRule>,
    #[serde(default)]
    private_addrs: Vec<std::net::IpAddr>,
    #[serde(default = "yes")]
    public: bool,
    #[serde(default)]
    addrs: Vec<std::net::IpAddr>,
    #[serde(default)]
    services: Vec<Service>,
}

/// `[apps.affinity]` as written, with the `replay_buffer` the contract's example puts there.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAffinity {
    #[serde(default = "default_affinity_headers")]
    headers: Vec<String>,
    #[serde(default)]
    cookie: Option<String>,
    #[serde(default, deserialize_with = "de_size_opt")]
    replay_buffer: Option<u64>,
}

impl Default for RawAffinity {
    fn default() -> Self {
        RawAffinity { headers: default_affinity_headers(), cookie: None, replay_buffer: None }
    }
}

/// The one way reading an app fails after its fields parsed.
#[derive(Debug, thiserror::Error)]
#[error(
    "replay_buffer is given twice, as {top} at the top of [[apps]] and as {inner} in [apps.affinity]; \
     keep one (the top level is where it belongs)"
)]
pub struct TwoReplayBuffers {
    top: u64,
    inner: u64,
}

impl TryFrom<RawApp> for AppSpec {
    type Error = TwoReplayBuffers;

    fn try_from(r: RawApp) -> Result<Self, TwoReplayBuffers> {
        let replay_buffer = match (r.replay_buffer, r.affinity.replay_buffer) {
            (Some(top), Some(inner)) if top != inner => return Err(TwoReplayBuffers { top, inner }),
            (Some(v), _) | (None, Some(v)) => v,
            (None, None) => default_replay_buffer(),
        };
        Ok(AppSpec {
            name: r.name,
            org: r.org,
            hostnames: r.hostnames,
            primary_region: r.primary_region,
            internal_port: r.internal_port,
            auto_stop: r.auto_stop,
            auto_start: r.auto_start,
            min_machines_running: r.min_machines_running,
            idle_timeout: r.idle_timeout,
            concurrency: r.concurrency,
            auto_stop_after: r.auto_stop_after,
            kill_timeout: r.kill_timeout,
            wake_timeout: r.wake_timeout,
            start_timeout: r.start_timeout,
            max_pending: r.max_pending,
            wake_ignore_user_agents: r.wake_ignore_user_agents,
            checks: r.checks,
            http_options: r.http_options,
            affinity: Affinity { headers: r.affinity.headers, cookie: r.affinity.cookie },
            replay_buffer,
            replay_cache: r.replay_cache,
            private_addrs: r.private_addrs,
            public: r.public,
            addrs: r.addrs,
            services: r.services,
        })
    }
}
