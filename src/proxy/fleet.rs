//! The node's part in a fleet: while it has a `[backhaul]`, it rewrites its row in the RIB's
//! `nodes` every heartbeat, so the others know it is alive and where to reach it; when it
//! stops (not when it hands over to an upgrade), it deletes the row, so they route around
//! its machines at once instead of after `dead_after`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::model::NodeRow;
use crate::rib::Rib;

/// What this node publishes about itself.
#[derive(Clone)]
pub struct Identity {
    pub node: Arc<str>,
    pub region: Arc<str>,
    pub backhaul: std::net::SocketAddr,
    pub every: Duration,
}

impl Identity {
    fn row(&self) -> NodeRow {
        NodeRow {
            node: self.node.to_string(),
            region: self.region.to_string(),
            backhaul: Some(self.backhaul.to_string()),
            pid: std::process::id(),
            beat_ms: crate::clock::unix_ms(),
        }
    }
}

/// Starts this node's heartbeat if it has a `[backhaul]`; returns what leaving needs.
pub fn beat(
    config: &crate::config::Config,
    rib: &Arc<dyn Rib>,
    node: &Arc<str>,
    tasks: &crate::tasks::Tasks,
    runtime: &tokio::runtime::Handle,
    shutdown: &watch::Receiver<bool>,
) -> Option<(Arc<dyn Rib>, Arc<str>)> {
    let b = config.backhaul.as_ref()?;
    let me = Identity {
        node: node.clone(),
        region: Arc::from(config.region.as_str()),
        backhaul: b.addr,
        every: b.heartbeat,
    };
    let (r, s) = (rib.clone(), shutdown.clone());
    tasks.keep(runtime, "heartbeat", move || heartbeat(r.clone(), me.clone(), s.clone()));
    Some((rib.clone(), node.clone()))
}

/// Beats until `shutdown`. A failed write is logged once per run of failures (the RIB's own
/// errors are reported by the catalog too) and tried again at the next beat.
pub async fn heartbeat(rib: Arc<dyn Rib>, me: Identity, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(me.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            () = crate::shutdown::requested(&mut shutdown) => return,
            _ = tick.tick() => {}
        }
        let (rib, row) = (rib.clone(), me.row());
        let wrote = tokio::task::spawn_blocking(move || rib.publish_node(&row)).await;
        match wrote {
            Ok(Ok(())) if failing => {
                failing = false;
                tracing::info!(target: "tern::fleet", node = %me.node, "heartbeat written again");
            }
            Ok(Ok(())) => {}
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::warn!(target: "tern::fleet", node = %me.node, error = %e,
                    "could not write this node's heartbeat; other nodes will soon route around its machines");
            }
            Ok(Err(_)) => {}
            Err(e) => tracing::error!(target: "tern::fleet", error = %e, "the heartbeat write panicked"),
        }
    }
}

/// Deletes this node's row: it is leaving.
pub async fn leave(rib: Arc<dyn Rib>, node: Arc<str>) {
    let n = node.clone();
    match tokio::task::spawn_blocking(move || rib.remove_node(&n)).await {
        Ok(Ok(())) => tracing::info!(target: "tern::fleet", %node, "left the fleet"),
        Ok(Err(e)) => tracing::warn!(target: "tern::fleet", %node, error = %e,
            "could not delete this node's row; others route around it once its heartbeat is missed"),
        Err(e) => tracing::error!(target: "tern::fleet", error = %e, "leaving the fleet panicked"),
    }
}
