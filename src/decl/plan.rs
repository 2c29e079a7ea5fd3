//! Applying a declaration to the RIB: one transaction that reads what is there, checks the
//! result as a whole (no hostname claimed twice, no machine without its app), and writes
//! only the rows that change. Either all of it lands or none of it. `tern check` runs the
//! same plan over a read-only view ([`dry_run`]), so it refuses exactly what `apply` would.

use std::collections::HashMap;
use std::fmt;

use serde::Serialize;

use crate::model::{AppSpec, CertSpec, MachineSpec, OrgSpec, StateRow};
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
                Table::Nodes => "node",
                Table::Orgs => "org",
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

/// What a plan reads: point lookups (and, for `--prune`, the keys of a table), so that an
/// apply costs what it declares, not what the RIB holds. Implemented by a write transaction
/// (`apply`), a read-only view (`check`) and each distributed store's reader.
pub trait Current {
    /// The body of one row, if the RIB holds it.
    fn get(&self, table: Table, key: &str) -> Result<Option<String>, RibError>;
    /// The apps whose rows claim `hostname` (the store's hostname index), in any order.
    fn claimants(&self, hostname: &str) -> Result<Vec<String>, RibError>;
    /// Every key of `table`: only `--prune` asks, and it has to look at everything.
    fn keys(&self, table: Table) -> Result<Vec<String>, RibError>;
}

impl Current for Tx<'_> {
    fn get(&self, table: Table, key: &str) -> Result<Option<String>, RibError> {
        Tx::get(self, table, key)
    }
    fn claimants(&self, hostname: &str) -> Result<Vec<String>, RibError> {
        Tx::claimants(self, hostname)
    }
    fn keys(&self, table: Table) -> Result<Vec<String>, RibError> {
        Tx::keys(self, table)
    }
}

impl Current for ReadOnly {
    fn get(&self, table: Table, key: &str) -> Result<Option<String>, RibError> {
        Ok(ReadOnly::get(self, table, key))
    }
    fn claimants(&self, hostname: &str) -> Result<Vec<String>, RibError> {
        Ok(ReadOnly::claimants(self, hostname))
    }
    fn keys(&self, table: Table) -> Result<Vec<String>, RibError> {
        Ok(ReadOnly::keys(self, table))
    }
}

/// The hostnames an app row's body claims (none, if it does not decode that far): what a
/// store's hostname index holds for it. Shared by the stores that keep the index themselves.
pub fn claimed_hostnames(body: Option<&str>) -> std::collections::BTreeSet<String> {
    #[derive(serde::Deserialize)]
    struct Hosts {
        #[serde(default)]
        hostnames: Vec<String>,
    }
    body.and_then(|b| serde_json::from_str::<Hosts>(b).ok())
        .map(|h| h.hostnames.into_iter().collect())
        .unwrap_or_default()
}

/// One row to write: `body` `None` deletes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub table: Table,
    pub key: String,
    pub body: Option<String>,
}

/// Writes `decl` into the RIB: upsert by key; with `prune`, also delete every row `decl`
/// does not name. With `dry_run`, checks and plans without writing.
pub fn apply(store: &mut Store, decl: &Declaration, prune: bool, dry_run: bool) -> Result<Plan, PlanError> {
    store.transact(|tx| {
        let (plan, writes) = plan(tx, decl, prune)?;
        if !dry_run {
            for w in writes {
                match w.body {
                    Some(body) => tx.put(&Record { table: w.table, key: w.key, body })?,
                    None => {
                        tx.delete(w.table, &w.key)?;
                    }
                }
            }
        }
        Ok(plan)
    })
}

/// What `apply` would do to `current`, refused exactly as `apply` would refuse it.
pub fn dry_run(current: &impl Current, decl: &Declaration, prune: bool) -> Result<Plan, PlanError> {
    plan(current, decl, prune).map(|(plan, _)| plan)
}

/// The plan for `decl` against `current`, and the rows it writes. Stores that cannot hold a
/// transaction open across the reads (etcd) commit the writes guarded on what was read.
pub fn plan(
    current: &impl Current,
    decl: &Declaration,
    prune: bool,
) -> Result<(Plan, Vec<Write>), PlanError> {
    let mut plan = Plan::default();
    diff(&mut plan, current, Table::Orgs, decl.orgs.iter().map(|o| (o.name.as_str(), o)), prune)?;
    diff(&mut plan, current, Table::Apps, decl.apps.iter().map(|a| (a.name.as_str(), a)), prune)?;
    diff(&mut plan, current, Table::Machines, decl.machines.iter().map(|m| (&*m.id, m)), prune)?;
    diff(
        &mut plan,
        current,
        Table::Certificates,
        decl.certificates.iter().map(|c| (c.hostname.as_str(), c)),
        prune,
    )?;
    check_result(current, decl, prune, &plan)?;
    let writes = writes(decl, &plan)?;
    Ok((plan, writes))
}

fn diff<'a, T: Serialize + 'a>(
    plan: &mut Plan,
    current: &impl Current,
    table: Table,
    declared: impl Iterator<Item = (&'a str, &'a T)>,
    prune: bool,
) -> Result<(), PlanError> {
    let mut named = std::collections::HashSet::new();
    for (key, spec) in declared {
        named.insert(key.to_string());
        let new = serde_json::to_value(spec).map_err(|e| PlanError::Encode(key.into(), e))?;
        let op = match current.get(table, key)? {
            None => Some(Op::Add),
            Some(body) => match serde_json::from_str::<serde_json::Value>(&body) {
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
        let mut gone: Vec<String> = current.keys(table)?.into_iter().filter(|k| !named.contains(k)).collect();
        gone.sort();
        for key in gone {
            plan.changes.push(Planned { op: Op::Remove, table, key });
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
        Table::Nodes => through::<crate::model::NodeRow>(v),
        Table::Orgs => through::<OrgSpec>(v),
    }
}

fn changed_fields(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let (Some(old), Some(new)) = (old.as_object(), new.as_object()) else { return vec!["(all)".into()] };
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter().filter(|k| old.get(*k) != new.get(*k)).cloned().collect()
}

/// Checks the RIB as it will be after the apply, looking only at what the declaration
/// names: each declared hostname is claimed by no app the RIB keeps, and each declared
/// machine's app is declared or kept. A conflict points at the declaration's field. (Two
/// kept apps claiming one hostname between them is not this apply's business: the catalog
/// refuses the later one, as it always has.)
fn check_result(
    current: &impl Current,
    decl: &Declaration,
    prune: bool,
    plan: &Plan,
) -> Result<(), PlanError> {
    let declared = |name: &str| decl.apps.iter().any(|a| a.name == name);
    // An app the RIB keeps (not replaced by this declaration, nor pruned) whose row decodes.
    let kept = |name: &str| -> Result<Option<AppSpec>, PlanError> {
        if prune || declared(name) {
            return Ok(None);
        }
        let Some(body) = current.get(Table::Apps, name)? else { return Ok(None) };
        match serde_json::from_str::<AppSpec>(&body) {
            Ok(a) => Ok(Some(a)),
            Err(e) => {
                tracing::warn!(target: "tern::rib", app = %name, error = %e,
                    "existing app row does not decode; ignored for the hostname check");
                Ok(None)
            }
        }
    };
    if !prune {
        for (i, a) in decl.apps.iter().enumerate() {
            for (j, h) in a.hostnames.iter().enumerate() {
                let mut claimants = current.claimants(h)?;
                claimants.sort();
                for other in claimants {
                    // The index may lag a row that no longer claims it; the row decides.
                    if kept(&other)?.is_some_and(|spec| spec.hostnames.contains(h)) {
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
        }
    }
    check_orgs(current, decl, prune, plan)?;
    for (i, m) in decl.machines.iter().enumerate() {
        if !declared(&m.app) && kept(&m.app)?.is_none() {
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

/// The org rules, against the RIB as it will be: an app never moves to another org (a
/// name taken in one org is not another org's to reuse: remove the app first), and an app
/// with private addresses names an org that is declared or kept, whose networks say who
/// may reach them.
fn check_orgs(current: &impl Current, decl: &Declaration, prune: bool, plan: &Plan) -> Result<(), PlanError> {
    // The diff already read every declared app's row: only one whose org changed is read again
    // (for the message), so an apply costs no extra read per app.
    let org_changed = |name: &str| {
        plan.changes.iter().any(|c| {
            c.table == Table::Apps
                && c.key == name
                && matches!(&c.op, Op::Change(f) if f.iter().any(|f| f == "org"))
        })
    };
    for (i, a) in decl.apps.iter().enumerate() {
        let path = [Seg::Key("apps"), Seg::Index(i), Seg::Key("org")];
        if org_changed(&a.name)
            && let Some(body) = current.get(Table::Apps, &a.name)?
            && let Ok(old) = serde_json::from_str::<AppSpec>(&body)
            && old.org != a.org
        {
            return Err(PlanError::Conflict(decl.problem_at(
                &path,
                format!(
                    "app {:?} belongs to org {:?} in the RIB; an app does not move between orgs \
                     (apply without it and with --prune to remove it, then declare it anew)",
                    a.name, old.org
                ),
            )));
        }
        if a.private_addrs.is_empty() || decl.orgs.iter().any(|o| o.name == a.org) {
            continue;
        }
        if prune || current.get(Table::Orgs, &a.org)?.is_none() {
            return Err(PlanError::Conflict(decl.problem_at(
                &path,
                format!(
                    "app {:?} has private_addrs but its org {:?} is not declared ([[orgs]] name = {:?}, \
                     networks = [...]): nobody could reach them",
                    a.name, a.org, a.org
                ),
            )));
        }
    }
    Ok(())
}

/// The rows a plan writes, in its order.
fn writes(decl: &Declaration, plan: &Plan) -> Result<Vec<Write>, PlanError> {
    fn encode<T: Serialize>(key: &str, v: &T) -> Result<String, PlanError> {
        serde_json::to_string(v).map_err(|e| PlanError::Encode(key.into(), e))
    }
    let apps: HashMap<&str, &AppSpec> = decl.apps.iter().map(|a| (a.name.as_str(), a)).collect();
    let machines: HashMap<&str, &MachineSpec> = decl.machines.iter().map(|m| (&*m.id, m)).collect();
    let certs: HashMap<&str, &CertSpec> =
        decl.certificates.iter().map(|c| (c.hostname.as_str(), c)).collect();
    let orgs: HashMap<&str, &OrgSpec> = decl.orgs.iter().map(|o| (o.name.as_str(), o)).collect();
    let mut out = Vec::with_capacity(plan.changes.len());
    for c in &plan.changes {
        // A machine removed, or declared in a new state, drops its recorded lifecycle
        // state: what the operator declares wins over what the machine was doing.
        let restated = match &c.op {
            Op::Remove => true,
            Op::Change(fields) => fields.iter().any(|f| f == "state"),
            Op::Add => false,
        };
        if c.table == Table::Machines && restated {
            out.push(Write { table: Table::MachineStates, key: c.key.clone(), body: None });
        }
        if c.op == Op::Remove {
            out.push(Write { table: c.table, key: c.key.clone(), body: None });
            continue;
        }
        let body = match c.table {
            Table::Apps => apps.get(c.key.as_str()).map(|a| encode(&c.key, a)),
            Table::Machines => machines.get(c.key.as_str()).map(|m| encode(&c.key, m)),
            Table::Certificates => certs.get(c.key.as_str()).map(|x| encode(&c.key, x)),
            Table::Orgs => orgs.get(c.key.as_str()).map(|o| encode(&c.key, o)),
            // Never declared: a plan holds no changes to them.
            Table::MachineStates | Table::SessionKeys | Table::Nodes => None,
        };
        if let Some(body) = body {
            out.push(Write { table: c.table, key: c.key.clone(), body: Some(body?) });
        }
    }
    Ok(out)
}
