//! `tern apply` into Corrosion: the same plan as for SQLite, read through point queries on
//! this node's agent (a row by its key, a hostname's claimants from `tern_app_hosts`), so an
//! apply costs what it declares, not what the RIB holds; then written in one transaction,
//! app rows and their hostname index together.
//!
//! Corrosion has no compare-and-set: between the reads and the transaction another writer
//! may change what was read, here or on another agent, and the agents merge the two
//! last-writer-wins. docs/rib-corrosion.md says what that means for operators.

use std::cell::RefCell;
use std::collections::HashMap;

use serde_json::Value;

use super::{CALL_DEADLINE, CorrosionRib, delete, put};
use crate::decl::{Current, Declaration, Plan, PlanError};
use crate::rib::corrosion::wire::statement;
use crate::rib::{RibError, Table};

use crate::decl::plan::claimed_hostnames as hostnames;

/// Reads for a plan, each row read once.
struct Reader<'a> {
    rib: &'a CorrosionRib,
    bodies: RefCell<HashMap<(Table, String), Option<String>>>,
}

impl Reader<'_> {
    /// One column of every row `stmt` selects, as text.
    fn strings(&self, what: &str, stmt: Value) -> Result<Vec<String>, RibError> {
        let rows = self.rib.run(async |inner| {
            inner.client.query(&stmt, CALL_DEADLINE).await.map_err(|e| inner.err(what, e))
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|cells| match cells.into_iter().next() {
                Some(Value::String(s)) => Some(s),
                _ => None,
            })
            .collect())
    }
}

impl Current for Reader<'_> {
    fn get(&self, table: Table, key: &str) -> Result<Option<String>, RibError> {
        if let Some(b) = self.bodies.borrow().get(&(table, key.to_string())) {
            return Ok(b.clone());
        }
        let stmt = statement("SELECT body FROM tern_rib WHERE tbl = ? AND key = ?", &[table.as_str(), key]);
        let body = self.strings(&format!("reading {} {key}", table.as_str()), stmt)?.into_iter().next();
        self.bodies.borrow_mut().insert((table, key.to_string()), body.clone());
        Ok(body)
    }

    fn claimants(&self, hostname: &str) -> Result<Vec<String>, RibError> {
        let stmt = statement("SELECT app FROM tern_app_hosts WHERE hostname = ?", &[hostname]);
        self.strings(&format!("reading the claimants of {hostname}"), stmt)
    }

    fn keys(&self, table: Table) -> Result<Vec<String>, RibError> {
        let stmt = statement("SELECT key FROM tern_rib WHERE tbl = ?", &[table.as_str()]);
        self.strings(&format!("listing {}", table.as_str()), stmt)
    }
}

/// The statements that write `writes`, keeping the hostname index of each app written.
fn statements(reader: &Reader<'_>, writes: &[crate::decl::plan::Write]) -> Result<Vec<Value>, RibError> {
    let mut stmts = Vec::with_capacity(writes.len() * 2);
    for w in writes {
        if w.table == Table::Apps {
            let old = hostnames(reader.get(Table::Apps, &w.key)?.as_deref());
            let new = hostnames(w.body.as_deref());
            for h in old.difference(&new) {
                stmts.push(statement(
                    "DELETE FROM tern_app_hosts WHERE hostname = ? AND app = ?",
                    &[h, &w.key],
                ));
            }
            for h in new.difference(&old) {
                stmts.push(statement(
                    "INSERT INTO tern_app_hosts (hostname, app) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    &[h, &w.key],
                ));
            }
        }
        stmts.push(match &w.body {
            Some(body) => put(w.table, &w.key, body),
            None => delete(w.table, &w.key),
        });
    }
    Ok(stmts)
}

/// `tern apply` (and, with `dry_run`, `tern check`) against Corrosion.
pub fn apply(rib: &CorrosionRib, decl: &Declaration, prune: bool, dry_run: bool) -> Result<Plan, PlanError> {
    let reader = Reader { rib, bodies: RefCell::default() };
    let (plan, writes) = crate::decl::plan::plan(&reader, decl, prune)?;
    if dry_run || writes.is_empty() {
        return Ok(plan);
    }
    let stmts = statements(&reader, &writes)?;
    rib.run(async |inner| inner.transact("applying the declaration", &stmts).await)?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_app_body_claims_its_hostnames() {
        let body = r#"{"name":"a","hostnames":["a.test","*.a.test"]}"#;
        assert_eq!(hostnames(Some(body)).into_iter().collect::<Vec<_>>(), ["*.a.test", "a.test"]);
        assert!(hostnames(Some("not json")).is_empty());
        assert!(hostnames(None).is_empty());
    }
}
