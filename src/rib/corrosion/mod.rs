//! The RIB on Corrosion (superfly/corrosion), for fleets: every node talks to the Corrosion
//! agent beside it over the agent's HTTP API, and agents spread changes among themselves.
//!
//! Layout (docs/corrosion-schema.sql, loaded by the operator into every agent): one table,
//! `tern_rib (tbl, key, body)`, holding the same JSON bodies as the SQLite RIB, one row per
//! record (`tbl` is [`Table::as_str`]); and `tern_app_hosts (hostname, app)`, the hostname
//! index `tern apply` keeps in the same transaction as the app rows (Corrosion schemas hold
//! no triggers, so nothing else keeps it).
//!
//! Following it ([`follow`]): one subscription, `SELECT tbl, key, body FROM tern_rib`: its
//! rows up to the end-of-query line are the snapshot, then each `change` line is a change,
//! numbered by a contiguous change id. A dropped stream is resumed from the last change id
//! (`GET /v1/subscriptions/{id}?from=N`); an unknown subscription (404), an `{"error":…}` in
//! the stream (the agent purged the changes the resume needed) or a skipped change id can
//! only be repaired by a fresh subscription and snapshot. An idle stream sends nothing at
//! all, so a quiet one is checked with `GET /v1/health`; a late or failed answer counts as a
//! dropped stream.
//!
//! Writing: Corrosion has no compare-and-set and no cross-node transactions: each write is
//! one transaction on this node's agent, merged last-writer-wins into the others. What
//! depends on what it read says so in its SQL where one statement can hold it (a lifecycle
//! state written only over an older version, key 1 inserted only into an empty key table).

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

use super::{ClientRuntime, Cursor, Liveness, Record, Rib, RibError, Rotated, Subscription, Table};
use crate::model::StateRow;
use crate::model::session_key::{SessionKeyRow, plan_rotation};

pub mod apply;
mod client;
mod follow;
pub mod wire;

use client::Client;
pub use client::CorroError;
use wire::statement;

/// How long a query or a transaction may take.
const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// How long reading a whole table (`tern status`) may take.
const READ_ALL_DEADLINE: Duration = Duration::from_secs(120);
/// Key rotations retried when another one took the id first.
const ATTEMPTS: usize = 10;

pub(crate) struct Inner {
    pub(crate) client: Client,
    /// The agent's API address as configured (`http://host:port`): in messages and cursors.
    pub(crate) url: String,
    pub(crate) liveness: Liveness,
}

impl Inner {
    fn err(&self, what: &str, e: CorroError) -> RibError {
        RibError::Other(format!("Corrosion agent {}: {what}: {e}", self.url))
    }

    /// The bodies of `table`'s rows, `(key, body)`.
    async fn rows(&self, table: Table, deadline: Duration) -> Result<Vec<(String, String)>, RibError> {
        let stmt = statement("SELECT key, body FROM tern_rib WHERE tbl = ? ORDER BY key", &[table.as_str()]);
        let rows = self.client.query(&stmt, deadline).await.map_err(|e| self.err("reading the RIB", e))?;
        Ok(rows
            .into_iter()
            .filter_map(|cells| match <[Value; 2]>::try_from(cells) {
                Ok([Value::String(k), Value::String(b)]) => Some((k, b)),
                _ => None,
            })
            .collect())
    }

    async fn transact(&self, what: &str, stmts: &[Value]) -> Result<Vec<u64>, RibError> {
        self.client.transact(stmts, CALL_DEADLINE).await.map_err(|e| self.err(what, e))
    }
}

/// `host:port` from `http://host:port` (the agent's API serves plain HTTP/1.1).
pub fn authority(url: &str) -> Result<String, String> {
    let bad = || format!("{url:?} is not a Corrosion API address (\"http://host:port\")");
    let rest = url.strip_prefix("http://").ok_or_else(bad)?.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || rest.contains('/') || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(rest.to_string())
}

pub struct CorrosionRib {
    inner: Arc<Inner>,
    rt: ClientRuntime,
}

impl CorrosionRib {
    /// A client for the agent whose API is at `url` (`http://host:port`). Connects lazily:
    /// an unreachable agent shows in the first read.
    pub fn new(url: &str, liveness: Liveness) -> Result<CorrosionRib, RibError> {
        let authority = authority(url).map_err(RibError::Other)?;
        let rt = ClientRuntime::new("tern-rib-corrosion")?;
        let url = url.trim_end_matches('/').to_string();
        let inner = Inner { client: Client::new(&authority), url, liveness };
        Ok(CorrosionRib { inner: Arc::new(inner), rt })
    }

    /// Runs `f` on the client's runtime from synchronous code (the CLI, blocking threads).
    pub(crate) fn run<T>(&self, f: impl AsyncFnOnce(&Inner) -> T) -> T {
        let inner = self.inner.clone();
        self.rt.get().block_on(async move { f(&inner).await })
    }

    /// Every row of `table`, as this agent holds it now.
    pub fn read_all(&self, table: Table) -> Result<Vec<Record>, RibError> {
        let rows = self.run(async |inner| inner.rows(table, READ_ALL_DEADLINE).await)?;
        Ok(rows.into_iter().map(|(key, body)| Record { table, key, body }).collect())
    }

    /// Whether the agent answers its health check (for `tern check`).
    pub fn health(&self) -> Result<wire::Health, RibError> {
        self.run(async |inner| inner.client.health(CALL_DEADLINE).await.map_err(|e| inner.err("health", e)))
    }
}

/// An upsert of one row that writes only a body that differs (an equal write would still
/// be a change every agent merges and every subscriber hears).
pub(crate) fn put(table: Table, key: &str, body: &str) -> Value {
    statement(
        "INSERT INTO tern_rib (tbl, key, body) VALUES (?, ?, ?) \
         ON CONFLICT (tbl, key) DO UPDATE SET body = excluded.body WHERE tern_rib.body IS NOT excluded.body",
        &[table.as_str(), key, body],
    )
}

pub(crate) fn delete(table: Table, key: &str) -> Value {
    statement("DELETE FROM tern_rib WHERE tbl = ? AND key = ?", &[table.as_str(), key])
}

impl Rib for CorrosionRib {
    fn subscribe(&self, from: Option<Cursor>) -> Subscription {
        let (tx, rx) = mpsc::channel(64);
        self.rt.get().spawn(follow::run(self.inner.clone(), from, tx));
        Subscription::new(rx)
    }

    fn client_runtime(&self) -> Option<(tokio::runtime::Handle, crate::watchdog::Parking)> {
        Some(self.rt.watched())
    }

    fn record_state(&self, id: &str, row: &StateRow) -> Result<bool, RibError> {
        let body = serde_json::to_string(row).map_err(|e| RibError::Other(e.to_string()))?;
        // One statement, so the version check and the write are one step on the agent. A
        // stored body that is not JSON (or has no version) is replaced rather than kept
        // forever; CASE keeps json_extract away from it.
        let stmt = statement(
            "INSERT INTO tern_rib (tbl, key, body) VALUES ('machine_states', ?, ?) \
             ON CONFLICT (tbl, key) DO UPDATE SET body = excluded.body \
             WHERE CASE WHEN json_valid(tern_rib.body) \
                   THEN coalesce(json_extract(tern_rib.body, '$.version'), -1) < json_extract(excluded.body, '$.version') \
                   ELSE 1 END",
            &[id, &body],
        );
        let done =
            self.run(async |inner| inner.transact(&format!("recording machine state {id}"), &[stmt]).await)?;
        Ok(done.first().is_some_and(|n| *n > 0))
    }

    fn publish_node(&self, row: &crate::model::NodeRow) -> Result<(), RibError> {
        let body = serde_json::to_string(row).map_err(|e| RibError::Other(e.to_string()))?;
        let stmt = statement(
            "INSERT INTO tern_rib (tbl, key, body) VALUES ('nodes', ?, ?) \
             ON CONFLICT (tbl, key) DO UPDATE SET body = excluded.body",
            &[&row.node, &body],
        );
        self.run(async |inner| inner.transact("writing this node's heartbeat", &[stmt]).await).map(|_| ())
    }

    fn remove_node(&self, node: &str) -> Result<(), RibError> {
        let stmt = statement("DELETE FROM tern_rib WHERE tbl = 'nodes' AND key = ?", &[node]);
        self.run(async |inner| inner.transact("removing this node's row", &[stmt]).await).map(|_| ())
    }

    fn ensure_session_key(&self, fresh: &SessionKeyRow) -> Result<bool, RibError> {
        // Insert-if-absent in one statement. Nodes on different agents may both insert key 1
        // before they hear of each other; the agents then keep one of the two bodies
        // (last writer wins), and every node seals with what the subscription delivers.
        let stmt = statement(
            "INSERT INTO tern_rib (tbl, key, body) SELECT 'session_keys', '1', ? \
             WHERE NOT EXISTS (SELECT 1 FROM tern_rib WHERE tbl = 'session_keys')",
            &[&fresh.to_json()],
        );
        let done = self.run(async |inner| inner.transact("making session key 1", &[stmt]).await)?;
        Ok(done.first().is_some_and(|n| *n > 0))
    }

    fn rotate_session_key(&self, fresh: &SessionKeyRow, grace_ms: i64) -> Result<Rotated, RibError> {
        self.run(async |inner| {
            for _ in 0..ATTEMPTS {
                let rows = inner.rows(Table::SessionKeys, CALL_DEADLINE).await?;
                let plan = plan_rotation(&rows, fresh.clone(), grace_ms)
                    .map_err(|e| RibError::Other(e.to_string()))?;
                let id = plan.id.to_string();
                // First, the new key, only if its id is still free: otherwise the NULL body
                // fails NOT NULL and the agent rolls the whole batch back (a rotation on this
                // agent took the id meanwhile), and the rotation is planned again.
                let mut stmts = vec![statement(
                    "INSERT INTO tern_rib (tbl, key, body) VALUES ('session_keys', ?1, \
                     CASE WHEN NOT EXISTS (SELECT 1 FROM tern_rib WHERE tbl = 'session_keys' AND key = ?1) \
                     THEN ?2 END)",
                    &[&id, &plan.row.to_json()],
                )];
                for (retired, row) in &plan.retire {
                    stmts.push(put(Table::SessionKeys, &retired.to_string(), &row.to_json()));
                }
                for gone in &plan.delete {
                    stmts.push(delete(Table::SessionKeys, &gone.to_string()));
                }
                match inner.client.transact(&stmts, CALL_DEADLINE).await {
                    Ok(_) => {
                        return Ok(Rotated {
                            id: plan.id,
                            retired: plan.retire.iter().map(|(id, _)| *id).collect(),
                            retire_at_ms: plan.retire_at_ms,
                            deleted: plan.delete,
                        });
                    }
                    Err(e) if e.to_string().contains("NOT NULL constraint failed") => {
                        tracing::info!(target: "tern::rib", id = plan.id,
                            "another rotation took the session key id first; planning again");
                    }
                    Err(e) => return Err(inner.err("rotating session keys", e)),
                }
            }
            Err(RibError::Other("session keys kept changing under the rotation".into()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_is_named_by_an_http_host_and_port() {
        assert_eq!(authority("http://127.0.0.1:8081").unwrap(), "127.0.0.1:8081");
        assert_eq!(authority("http://corrosion.internal:8081/").unwrap(), "corrosion.internal:8081");
        assert_eq!(authority("http://[::1]:8081").unwrap(), "[::1]:8081");
        for bad in
            ["https://127.0.0.1:8081", "http://127.0.0.1", "http://h:8081/v1", "127.0.0.1:8081", "http://:80"]
        {
            assert!(authority(bad).is_err(), "{bad}");
        }
    }
}
