//! Upgraded connections (WebSocket or any HTTP/1.1 Upgrade): once the machine answers 101,
//! bytes are copied both ways until either side closes or the exchange has been silent for
//! the app's idle_timeout. Nothing is buffered beyond the copy buffers.

use std::sync::Arc;
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::telemetry::Metrics;

use super::activity::{Activity, TouchIo, silent_for};
use super::body::ExchangeGuards;

pub async fn run(
    client: OnUpgrade,
    machine: OnUpgrade,
    idle_timeout: Duration,
    metrics: Arc<Metrics>,
    guards: ExchangeGuards,
) {
    let (client, machine) = match tokio::try_join!(client, machine) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(target: "tern::http", error = %e, "upgrade did not complete");
            return;
        }
    };
    let activity = Arc::new(Activity::new());
    let mut client = TouchIo::new(TokioIo::new(client), activity.clone());
    let mut machine = TouchIo::new(TokioIo::new(machine), activity.clone());
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut machine) => {
            if let Err(e) = r {
                tracing::debug!(target: "tern::http", error = %e, "tunnel ended with an error");
            }
        }
        () = silent_for(&activity, idle_timeout) => {
            metrics.streams_cut_idle.inc();
            tracing::debug!(target: "tern::http", ?idle_timeout, "tunnel closed after the app's idle_timeout of silence");
        }
    }
    drop(guards);
}
