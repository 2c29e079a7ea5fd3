//! The embedded RIB: one SQLite database (WAL mode).
//!
//! Tables `apps`, `machines` and `certificates` hold one JSON body per key. Triggers append
//! every insert, update and delete to `changes`, whatever wrote it (`tern apply`, the
//! driver, or an operator with `sqlite3`), so subscribers see all of them. A subscriber
//! polls `PRAGMA data_version`, which costs microseconds and changes only when another
//! connection commits, and then reads `changes` after its cursor. The log keeps the last
//! [`RETAIN_CHANGES`] entries; a subscriber that falls further behind gets a snapshot.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::mpsc;

use super::{Change, Cursor, Record, Rib, RibError, RibEvent, Subscription, Table};
use crate::model::StateRow;

mod existing;
pub use existing::{Existing, ReadOnly, open_existing};

/// Change-log entries kept for subscribers to resume from.
pub const RETAIN_CHANGES: i64 = 100_000;
/// Changes sent to a subscriber in one event, so a huge apply cannot build one huge event.
const BATCH: usize = 10_000;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS changes (
    seq  INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl  TEXT NOT NULL,
    key  TEXT NOT NULL,
    body TEXT,
    at   INTEGER NOT NULL
);
"#;

fn table_schema(t: &str) -> String {
    let now = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";
    format!(
        r#"
CREATE TABLE IF NOT EXISTS {t} (
    key        TEXT PRIMARY KEY,
    body       TEXT NOT NULL,
    updated_at INTEGER NOT NULL DEFAULT ({now})
);
CREATE TRIGGER IF NOT EXISTS {t}_ins AFTER INSERT ON {t} BEGIN
    INSERT INTO changes (tbl, key, body, at) VALUES ('{t}', NEW.key, NEW.body, {now});
END;
CREATE TRIGGER IF NOT EXISTS {t}_upd AFTER UPDATE ON {t} WHEN OLD.body IS NOT NEW.body OR OLD.key IS NOT NEW.key BEGIN
    INSERT INTO changes (tbl, key, body, at) SELECT '{t}', OLD.key, NULL, {now} WHERE OLD.key IS NOT NEW.key;
    INSERT INTO changes (tbl, key, body, at) VALUES ('{t}', NEW.key, NEW.body, {now});
END;
CREATE TRIGGER IF NOT EXISTS {t}_del AFTER DELETE ON {t} BEGIN
    INSERT INTO changes (tbl, key, body, at) VALUES ('{t}', OLD.key, NULL, {now});
END;
"#
    )
}

fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> RibError + '_ {
    move |source| RibError::Sqlite { path: path.display().to_string(), source }
}

fn open_conn(path: &Path) -> Result<Connection, RibError> {
    let err = sql_err(path);
    let conn = Connection::open(path).map_err(&err)?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(&err)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(&err)?;
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(&err)?;
    Ok(conn)
}

/// Creates the schema if it is missing and returns the store's epoch.
fn ensure_schema(conn: &mut Connection, path: &Path) -> Result<String, RibError> {
    let err = sql_err(path);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&err)?;
    tx.execute_batch(SCHEMA).map_err(&err)?;
    for t in Table::ALL {
        tx.execute_batch(&table_schema(t.as_str())).map_err(&err)?;
    }
    let fresh = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    tx.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?1)", [&fresh]).map_err(&err)?;
    let epoch: String =
        tx.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| r.get(0)).map_err(&err)?;
    tx.commit().map_err(&err)?;
    Ok(epoch)
}

/// The writable side of the SQLite RIB, used by `tern apply` and the driver.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

/// A write transaction: reads see the database as of its start plus its own writes.
pub struct Tx<'a> {
    tx: rusqlite::Transaction<'a>,
    path: &'a Path,
}

impl Tx<'_> {
    pub fn all(&self, table: Table) -> Result<Vec<Record>, RibError> {
        read_table(&self.tx, table, self.path)
    }

    pub fn get(&self, table: Table, key: &str) -> Result<Option<String>, RibError> {
        let sql = format!("SELECT body FROM {} WHERE key = ?1", table.as_str());
        self.tx.query_row(&sql, [key], |r| r.get(0)).optional().map_err(sql_err(self.path))
    }

    /// Inserts or replaces a row. An unchanged body writes nothing to the change log.
    pub fn put(&self, record: &Record) -> Result<(), RibError> {
        let sql = format!(
            "INSERT INTO {} (key, body) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET body = excluded.body,
                 updated_at = CAST(unixepoch('subsec') * 1000 AS INTEGER)
             WHERE body IS NOT excluded.body",
            record.table.as_str()
        );
        self.tx.execute(&sql, params![record.key, record.body]).map_err(sql_err(self.path))?;
        Ok(())
    }

    /// Writes a machine's lifecycle state unless the row already holds a newer version.
    pub fn put_newer_state(&self, key: &str, body: &str) -> Result<bool, RibError> {
        let n = self
            .tx
            .execute(
                "INSERT INTO machine_states (key, body) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET body = excluded.body,
                     updated_at = CAST(unixepoch('subsec') * 1000 AS INTEGER)
                 WHERE json_extract(body, '$.version') < json_extract(excluded.body, '$.version')",
                params![key, body],
            )
            .map_err(sql_err(self.path))?;
        Ok(n > 0)
    }

    pub fn delete(&self, table: Table, key: &str) -> Result<bool, RibError> {
        let sql = format!("DELETE FROM {} WHERE key = ?1", table.as_str());
        let n = self.tx.execute(&sql, [key]).map_err(sql_err(self.path))?;
        Ok(n > 0)
    }
}

impl Store {
    /// Opens (creating if needed) the RIB database at `path`.
    pub fn open(path: &Path) -> Result<Store, RibError> {
        let mut conn = open_conn(path)?;
        ensure_schema(&mut conn, path)?;
        Ok(Store { conn, path: path.to_path_buf() })
    }

    /// Runs `f` in one IMMEDIATE transaction (no other writer can interleave) and commits
    /// only if it succeeds; on error nothing is written.
    pub fn transact<T, E: From<RibError>>(
        &mut self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let err = sql_err(&self.path);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&err)?;
        let wrapped = Tx { tx, path: &self.path };
        let out = f(&wrapped)?;
        prune(&wrapped.tx, &self.path)?;
        wrapped.tx.commit().map_err(&err)?;
        Ok(out)
    }

    pub fn read_all(&mut self, table: Table) -> Result<Vec<Record>, RibError> {
        self.transact(|tx| tx.all(table))
    }
}

fn prune(tx: &Connection, path: &Path) -> Result<(), RibError> {
    tx.execute("DELETE FROM changes WHERE seq <= (SELECT MAX(seq) FROM changes) - ?1", [RETAIN_CHANGES])
        .map_err(sql_err(path))?;
    Ok(())
}

fn read_table(conn: &Connection, table: Table, path: &Path) -> Result<Vec<Record>, RibError> {
    let err = sql_err(path);
    let sql = format!("SELECT key, body FROM {} ORDER BY key", table.as_str());
    let mut stmt = conn.prepare(&sql).map_err(&err)?;
    let rows = stmt.query_map([], |r| Ok(Record { table, key: r.get(0)?, body: r.get(1)? })).map_err(&err)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(&err)
}

/// The subscribing side of the SQLite RIB, which the catalog reads.
pub struct SqliteRib {
    path: PathBuf,
    poll_interval: Duration,
    /// The connection lifecycle records go through, opened on first use.
    writer: parking_lot::Mutex<Option<Store>>,
}

impl SqliteRib {
    /// Opens the database, creating the file and schema if needed, so that a proxy can
    /// start before anything was ever applied.
    pub fn open(path: &Path, poll_interval: Duration) -> Result<SqliteRib, RibError> {
        Store::open(path)?;
        Ok(SqliteRib { path: path.to_path_buf(), poll_interval, writer: parking_lot::Mutex::new(None) })
    }
}

impl Rib for SqliteRib {
    fn subscribe(&self, from: Option<Cursor>) -> Subscription {
        let (tx, rx) = mpsc::channel(4);
        let path = self.path.clone();
        let poll = self.poll_interval;
        let spawned = std::thread::Builder::new()
            .name("tern-rib-watch".into())
            .spawn(move || watch(&path, poll, from, &tx));
        if let Err(e) = spawned {
            tracing::error!(target: "tern::rib", error = %e, "could not start the RIB watcher thread");
        }
        Subscription::new(rx)
    }

    fn record_state(&self, id: &str, row: &StateRow) -> Result<bool, RibError> {
        let body = serde_json::to_string(row).map_err(|e| RibError::Other(e.to_string()))?;
        let mut writer = self.writer.lock();
        if writer.is_none() {
            *writer = Some(Store::open(&self.path)?);
        }
        let store = writer.as_mut().expect("opened above");
        store.transact(|tx| tx.put_newer_state(id, &body))
    }
}

/// Runs until the subscription is dropped; errors are sent on, then retried with back-off.
fn watch(path: &Path, poll: Duration, from: Option<Cursor>, tx: &mpsc::Sender<Result<RibEvent, RibError>>) {
    let mut cursor = from;
    let mut backoff = Duration::from_millis(50);
    loop {
        match watch_once(path, poll, &mut cursor, tx) {
            Ok(()) => return,
            Err(e) => {
                if tx.blocking_send(Err(e)).is_err() {
                    return;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Ok(()) means the subscriber went away.
fn watch_once(
    path: &Path,
    poll: Duration,
    cursor: &mut Option<Cursor>,
    tx: &mpsc::Sender<Result<RibEvent, RibError>>,
) -> Result<(), RibError> {
    let err = sql_err(path);
    let mut conn = open_conn(path)?;
    let epoch = ensure_schema(&mut conn, path)?;
    conn.pragma_update(None, "query_only", true).map_err(&err)?;
    let mut need_snapshot = match cursor {
        Some(c) if c.epoch == epoch => oldest_seq(&conn, path)?.is_some_and(|min| min > c.seq + 1),
        _ => true,
    };
    let mut seen_version = data_version(&conn, path)?;
    loop {
        if need_snapshot {
            let (records, seq) = read_snapshot(&mut conn, path)?;
            let c = Cursor { epoch: epoch.clone(), seq };
            *cursor = Some(c.clone());
            if tx.blocking_send(Ok(RibEvent::Snapshot { records, cursor: c })).is_err() {
                return Ok(());
            }
        }
        let Some(at) = cursor.as_mut() else { return Ok(()) };
        need_snapshot = drain_changes(&conn, path, at, tx)?;
        if tx.is_closed() {
            return Ok(());
        }
        if need_snapshot {
            continue;
        }
        // Wait for another connection to commit.
        loop {
            std::thread::sleep(poll);
            if tx.is_closed() {
                return Ok(());
            }
            let v = data_version(&conn, path)?;
            if v != seen_version {
                seen_version = v;
                break;
            }
        }
    }
}

/// Sends every change after `at`, advancing it. Returns true when the log no longer holds
/// the next change (it was pruned), so a snapshot is needed.
fn drain_changes(
    conn: &Connection,
    path: &Path,
    at: &mut Cursor,
    tx: &mpsc::Sender<Result<RibEvent, RibError>>,
) -> Result<bool, RibError> {
    loop {
        let batch = read_changes(conn, path, at.seq)?;
        let Some((first_seq, _)) = batch.first() else { return Ok(false) };
        if *first_seq > at.seq + 1 {
            return Ok(true);
        }
        let full = batch.len() == BATCH;
        at.seq = batch.last().map_or(at.seq, |(s, _)| *s);
        let changes = batch.into_iter().map(|(_, c)| c).collect();
        if tx.blocking_send(Ok(RibEvent::Changes { changes, cursor: at.clone() })).is_err() {
            return Ok(false);
        }
        if !full {
            return Ok(false);
        }
    }
}

fn data_version(conn: &Connection, path: &Path) -> Result<i64, RibError> {
    conn.query_row("PRAGMA data_version", [], |r| r.get(0)).map_err(sql_err(path))
}

fn oldest_seq(conn: &Connection, path: &Path) -> Result<Option<i64>, RibError> {
    conn.query_row("SELECT MIN(seq) FROM changes", [], |r| r.get(0)).map_err(sql_err(path))
}

fn read_snapshot(conn: &mut Connection, path: &Path) -> Result<(Vec<Record>, i64), RibError> {
    let err = sql_err(path);
    // One read transaction, so the rows and the cursor describe the same moment.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred).map_err(&err)?;
    let seq: i64 =
        tx.query_row("SELECT COALESCE(MAX(seq), 0) FROM changes", [], |r| r.get(0)).map_err(&err)?;
    let mut records = Vec::new();
    for t in Table::ALL {
        records.extend(read_table(&tx, t, path)?);
    }
    tx.commit().map_err(&err)?;
    Ok((records, seq))
}

fn read_changes(conn: &Connection, path: &Path, after: i64) -> Result<Vec<(i64, Change)>, RibError> {
    let err = sql_err(path);
    let mut stmt = conn
        .prepare_cached("SELECT seq, tbl, key, body, at FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2")
        .map_err(&err)?;
    let rows = stmt
        .query_map(params![after, BATCH as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .map_err(&err)?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, tbl, key, body, at) = row.map_err(&err)?;
        // A row naming an unknown table cannot come from our triggers; skip it.
        let Some(table) = Table::parse(&tbl) else {
            tracing::warn!(target: "tern::rib", seq, table = %tbl, "change for an unknown table skipped");
            continue;
        };
        out.push((seq, Change { table, key, body, committed_at_ms: at }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(table: Table, key: &str, body: &str) -> Record {
        Record { table, key: key.into(), body: body.into() }
    }

    #[tokio::test]
    async fn snapshot_then_changes_then_resume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rib.db");
        let mut store = Store::open(&path).unwrap();
        store.transact(|tx| tx.put(&rec(Table::Apps, "a", "{\"v\":1}"))).unwrap();
        let rib = SqliteRib::open(&path, Duration::from_millis(5)).unwrap();
        let mut sub = rib.subscribe(None);
        let Some(Ok(RibEvent::Snapshot { records, cursor })) = sub.next().await else {
            panic!("expected a snapshot first")
        };
        assert_eq!(records, vec![rec(Table::Apps, "a", "{\"v\":1}")]);

        store
            .transact(|tx| {
                tx.put(&rec(Table::Apps, "a", "{\"v\":1}"))?; // unchanged: no change logged
                tx.put(&rec(Table::Machines, "m", "{}"))?;
                tx.delete(Table::Apps, "a")
            })
            .unwrap();
        let Some(Ok(RibEvent::Changes { changes, cursor: after })) = sub.next().await else {
            panic!("expected changes")
        };
        let summary: Vec<_> = changes.iter().map(|c| (c.table, c.key.as_str(), c.body.is_some())).collect();
        assert_eq!(summary, vec![(Table::Machines, "m", true), (Table::Apps, "a", false)]);
        drop(sub);

        // Resuming from the first cursor replays the same changes, no snapshot.
        let mut sub = rib.subscribe(Some(cursor));
        let Some(Ok(RibEvent::Changes { changes, .. })) = sub.next().await else {
            panic!("expected a resume")
        };
        assert_eq!(changes.len(), 2);
        drop(sub);

        // A cursor from another store's history gets a snapshot.
        let foreign = Cursor { epoch: "elsewhere".into(), seq: after.seq };
        let mut sub = rib.subscribe(Some(foreign));
        assert!(matches!(sub.next().await, Some(Ok(RibEvent::Snapshot { .. }))));
    }

    #[test]
    fn a_failed_transaction_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("rib.db")).unwrap();
        let r: Result<(), RibError> = store.transact(|tx| {
            tx.put(&rec(Table::Apps, "a", "{}"))?;
            Err(RibError::Other("refused".into()))
        });
        assert!(r.is_err());
        assert!(store.read_all(Table::Apps).unwrap().is_empty());
    }
}
