//! `tern apply` into etcd: the same plan as for SQLite, read at one revision through point
//! reads, then written in one transaction guarded on everything it read. If anything it read
//! changed meanwhile, the guard fails, nothing is written, and the plan is made again.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use super::{ATTEMPTS, EtcdRib, delete, prefix_end, proto, put, unchanged_since};
use crate::decl::{Current, Declaration, Plan, PlanError};
use crate::rib::{RibError, Table};

/// The hostname index: `app_hosts/HOSTNAME/APP`, value `APP`.
fn index_key(rib: &EtcdRib, hostname: &str, app: &str) -> Vec<u8> {
    format!("{}app_hosts/{hostname}/{app}", rib.inner().prefix).into_bytes()
}

fn index_prefix(rib: &EtcdRib, hostname: &str) -> Vec<u8> {
    format!("{}app_hosts/{hostname}/", rib.inner().prefix).into_bytes()
}

use crate::decl::plan::claimed_hostnames as hostnames;

/// Reads for a plan, all at one revision, remembering what was read.
struct Reader<'a> {
    rib: &'a EtcdRib,
    /// The revision every read is made at (taken from the first).
    rev: Cell<i64>,
    /// What was read: a key (`end` empty) or a range.
    read: RefCell<Vec<(Vec<u8>, Vec<u8>)>>,
    bodies: RefCell<HashMap<(Table, String), Option<String>>>,
}

fn rib_err(e: super::GrpcError) -> RibError {
    RibError::Other(e.to_string())
}

impl Reader<'_> {
    fn note(&self, key: Vec<u8>, end: Vec<u8>, rev: i64) {
        if self.rev.get() == 0 {
            self.rev.set(rev);
        }
        self.read.borrow_mut().push((key, end));
    }

    /// One guard per thing read: none of it modified after the plan's revision.
    fn guards(&self) -> Vec<proto::Compare> {
        let mut read = self.read.borrow().clone();
        read.sort();
        read.dedup();
        read.into_iter().map(|(k, e)| unchanged_since(k, e, self.rev.get())).collect()
    }

    fn body(&self, table: Table, key: &str) -> Result<Option<String>, RibError> {
        if let Some(b) = self.bodies.borrow().get(&(table, key.to_string())) {
            return Ok(b.clone());
        }
        let k = self.rib.inner().key(table, key);
        let at = self.rev.get();
        let (value, _, rev) = self.rib.run(async |inner| inner.get(k.clone(), at).await).map_err(rib_err)?;
        self.note(k, Vec::new(), rev);
        let body = value.map(|v| String::from_utf8_lossy(&v).into_owned());
        self.bodies.borrow_mut().insert((table, key.to_string()), body.clone());
        Ok(body)
    }

    fn range_keys(&self, p: Vec<u8>) -> Result<Vec<Vec<u8>>, RibError> {
        let end = prefix_end(&p);
        let at = self.rev.get();
        let (kvs, rev, _) = self
            .rib
            .run(async |inner| inner.range_all(p.clone(), end.clone(), at, true).await)
            .map_err(rib_err)?;
        self.note(p, end, rev);
        Ok(kvs.into_iter().map(|kv| kv.key).collect())
    }
}

impl Current for Reader<'_> {
    fn get(&self, table: Table, key: &str) -> Result<Option<String>, RibError> {
        self.body(table, key)
    }

    fn claimants(&self, hostname: &str) -> Result<Vec<String>, RibError> {
        let p = index_prefix(self.rib, hostname);
        let keys = self.range_keys(p.clone())?;
        Ok(keys
            .iter()
            .filter_map(|k| std::str::from_utf8(k.get(p.len()..)?).ok().map(String::from))
            .collect())
    }

    fn keys(&self, table: Table) -> Result<Vec<String>, RibError> {
        let keys = self.range_keys(self.rib.inner().table_prefix(table.as_str()))?;
        Ok(keys.iter().filter_map(|k| self.rib.inner().parse_key(k).map(|(_, key)| key)).collect())
    }
}

/// `tern apply` (and, with `dry_run`, `tern check`) against etcd.
pub fn apply(rib: &EtcdRib, decl: &Declaration, prune: bool, dry_run: bool) -> Result<Plan, PlanError> {
    for _ in 0..ATTEMPTS {
        let reader = Reader { rib, rev: Cell::new(0), read: RefCell::default(), bodies: RefCell::default() };
        let (plan, writes) = crate::decl::plan::plan(&reader, decl, prune)?;
        if dry_run || writes.is_empty() {
            return Ok(plan);
        }
        let mut ops = Vec::new();
        for w in &writes {
            if w.table == Table::Apps {
                let old = hostnames(reader.body(Table::Apps, &w.key)?.as_deref());
                let new = hostnames(w.body.as_deref());
                for h in old.difference(&new) {
                    ops.push(delete(index_key(rib, h, &w.key)));
                }
                for h in new.difference(&old) {
                    ops.push(put(index_key(rib, h, &w.key), w.key.clone().into_bytes()));
                }
            }
            let key = rib.inner().key(w.table, &w.key);
            ops.push(match &w.body {
                Some(body) => put(key, body.clone().into_bytes()),
                None => delete(key),
            });
        }
        let txn = proto::TxnRequest { compare: reader.guards(), success: ops, failure: vec![] };
        let done = rib.run(async |inner| inner.txn(txn.clone()).await).map_err(|e| {
            let hint = if e.to_string().contains("too many operations") {
                " (etcd's --max-txn-ops limits one transaction: raise it, or apply in smaller declarations)"
            } else {
                ""
            };
            PlanError::Rib(RibError::Other(format!("{e}{hint}")))
        })?;
        if done.succeeded {
            return Ok(plan);
        }
        tracing::info!(target: "tern::rib", "the RIB changed while the apply was planned; planning again");
    }
    Err(PlanError::Rib(RibError::Other(format!(
        "the RIB kept changing while the apply was planned ({ATTEMPTS} attempts); nothing was applied"
    ))))
}
