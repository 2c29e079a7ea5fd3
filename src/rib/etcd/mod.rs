//! The RIB on etcd (v3 API, 3.4 and later), for fleets: every node follows one prefix.
//!
//! Layout under the prefix (default `/tern/`): one key per row, `TABLE/KEY`, holding the
//! same JSON body the SQLite RIB holds (`apps/hello`, `machines/hello-1`,
//! `certificates/hello.example.com`, `machine_states/hello-1`, `session_keys/1`), and the
//! hostname index `tern apply` keeps, `app_hosts/HOSTNAME/APP`. Other keys under the prefix
//! are ignored (docs/rib-etcd.md).
//!
//! Following it ([`watch`]): range the prefix (one revision, paged), then watch from that
//! revision + 1. A broken stream is re-watched from the last revision seen, which etcd
//! replays in order, so nothing is lost; a watch cancelled for compaction, or a cluster
//! that is not the one the cursor came from, is a resync. A quiet stream is probed with a
//! progress request; one left unanswered counts as broken.
//!
//! Writing: every write that depends on what it read (`tern apply`, a lifecycle state, a
//! key rotation) is one transaction guarded on the revisions of what it read, retried when
//! the guard fails.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{ClientRuntime, Cursor, Record, Rib, RibError, Rotated, Subscription, Table};
use crate::model::StateRow;
use crate::model::session_key::{SessionKeyRow, plan_rotation};

pub mod apply;
pub mod grpc;
pub mod proto;
mod watch;

use grpc::{Grpc, GrpcError};
use proto::{compare, request_op};

/// How long a unary call may take before it counts as failed.
const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// Keys per page when ranging the prefix.
const PAGE: i64 = 2_000;
/// Guarded writes retried when what they read changed under them.
const ATTEMPTS: usize = 10;

/// Here the probe is a progress request on the watch stream.
pub use super::Liveness;

pub(crate) struct Inner {
    pub(crate) grpc: Grpc,
    pub(crate) prefix: String,
    pub(crate) liveness: Liveness,
}

pub struct EtcdRib {
    inner: Arc<Inner>,
    rt: ClientRuntime,
}

fn err(e: GrpcError) -> RibError {
    RibError::Other(e.to_string())
}

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Inner {
    pub(crate) fn key(&self, table: Table, key: &str) -> Vec<u8> {
        format!("{}{}/{key}", self.prefix, table.as_str()).into_bytes()
    }

    pub(crate) fn table_prefix(&self, table: &str) -> Vec<u8> {
        format!("{}{table}/", self.prefix).into_bytes()
    }

    /// The table and row key an etcd key names, if it is a row of the RIB.
    pub(crate) fn parse_key(&self, key: &[u8]) -> Option<(Table, String)> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        let (table, key) = rest.split_once('/')?;
        Some((Table::parse(table)?, key.to_string()))
    }

    pub(crate) async fn range(&self, req: proto::RangeRequest) -> Result<proto::RangeResponse, GrpcError> {
        self.grpc.unary("/etcdserverpb.KV/Range", &req, CALL_DEADLINE).await
    }

    pub(crate) async fn txn(&self, req: proto::TxnRequest) -> Result<proto::TxnResponse, GrpcError> {
        self.grpc.unary("/etcdserverpb.KV/Txn", &req, CALL_DEADLINE).await
    }

    /// Every key in `[key, end)` as of one revision (the newest, or `at`), page by page;
    /// returns them and that revision.
    pub(crate) async fn range_all(
        &self,
        key: Vec<u8>,
        end: Vec<u8>,
        at: i64,
        keys_only: bool,
    ) -> Result<(Vec<proto::KeyValue>, i64, u64), GrpcError> {
        let mut out = Vec::new();
        let (mut from, mut rev) = (key, at);
        loop {
            let page = self
                .range(proto::RangeRequest {
                    key: from.clone(),
                    range_end: end.clone(),
                    limit: PAGE,
                    revision: rev,
                    keys_only,
                    ..Default::default()
                })
                .await?;
            let header = page.header.unwrap_or_default();
            if rev == 0 {
                rev = header.revision;
            }
            let more = page.more;
            if let Some(last) = page.kvs.last() {
                from = last.key.clone();
                from.push(0);
            }
            out.extend(page.kvs);
            if !more {
                return Ok((out, rev, header.cluster_id));
            }
        }
    }

    /// One row's value and mod revision (0 when absent).
    pub(crate) async fn get(&self, key: Vec<u8>, at: i64) -> Result<(Option<Vec<u8>>, i64, i64), GrpcError> {
        let r = self.range(proto::RangeRequest { key, revision: at, ..Default::default() }).await?;
        let rev = r.header.map_or(0, |h| h.revision);
        Ok(match r.kvs.into_iter().next() {
            Some(kv) => (Some(kv.value), kv.mod_revision, rev),
            None => (None, 0, rev),
        })
    }
}

/// A put or a delete, as a transaction operation.
pub(crate) fn put(key: Vec<u8>, value: Vec<u8>) -> proto::RequestOp {
    proto::RequestOp {
        request: Some(request_op::Request::Put(proto::PutRequest { key, value, ..Default::default() })),
    }
}

pub(crate) fn delete(key: Vec<u8>) -> proto::RequestOp {
    proto::RequestOp {
        request: Some(request_op::Request::DeleteRange(proto::DeleteRangeRequest {
            key,
            ..Default::default()
        })),
    }
}

/// Holds when no key in `[key, end)` (or `key` alone, with `end` empty) was modified after
/// revision `rev`: the guard for "what I read at `rev` is still so". A key created since has
/// a newer mod revision too, so the guard also catches additions to a range.
pub(crate) fn unchanged_since(key: Vec<u8>, end: Vec<u8>, rev: i64) -> proto::Compare {
    proto::Compare {
        result: proto::cmp::LESS,
        target: proto::target::MOD,
        key,
        target_union: Some(compare::Target::ModRevision(rev + 1)),
        range_end: end,
    }
}

impl EtcdRib {
    /// A client for the cluster at `endpoints` (`http://host:port`), following `prefix`.
    /// Connects lazily: an unreachable cluster shows in the first read.
    pub fn new(endpoints: &[String], prefix: &str, liveness: Liveness) -> Result<EtcdRib, RibError> {
        if endpoints.is_empty() {
            return Err(RibError::Other("[rib] endpoints is empty: name at least one etcd member".into()));
        }
        let rt = ClientRuntime::new("tern-rib-etcd")?;
        let inner = Inner { grpc: Grpc::new(endpoints), prefix: prefix.to_string(), liveness };
        Ok(EtcdRib { inner: Arc::new(inner), rt })
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.get().block_on(f)
    }

    /// Runs `f` on the client's runtime from synchronous code (the CLI, blocking threads).
    pub(crate) fn run<T>(&self, f: impl AsyncFnOnce(&Inner) -> T) -> T {
        let inner = self.inner.clone();
        self.block_on(async move { f(&inner).await })
    }

    /// Every row of `table`, as of now.
    pub fn read_all(&self, table: Table) -> Result<Vec<Record>, RibError> {
        self.run(async |inner| {
            let p = inner.table_prefix(table.as_str());
            let end = prefix_end(&p);
            let (kvs, _, _) = inner.range_all(p, end, 0, false).await.map_err(err)?;
            Ok(kvs
                .into_iter()
                .filter_map(|kv| {
                    let (t, key) = inner.parse_key(&kv.key)?;
                    Some(Record { table: t, key, body: String::from_utf8_lossy(&kv.value).into_owned() })
                })
                .collect())
        })
    }

    /// Compacts the cluster's history up to the newest revision (for tests and the fleet
    /// harness; operators run `etcdctl compact`).
    pub fn compact_now(&self) -> Result<i64, RibError> {
        self.run(async |inner| {
            let (_, _, rev) = inner.get(inner.key(Table::Apps, ""), 0).await.map_err(err)?;
            let req = proto::CompactionRequest { revision: rev, physical: true };
            let _: proto::CompactionResponse =
                inner.grpc.unary("/etcdserverpb.KV/Compact", &req, CALL_DEADLINE).await.map_err(err)?;
            Ok(rev)
        })
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}

impl Rib for EtcdRib {
    fn subscribe(&self, from: Option<Cursor>) -> Subscription {
        let (tx, rx) = mpsc::channel(64);
        let inner = self.inner.clone();
        self.rt.get().spawn(watch::run(inner, from, tx));
        Subscription::new(rx)
    }

    fn client_runtime(&self) -> Option<(tokio::runtime::Handle, crate::watchdog::Parking)> {
        Some(self.rt.watched())
    }

    fn record_state(&self, id: &str, row: &StateRow) -> Result<bool, RibError> {
        let body = serde_json::to_vec(row).map_err(|e| RibError::Other(e.to_string()))?;
        self.run(async |inner| {
            let key = inner.key(Table::MachineStates, id);
            for _ in 0..ATTEMPTS {
                let (held, mod_rev, _) = inner.get(key.clone(), 0).await.map_err(err)?;
                let newer = held
                    .as_deref()
                    .and_then(|b| serde_json::from_slice::<StateRow>(b).ok())
                    .is_some_and(|h| h.version >= row.version);
                if newer {
                    return Ok(false);
                }
                let guard = proto::Compare {
                    result: proto::cmp::EQUAL,
                    target: proto::target::MOD,
                    key: key.clone(),
                    target_union: Some(compare::Target::ModRevision(mod_rev)),
                    range_end: Vec::new(),
                };
                let done = inner
                    .txn(proto::TxnRequest {
                        compare: vec![guard],
                        success: vec![put(key.clone(), body.clone())],
                        failure: vec![],
                    })
                    .await
                    .map_err(err)?;
                if done.succeeded {
                    return Ok(true);
                }
            }
            Err(RibError::Other(format!("machine state {id}: the row kept changing under the write")))
        })
    }

    fn publish_node(&self, row: &crate::model::NodeRow) -> Result<(), RibError> {
        let body = serde_json::to_vec(row).map_err(|e| RibError::Other(e.to_string()))?;
        self.run(async |inner| {
            let req = proto::PutRequest {
                key: inner.key(Table::Nodes, &row.node),
                value: body,
                ..Default::default()
            };
            let _: proto::PutResponse =
                inner.grpc.unary("/etcdserverpb.KV/Put", &req, CALL_DEADLINE).await.map_err(err)?;
            Ok(())
        })
    }

    fn remove_node(&self, node: &str) -> Result<(), RibError> {
        self.run(async |inner| {
            let req = proto::DeleteRangeRequest { key: inner.key(Table::Nodes, node), ..Default::default() };
            let _: proto::DeleteRangeResponse =
                inner.grpc.unary("/etcdserverpb.KV/DeleteRange", &req, CALL_DEADLINE).await.map_err(err)?;
            Ok(())
        })
    }

    fn ensure_session_key(&self, fresh: &SessionKeyRow) -> Result<bool, RibError> {
        self.run(async |inner| {
            let p = inner.table_prefix(Table::SessionKeys.as_str());
            // "No key in the range": an empty range compares as one key of version 0.
            let none = proto::Compare {
                result: proto::cmp::EQUAL,
                target: proto::target::VERSION,
                key: p.clone(),
                target_union: Some(compare::Target::Version(0)),
                range_end: prefix_end(&p),
            };
            let done = inner
                .txn(proto::TxnRequest {
                    compare: vec![none],
                    success: vec![put(inner.key(Table::SessionKeys, "1"), fresh.to_json().into_bytes())],
                    failure: vec![],
                })
                .await
                .map_err(err)?;
            Ok(done.succeeded)
        })
    }

    fn rotate_session_key(&self, fresh: &SessionKeyRow, grace_ms: i64) -> Result<Rotated, RibError> {
        self.run(async |inner| {
            let p = inner.table_prefix(Table::SessionKeys.as_str());
            let end = prefix_end(&p);
            for _ in 0..ATTEMPTS {
                let (kvs, rev, _) = inner.range_all(p.clone(), end.clone(), 0, false).await.map_err(err)?;
                let rows: Vec<(String, String)> = kvs
                    .iter()
                    .filter_map(|kv| {
                        let (_, key) = inner.parse_key(&kv.key)?;
                        Some((key, String::from_utf8_lossy(&kv.value).into_owned()))
                    })
                    .collect();
                let plan = plan_rotation(&rows, fresh.clone(), grace_ms)
                    .map_err(|e| RibError::Other(e.to_string()))?;
                let mut ops = Vec::new();
                for (id, row) in &plan.retire {
                    ops.push(put(inner.key(Table::SessionKeys, &id.to_string()), row.to_json().into_bytes()));
                }
                for id in &plan.delete {
                    ops.push(delete(inner.key(Table::SessionKeys, &id.to_string())));
                }
                ops.push(put(
                    inner.key(Table::SessionKeys, &plan.id.to_string()),
                    plan.row.to_json().into_bytes(),
                ));
                let done = inner
                    .txn(proto::TxnRequest {
                        compare: vec![unchanged_since(p.clone(), end.clone(), rev)],
                        success: ops,
                        failure: vec![],
                    })
                    .await
                    .map_err(err)?;
                if done.succeeded {
                    return Ok(Rotated {
                        id: plan.id,
                        retired: plan.retire.iter().map(|(id, _)| *id).collect(),
                        retire_at_ms: plan.retire_at_ms,
                        deleted: plan.delete,
                    });
                }
            }
            Err(RibError::Other("session keys kept changing under the rotation".into()))
        })
    }
}
