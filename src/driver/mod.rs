//! Drivers: what starts, stops and suspends machines on tern's behalf.
//!
//! One trait, chosen by `[driver] kind`. `process` (the embedded default) runs each machine
//! as a local process from its declared `cmd`; `machines-api` asks an orchestrator that
//! speaks the Fly Machines API. A driver only acts; deciding when (waking on a request,
//! stopping when idle) and recording states in the RIB is the lifecycle manager's job
//! (`crate::autostart`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

pub mod machines_api;
pub mod process;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a driver needs to know about a machine.
#[derive(Clone, Debug)]
pub struct Target {
    pub id: Arc<str>,
    pub app: Arc<str>,
    pub region: String,
    pub addr: SocketAddr,
    pub cmd: Option<Vec<String>>,
}

impl Target {
    pub fn of(m: &crate::catalog::Machine) -> Target {
        Target {
            id: m.id.clone(),
            app: m.spec.app.clone(),
            region: m.spec.region.to_string(),
            addr: m.addr,
            cmd: m.spec.cmd.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("machine {0} has no cmd; someone else runs it")]
    NotManaged(Arc<str>),
    #[error("could not start machine {id}: {source}")]
    Spawn {
        id: Arc<str>,
        #[source]
        source: std::io::Error,
    },
    #[error("could not signal machine {id}: {detail}")]
    Signal { id: Arc<str>, detail: String },
    #[error("orchestrator: {0}")]
    Api(String),
}

/// Something the driver noticed on its own.
#[derive(Debug, Clone)]
pub enum DriverEvent {
    /// The machine's process ended without tern asking it to.
    Exited { id: Arc<str>, status: String },
}

pub trait Driver: Send + Sync + 'static {
    /// Whether this driver can start and stop the machine at all.
    fn manages(&self, m: &crate::model::MachineSpec) -> bool;

    /// Starts a stopped machine or resumes a suspended one. Returns once the driver has
    /// done its part; readiness (the machine accepting connections) is checked by the caller.
    fn start<'a>(&'a self, m: &'a Target) -> BoxFuture<'a, Result<(), DriverError>>;

    /// Stops the machine: a polite request first, forced after `kill_timeout`.
    fn stop<'a>(&'a self, m: &'a Target, kill_timeout: Duration) -> BoxFuture<'a, Result<(), DriverError>>;

    /// Freezes the machine so that `start` resumes it quickly.
    fn suspend<'a>(&'a self, m: &'a Target) -> BoxFuture<'a, Result<(), DriverError>>;

    /// Whether the machine is running (started or suspended) as far as the driver knows.
    fn running(&self, id: &str) -> bool;

    /// Every machine the driver runs now (started or suspended), as it was started. At
    /// shutdown tern stops each of them, whether or not the catalog still holds it (one
    /// removed moments before is still running).
    fn running_targets(&self) -> Vec<Target>;

    /// At startup, before anything is started: deals with machines an earlier run of tern
    /// left running (it crashed or was killed before it could stop them).
    fn clean_up_leftovers(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Builds the configured driver; `events` receives what it notices on its own.
pub fn build(
    config: &crate::config::Config,
    events: mpsc::UnboundedSender<DriverEvent>,
) -> Result<Arc<dyn Driver>, String> {
    match config.driver.kind {
        crate::config::DriverKind::Process => {
            let dir = config.driver_log_dir();
            Ok(Arc::new(process::ProcessDriver::new(dir, events)))
        }
        crate::config::DriverKind::MachinesApi => {
            // Nothing is watched, so no events: `events` is dropped and its receiver ends.
            // `Config::parse` checked the settings already; this only fails for a hand-built config.
            let settings = config.driver.machines_api().map_err(|(field, msg)| format!("{field}: {msg}"))?;
            Ok(Arc::new(machines_api::MachinesApiDriver::new(&settings)?))
        }
    }
}
