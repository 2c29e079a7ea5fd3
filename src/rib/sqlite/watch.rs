//! The thread that follows the SQLite RIB for one subscription: a snapshot, then every
//! change after the cursor. It sleeps until the RIB's files change ([`wake`]: inotify, with a
//! slow poll behind it), then asks `PRAGMA data_version` whether another connection
//! committed, and reads the changes if one did.
//!
//! It also watches the path itself. A connection stays on the file it opened, so a RIB
//! deleted and re-created (or renamed over) under a running proxy would go unseen: each
//! look compares the file the path names (device and inode, one `stat`) with the one open,
//! and on a difference reopens and sends a fresh snapshot, which the catalog diffs against
//! what it holds. While the path names nothing, or a file with no RIB in it yet, nothing is
//! created there (an empty RIB would empty the catalog): the subscriber is told once, keeps
//! serving what it has, and the thread waits for the RIB to come back.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior, params};
use tokio::sync::mpsc;

use super::wake::{RECHECK, Wake, Woke};
use super::{BATCH, FileId, Opened, abandon, file_id, open_conn, sql_err};
use crate::rib::{Change, Cursor, Resync, RibError, RibEvent, Rows, SpareRows, Table};

type Tx = mpsc::Sender<Result<RibEvent, RibError>>;

const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// Starts the watcher thread; it runs until the subscription is dropped (`gone` hangs up).
/// Its files are watched from now on, so no commit made after the snapshot goes unnoticed.
pub(super) fn spawn(
    path: PathBuf,
    poll: Duration,
    from: Option<Cursor>,
    out: (Tx, Arc<SpareRows>),
    gone: OwnedFd,
) {
    let wake = Wake::new(&path, poll, gone);
    let (tx, spare) = out;
    let watcher =
        Watcher { path, wake, tx, spare, cursor: from, file: None, absent: false, backoff: FIRST_BACKOFF };
    let spawned = std::thread::Builder::new().name("tern-rib-watch".into()).spawn(move || watcher.run());
    if let Err(e) = spawned {
        tracing::error!(target: "tern::rib", error = %e, "could not start the RIB watcher thread");
    }
}

struct Watcher {
    path: PathBuf,
    wake: Wake,
    tx: Tx,
    /// Snapshot parts the subscriber handed back, to fill again.
    spare: Arc<SpareRows>,
    cursor: Option<Cursor>,
    /// The file the cursor belongs to, once one was opened.
    file: Option<FileId>,
    /// The subscriber was told the RIB is gone and has not heard it is back.
    absent: bool,
    backoff: Duration,
}

/// Why [`Watcher::follow`] returned without an error.
enum Stop {
    Unsubscribed,
    /// The path names another file now.
    Moved,
}

impl Watcher {
    /// Errors are sent on, then retried with back-off; an absent RIB is reported once.
    fn run(mut self) {
        loop {
            match self.follow() {
                Ok(Stop::Unsubscribed) => return,
                Ok(Stop::Moved) => {
                    tracing::warn!(target: "tern::rib", path = %self.path.display(),
                        "the RIB file was replaced; reopening it and resynchronising");
                }
                Err(e) if e.is_absent() => {
                    let no_schema = matches!(e, RibError::NoSchema { .. });
                    if !self.absent {
                        self.absent = true;
                        if self.tx.blocking_send(Err(e)).is_err() {
                            return;
                        }
                    }
                    // A writer may be creating it; retry opening with back-off.
                    if (no_schema && !self.pause()) || !self.wait_for_path() {
                        return;
                    }
                }
                Err(e) => {
                    if self.tx.blocking_send(Err(e)).is_err() || !self.pause() {
                        return;
                    }
                }
            }
        }
    }

    /// Backs off before trying again. False if the subscriber went away meanwhile.
    fn pause(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
        // File events only cut the pause short; it is a pause all the same.
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.wake.wait(left) {
                Woke::Unsubscribed => return false,
                _ if left.is_zero() => return true,
                _ => {}
            }
        }
    }

    /// Waits, one `stat` per file event or poll, until the path names a file. False if the
    /// subscriber went away meanwhile.
    fn wait_for_path(&mut self) -> bool {
        loop {
            if self.tx.is_closed() {
                return false;
            }
            if matches!(file_id(&self.path), Ok(Some(_))) {
                return true;
            }
            if self.wake.wait(self.wake.poll) == Woke::Unsubscribed {
                return false;
            }
        }
    }

    /// Opens the RIB and follows it until the subscriber goes away, the path names another
    /// file, or something fails.
    fn follow(&mut self) -> Result<Stop, RibError> {
        let path = self.path.clone();
        let err = sql_err(&path);
        let (mut conn, file) = open_conn(&path, false)?;
        let mut epoch = super::ensure_schema(&mut conn, &path)?;
        conn.pragma_update(None, "query_only", true).map_err(&err)?;
        let opened = Opened::now(&path, file);
        // A file that replaced the one the cursor came from may share its epoch (a copy
        // restored from a backup) without continuing its history: start over from a snapshot.
        let replaced = self.file.is_some_and(|f| f != file);
        if self.absent {
            tracing::info!(target: "tern::rib", path = %path.display(), "the RIB is back; resynchronising");
            self.absent = false;
        }
        self.file = Some(file);
        self.backoff = FIRST_BACKOFF;
        // Open again after a failure: the subscriber hears the RIB is followed again.
        if self.tx.blocking_send(Ok(RibEvent::Live)).is_err() {
            return Ok(Stop::Unsubscribed);
        }
        let mut reason = match &self.cursor {
            _ if replaced => Some(Resync::Replaced),
            Some(c) if c.epoch == epoch => {
                oldest_seq(&conn, &path)?.is_some_and(|min| min > c.seq + 1).then_some(Resync::Compacted)
            }
            Some(_) => Some(Resync::Replaced),
            None => Some(Resync::Start),
        };
        let mut seen_version = data_version(&conn, &path)?;
        loop {
            if let Some(reason) = reason.take() {
                let Some(seq) = send_snapshot(&mut conn, &path, (&self.tx, &self.spare))? else {
                    return Ok(Stop::Unsubscribed);
                };
                let c = Cursor { epoch: epoch.clone(), seq };
                self.cursor = Some(c.clone());
                // Every row went in the parts before it.
                let records = Vec::new();
                if self.tx.blocking_send(Ok(RibEvent::Snapshot { records, cursor: c, reason })).is_err() {
                    return Ok(Stop::Unsubscribed);
                }
            }
            let Some(at) = self.cursor.as_mut() else { return Ok(Stop::Unsubscribed) };
            if drain_changes(&conn, &path, at, &self.tx)? {
                reason = Some(Resync::Compacted);
            }
            if self.tx.is_closed() {
                return Ok(Stop::Unsubscribed);
            }
            if reason.is_some() {
                continue;
            }
            match self.wait_for_commit(&conn, &opened, &mut seen_version) {
                Ok(None) => {}
                // The file is gone from the path: its connection must never close.
                Ok(Some(Stop::Moved)) => {
                    abandon(conn);
                    return Ok(Stop::Moved);
                }
                Err(e) if e.is_absent() => {
                    abandon(conn);
                    return Err(e);
                }
                other => return other.map(|stop| stop.unwrap_or(Stop::Unsubscribed)),
            }
            // The content may have been replaced in place (`sqlite3 tern.db ".restore
            // other.db"` copies pages, log included, and fires no trigger): a log from
            // another history, or one rewound behind the cursor, needs a snapshot.
            let (now_epoch, last_seq) = log_head(&conn, &path)?;
            if now_epoch != epoch || self.cursor.as_ref().is_some_and(|c| last_seq < c.seq) {
                tracing::warn!(target: "tern::rib", path = %path.display(),
                    "the RIB's change log was replaced; resynchronising");
                epoch = now_epoch;
                reason = Some(Resync::Replaced);
            }
        }
    }
}

/// The store's epoch and the last sequence number in its log.
fn log_head(conn: &Connection, path: &Path) -> Result<(String, i64), RibError> {
    conn.query_row(
        "SELECT (SELECT value FROM meta WHERE key = 'epoch'), (SELECT COALESCE(MAX(seq), 0) FROM changes)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .map_err(sql_err(path))
}

impl Watcher {
    /// Waits for file events (or the poll) until another connection commits (`None`), the
    /// subscriber goes away, or the path names another file or none.
    fn wait_for_commit(
        &mut self,
        conn: &Connection,
        opened: &Opened,
        seen: &mut i64,
    ) -> Result<Option<Stop>, RibError> {
        // After an event that showed no commit, the next looks come soon (see RECHECK).
        let mut recheck = RECHECK.len();
        loop {
            let timeout = RECHECK.get(recheck).copied().unwrap_or(self.wake.poll);
            match self.wake.wait(timeout) {
                Woke::Unsubscribed => return Ok(Some(Stop::Unsubscribed)),
                Woke::Changed => recheck = 0,
                Woke::Timeout => recheck = (recheck + 1).min(RECHECK.len()),
            }
            if self.tx.is_closed() {
                return Ok(Some(Stop::Unsubscribed));
            }
            match file_id(&self.path)? {
                Some(now) if now == opened.db => {}
                now => {
                    return match now {
                        None => Err(super::missing(&self.path)),
                        Some(_) => Ok(Some(Stop::Moved)),
                    };
                }
            }
            let v = data_version(conn, &self.path)?;
            if v != *seen {
                *seen = v;
                return Ok(None);
            }
        }
    }
}

/// Sends every change after `at`, advancing it. Returns true when the log no longer holds
/// the next change (it was pruned), so a snapshot is needed.
fn drain_changes(conn: &Connection, path: &Path, at: &mut Cursor, tx: &Tx) -> Result<bool, RibError> {
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

/// Bytes of keys and bodies sent in one [`RibEvent::SnapshotPart`]: the subscriber decodes
/// one part while the next is read, and no more than a few parts are ever held. Tiny in unit
/// tests, so that their snapshots come in parts too.
const PART_BYTES: usize = if cfg!(test) { 8 } else { 4 << 20 };

/// Reads the whole RIB, sending it in parts as it goes; returns the cursor they describe
/// (for the `Snapshot` event that ends them), or `None` if the subscriber went away. The
/// first part says about how many rows each table holds (the largest rowid: exact unless
/// rows were deleted, and then above), so the catalog sizes its maps once.
fn send_snapshot(
    conn: &mut Connection,
    path: &Path,
    out: (&Tx, &SpareRows),
) -> Result<Option<i64>, RibError> {
    let (out, spare) = out;
    let err = sql_err(path);
    // One read transaction, so the rows and the cursor describe the same moment.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred).map_err(&err)?;
    let seq: i64 =
        tx.query_row("SELECT COALESCE(MAX(seq), 0) FROM changes", [], |r| r.get(0)).map_err(&err)?;
    let fresh = || spare.take().unwrap_or_else(|| Rows::with_capacity(PART_BYTES / 128, PART_BYTES + 4096));
    let mut part = fresh();
    for t in Table::ALL {
        let sql = format!("SELECT COALESCE(MAX(rowid), 0) FROM {}", t.as_str());
        let rows: i64 = tx.query_row(&sql, [], |r| r.get(0)).map_err(&err)?;
        part.expect(t, usize::try_from(rows).unwrap_or(0));
    }
    for t in Table::ALL {
        let sql = format!("SELECT key, body FROM {} ORDER BY key", t.as_str());
        let mut stmt = tx.prepare(&sql).map_err(&err)?;
        let mut rows = stmt.query([]).map_err(&err)?;
        while let Some(row) = rows.next().map_err(&err)? {
            let text = |i| row.get_ref(i).and_then(|v| v.as_str().map_err(Into::into)).map_err(&err);
            part.push(t, text(0)?, text(1)?);
            if part.text_len() >= PART_BYTES && !send(out, std::mem::replace(&mut part, fresh())) {
                return Ok(None);
            }
        }
    }
    tx.commit().map_err(&err)?;
    if !part.is_empty() && !send(out, part) {
        return Ok(None);
    }
    Ok(Some(seq))
}

fn send(out: &Tx, part: Rows) -> bool {
    out.blocking_send(Ok(RibEvent::SnapshotPart(part))).is_ok()
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
