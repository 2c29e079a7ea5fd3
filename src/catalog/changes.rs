//! What one published batch changed, for whoever acts on machines beside the request path
//! (the lifecycle manager starts a machine declared `started`, retires a removed one and
//! forgets a removed app's state).
//!
//! The catalog only tells: it defines the message and the updater sends it on a channel
//! after each publication, so nothing here knows who listens (the flow stays one-way).
//! Computing it costs one or two lookups per key the batch touched, never a walk of the
//! whole catalog (except after a full resync, which walks it anyway).

use std::collections::HashSet;
use std::sync::Arc;

use crate::model::AppSpec;
use crate::rib::{Change, Record, Table};

use super::snapshot::{Machine, Snapshot};

/// The feed's sending half, given to [`super::updater::start`].
pub type Feed = tokio::sync::mpsc::UnboundedSender<Changes>;

/// One batch's effect on apps and machines, as published.
#[derive(Debug, Default)]
pub struct Changes {
    /// Machines added, or whose record (or app) changed: the published version. A reader
    /// acting later should look the id up again: a newer batch may have changed it since.
    pub machines: Vec<Arc<Machine>>,
    /// Machines that left the catalog, as the last snapshot held them: their live state
    /// (requests in flight, streams) goes with them, and with it the spec of their app
    /// then, if it was there (its `kill_timeout`, say).
    pub removed_machines: Vec<(Arc<Machine>, Option<Arc<AppSpec>>)>,
    /// Apps that left the catalog.
    pub removed_apps: Vec<Arc<str>>,
    /// Machines still in the catalog whose address or command changed (their app's
    /// `internal_port`, say): the version before, with its app's spec then. A process
    /// running the old version must make way for the new one.
    pub redeclared: Vec<(Arc<Machine>, Option<Arc<AppSpec>>)>,
    /// Apps still in the catalog whose spec changed: what was decided under the old one
    /// (a replay cache rule's index, say) may mean something else now.
    pub redeclared_apps: Vec<Arc<str>>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.machines.is_empty()
            && self.removed_machines.is_empty()
            && self.removed_apps.is_empty()
            && self.redeclared.is_empty()
            && self.redeclared_apps.is_empty()
    }
}

/// The app and machine keys a batch may have changed.
#[derive(Debug, Default)]
pub struct Touched {
    apps: HashSet<Arc<str>>,
    machines: HashSet<Arc<str>>,
}

impl Touched {
    /// The keys a batch of changes names (whether or not each one decodes or differs).
    pub fn of_changes(changes: &[Change]) -> Touched {
        let mut t = Touched::default();
        for c in changes {
            t.note(c.table, &c.key);
        }
        t
    }

    /// Every key a full resync may touch: those in the snapshot and those in the catalog.
    pub fn of_resync(current: &Snapshot, records: &[Record]) -> Touched {
        let mut t = Touched::default();
        for r in records {
            t.note(r.table, &r.key);
        }
        t.apps.extend(current.apps.keys().cloned());
        t.machines.extend(current.machines.keys().cloned());
        t
    }

    fn note(&mut self, table: Table, key: &str) {
        match table {
            Table::Apps => {
                self.apps.insert(Arc::from(key));
            }
            Table::Machines => {
                self.machines.insert(Arc::from(key));
            }
            Table::Certificates | Table::MachineStates | Table::SessionKeys | Table::Nodes | Table::Orgs => {}
        }
    }

    /// What changed between `prev` and `next` under the touched keys. An app that changed
    /// brings its machines along: they resolve their address through it, and a re-added
    /// app brings back machines that waited for it.
    pub fn diff(&self, prev: &Snapshot, next: &Snapshot) -> Changes {
        let mut out = Changes::default();
        let mut seen: HashSet<Arc<str>> = HashSet::new();
        let mut changed = |m: &Arc<Machine>, out: &mut Changes| {
            if !seen.insert(m.id.clone()) {
                return;
            }
            out.machines.push(m.clone());
            if let Some(before) = prev.machine(&m.id)
                && (before.addr != m.addr || before.spec.cmd != m.spec.cmd || before.spec.node != m.spec.node)
            {
                let app = prev.app(&before.spec.app).map(|e| e.spec.clone());
                out.redeclared.push((before.clone(), app));
            }
        };
        for id in &self.machines {
            match (prev.machine(id), next.machine(id)) {
                (Some(a), Some(b)) if Arc::ptr_eq(a, b) => {}
                (_, Some(b)) => changed(b, &mut out),
                (Some(a), None) => {
                    let app = prev.app(&a.spec.app).map(|e| e.spec.clone());
                    out.removed_machines.push((a.clone(), app));
                }
                (None, None) => {}
            }
        }
        for name in &self.apps {
            match (prev.app(name), next.app(name)) {
                (Some(a), Some(b)) if Arc::ptr_eq(&a.spec, &b.spec) => {}
                (a, Some(b)) => {
                    if a.is_some_and(|a| a.spec != b.spec) {
                        out.redeclared_apps.push(name.clone());
                    }
                    b.machines.iter().for_each(|m| changed(m, &mut out));
                }
                (Some(_), None) => out.removed_apps.push(name.clone()),
                (None, None) => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Event;
    use crate::model::{MachineSpec, MachineState};

    fn app(name: &str) -> AppSpec {
        toml::from_str(&format!("name = \"{name}\"\nhostnames = [\"{name}.test\"]")).unwrap()
    }

    fn machine(id: &str, app: &str, state: MachineState) -> MachineSpec {
        MachineSpec {
            id: id.into(),
            app: app.into(),
            region: "".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            state,
            cmd: None,
            node: None,
        }
    }

    fn change(table: Table, key: &str) -> Change {
        Change { table, key: key.into(), body: None, committed_at_ms: 0 }
    }

    #[test]
    fn a_batch_reports_added_changed_and_removed_keys_only() {
        let mut prev = Snapshot::default();
        prev.apply(Event::App(app("a")));
        prev.apply(Event::App(app("b")));
        prev.apply(Event::Machine(machine("m1", "a", MachineState::Stopped)));
        prev.apply(Event::Machine(machine("m2", "a", MachineState::Started)));
        prev.apply(Event::Machine(machine("m3", "b", MachineState::Started)));
        let mut next = prev.clone();
        next.apply(Event::Machine(machine("m1", "a", MachineState::Started)));
        next.apply(Event::Machine(machine("m4", "a", MachineState::Started)));
        next.apply(Event::RemoveMachine("m3".into()));
        next.apply(Event::RemoveApp("b".into()));
        let touched = Touched::of_changes(&[
            change(Table::Machines, "m1"),
            change(Table::Machines, "m4"),
            change(Table::Machines, "m3"),
            change(Table::Apps, "b"),
            change(Table::MachineStates, "m2"),
        ]);
        let c = touched.diff(&prev, &next);
        let mut ids: Vec<&str> = c.machines.iter().map(|m| &*m.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["m1", "m4"], "m2 was not touched");
        let removed: Vec<(&str, Option<&str>)> =
            c.removed_machines.iter().map(|(m, a)| (&*m.id, a.as_ref().map(|a| a.name.as_str()))).collect();
        assert_eq!(removed, [("m3", Some("b"))], "with the app it had");
        assert_eq!(c.removed_apps, [Arc::from("b")]);

        // An unchanged key is no change; a changed app brings its machines.
        let same = Touched::of_changes(&[change(Table::Machines, "m2")]).diff(&next, &next);
        assert!(same.is_empty());
        let mut again = next.clone();
        let mut a = app("a");
        a.internal_port = 9000;
        again.apply(Event::App(a));
        let c = Touched::of_changes(&[change(Table::Apps, "a")]).diff(&next, &again);
        assert_eq!(c.machines.len(), 3);
        assert_eq!(c.redeclared_apps, [Arc::from("a")]);
    }
}
