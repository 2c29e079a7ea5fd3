//! One version of the catalog and its lookups.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use imbl::{HashMap, OrdMap};
use rustls::sign::CertifiedKey;

use crate::model::{AppSpec, CertSpec, MachineSpec, MachineState};

/// Live, per-machine state shared by every snapshot that holds the machine.
#[derive(Debug, Default)]
pub struct MachineLive {
    in_flight: AtomicU32,
}

impl MachineLive {
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one more exchange on the machine until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// One exchange in flight on a machine; dropping it ends the exchange.
#[derive(Debug)]
pub struct InFlight(Arc<MachineLive>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let before = self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        // Every decrement pairs with the increment in `begin`; a wrap means a double drop.
        debug_assert!(before > 0, "in-flight counter underflow");
    }
}

/// A machine as routing sees it: its record, its resolved address and its live counters.
#[derive(Debug)]
pub struct Machine {
    pub id: Arc<str>,
    pub spec: MachineSpec,
    /// `spec.addr` with the app's internal_port filled in.
    pub addr: SocketAddr,
    pub live: Arc<MachineLive>,
}

impl Machine {
    pub fn state(&self) -> MachineState {
        self.spec.state
    }

    pub fn region(&self) -> &str {
        &self.spec.region
    }
}

/// An app as routing sees it: its spec and all its machines (any state), sorted by id.
#[derive(Debug)]
pub struct AppEntry {
    pub name: Arc<str>,
    pub spec: Arc<AppSpec>,
    pub machines: Arc<[Arc<Machine>]>,
}

#[derive(Debug)]
pub struct CertEntry {
    pub spec: CertSpec,
    pub key: Arc<CertifiedKey>,
    pub names: Vec<String>,
    pub not_after: i64,
}

/// One immutable version of the catalog. Cloning is O(1): every map is persistent.
#[derive(Clone, Default)]
pub struct Snapshot {
    pub(super) apps: HashMap<Arc<str>, Arc<AppEntry>>,
    /// Exact hostname → app.
    pub(super) hosts: HashMap<Arc<str>, Arc<AppEntry>>,
    /// Wildcard hostnames by the part after "*." → app.
    pub(super) wild_hosts: HashMap<Arc<str>, Arc<AppEntry>>,
    /// Every machine by id, including those whose app is not (yet) in the catalog.
    pub(super) machines: HashMap<Arc<str>, Arc<Machine>>,
    /// Machine ids per app name.
    pub(super) app_machines: HashMap<Arc<str>, OrdMap<Arc<str>, ()>>,
    pub(super) certs: HashMap<Arc<str>, Arc<CertEntry>>,
    pub(super) wild_certs: HashMap<Arc<str>, Arc<CertEntry>>,
}

impl Snapshot {
    /// The app serving a normalised hostname (lower-case, no port, no trailing dot): the
    /// exact name first, then the wildcard one label up.
    pub fn route(&self, host: &str) -> Option<&Arc<AppEntry>> {
        self.hosts.get(host).or_else(|| {
            let (_, parent) = host.split_once('.')?;
            self.wild_hosts.get(parent)
        })
    }

    /// The certificate for a normalised SNI name: exact first, then wildcard.
    pub fn cert_for(&self, name: &str) -> Option<&Arc<CertEntry>> {
        self.certs.get(name).or_else(|| {
            let (_, parent) = name.split_once('.')?;
            self.wild_certs.get(parent)
        })
    }

    pub fn app(&self, name: &str) -> Option<&Arc<AppEntry>> {
        self.apps.get(name)
    }

    pub fn machine(&self, id: &str) -> Option<&Arc<Machine>> {
        self.machines.get(id)
    }

    pub fn app_count(&self) -> usize {
        self.apps.len()
    }

    pub fn machine_count(&self) -> usize {
        self.machines.len()
    }

    pub fn cert_count(&self) -> usize {
        self.certs.len() + self.wild_certs.len()
    }

    pub fn apps(&self) -> impl Iterator<Item = &Arc<AppEntry>> {
        self.apps.values()
    }
}
