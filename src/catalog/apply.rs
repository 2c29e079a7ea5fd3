//! Applying one change to a snapshot: no I/O; nothing changes outside the new snapshot but
//! the shared `MachineLive` of a machine whose lifecycle state moved to a newer version.
//!
//! Cost per event: a few updates of the layered maps' small deltas plus the affected app's
//! hostnames and machines. Nothing here walks the whole catalog, except [`Snapshot::resync`], which is
//! only used when a subscriber has to start from a full snapshot.

use std::collections::HashSet;
use std::sync::Arc;

use crate::model::seal::{Keyring, SessionKey};
use crate::model::{AppSpec, MachineSpec};
use crate::rib::Table;
use crate::telemetry::AppSeries;

use super::host_key::HostKey;
use super::snapshot::{
    AppEntry, CertEntry, Machine, MachineLive, NodeEntry, NodeLive, Snapshot, StateRecord,
};

/// One decoded change.
// An app spec is the largest variant by far; events live only between decoding a row and
// applying it, so boxing it would buy an allocation per app change and nothing else.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Event {
    App(AppSpec),
    Machine(MachineSpec),
    Cert(Box<CertEntry>),
    RemoveApp(String),
    RemoveMachine(String),
    RemoveCert(String),
    /// A machine's lifecycle state as recorded by whoever manages it.
    MachineState {
        id: String,
        record: StateRecord,
    },
    RemoveMachineState(String),
    /// A session key, new or changed (a rotation retires it).
    SessionKey(SessionKey),
    RemoveSessionKey(u32),
    /// A node's heartbeat row, new or rewritten.
    Node(crate::model::NodeRow),
    RemoveNode(String),
    /// An organisation, new or changed.
    Org(crate::model::OrgSpec),
    RemoveOrg(String),
}

impl Snapshot {
    pub fn apply(&mut self, event: Event) {
        self.generation += 1;
        match event {
            Event::App(spec) => self.upsert_app(spec),
            Event::Machine(spec) => self.upsert_machine(spec),
            Event::Cert(entry) => self.upsert_cert(*entry),
            Event::RemoveApp(name) => self.remove_app(&name),
            Event::RemoveMachine(id) => self.remove_machine(&id),
            Event::RemoveCert(host) => self.remove_cert(&host),
            Event::MachineState { id, record } => self.record_state(&id, record),
            Event::RemoveMachineState(id) => {
                // The machine keeps the state it is in; only the record goes.
                self.states.remove(id.as_str(), self.generation);
            }
            Event::SessionKey(key) => self.set_session_keys(|keys| {
                keys.insert(key.id, key);
            }),
            Event::RemoveSessionKey(id) => self.set_session_keys(|keys| {
                keys.remove(&id);
            }),
            Event::Node(row) => self.upsert_node(row),
            Event::RemoveNode(name) => {
                if let Some(n) = Arc::make_mut(&mut self.nodes).get_mut(name.as_str()) {
                    n.live.gone();
                    *n = Arc::new(NodeEntry { row: None, live: n.live.clone() });
                }
            }
            Event::Org(org) => {
                Arc::make_mut(&mut self.orgs).insert(Arc::from(org.name.as_str()), Arc::new(org));
            }
            Event::RemoveOrg(name) => {
                Arc::make_mut(&mut self.orgs).remove(name.as_str());
            }
        }
    }

    /// A heartbeat: heard now. Its liveness object stays the one the node's machines hold.
    fn upsert_node(&mut self, row: crate::model::NodeRow) {
        let live = self.node_live(&row.node);
        live.heard();
        let name: Arc<str> = Arc::from(row.node.as_str());
        Arc::make_mut(&mut self.nodes).insert(name, Arc::new(NodeEntry { row: Some(row), live }));
    }

    /// Removes everything whose key is not in `present`: the "diff" half of a resync (the
    /// "apply" half is the decoded snapshot's events, which skip unchanged rows).
    pub fn retain_only(&mut self, present: &HashSet<(Table, String)>) {
        // A generation of its own: a compaction taken at the current one already holds what
        // this removes, and rebasing onto it keeps only delta entries newer than it.
        self.generation += 1;
        let gone = |t: Table, k: &str| !present.contains(&(t, k.to_string()));
        let apps: Vec<String> =
            self.apps.keys().filter(|k| gone(Table::Apps, k)).map(|k| k.to_string()).collect();
        let machines: Vec<String> =
            self.machines.keys().filter(|k| gone(Table::Machines, k)).map(|k| k.to_string()).collect();
        let certs: Vec<String> = self
            .certs
            .values()
            .chain(self.wild_certs.values())
            .map(|c| c.spec.hostname.clone())
            .filter(|h| gone(Table::Certificates, h))
            .collect();
        apps.iter().for_each(|a| self.remove_app(a));
        machines.iter().for_each(|m| self.remove_machine(m));
        certs.iter().for_each(|c| self.remove_cert(c));
        if self.session_keys.keys().any(|id| gone(Table::SessionKeys, &id.to_string())) {
            self.set_session_keys(|keys| keys.retain(|id, _| !gone(Table::SessionKeys, &id.to_string())));
        }
        let left: Vec<String> = self
            .nodes
            .iter()
            .filter(|(name, n)| n.row.is_some() && gone(Table::Nodes, name))
            .map(|(name, _)| name.to_string())
            .collect();
        for name in left {
            self.apply(Event::RemoveNode(name));
        }
        if self.orgs.keys().any(|name| gone(Table::Orgs, name)) {
            Arc::make_mut(&mut self.orgs).retain(|name, _| !gone(Table::Orgs, name));
        }
    }

    /// Changes the session keys and prepares the keyring anew. A node holds a handful of
    /// keys and they change once a rotation, so rebuilding both whole is cheaper than being
    /// clever; the request path only ever sees a finished keyring.
    fn set_session_keys(&mut self, change: impl FnOnce(&mut std::collections::BTreeMap<u32, SessionKey>)) {
        let mut keys = (*self.session_keys).clone();
        change(&mut keys);
        self.keyring = Arc::new(Keyring::new(keys.values().cloned().collect()));
        self.session_keys = Arc::new(keys);
    }

    fn upsert_app(&mut self, spec: AppSpec) {
        let name: Arc<str> = Arc::from(spec.name.as_str());
        if let Some(old) = self.apps.get(&name).cloned() {
            for h in old.spec.hostnames.iter().filter(|h| !spec.hostnames.contains(h)) {
                self.unclaim_host(h, &name);
            }
            self.unclaim_addrs(&old.spec, Some(&spec), &name);
        }
        let spec = Arc::new(spec);
        // Machines declared by bare IP take the app's internal_port, which may have changed.
        let ids = self.app_machines.get(&name).cloned().unwrap_or_else(|| Arc::from(Vec::new()));
        for id in ids.iter() {
            if let Some(m) = self.machines.get(id).cloned() {
                let resolved = resolve(&m.spec, Some(&spec), m.live.clone(), m.owner.clone());
                self.machines.insert(id.clone(), Arc::new(resolved), self.generation);
            }
        }
        self.publish_app(&name, spec);
    }

    fn remove_app(&mut self, name: &str) {
        let Some(old) = self.apps.remove(name, self.generation) else { return };
        for h in &old.spec.hostnames {
            self.unclaim_host(h, name);
        }
        self.unclaim_addrs(&old.spec, None, name);
        // Its machines stay (unroutable) so that re-adding the app brings them back.
    }

    fn upsert_machine(&mut self, spec: MachineSpec) {
        let id: Arc<str> = spec.id.clone();
        let previous = self.machines.get(&id).cloned();
        // Live counters survive a record change at the same address: in-flight requests
        // still count against the machine. A new address is a new machine.
        let app_spec = self.apps.get(&*spec.app).map(|a| a.spec.clone());
        let mut live = None;
        if let Some(prev) = &previous {
            if prev.spec.addr == spec.addr && prev.spec.app == spec.app {
                // A changed declared state is the operator's word: it wins over whatever
                // the machine was doing.
                if prev.spec.state != spec.state {
                    prev.live.transition(spec.state, 0);
                }
                live = Some(prev.live.clone());
            }
            if prev.spec.app != spec.app {
                self.detach_machine(&id, &prev.spec.app);
            }
        }
        let live = live.unwrap_or_else(|| {
            // New here: the recorded lifecycle state if there is one, else the declared one.
            let r = self.states.get(&id).copied().unwrap_or(StateRecord { state: spec.state, version: 0 });
            Arc::new(MachineLive::new(r.state, r.version))
        });
        let app: Arc<str> = spec.app.clone();
        let owner = spec.node.as_deref().map(|n| self.node_live(n));
        let machine = resolve(&spec, app_spec.as_ref(), live, owner);
        self.machines.insert(id.clone(), Arc::new(machine), self.generation);
        let ids = self.app_machines.get(&app).cloned().unwrap_or_else(|| Arc::from(Vec::new()));
        if let Err(at) = ids.binary_search(&id) {
            let mut next = ids.to_vec();
            next.insert(at, id);
            self.app_machines.insert(app.clone(), Arc::from(next), self.generation);
        }
        self.refresh_app(&app);
    }

    fn record_state(&mut self, id: &str, record: StateRecord) {
        let id: Arc<str> = Arc::from(id);
        if let Some(m) = self.machines.get(&id) {
            // Routing reads the live state; no new app entry is needed.
            m.live.observe(record.state, record.version);
        }
        self.states.insert(id, record, self.generation);
    }

    fn remove_machine(&mut self, id: &str) {
        let Some(old) = self.machines.remove(id, self.generation) else { return };
        self.detach_machine(id, &old.spec.app);
    }

    fn detach_machine(&mut self, id: &str, app: &str) {
        if let Some(ids) = self.app_machines.get(app).cloned() {
            let rest: Vec<Arc<str>> = ids.iter().filter(|i| &***i != id).cloned().collect();
            if rest.is_empty() {
                self.app_machines.remove(app, self.generation);
            } else {
                self.app_machines.insert(Arc::from(app), Arc::from(rest), self.generation);
            }
        }
        self.refresh_app(app);
    }

    fn upsert_cert(&mut self, entry: CertEntry) {
        let host = entry.spec.hostname.clone();
        let entry = Arc::new(entry);
        match host.strip_prefix("*.") {
            Some(suffix) => self.wild_certs.insert(Arc::from(suffix), entry, self.generation),
            None => self.certs.insert(Arc::from(host.as_str()), entry, self.generation),
        };
    }

    fn remove_cert(&mut self, host: &str) {
        match host.strip_prefix("*.") {
            Some(suffix) => self.wild_certs.remove(suffix, self.generation),
            None => self.certs.remove(host, self.generation),
        };
    }

    /// Rebuilds an app's entry after one of its machines changed.
    fn refresh_app(&mut self, name: &str) {
        if let Some(app) = self.apps.get(name).cloned() {
            self.publish_app(&app.name, app.spec.clone());
        }
    }

    /// Stores a fresh entry for the app and points each of its hostnames at it.
    fn publish_app(&mut self, name: &Arc<str>, spec: Arc<AppSpec>) {
        let machines: Arc<[Arc<Machine>]> = self
            .app_machines
            .get(name)
            .map(|ids| ids.iter().filter_map(|id| self.machines.get(id).cloned()).collect())
            .unwrap_or_else(|| Arc::from(Vec::new()));
        let entry = Arc::new(AppEntry {
            name: name.clone(),
            spec: spec.clone(),
            machines,
            series: AppSeries::default(),
        });
        let generation = self.generation;
        self.apps.insert(name.clone(), entry.clone(), generation);
        for h in &spec.hostnames {
            let (map, key) = match h.strip_prefix("*.") {
                Some(suffix) => (&mut self.wild_hosts, suffix),
                None => (&mut self.hosts, h.as_str()),
            };
            if let Some(holder) = map.get(key.as_bytes()).filter(|e| e.name != *name) {
                // `tern apply` refuses this; another writer of the RIB may not have.
                tracing::warn!(target: "tern::catalog", hostname = %h, from = %holder.name, to = %name,
                    "hostname claimed by two apps; the later change wins");
            }
            map.insert(HostKey::from(key), entry.clone(), generation);
        }
        // The address indexes name the app, not its entry, so a machine's change (which
        // publishes the app again) leaves them alone.
        claim(&mut self.private, &spec.private_addrs, name, "private address");
        claim(&mut self.tcp, &tcp_keys(&spec), name, "dedicated address and port");
    }

    /// Drops the address-index entries `old` had and `new` (if any) does not.
    fn unclaim_addrs(&mut self, old: &AppSpec, new: Option<&AppSpec>, app: &str) {
        let private: Vec<_> = old
            .private_addrs
            .iter()
            .filter(|a| new.is_none_or(|n| !n.private_addrs.contains(a)))
            .copied()
            .collect();
        unclaim(&mut self.private, &private, app);
        let kept = new.map(tcp_keys).unwrap_or_default();
        let tcp: Vec<_> = tcp_keys(old).into_iter().filter(|k| !kept.contains(k)).collect();
        unclaim(&mut self.tcp, &tcp, app);
    }

    fn unclaim_host(&mut self, host: &str, app: &str) {
        let generation = self.generation;
        let (map, key) = match host.strip_prefix("*.") {
            Some(suffix) => (&mut self.wild_hosts, suffix),
            None => (&mut self.hosts, host),
        };
        if map.get(key.as_bytes()).is_some_and(|e| &*e.name == app) {
            map.remove(key.as_bytes(), generation);
        }
    }
}

/// The (dedicated address, public port) pairs an app's TCP services are reached on.
pub(super) fn tcp_keys(spec: &AppSpec) -> Vec<(std::net::IpAddr, u16)> {
    let ports = spec.services.iter().flat_map(|s| s.ports.iter().map(|p| p.port));
    spec.addrs.iter().flat_map(|a| ports.clone().map(move |p| (*a, p))).collect()
}

/// Points `keys` at app `name` in an address index, replacing the index only if it changes.
fn claim<K>(index: &mut Arc<std::collections::HashMap<K, Arc<str>>>, keys: &[K], name: &Arc<str>, what: &str)
where
    K: Copy + Eq + std::hash::Hash + std::fmt::Debug,
{
    if keys.iter().all(|k| index.get(k) == Some(name)) {
        return;
    }
    let index = Arc::make_mut(index);
    for k in keys {
        if let Some(holder) = index.get(k).filter(|h| *h != name) {
            // `tern apply` refuses this; another writer of the RIB may not have.
            tracing::warn!(target: "tern::catalog", key = ?k, from = %holder, to = %name,
                "{what} claimed by two apps; the later change wins");
        }
        index.insert(*k, name.clone());
    }
}

/// Removes `keys` from an address index where they still point at `app`.
fn unclaim<K>(index: &mut Arc<std::collections::HashMap<K, Arc<str>>>, keys: &[K], app: &str)
where
    K: Clone + Eq + std::hash::Hash,
{
    if keys.iter().any(|k| index.get(k).is_some_and(|h| &**h == app)) {
        Arc::make_mut(index).retain(|k, h| &**h != app || !keys.contains(k));
    }
}

fn resolve(
    spec: &MachineSpec,
    app: Option<&Arc<AppSpec>>,
    live: Arc<MachineLive>,
    owner: Option<Arc<NodeLive>>,
) -> Machine {
    // Without its app the port is unknown; the machine is unroutable until the app arrives.
    let port = app.map_or(0, |a| a.internal_port);
    Machine { id: spec.id.clone(), addr: spec.addr.resolve(port), spec: spec.clone(), live, owner }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MachineAddr, MachineState};

    fn app(name: &str, hosts: &[&str]) -> AppSpec {
        let mut a: AppSpec = toml::from_str(&format!("name = \"{name}\"")).unwrap();
        a.hostnames = hosts.iter().map(|h| h.to_string()).collect();
        a
    }

    fn machine(id: &str, app: &str, addr: &str, state: MachineState) -> MachineSpec {
        MachineSpec {
            id: id.into(),
            app: app.into(),
            region: "ams".into(),
            addr: addr.parse::<MachineAddr>().unwrap(),
            state,
            cmd: None,
            node: None,
        }
    }

    #[test]
    fn routes_exact_then_wildcard() {
        let mut s = Snapshot::default();
        s.apply(Event::App(app("a", &["a.example.com", "*.a.example.com"])));
        s.apply(Event::App(app("b", &["x.a.example.com"])));
        assert_eq!(&*s.route("a.example.com").unwrap().name, "a");
        assert_eq!(&*s.route("y.a.example.com").unwrap().name, "a");
        assert_eq!(&*s.route("x.a.example.com").unwrap().name, "b");
        assert!(s.route("z.y.a.example.com").is_none(), "a wildcard covers one label");
        assert!(s.route("example.com").is_none());
    }

    #[test]
    fn machines_follow_their_app_in_either_order() {
        let mut s = Snapshot::default();
        s.apply(Event::Machine(machine("m1", "a", "127.0.0.1", MachineState::Started)));
        assert!(s.app("a").is_none());
        let mut a = app("a", &["a.test"]);
        a.internal_port = 9000;
        s.apply(Event::App(a.clone()));
        let entry = s.route("a.test").unwrap();
        assert_eq!(entry.machines.len(), 1);
        assert_eq!(entry.machines[0].addr.to_string(), "127.0.0.1:9000");

        // Changing internal_port re-resolves bare-IP machines.
        a.internal_port = 9100;
        s.apply(Event::App(a));
        assert_eq!(s.route("a.test").unwrap().machines[0].addr.port(), 9100);

        s.apply(Event::RemoveMachine("m1".into()));
        assert!(s.route("a.test").unwrap().machines.is_empty());
    }

    #[test]
    fn hostname_changes_release_old_names_and_snapshots_are_independent() {
        let mut s = Snapshot::default();
        s.apply(Event::App(app("a", &["old.test"])));
        let before = s.clone();
        s.apply(Event::App(app("a", &["new.test"])));
        assert!(s.route("old.test").is_none());
        assert!(s.route("new.test").is_some());
        // The earlier version is untouched: readers holding it see a consistent catalog.
        assert!(before.route("old.test").is_some());
        assert!(before.route("new.test").is_none());
        s.apply(Event::RemoveApp("a".into()));
        assert!(s.route("new.test").is_none());
        assert_eq!(s.app_count(), 0);
    }

    #[test]
    fn live_counters_survive_a_state_change_but_not_a_move() {
        let mut s = Snapshot::default();
        s.apply(Event::App(app("a", &["a.test"])));
        s.apply(Event::Machine(machine("m1", "a", "127.0.0.1:1", MachineState::Started)));
        let guard = s.machine("m1").unwrap().live.begin();
        s.apply(Event::Machine(machine("m1", "a", "127.0.0.1:1", MachineState::Stopped)));
        assert_eq!(s.machine("m1").unwrap().live.in_flight(), 1);
        s.apply(Event::Machine(machine("m1", "a", "127.0.0.1:2", MachineState::Started)));
        assert_eq!(s.machine("m1").unwrap().live.in_flight(), 0);
        drop(guard);
    }

    #[test]
    fn a_resync_while_a_compaction_runs_removes_for_good() {
        let mut s = Snapshot::default();
        s.apply(Event::App(app("a", &["a.test"])));
        s.apply(Event::Machine(machine("m1", "a", "127.0.0.1:1", MachineState::Started)));
        // Taken in the background; the next thing to arrive is a snapshot without them.
        let compaction = s.compact();
        s.retain_only(&HashSet::new());
        let rebased = s.rebase(&compaction);
        assert!(rebased.route("a.test").is_none(), "the removed app came back with the compaction");
        assert!(rebased.app("a").is_none() && rebased.machine("m1").is_none());
        assert_eq!((rebased.app_count(), rebased.machine_count()), (0, 0));
    }

    #[test]
    fn compaction_with_changes_in_between_keeps_every_route() {
        let mut s = Snapshot::default();
        for i in 0..3000 {
            s.apply(Event::App(app(&format!("a{i}"), &[&format!("a{i}.test"), &format!("*.a{i}.test")])));
            s.apply(Event::Machine(machine(
                &format!("m{i}"),
                &format!("a{i}"),
                "127.0.0.1:1",
                MachineState::Started,
            )));
        }
        assert!(s.needs_compaction());
        let compaction = s.compact();
        // Changes that land while the compaction runs in the background.
        let mut reference = s.clone();
        for i in (0..3000).step_by(7) {
            for snap in [&mut s, &mut reference] {
                snap.apply(Event::RemoveApp(format!("a{i}")));
                snap.apply(Event::Machine(machine(
                    &format!("m{}", i + 1),
                    &format!("a{}", i + 1),
                    "127.0.0.1:2",
                    MachineState::Stopped,
                )));
            }
        }
        let rebased = s.rebase(&compaction);
        // 429 apps removed and 429 machine changes (each rewriting its app) since the compaction.
        assert!(
            rebased.delta_len() <= 2 * 429,
            "only the changes made after the compaction stay in the deltas"
        );
        assert!(s.delta_len() >= 3000);
        for i in 0..3000 {
            let (host, wild) = (format!("a{i}.test"), format!("x.a{i}.test"));
            for h in [&host, &wild] {
                let got = rebased.route(h).map(|a| {
                    (a.name.clone(), a.machines.iter().map(|m| (m.addr, m.state())).collect::<Vec<_>>())
                });
                let want = reference.route(h).map(|a| {
                    (a.name.clone(), a.machines.iter().map(|m| (m.addr, m.state())).collect::<Vec<_>>())
                });
                assert_eq!(got, want, "{h}");
            }
        }
        assert_eq!(rebased.app_count(), reference.app_count());
        assert_eq!(rebased.machine_count(), 3000);
    }

    #[test]
    fn private_and_dedicated_addresses_follow_their_apps() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let sock = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let with = |name: &str, private: &[&str], addrs: &[&str]| {
            let mut a = app(name, &[]);
            a.private_addrs = private.iter().map(|p| ip(p)).collect();
            a.addrs = addrs.iter().map(|p| ip(p)).collect();
            a.services =
                toml::from_str::<toml::Table>("[[s]]\ninternal_port = 5432\nports = [{ port = 5432 }]")
                    .unwrap()["s"]
                    .clone()
                    .try_into()
                    .unwrap();
            a
        };
        let name_at = |s: &Snapshot, addr: &str| s.private_app(ip(addr)).map(|a| a.name.to_string());
        let tcp_at = |s: &Snapshot, addr: &str| s.tcp_app(sock(addr)).map(|a| a.name.to_string());
        let mut s = Snapshot::default();
        s.apply(Event::App(with("a", &["fdaa::2", "10.0.0.2"], &["203.0.113.7"])));
        assert_eq!(name_at(&s, "fdaa::2").as_deref(), Some("a"));
        assert_eq!(name_at(&s, "::ffff:10.0.0.2").as_deref(), Some("a"), "a dual-stack listener's view");
        assert_eq!(tcp_at(&s, "203.0.113.7:5432").as_deref(), Some("a"));
        assert_eq!(tcp_at(&s, "203.0.113.7:5433"), None, "no service on that port");

        // A machine's change publishes the app again; the indexes are not rebuilt for it.
        let (private, tcp) = (s.private.clone(), s.tcp.clone());
        s.apply(Event::Machine(machine("m1", "a", "127.0.0.1:1", MachineState::Started)));
        assert!(Arc::ptr_eq(&private, &s.private) && Arc::ptr_eq(&tcp, &s.tcp));

        // Moved: the old addresses are released, and a snapshot taken before keeps its view.
        let before = s.clone();
        s.apply(Event::App(with("a", &["fdaa::3"], &["203.0.113.8"])));
        assert_eq!(name_at(&s, "fdaa::2"), None);
        assert_eq!(name_at(&s, "fdaa::3").as_deref(), Some("a"));
        assert_eq!(
            (tcp_at(&s, "203.0.113.7:5432"), tcp_at(&s, "203.0.113.8:5432").as_deref()),
            (None, Some("a"))
        );
        assert_eq!(name_at(&before, "fdaa::2").as_deref(), Some("a"));

        // Claimed by another app: the later change wins; removing that app leaves a's own.
        s.apply(Event::App(with("b", &["fdaa::3", "fdaa::4"], &[])));
        assert_eq!(name_at(&s, "fdaa::3").as_deref(), Some("b"));
        s.apply(Event::RemoveApp("b".into()));
        assert_eq!((name_at(&s, "fdaa::3"), name_at(&s, "fdaa::4")), (None, None));
        s.apply(Event::RemoveApp("a".into()));
        assert!(s.private.is_empty() && s.tcp.is_empty());
    }

    #[test]
    fn retain_only_removes_what_is_gone() {
        let mut s = Snapshot::default();
        s.apply(Event::App(app("a", &["a.test"])));
        s.apply(Event::App(app("b", &["b.test"])));
        s.apply(Event::Machine(machine("m1", "a", "127.0.0.1:1", MachineState::Started)));
        let present: HashSet<_> = [(Table::Apps, "b".to_string())].into_iter().collect();
        s.retain_only(&present);
        assert!(s.route("a.test").is_none());
        assert!(s.route("b.test").is_some());
        assert_eq!(s.machine_count(), 0);
    }

    #[test]
    fn session_key_rows_become_the_keyring_and_bad_ones_are_skipped() {
        use crate::model::session_key::SessionKeyRow;
        let metrics = crate::telemetry::Metrics::new();
        let row =
            |retire: Option<i64>| SessionKeyRow { secret: [3; 32], created_ms: 1, retire_at_ms: retire };
        let change = |key: &str, body: Option<String>| crate::rib::Change {
            table: Table::SessionKeys,
            key: key.into(),
            body,
            committed_at_ms: 0,
        };
        let s = crate::catalog::updater::apply_changes(
            &Snapshot::default(),
            vec![
                change("1", Some(row(None).to_json())),
                change("01", Some(row(None).to_json())),
                change("2", Some("{not json".into())),
                change("3", Some(r#"{"secret":"AAAA","created_ms":1,"retire_at_ms":null}"#.into())),
            ],
            &metrics,
        );
        assert_eq!(s.keyring().ids().collect::<Vec<_>>(), [1]);
        assert_eq!(metrics.rib_rows_skipped.with_label_values(&["session_keys"]).get(), 3);
        let token = s.keyring().seal("app", "m", b"v").unwrap();

        // A rotation arrives: key 1 retires later, key 4 seals.
        let rotated = crate::catalog::updater::apply_changes(
            &s,
            vec![change("1", Some(row(Some(100)).to_json())), change("4", Some(row(None).to_json()))],
            &metrics,
        );
        assert_eq!(rotated.keyring().sealing_id(), Some(4));
        assert!(rotated.keyring().open("app", token.as_bytes(), 99).is_ok());
        assert_eq!(s.keyring().ids().collect::<Vec<_>>(), [1], "the earlier snapshot is untouched");

        // Compaction keeps it; a resync without the row drops it; a deletion removes it.
        let rebased = rotated.rebase(&rotated.compact());
        assert_eq!(rebased.keyring().ids().collect::<Vec<_>>(), [4, 1]);
        let mut resynced = rebased.clone();
        resynced.retain_only(&[(Table::SessionKeys, "4".to_string())].into_iter().collect());
        assert_eq!(resynced.keyring().ids().collect::<Vec<_>>(), [4]);
        let deleted = crate::catalog::updater::apply_changes(&rebased, vec![change("4", None)], &metrics);
        assert_eq!(deleted.keyring().ids().collect::<Vec<_>>(), [1]);
        assert_eq!(deleted.session_keys().map(|k| k.id).collect::<Vec<_>>(), [1]);
    }
}
