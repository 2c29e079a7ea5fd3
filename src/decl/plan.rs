//! Applying a declaration to the RIB: one transaction that reads what is there, checks the
//! result as a whole (no hostname claimed twice, no machine without its app), and writes
//! only the rows that change. Either all of it lands or none of it. `tern check` runs the
//! same plan over a read-only view ([`dry_run`]), so it refuses exactly what `apply` would.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::Serialize;

use crate::model::{AppSpec, CertSpec, MachineSpec, StateRow};
use crate::rib::sqlite::{ReadOnly, Store, Tx};
use crate::rib::{Record, RibError, Table};

use super::{Declaration, Problem, Seg};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Rib(#[from] RibError),
    /// The declaration is valid alone but not with what the RIB holds; the problem names
    /// the declaration's file, line and field.
    #[error(transparent)]
    Conflict(Problem),
    #[error("cannot encode {0}: {1}")]
    Encode(String, serde_json::Error),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Add,
    /// The fields that differ.
    Change(Vec<String>),
    Remove,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub op: Op,
    pub table: Table,
    pub key: String,
}

/// What an apply changed (or, with `dry_run`, would change).
#[derive(Debug, Default, Clone)]
pub struct Plan {
    pub changes: Vec<Planned>,
    pub unchanged: usize,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.changes {
            let what = match c.table {
                Table::Apps => "app",
                Table::Machines => "machine",
                Table::Certificates => "certificate",
                Table::MachineStates => "machine state",
                Table::SessionKeys => "session key",
            };
            match &c.op {
                Op::Add => writeln!(f, "+ {what} {}", c.key)?,
                Op::Change(fields) => writeln!(f, "~ {what} {} ({})", c.key, fields.join(", "))?,
                Op::Remove => writeln!(f, "- {what} {}", c.key)?,
            }
        }
        write!(f, "{} changed, {} unchanged", self.changes.len(), self.unchanged)
    }
}

/// The rows a plan is made against: a write transaction (`apply`) or a read-only view
/// (`check`).
pub trait Current {
    fn all(&self, table: Table) -> Result<Vec<Record>, RibError>;
}

impl Current for Tx<'_> {
    fn all(&self, table: Table) -> Result<Vec<Record>, RibError> {
        Tx::all(self, table)
    }
}

impl Current for ReadOnly {
    fn all(&self, table: Table) -> Result<Vec<Record>, RibError> {
        ReadOnly::all(self, table)
    }
}

/// Writes `decl` into the RIB: upsert by key; with `prune`, also delete every row `decl`
/// does not name. With `dry_run`, checks and plans without writing.
pub fn apply(store: &mut Store, decl: &Declaration, prune: bool, dry_run: bool) -> Result<Plan, PlanError> {
    store.transact(|tx| {
        let plan = plan(tx, decl, prune)?;
        if !dry_run {
            write(tx, decl, &plan)?;
        }
        Ok(plan)
    })
}

/// What `apply` would do to `current`, refused exactly as `apply` would refuse it.
pub fn dry_run(current: &impl Current, decl: &Declaration, prune: bool) -> Result<Plan, PlanError> {
    plan(current, decl, prune)
}

fn plan(tx: &impl Current, decl: &Declaration, prune: bool) -> Result<Plan, PlanError> {
    let current_apps = rows(tx, Table::Apps)?;
    let current_machines = rows(tx, Table::Machines)?;
    let current_certs = rows(tx, Table::Certificates)?;
    let mut plan = Plan::default();
    diff(&mut plan, Table::Apps, &current_apps, decl.apps.iter().map(|a| (a.name.as_str(), a)), prune)?;
    diff(
        &mut plan,
        Table::Machines,
        &current_machines,
        decl.machines.iter().map(|m| (m.id.as_str(), m)),
        prune,
    )?;
    diff(
        &mut plan,
        Table::Certificates,
        &current_certs,
        decl.certificates.iter().map(|c| (c.hostname.as_str(), c)),
        prune,
    )?;
    check_result(decl, &current_apps, prune)?;
    Ok(plan)
}

fn rows(tx: &impl Current, table: Table) -> Result<BTreeMap<String, String>, PlanError> {
    Ok(tx.all(table)?.into_iter().map(|r| (r.key, r.body)).collect())
}

fn diff<'a, T: Serialize + 'a>(
    plan: &mut Plan,
    table: Table,
    current: &BTreeMap<String, String>,
    declared: impl Iterator<Item = (&'a str, &'a T)>,
    prune: bool,
) -> Result<(), PlanError> {
    let mut named = std::collections::HashSet::new();
    for (key, spec) in declared {
        named.insert(key.to_string());
        let new = serde_json::to_value(spec).map_err(|e| PlanError::Encode(key.into(), e))?;
        let op = match current.get(key) {
            None => Some(Op::Add),
            Some(body) => match serde_json::from_str::<serde_json::Value>(body) {
                Ok(old) if normalised(table, &old) == Some(new.clone()) => None,
                Ok(old) => Some(Op::Change(changed_fields(&old, &new))),
                Err(_) => Some(Op::Change(vec!["(undecodable row replaced)".into()])),
            },
        };
        match op {
            Some(op) => plan.changes.push(Planned { op, table, key: key.into() }),
            None => plan.unchanged += 1,
        }
    }
    if prune {
        for key in current.keys().filter(|k| !named.contains(*k)) {
            plan.changes.push(Planned { op: Op::Remove, table, key: key.clone() });
        }
    }
    Ok(())
}

/// An existing body re-encoded through its type, so rows written by an older tern (fewer
/// default fields) compare equal to the same declaration today.
fn normalised(table: Table, v: &serde_json::Value) -> Option<serde_json::Value> {
    fn through<T: serde::de::DeserializeOwned + Serialize>(
        v: &serde_json::Value,
    ) -> Option<serde_json::Value> {
        serde_json::to_value(serde_json::from_value::<T>(v.clone()).ok()?).ok()
    }
    match table {
        Table::Apps => through::<AppSpec>(v),
        Table::Machines => through::<MachineSpec>(v),
        Table::Certificates => through::<CertSpec>(v),
        Table::MachineStates => through::<StateRow>(v),
        Table::SessionKeys => through::<crate::model::session_key::SessionKeyRow>(v),
    }
}

fn changed_fields(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let (Some(old), Some(new)) = (old.as_object(), new.as_object()) else { return vec!["(all)".into()] };
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter().filter(|k| old.get(*k) != new.get(*k)).cloned().collect()
}

/// Checks the RIB as it will be after the apply: hostnames unique across all apps, and
/// every declared machine's app present. A conflict points at the declaration's field.
fn check_result(
    decl: &Declaration,
    current_apps: &BTreeMap<String, String>,
    prune: bool,
) -> Result<(), PlanError> {
    // Apps the RIB keeps that this declaration does not replace (none with --prune).
    let mut kept: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    if !prune {
        for (name, body) in current_apps {
            if decl.apps.iter().any(|a| &a.name == name) {
                continue;
            }
            match serde_json::from_str::<AppSpec>(body) {
                Ok(a) => {
                    kept.insert(name, a.hostnames);
                }
                Err(e) => tracing::warn!(target: "tern::rib", app = %name, error = %e,
                    "existing app row does not decode; ignored for the hostname check"),
            }
        }
    }
    let mut owner: HashMap<&str, &str> = HashMap::new();
    for (name, hosts) in &kept {
        for h in hosts {
            if let Some(other) = owner.insert(h, name) {
                return Err(PlanError::Conflict(Problem {
                    file: decl.file.clone(),
                    line: 0,
                    field: String::new(),
                    message: format!(
                        "the RIB already has hostname {h:?} claimed by both app {other:?} and app \
                         {name:?}; fix the RIB (or apply with --prune) before applying"
                    ),
                }));
            }
        }
    }
    for (i, a) in decl.apps.iter().enumerate() {
        for (j, h) in a.hostnames.iter().enumerate() {
            if let Some(other) = owner.get(h.as_str()) {
                let path = [Seg::Key("apps"), Seg::Index(i), Seg::Key("hostnames"), Seg::Index(j)];
                return Err(PlanError::Conflict(decl.problem_at(
                    &path,
                    format!(
                        "hostname {h:?} is already claimed by app {other:?} in the RIB; remove it \
                         from one of them (or apply with --prune if {other:?} should go)"
                    ),
                )));
            }
        }
    }
    for (i, m) in decl.machines.iter().enumerate() {
        if !kept.contains_key(m.app.as_str()) && !decl.apps.iter().any(|a| a.name == m.app) {
            let path = [Seg::Key("machines"), Seg::Index(i), Seg::Key("app")];
            return Err(PlanError::Conflict(decl.problem_at(
                &path,
                format!(
                    "machine {:?} belongs to app {:?}, which is neither declared nor in the RIB",
                    m.id, m.app
                ),
            )));
        }
    }
    Ok(())
}

fn write(tx: &Tx<'_>, decl: &Declaration, plan: &Plan) -> Result<(), PlanError> {
    fn encode<T: Serialize>(key: &str, v: &T) -> Result<String, PlanError> {
        serde_json::to_string(v).map_err(|e| PlanError::Encode(key.into(), e))
    }
    let apps: HashMap<&str, &AppSpec> = decl.apps.iter().map(|a| (a.name.as_str(), a)).collect();
    let machines: HashMap<&str, &MachineSpec> = decl.machines.iter().map(|m| (m.id.as_str(), m)).collect();
    let certs: HashMap<&str, &CertSpec> =
        decl.certificates.iter().map(|c| (c.hostname.as_str(), c)).collect();
    for c in &plan.changes {
        // A machine removed, or declared in a new state, drops its recorded lifecycle
        // state: what the operator declares wins over what the machine was doing.
        let restated = match &c.op {
            Op::Remove => true,
            Op::Change(fields) => fields.iter().any(|f| f == "state"),
            Op::Add => false,
        };
        if c.table == Table::Machines && restated {
            tx.delete(Table::MachineStates, &c.key)?;
        }
        if c.op == Op::Remove {
            tx.delete(c.table, &c.key)?;
            continue;
        }
        let body = match c.table {
            Table::Apps => apps.get(c.key.as_str()).map(|a| encode(&c.key, a)),
            Table::Machines => machines.get(c.key.as_str()).map(|m| encode(&c.key, m)),
            Table::Certificates => certs.get(c.key.as_str()).map(|x| encode(&c.key, x)),
            // Never declared: a plan holds no changes to them.
            Table::MachineStates | Table::SessionKeys => None,
        };
        if let Some(body) = body {
            tx.put(&Record { table: c.table, key: c.key.clone(), body: body? })?;
        }
    }
    Ok(())
}
