//! The embedded RIB: one SQLite database (WAL mode).
//!
//! Tables `apps`, `machines` and `certificates` hold one JSON body per key. Triggers append
//! every insert, update and delete to `changes`, whatever wrote it (`tern apply`, the
//! driver, or an operator with `sqlite3`), so subscribers see all of them. A subscriber
//! is woken by the database's file events (`wake`; a slow poll where there are none), checks
//! `PRAGMA data_version`, which costs microseconds and changes only when another connection
//! commits, and then reads `changes` after its cursor. The log keeps the last
//! [`RETAIN_CHANGES`] entries; a subscriber that falls further behind gets a snapshot. The
//! log also lets [`Rib::look_back`] find a row's last body that decoded.
//!
//! The schema is versioned (`schema`) so that any SQLite an operator writes with runs the
//! triggers. A subscriber notices the file being replaced under it (`watch`); nothing but
//! `tern apply` and a proxy's first start ever creates the file.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::mpsc;

use super::{Change, Cursor, Record, Rib, RibError, Rotated, Subscription, Table};
use crate::model::StateRow;
use crate::model::session_key::{SessionKeyRow, plan_rotation};
use crate::watchdog::lock::Mutex;

mod existing;
mod schema;
mod wake;
mod watch;

pub use existing::{Existing, ReadOnly, open_existing};
pub use schema::VERSION as SCHEMA_VERSION;

/// Change-log entries kept for subscribers to resume from.
pub const RETAIN_CHANGES: i64 = 100_000;
/// Changes sent to a subscriber in one event, so a huge apply cannot build one huge event.
const BATCH: usize = 10_000;

/// How long a statement waits for another process's write (`tern apply`) to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> RibError + '_ {
    move |source| RibError::Sqlite { path: path.display().to_string(), source }
}

fn missing(path: &Path) -> RibError {
    RibError::Missing { path: path.display().to_string() }
}

/// Which file a path named when it was opened: a file deleted and re-created (or renamed
/// over) under the same path is another file, and a connection to the old one never sees
/// what is written to the new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

/// The file `path` names now, or `None` if nothing is there. One `stat`: cheap enough to
/// call on every poll.
fn file_id(path: &Path) -> Result<Option<FileId>, RibError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(FileId { dev: m.dev(), ino: m.ino() })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RibError::Other(format!("{}: {e}", path.display()))),
    }
}

/// A database file a connection has open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Opened {
    db: FileId,
}

impl Opened {
    fn now(_path: &Path, db: FileId) -> Opened {
        Opened { db }
    }
}

#[cfg(test)]
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Lets go of a connection to a file that no longer is at its path, without closing it.
///
/// SQLite keeps a database's recent commits in a log found by name (`tern.db-wal`, with its
/// index `tern.db-shm`), and when the last connection to a database closes, it checkpoints
/// and deletes that log by name. Once another file has taken the path, that name may be the
/// new file's log, holding commits another program just made: closing would delete them.
/// So a connection to a replaced file is never closed; it costs its descriptors (three, kept
/// until tern exits) per replacement, an operator's action. Nor does tern remove a log left
/// behind: a replacement must take it along (docs/rib.md, "Replacing the file").
fn abandon<T>(held: T) {
    std::mem::forget(held);
}

/// Opens the database and says which file it is. With `create`, a missing file is created
/// (`tern apply`, a proxy's first start); without, a missing file or one without a RIB in
/// it is an error and nothing is written to it.
fn open_conn(path: &Path, create: bool) -> Result<(Connection, FileId), RibError> {
    let err = sql_err(path);
    let before = file_id(path)?;
    if before.is_none() && !create {
        return Err(missing(path));
    }
    if before.is_none() {
        create_private(path)?;
    }
    let mut flags = OpenFlags::default();
    if !create {
        flags.remove(OpenFlags::SQLITE_OPEN_CREATE);
    }
    let conn = match Connection::open_with_flags(path, flags) {
        Ok(c) => c,
        Err(_) if !create && file_id(path)?.is_none() => return Err(missing(path)),
        Err(e) => return Err(err(e)),
    };
    conn.busy_timeout(BUSY_TIMEOUT).map_err(&err)?;
    if !create && !holds_rib(&conn).map_err(&err)? {
        return Err(RibError::NoSchema { path: path.display().to_string() });
    }
    wal_mode(&conn).map_err(&err)?;
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(&err)?;
    let after = file_id(path)?.ok_or_else(|| missing(path))?;
    if before.is_some_and(|b| b != after) {
        return Err(RibError::Other(format!("{} was replaced while being opened", path.display())));
    }
    Ok((conn, after))
}

/// Switches the database to WAL. On a new database that needs an exclusive lock, and SQLite
/// answers BUSY at once, without its busy handler, while another process does the same:
/// two nodes starting together on a RIB that does not exist yet. So this retries for as
/// long as the busy timeout would have waited.
fn wal_mode(conn: &Connection) -> rusqlite::Result<()> {
    // 2,000 tries 5 ms apart: the 10 s of the busy timeout.
    let mut tries = 2_000;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && tries > 0 =>
            {
                tries -= 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// Creates the database file readable and writable by its owner only (0600), before SQLite
/// opens it: the RIB holds the session keys' secrets. SQLite gives the `-wal` and `-shm`
/// files it makes the database file's mode. An empty file is an empty database to SQLite,
/// and subscribers wait out a file with no RIB in it yet. Someone else creating it first
/// is fine: theirs is used.
fn create_private(path: &Path) -> Result<(), RibError> {
    use std::os::unix::fs::OpenOptionsExt;
    let made = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
    match made {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(RibError::Other(format!("creating {}: {e}", path.display()))),
    }
}

/// Whether the database has been made a RIB (its schema and epoch are written together).
fn holds_rib(conn: &Connection) -> rusqlite::Result<bool> {
    let has_meta: i64 = conn.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
        [],
        |r| r.get(0),
    )?;
    if has_meta == 0 {
        return Ok(false);
    }
    conn.query_row("SELECT COUNT(*) FROM meta WHERE key = 'epoch'", [], |r| r.get::<_, i64>(0)).map(|n| n > 0)
}

/// Brings the schema up to date (creating it if missing) and returns the store's epoch.
fn ensure_schema(conn: &mut Connection, path: &Path) -> Result<String, RibError> {
    let err = sql_err(path);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(&err)?;
    schema::ensure(&tx, path)?;
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
    file: Opened,
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

    /// The apps whose rows claim `hostname`, from the index the schema's triggers keep.
    pub fn claimants(&self, hostname: &str) -> Result<Vec<String>, RibError> {
        let mut st = self
            .tx
            .prepare_cached("SELECT app FROM app_hosts WHERE hostname = ?1")
            .map_err(sql_err(self.path))?;
        let rows = st.query_map([hostname], |r| r.get(0)).map_err(sql_err(self.path))?;
        rows.collect::<Result<_, _>>().map_err(sql_err(self.path))
    }

    /// Every key of `table`, without the bodies.
    pub fn keys(&self, table: Table) -> Result<Vec<String>, RibError> {
        let sql = format!("SELECT key FROM {}", table.as_str());
        let mut st = self.tx.prepare(&sql).map_err(sql_err(self.path))?;
        let rows = st.query_map([], |r| r.get(0)).map_err(sql_err(self.path))?;
        rows.collect::<Result<_, _>>().map_err(sql_err(self.path))
    }

    /// Inserts or replaces a row. An unchanged body writes nothing to the change log.
    pub fn put(&self, record: &Record) -> Result<(), RibError> {
        let sql = format!(
            "INSERT INTO {} (key, body) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET body = excluded.body, updated_at = {}
             WHERE body IS NOT excluded.body",
            record.table.as_str(),
            schema::NOW_MS,
        );
        self.tx.execute(&sql, params![record.key, record.body]).map_err(sql_err(self.path))?;
        Ok(())
    }

    /// Writes a machine's lifecycle state unless the row already holds a newer version.
    pub fn put_newer_state(&self, key: &str, body: &str) -> Result<bool, RibError> {
        let sql = format!(
            "INSERT INTO machine_states (key, body) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET body = excluded.body, updated_at = {}
             WHERE json_extract(body, '$.version') < json_extract(excluded.body, '$.version')",
            schema::NOW_MS,
        );
        let n = self.tx.execute(&sql, params![key, body]).map_err(sql_err(self.path))?;
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
        Self::open_as(path, true)
    }

    /// Opens the RIB database at `path` only if it exists and holds a RIB: a running proxy
    /// must never create an empty one in place of a RIB that was deleted.
    pub fn open_no_create(path: &Path) -> Result<Store, RibError> {
        Self::open_as(path, false)
    }

    fn open_as(path: &Path, create: bool) -> Result<Store, RibError> {
        let (mut conn, db) = open_conn(path, create)?;
        ensure_schema(&mut conn, path)?;
        Ok(Store { conn, path: path.to_path_buf(), file: Opened::now(path, db) })
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

    /// [`Rib::ensure_session_key`]: the check and the insert in one IMMEDIATE transaction,
    /// so of two nodes starting at once the second sees the first one's key.
    pub fn ensure_session_key(&mut self, fresh: &SessionKeyRow) -> Result<bool, RibError> {
        self.transact(|tx| {
            if !tx.all(Table::SessionKeys)?.is_empty() {
                return Ok(false);
            }
            tx.put(&Record { table: Table::SessionKeys, key: "1".into(), body: fresh.to_json() })?;
            Ok(true)
        })
    }

    /// [`Rib::rotate_session_key`], in one IMMEDIATE transaction.
    pub fn rotate_session_key(&mut self, fresh: &SessionKeyRow, grace_ms: i64) -> Result<Rotated, RibError> {
        self.transact(|tx| {
            let rows: Vec<(String, String)> =
                tx.all(Table::SessionKeys)?.into_iter().map(|r| (r.key, r.body)).collect();
            let plan =
                plan_rotation(&rows, fresh.clone(), grace_ms).map_err(|e| RibError::Other(e.to_string()))?;
            let put = |id: u32, row: &SessionKeyRow| {
                tx.put(&Record { table: Table::SessionKeys, key: id.to_string(), body: row.to_json() })
            };
            for (id, row) in &plan.retire {
                put(*id, row)?;
            }
            for id in &plan.delete {
                tx.delete(Table::SessionKeys, &id.to_string())?;
            }
            put(plan.id, &plan.row)?;
            Ok(Rotated {
                id: plan.id,
                retired: plan.retire.iter().map(|(id, _)| *id).collect(),
                retire_at_ms: plan.retire_at_ms,
                deleted: plan.delete,
            })
        })
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
    /// The connection lifecycle records and session keys are written through.
    writer: Mutex<Option<Store>>,
}

impl SqliteRib {
    /// Opens the database, creating the file and schema if needed, so that a proxy can
    /// start before anything was ever applied.
    pub fn open(path: &Path, poll_interval: Duration) -> Result<SqliteRib, RibError> {
        Store::open(path)?;
        // Held across SQLite's busy waits (opening, then the write), each bounded by
        // BUSY_TIMEOUT: slow while another process writes, but no wedge of tern's.
        let writer = Mutex::new("rib.writer", None).may_hold_for(2 * BUSY_TIMEOUT);
        Ok(SqliteRib { path: path.to_path_buf(), poll_interval, writer })
    }
}

impl SqliteRib {
    /// Runs `write` on the connection writes go through, opened on first use and reopened
    /// when the path names another file (a write to a replaced file would be lost with it).
    fn with_writer<T>(&self, write: impl FnOnce(&mut Store) -> Result<T, RibError>) -> Result<T, RibError> {
        let mut writer = self.writer.lock();
        let now = file_id(&self.path)?;
        if let Some(old) = writer.take_if(|s| Some(s.file.db) != now) {
            abandon(old);
        }
        let store = match writer.take() {
            Some(store) => writer.insert(store),
            None => writer.insert(Store::open_no_create(&self.path)?),
        };
        write(store)
    }
}

impl Rib for SqliteRib {
    /// The writer lock that lifecycle state records and session keys are written under.
    fn hold_for_fault(&self, f: &mut dyn FnMut()) {
        let _writer = self.writer.lock();
        f();
    }

    fn subscribe(&self, from: Option<Cursor>) -> Subscription {
        let (tx, rx) = mpsc::channel(4);
        // The watcher hears the subscription dropped as this pipe hanging up.
        match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
            Ok((gone, held)) => {
                let spare = Arc::new(super::SpareRows::default());
                watch::spawn(self.path.clone(), self.poll_interval, from, (tx, spare.clone()), gone);
                Subscription::new(rx).holding(Box::new(held)).recycling(spare)
            }
            Err(e) => {
                let _ = tx.try_send(Err(RibError::Other(format!("cannot follow the RIB: pipe: {e}"))));
                Subscription::new(rx)
            }
        }
    }

    fn record_state(&self, id: &str, row: &StateRow) -> Result<bool, RibError> {
        let body = serde_json::to_string(row).map_err(|e| RibError::Other(e.to_string()))?;
        self.with_writer(|store| store.transact(|tx| tx.put_newer_state(id, &body)))
    }

    fn ensure_session_key(&self, fresh: &SessionKeyRow) -> Result<bool, RibError> {
        self.with_writer(|store| store.ensure_session_key(fresh))
    }

    fn rotate_session_key(&self, fresh: &SessionKeyRow, grace_ms: i64) -> Result<Rotated, RibError> {
        self.with_writer(|store| store.rotate_session_key(fresh, grace_ms))
    }

    fn publish_node(&self, row: &crate::model::NodeRow) -> Result<(), RibError> {
        let body = serde_json::to_string(row).map_err(|e| RibError::Other(e.to_string()))?;
        self.with_writer(|store| {
            store.transact(|tx| tx.put(&Record { table: Table::Nodes, key: row.node.clone(), body }))
        })
    }

    fn remove_node(&self, node: &str) -> Result<(), RibError> {
        self.with_writer(|store| store.transact(|tx| tx.delete(Table::Nodes, node).map(|_| ())))
    }

    fn look_back(
        &self,
        upto: &Cursor,
        keys: &[(Table, String)],
        visit: &mut dyn FnMut(Change) -> bool,
    ) -> Result<(), RibError> {
        if keys.is_empty() {
            return Ok(());
        }
        let err = sql_err(&self.path);
        let (conn, _) = open_conn(&self.path, false)?;
        let epoch: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| r.get(0))
            .optional()
            .map_err(&err)?;
        if epoch.as_deref() != Some(upto.epoch.as_str()) {
            // Another store's history says nothing about the rows `upto` came with.
            return Ok(());
        }
        // Table names hold no '/', so "table/key" names one row unambiguously.
        let wanted: Vec<String> = keys.iter().map(|(t, k)| format!("{}/{k}", t.as_str())).collect();
        let wanted = serde_json::to_string(&wanted).map_err(|e| RibError::Other(e.to_string()))?;
        let mut stmt = conn
            .prepare(
                "SELECT tbl, key, body, at FROM changes
                 WHERE seq <= ?1 AND tbl || '/' || key IN (SELECT value FROM json_each(?2))
                 ORDER BY seq DESC",
            )
            .map_err(&err)?;
        let mut rows = stmt.query(params![upto.seq, wanted]).map_err(&err)?;
        while let Some(row) = rows.next().map_err(&err)? {
            let tbl: String = row.get(0).map_err(&err)?;
            let Some(table) = Table::parse(&tbl) else { continue };
            let change = Change {
                table,
                key: row.get(1).map_err(&err)?,
                body: row.get(2).map_err(&err)?,
                committed_at_ms: row.get(3).map_err(&err)?,
            };
            if !visit(change) {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next event other than [`RibEvent::Live`] (sent each time the watcher opens the RIB),
    /// a snapshot's parts gathered into it.
    async fn skip_live(sub: &mut Subscription) -> Option<Result<RibEvent, RibError>> {
        let mut parts = Vec::new();
        loop {
            match sub.next().await {
                Some(Ok(RibEvent::Live)) => continue,
                Some(Ok(RibEvent::SnapshotPart(rows))) => parts.extend(rows.to_records()),
                Some(Ok(RibEvent::Snapshot { records, cursor, reason })) => {
                    parts.extend(records);
                    return Some(Ok(RibEvent::Snapshot { records: parts, cursor, reason }));
                }
                other => return other,
            }
        }
    }

    /// The events as they come, parts and all, but for [`RibEvent::Live`].
    async fn raw(sub: &mut Subscription) -> Option<Result<RibEvent, RibError>> {
        loop {
            match sub.next().await {
                Some(Ok(RibEvent::Live)) => continue,
                other => return other,
            }
        }
    }
    use crate::rib::RibEvent;

    /// A poll that never comes within a test: changes must be noticed from file events.
    const NO_POLL: Duration = Duration::from_secs(3600);

    fn rec(table: Table, key: &str, body: &str) -> Record {
        Record { table, key: key.into(), body: body.into() }
    }

    #[tokio::test]
    async fn snapshot_then_changes_then_resume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rib.db");
        let mut store = Store::open(&path).unwrap();
        store.transact(|tx| tx.put(&rec(Table::Apps, "a", "{\"v\":1}"))).unwrap();
        let rib = SqliteRib::open(&path, NO_POLL).unwrap();
        let mut sub = rib.subscribe(None);
        let Some(Ok(RibEvent::Snapshot { records, cursor, .. })) = skip_live(&mut sub).await else {
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
        let Some(Ok(RibEvent::Changes { changes, cursor: after })) = skip_live(&mut sub).await else {
            panic!("expected changes")
        };
        let summary: Vec<_> = changes.iter().map(|c| (c.table, c.key.as_str(), c.body.is_some())).collect();
        assert_eq!(summary, vec![(Table::Machines, "m", true), (Table::Apps, "a", false)]);
        drop(sub);

        // Resuming from the first cursor replays the same changes, no snapshot.
        let mut sub = rib.subscribe(Some(cursor));
        let Some(Ok(RibEvent::Changes { changes, .. })) = skip_live(&mut sub).await else {
            panic!("expected a resume")
        };
        assert_eq!(changes.len(), 2);
        drop(sub);

        // A cursor from another store's history gets a snapshot.
        let foreign = Cursor { epoch: "elsewhere".into(), seq: after.seq };
        let mut sub = rib.subscribe(Some(foreign));
        assert!(matches!(skip_live(&mut sub).await, Some(Ok(RibEvent::Snapshot { .. }))));
    }

    #[tokio::test]
    async fn a_big_snapshot_comes_in_parts_then_the_rest_with_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rib.db");
        let rows: Vec<Record> = (0..10).map(|i| rec(Table::Apps, &format!("a{i:02}"), "{}")).collect();
        Store::open(&path).unwrap().transact(|tx| rows.iter().try_for_each(|r| tx.put(r))).unwrap();
        let rib = SqliteRib::open(&path, NO_POLL).unwrap();
        let mut sub = rib.subscribe(None);
        let mut got = Vec::new();
        let mut parts = 0;
        loop {
            match raw(&mut sub).await {
                Some(Ok(RibEvent::SnapshotPart(part))) => {
                    parts += 1;
                    got.extend(part.to_records());
                }
                Some(Ok(RibEvent::Snapshot { records, cursor, .. })) => {
                    got.extend(records);
                    assert_eq!(cursor.seq, 10);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(parts, 5, "parts of 8 bytes or just over in unit tests: two rows each");
        assert_eq!(got, rows, "every row once, in order");
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

    /// The next event, failing the test rather than hanging if none comes.
    async fn next(sub: &mut Subscription) -> Result<RibEvent, RibError> {
        tokio::time::timeout(Duration::from_secs(10), skip_live(sub)).await.expect("no event").expect("ended")
    }

    fn remove_db(path: &Path) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(sidecar(path, suffix));
        }
    }

    #[tokio::test]
    async fn a_replaced_file_is_noticed_and_sent_as_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rib.db");
        let rib = SqliteRib::open(&path, NO_POLL).unwrap();
        let mut sub = rib.subscribe(None);
        assert!(matches!(next(&mut sub).await, Ok(RibEvent::Snapshot { .. })));
        // Written while the proxy has the file open: it sits in the write-ahead log.
        Store::open(&path).unwrap().transact(|tx| tx.put(&rec(Table::Apps, "old", "{}"))).unwrap();
        assert!(matches!(next(&mut sub).await, Ok(RibEvent::Changes { .. })));

        // Another file takes the path: written elsewhere, then renamed over the RIB once the
        // old file's log is removed (docs/rib.md: a replacement takes the log with it).
        let other = dir.path().join("new.db");
        Store::open(&other).unwrap().transact(|tx| tx.put(&rec(Table::Apps, "new", "{}"))).unwrap();
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(sidecar(&path, suffix));
        }
        std::fs::rename(&other, &path).unwrap();
        let Ok(RibEvent::Snapshot { records, .. }) = next(&mut sub).await else {
            panic!("expected a snapshot of the new file")
        };
        assert_eq!(records, vec![rec(Table::Apps, "new", "{}")], "the new file, not the old one's log");

        // Lifecycle records go to the new file too.
        let row = StateRow {
            state: crate::model::MachineState::Started,
            version: 1,
            reason: String::new(),
            node: String::new(),
            at_ms: 0,
        };
        assert!(rib.record_state("m", &row).unwrap());
        let Ok(RibEvent::Changes { changes, .. }) = next(&mut sub).await else { panic!("expected changes") };
        assert_eq!((changes[0].table, changes[0].key.as_str()), (Table::MachineStates, "m"));
        let mut check = Store::open_no_create(&path).unwrap();
        assert_eq!(check.read_all(Table::Apps).unwrap(), vec![rec(Table::Apps, "new", "{}")]);
        let ok: String = check.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(ok, "ok");
    }

    #[tokio::test]
    async fn a_deleted_file_is_reported_once_and_not_recreated_until_a_writer_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rib.db");
        Store::open(&path).unwrap().transact(|tx| tx.put(&rec(Table::Apps, "old", "{}"))).unwrap();
        let rib = SqliteRib::open(&path, NO_POLL).unwrap();
        let mut sub = rib.subscribe(None);
        assert!(matches!(next(&mut sub).await, Ok(RibEvent::Snapshot { .. })));

        remove_db(&path);
        assert!(matches!(next(&mut sub).await, Err(RibError::Missing { .. })));
        // Neither the watcher nor a lifecycle record puts an empty RIB in its place.
        let row = StateRow {
            state: crate::model::MachineState::Started,
            version: 1,
            reason: String::new(),
            node: String::new(),
            at_ms: 0,
        };
        assert!(matches!(rib.record_state("m", &row), Err(RibError::Missing { .. })));
        assert!(!path.exists());

        // A file with no RIB in it yet (a writer half-way) is waited out as well.
        std::fs::write(&path, b"").unwrap();
        Store::open(&path).unwrap().transact(|tx| tx.put(&rec(Table::Apps, "new", "{}"))).unwrap();
        let Ok(RibEvent::Snapshot { records, .. }) = next(&mut sub).await else {
            panic!("expected a snapshot of the re-created file, and nothing before it")
        };
        assert_eq!(records, vec![rec(Table::Apps, "new", "{}")]);
    }

    #[test]
    fn look_back_visits_a_keys_history_newest_first_up_to_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rib.db");
        let mut store = Store::open(&path).unwrap();
        store.transact(|tx| tx.put(&rec(Table::Apps, "a", "1"))).unwrap();
        store.transact(|tx| tx.put(&rec(Table::Apps, "b", "x"))).unwrap();
        store.transact(|tx| tx.delete(Table::Apps, "a")).unwrap();
        store.transact(|tx| tx.put(&rec(Table::Apps, "a", "2"))).unwrap();
        let rib = SqliteRib::open(&path, NO_POLL).unwrap();
        let epoch: String =
            store.conn.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| r.get(0)).unwrap();
        store.transact(|tx| tx.put(&rec(Table::Apps, "a", "3"))).unwrap(); // after the cursor
        let upto = Cursor { epoch, seq: 4 };
        let mut seen = Vec::new();
        let keys = [(Table::Apps, "a".to_string())];
        rib.look_back(&upto, &keys, &mut |c| {
            seen.push(c.body);
            true
        })
        .unwrap();
        assert_eq!(seen, vec![Some("2".to_string()), None, Some("1".to_string())]);

        let foreign = Cursor { epoch: "elsewhere".into(), seq: 4 };
        let mut visited = 0;
        rib.look_back(&foreign, &keys, &mut |_| {
            visited += 1;
            true
        })
        .unwrap();
        assert_eq!(visited, 0, "another store's cursor says nothing about this history");
    }

    fn key_row(created_ms: i64) -> SessionKeyRow {
        SessionKeyRow { secret: [created_ms as u8; 32], created_ms, retire_at_ms: None }
    }

    #[test]
    fn nodes_starting_at_once_end_up_with_one_session_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rib.db");
        Store::open(&path).unwrap();
        let inserted: Vec<bool> = std::thread::scope(|s| {
            let nodes: Vec<_> = (0..8)
                .map(|i| {
                    let path = &path;
                    s.spawn(move || {
                        let rib = SqliteRib::open(path, NO_POLL).unwrap();
                        rib.ensure_session_key(&key_row(i)).unwrap()
                    })
                })
                .collect();
            nodes.into_iter().map(|n| n.join().unwrap()).collect()
        });
        assert_eq!(inserted.iter().filter(|i| **i).count(), 1, "{inserted:?}");
        let rows = Store::open(&path).unwrap().read_all(Table::SessionKeys).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].key, "1");
    }

    #[test]
    fn a_rotation_adds_a_key_and_retires_the_others_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rib.db");
        let rib = SqliteRib::open(&path, NO_POLL).unwrap();
        assert!(rib.ensure_session_key(&key_row(1)).unwrap());
        let done = rib.rotate_session_key(&key_row(100), 50).unwrap();
        assert_eq!(done, Rotated { id: 2, retired: vec![1], retire_at_ms: 150, deleted: vec![] });
        assert!(!rib.ensure_session_key(&key_row(7)).unwrap(), "a key exists: nothing is added");
        // A day and more later, the next rotation deletes key 1 and retires key 2.
        let later = 150 + crate::model::session_key::KEEP_RETIRED_MS + 1;
        let done = rib.rotate_session_key(&key_row(later), 0).unwrap();
        assert_eq!(done, Rotated { id: 3, retired: vec![2], retire_at_ms: later, deleted: vec![1] });
        let rows = Store::open(&path).unwrap().read_all(Table::SessionKeys).unwrap();
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["2", "3"]);
    }

    #[test]
    fn the_database_file_tern_creates_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rib.db");
        let rib = SqliteRib::open(&path, NO_POLL).unwrap();
        rib.ensure_session_key(&key_row(1)).unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let file = sidecar(&path, suffix);
            let Ok(meta) = std::fs::metadata(&file) else { continue };
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{}", file.display());
        }
    }

    #[test]
    fn a_version_2_database_gains_the_session_keys_table_and_keeps_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rib.db");
        Store::open(&path).unwrap().transact(|tx| tx.put(&rec(Table::Apps, "a", "{}"))).unwrap();
        // Back to what a version 2 tern left: no session_keys table, schema 2.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TRIGGER session_keys_ins; DROP TRIGGER session_keys_upd; DROP TRIGGER session_keys_del;
             DROP TABLE session_keys; UPDATE meta SET value = '2' WHERE key = 'schema';",
        )
        .unwrap();
        let read = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, String>(0)).unwrap();
        let (epoch, changes) =
            (read("SELECT value FROM meta WHERE key = 'epoch'"), read("SELECT COUNT(*) || '' FROM changes"));

        let rib = SqliteRib::open(&path, NO_POLL).unwrap();
        assert!(rib.ensure_session_key(&key_row(1)).unwrap());
        assert_eq!(read("SELECT value FROM meta WHERE key = 'schema'"), schema::VERSION.to_string());
        assert_eq!(read("SELECT value FROM meta WHERE key = 'epoch'"), epoch, "cursors stay valid");
        assert_eq!(read("SELECT body FROM apps WHERE key = 'a'"), "{}");
        let after: i64 = read("SELECT COUNT(*) || '' FROM changes").parse().unwrap();
        assert_eq!(after, changes.parse::<i64>().unwrap() + 1, "the key's insert is logged, nothing else");
    }

    #[test]
    fn the_hostname_index_is_filled_at_migration_and_follows_every_edit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rib.db");
        let app = |hosts: &str| format!(r#"{{"name":"x","hostnames":[{hosts}]}}"#);
        Store::open(&path)
            .unwrap()
            .transact(|tx| {
                tx.put(&rec(Table::Apps, "a", &app(r#""a.test","www.a.test""#)))?;
                tx.put(&rec(Table::Apps, "junk", "{not json"))
            })
            .unwrap();
        // Back to what a version 3 tern left: no index.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TRIGGER apps_hosts_ins; DROP TRIGGER apps_hosts_upd; DROP TRIGGER apps_hosts_del;
             DROP TABLE app_hosts; UPDATE meta SET value = '3' WHERE key = 'schema';",
        )
        .unwrap();
        let mut store = Store::open(&path).unwrap();
        let claim = |store: &mut Store, h: &str| store.transact(|tx| tx.claimants(h)).unwrap();
        assert_eq!(claim(&mut store, "www.a.test"), ["a"], "filled from the rows");
        // An operator's own SQL goes through the triggers too.
        conn.execute("UPDATE apps SET body = ?1 WHERE key = 'a'", [app(r#""b.test""#)]).unwrap();
        conn.execute("INSERT INTO apps (key, body) VALUES ('c', ?1)", [app(r#""b.test""#)]).unwrap();
        assert!(claim(&mut store, "a.test").is_empty());
        let mut both = claim(&mut store, "b.test");
        both.sort();
        assert_eq!(both, ["a", "c"]);
        conn.execute("DELETE FROM apps WHERE key = 'a'", []).unwrap();
        assert_eq!(claim(&mut store, "b.test"), ["c"]);
        // A body that is not JSON claims nothing and is still stored.
        conn.execute("UPDATE apps SET body = 'nope' WHERE key = 'c'", []).unwrap();
        assert!(claim(&mut store, "b.test").is_empty());
    }
}
