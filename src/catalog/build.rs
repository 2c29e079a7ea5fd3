//! Building the catalog from a whole snapshot at once, for a node that holds nothing yet
//! (boot): the same catalog as applying the snapshot's rows one by one to an empty one, made
//! in one pass instead.
//!
//! Why not the one-by-one path: each row would go through the layered maps' persistent
//! delta (a tree insert, nodes copied), each machine would rebuild its app's entry and
//! re-point its hostnames, and the result would then be folded into flat maps: at a million
//! apps that was most of a 38 s boot, and the garbage it left stayed in the resident set. Here
//! rows are decoded as they arrive (the store sends the snapshot in parts, so decoding runs
//! beside the store's reading and no part is kept once decoded), and the flat maps are
//! built once, each app's entry once, with its machines.
//!
//! What must come out the same as the one-by-one path (a test holds it to that):
//! - a bare-IP machine takes its app's `internal_port`; a machine whose app is absent stays,
//!   unroutable (port 0);
//! - a machine starts from the lifecycle state recorded for it before its row arrived, else
//!   its declared one; a state recorded after it is observed (the newer version wins);
//! - a hostname claimed by two apps goes to the one that published last, where an app
//!   publishes at its own row and again at each of its machines' rows after it;
//! - a row that does not decode is counted and skipped, and returned, for the caller to look
//!   for its last good version in the store's history.

use std::collections::HashMap;
use std::sync::Arc;

use crate::model::{AppSpec, MachineSpec};
use crate::rib::{Rows, Table};
use crate::telemetry::Metrics;

use super::apply::Event;
use super::decode::{DecodeError, decode};
use super::host_key::HostKey;
use super::layered::Layered;
use super::snapshot::{AppEntry, CertEntry, Machine, MachineLive, NodeLive, Snapshot, StateRecord};

type Map<V> = HashMap<Arc<str>, V, foldhash::fast::RandomState>;

/// A snapshot being built; feed it every row of the store's snapshot, then [`Build::finish`].
pub struct Build {
    /// The catalog it starts from (empty: its pulse, and the nodes and session keys, which
    /// are few and applied as they come).
    snap: Snapshot,
    /// Rows seen so far: the order the one-by-one path would have applied them in.
    seq: u64,
    apps: Map<AppSlot>,
    /// Machines made as their rows come (their app's row came first, as in SQLite's order),
    /// and which the final catalog holds as they are.
    machines: Map<Arc<Machine>>,
    /// Machines whose app had not come yet: made at the end (the port is the app's).
    waiting: Vec<Waiting>,
    certs: Map<Arc<CertEntry>>,
    wild_certs: Map<Arc<CertEntry>>,
    states: Map<StateRecord>,
    /// Each region's name once: machines share it.
    regions: std::collections::HashSet<Arc<str>, foldhash::fast::RandomState>,
    unserved: Vec<(Table, DecodeError)>,
}

/// A machine whose app had not come when it did.
struct Waiting {
    id: Arc<str>,
    spec: MachineSpec,
    owner: Option<Arc<NodeLive>>,
    /// The state recorded before it came, if any (one recorded later is observed).
    initial: Option<StateRecord>,
}

/// An app while its machines are gathered.
struct AppSlot {
    /// The map's key, shared by its machines' specs.
    name: Arc<str>,
    spec: Arc<AppSpec>,
    /// When it last published: its row, or a later row of one of its machines.
    stamp: u64,
    members: Vec<(Arc<str>, Arc<Machine>)>,
}

impl Build {
    /// Starts from `current`, which must hold no apps, machines, certificates or states.
    pub fn new(current: &Snapshot) -> Build {
        debug_assert!(
            current.app_count() == 0 && current.machine_count() == 0 && current.cert_count() == 0,
            "a build replaces the maps whole: whatever they held would be lost"
        );
        Build {
            snap: current.clone(),
            seq: 0,
            apps: Map::default(),
            machines: Map::default(),
            waiting: Vec::new(),
            certs: Map::default(),
            wild_certs: Map::default(),
            states: Map::default(),
            regions: Default::default(),
            unserved: Vec::new(),
        }
    }

    /// Makes room for the rows the store said the snapshot holds (a hint).
    pub fn reserve(&mut self, sizes: &[(Table, usize)]) {
        // A hint far off (rows deleted, a bad store) costs memory, not correctness: capped.
        const CAP: usize = 1 << 26;
        for &(table, rows) in sizes {
            let rows = rows.min(CAP);
            match table {
                Table::Apps => self.apps.reserve(rows.saturating_sub(self.apps.len())),
                Table::Machines => self.machines.reserve(rows.saturating_sub(self.machines.len())),
                Table::MachineStates => self.states.reserve(rows.saturating_sub(self.states.len())),
                _ => {}
            }
        }
    }

    /// Takes the next rows of the snapshot (table, key, body), in its order.
    pub fn add<'r>(&mut self, rows: impl IntoIterator<Item = (Table, &'r str, &'r str)>, metrics: &Metrics) {
        for (table, key, body) in rows {
            let row = decoded(&self.snap, table, key, body);
            self.take(row, metrics);
        }
    }

    /// Takes the next rows of the snapshot, decoded ([`decode_part`]), in its order.
    pub fn add_decoded(&mut self, rows: impl IntoIterator<Item = Decoded>, metrics: &Metrics) {
        for row in rows {
            self.take(row, metrics);
        }
    }

    fn take(&mut self, row: Decoded, metrics: &Metrics) {
        self.seq += 1;
        let event = match row {
            Decoded::App(name, spec) => return self.add_app(name, spec),
            // Its id is its key (decoding checked).
            Decoded::Machine(spec) => return self.add_machine(spec.id.clone(), spec),
            Decoded::Other(event) => *event,
            // Nothing held yet: nothing is ever unchanged (the same row twice would be).
            Decoded::Unchanged => return,
            Decoded::Skipped(table, e) => {
                metrics.rib_rows_skipped.with_label_values(&[table.as_str()]).inc();
                self.unserved.push((table, e));
                return;
            }
        };
        match event {
            // Decoded apart above; as they are all the same.
            Event::App(spec) => self.add_app(Arc::from(spec.name.as_str()), Arc::new(spec)),
            Event::Machine(spec) => self.add_machine(spec.id.clone(), spec),
            Event::MachineState { id, record } => {
                let id: Arc<str> = Arc::from(id);
                // Recorded after the machine came: observed, as it would have been then.
                if let Some(m) = self.machines.get(&id) {
                    m.live.observe(record.state, record.version);
                }
                self.states.insert(id, record);
            }
            Event::Cert(entry) => {
                let entry = Arc::new(*entry);
                match entry.spec.hostname.strip_prefix("*.") {
                    Some(suffix) => self.wild_certs.insert(Arc::from(suffix), entry),
                    None => self.certs.insert(Arc::from(entry.spec.hostname.as_str()), entry),
                };
            }
            // Few (nodes, session keys): as the one-by-one path does.
            other => self.snap.apply(other),
        }
    }

    fn add_app(&mut self, name: Arc<str>, spec: Arc<AppSpec>) {
        let slot = AppSlot { name: name.clone(), spec, stamp: self.seq, members: Vec::new() };
        self.apps.insert(name, slot);
    }

    fn add_machine(&mut self, id: Arc<str>, mut spec: MachineSpec) {
        let owner = spec.node.as_deref().map(|n| self.snap.node_live(n));
        let initial = self.states.get(&id).copied();
        // One allocation per id (the key's), per app name (its app's key) and per region.
        spec.id = id.clone();
        spec.region = match self.regions.get(&spec.region) {
            Some(r) => r.clone(),
            None => {
                self.regions.insert(spec.region.clone());
                spec.region
            }
        };
        let Some(slot) = self.apps.get_mut(&*spec.app) else {
            self.waiting.push(Waiting { id, spec, owner, initial });
            return;
        };
        spec.app = slot.name.clone();
        // A machine publishes its app again (for a hostname two apps claim).
        slot.stamp = self.seq;
        let machine = made(id.clone(), spec, slot.spec.internal_port, owner, initial);
        slot.members.push((id.clone(), machine.clone()));
        self.machines.insert(id, machine);
    }

    /// The catalog, with compact maps and empty deltas, and the rows that did not decode.
    pub fn finish(self) -> (Snapshot, Vec<(Table, DecodeError)>) {
        let Build { snap, mut apps, mut machines, waiting, certs, wild_certs, states, unserved, .. } = self;
        // Machines whose app came after them take its port; those whose app never came wait
        // for it, unroutable (port 0). Neither publishes the app.
        let mut orphans: Map<Vec<Arc<str>>> = Map::default();
        for Waiting { id, spec, owner, initial } in waiting {
            let slot = apps.get_mut(&*spec.app);
            let port = slot.as_ref().map_or(0, |s| s.spec.internal_port);
            let app = spec.app.clone();
            let machine = made(id.clone(), spec, port, owner, initial);
            if let (None, Some(r)) = (initial, states.get(&id)) {
                machine.live.observe(r.state, r.version);
            }
            match slot {
                Some(slot) => slot.members.push((id.clone(), machine.clone())),
                None => orphans.entry(app).or_default().push(id.clone()),
            }
            machines.insert(id, machine);
        }
        let (apps, hosts, wild_hosts, mut app_machines) = entries(apps);
        let private = apps
            .iter()
            .flat_map(|(name, a)| a.spec.private_addrs.iter().map(move |ip| (*ip, name.clone())))
            .collect();
        let tcp = apps
            .iter()
            .flat_map(|(name, a)| super::apply::tcp_keys(&a.spec).into_iter().map(move |k| (k, name.clone())))
            .collect();
        app_machines.extend(orphans.into_iter().map(|(app, mut ids)| {
            ids.sort_unstable();
            (app, Arc::from(ids))
        }));
        let generation = snap.generation + 1;
        let next = Snapshot {
            generation,
            base_at: generation,
            apps: Layered::from_base(Arc::new(apps)),
            hosts: Layered::from_base(Arc::new(hosts)),
            wild_hosts: Layered::from_base(Arc::new(wild_hosts)),
            machines: Layered::from_base(Arc::new(machines)),
            app_machines: Layered::from_base(Arc::new(app_machines)),
            certs: Layered::from_base(Arc::new(certs)),
            wild_certs: Layered::from_base(Arc::new(wild_certs)),
            states: Layered::from_base(Arc::new(states)),
            session_keys: snap.session_keys,
            keyring: snap.keyring,
            nodes: snap.nodes,
            pulse: snap.pulse,
            orgs: snap.orgs,
            private: Arc::new(private),
            tcp: Arc::new(tcp),
        };
        (next, unserved)
    }
}

/// A row of a snapshot, decoded: decoding needs nothing of the build (the catalog holds
/// nothing yet), so it can run on another thread while the part before is added.
pub enum Decoded {
    App(Arc<str>, Arc<AppSpec>),
    Machine(MachineSpec),
    Other(Box<Event>),
    Unchanged,
    Skipped(Table, DecodeError),
}

/// Decodes every row of `rows` onto `out`, against an empty catalog.
pub fn decode_part(rows: &Rows, out: &mut Vec<Decoded>) {
    let empty = Snapshot::default();
    out.extend(rows.iter().map(|(table, key, body)| decoded(&empty, table, key, body)));
}

fn decoded(current: &Snapshot, table: Table, key: &str, body: &str) -> Decoded {
    match decode(current, table, key, Some(body)) {
        Ok(Some(Event::App(spec))) => Decoded::App(Arc::from(key), Arc::new(spec)),
        Ok(Some(Event::Machine(spec))) => Decoded::Machine(spec),
        Ok(Some(event)) => Decoded::Other(Box::new(event)),
        Ok(None) => Decoded::Unchanged,
        Err(e) => Decoded::Skipped(table, e),
    }
}

/// A machine as the catalog holds it: resolved against its app's port, starting from the
/// lifecycle state recorded before it came (if any), else its declared one.
fn made(
    id: Arc<str>,
    spec: MachineSpec,
    port: u16,
    owner: Option<Arc<NodeLive>>,
    initial: Option<StateRecord>,
) -> Arc<Machine> {
    let r = initial.unwrap_or(StateRecord { state: spec.state, version: 0 });
    Arc::new(Machine {
        id,
        addr: spec.addr.resolve(port),
        spec,
        live: Arc::new(MachineLive::new(r.state, r.version)),
        owner,
    })
}

type Hosts = HashMap<HostKey, Arc<AppEntry>, foldhash::fast::RandomState>;
type Entries = (Map<Arc<AppEntry>>, Hosts, Hosts, Map<Arc<[Arc<str>]>>);

/// Each app's entry, made once with its machines (sorted by id), its machine ids, and the
/// hostname maps (exact, and wildcards by their suffix). A hostname two apps claim goes to
/// the later publisher. The hostname maps are filled on a thread of their own while this
/// one fills the others: at boot the node has nothing else for its cores to do.
fn entries(mut slots: Map<AppSlot>) -> Entries {
    let n = slots.len();
    let mut list = Vec::with_capacity(n);
    let mut app_machines = Map::with_capacity_and_hasher(n, Default::default());
    for (name, slot) in &mut slots {
        let mut members = std::mem::take(&mut slot.members);
        members.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let machines: Arc<[Arc<Machine>]> = members.iter().map(|(_, m)| m.clone()).collect();
        if !members.is_empty() {
            let ids: Arc<[Arc<str>]> = members.into_iter().map(|(id, _)| id).collect();
            app_machines.insert(name.clone(), ids);
        }
        list.push(Arc::new(AppEntry {
            name: name.clone(),
            spec: slot.spec.clone(),
            machines,
            series: crate::telemetry::AppSeries::default(),
        }));
    }
    let (apps, (hosts, wild)) = std::thread::scope(|s| {
        let beside = std::thread::Builder::new()
            .name("tern-catalog-build".into())
            .spawn_scoped(s, || hostnames(&list, &slots));
        let apps: Map<Arc<AppEntry>> = list.iter().map(|e| (e.name.clone(), e.clone())).collect();
        // No thread to be had: the same work here, after the rest.
        let hosts = match beside {
            Ok(thread) => thread.join().ok(),
            Err(_) => None,
        };
        (apps, hosts.unwrap_or_else(|| hostnames(&list, &slots)))
    });
    (apps, hosts, wild, app_machines)
}

/// The hostname maps: exact names, and wildcards by the suffix after `*.`.
fn hostnames(list: &[Arc<AppEntry>], slots: &Map<AppSlot>) -> (Hosts, Hosts) {
    let mut hosts: Hosts = Hosts::with_capacity_and_hasher(list.len(), Default::default());
    let mut wild: Hosts = Hosts::default();
    let mut contested = Vec::new();
    for entry in list {
        for h in &entry.spec.hostnames {
            let (map, key) = match h.strip_prefix("*.") {
                Some(suffix) => (&mut wild, suffix),
                None => (&mut hosts, h.as_str()),
            };
            match map.get(key.as_bytes()) {
                None => {
                    map.insert(HostKey::from(key), entry.clone());
                }
                // The same app listing a name twice.
                Some(held) if Arc::ptr_eq(held, entry) => {}
                Some(_) => contested.push((h.as_str(), entry.clone())),
            }
        }
    }
    for (host, entry) in contested {
        claim(&mut hosts, &mut wild, host, entry, slots);
    }
    (hosts, wild)
}

/// A hostname two apps claim (`tern apply` refuses this; another writer of the RIB may not
/// have): it goes to the app that published later.
fn claim(hosts: &mut Hosts, wild: &mut Hosts, host: &str, entry: Arc<AppEntry>, slots: &Map<AppSlot>) {
    let (map, key) = match host.strip_prefix("*.") {
        Some(suffix) => (wild, suffix),
        None => (hosts, host),
    };
    let stamp = |app: &AppEntry| slots.get(&app.name).map_or(0, |s| s.stamp);
    let Some(held) = map.get_mut(key.as_bytes()) else { return };
    let later = stamp(&entry) > stamp(held);
    let (from, to) = if later { (&held.name, &entry.name) } else { (&entry.name, &held.name) };
    tracing::warn!(target: "tern::catalog", hostname = %host, %from, %to,
        "hostname claimed by two apps; the later change wins");
    if later {
        *held = entry;
    }
}

#[cfg(test)]
mod tests;
