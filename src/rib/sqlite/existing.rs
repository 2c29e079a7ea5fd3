//! A RIB that may or may not exist yet, looked at without changing it: for `tern check`.
//!
//! `tern serve` and `tern apply` create the database and its schema when the file is
//! missing; `check` must not, and must not take the write lock a running tern needs. So this
//! opens an existing file only, with writes refused (`query_only`), reads the tables `apply`
//! plans against in one read transaction, and says plainly when there was nothing to look at. Anything that would make `serve` or `apply` fail to open
//! the RIB (a directory, a file that is not SQLite, a missing directory, no permission) is
//! an error here too.

use std::io::Read;
use std::path::Path;

use nix::unistd::{AccessFlags, access};
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::{read_table, sql_err};
use crate::rib::{Record, RibError, Table};

/// The tables a plan reads; a database without them has never been a tern RIB.
const PLANNED: [Table; 3] = [Table::Apps, Table::Machines, Table::Certificates];

/// What is at a RIB path.
pub enum Existing {
    /// Nothing to check against, and why (the file does not exist yet, say); `serve` and
    /// `apply` would create it.
    Absent(String),
    /// A RIB, with the rows a plan reads.
    Present(ReadOnly),
}

/// The rows of an existing RIB as of one moment, read through a read-only connection.
pub struct ReadOnly {
    rows: Vec<Record>,
}

impl ReadOnly {
    pub fn all(&self, table: Table) -> Result<Vec<Record>, RibError> {
        Ok(self.rows.iter().filter(|r| r.table == table).cloned().collect())
    }

    pub fn get(&self, table: Table, key: &str) -> Option<String> {
        self.rows.iter().find(|r| r.table == table && r.key == key).map(|r| r.body.clone())
    }

    pub fn keys(&self, table: Table) -> Vec<String> {
        self.rows.iter().filter(|r| r.table == table).map(|r| r.key.clone()).collect()
    }

    /// The apps whose rows list `hostname`. A scan: `check` reads every row anyway, and a
    /// database from before the hostname index has none.
    pub fn claimants(&self, hostname: &str) -> Vec<String> {
        self.rows
            .iter()
            .filter(|r| r.table == Table::Apps)
            .filter(|r| crate::decl::plan::claimed_hostnames(Some(&r.body)).contains(hostname))
            .map(|r| r.key.clone())
            .collect()
    }
}

fn unusable(path: &Path, reason: impl Into<String>) -> RibError {
    RibError::Unusable { path: path.display().to_string(), reason: reason.into() }
}

/// Looks at the RIB at `path` without creating or changing anything.
pub fn open_existing(path: &Path) -> Result<Existing, RibError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return absent(path),
        Err(e) => return Err(unusable(path, format!("cannot be read: {e}"))),
    };
    if meta.is_dir() {
        return Err(unusable(path, "is a directory; [rib] path must name the database file"));
    }
    let mut head = [0u8; 16];
    let read = std::fs::File::open(path).and_then(|mut f| f.read(&mut head));
    let n = read.map_err(|e| unusable(path, format!("cannot be read: {e}")))?;
    if n == 0 {
        return Ok(Existing::Absent("the file is empty".into()));
    }
    if n < head.len() || &head != b"SQLite format 3\0" {
        return Err(unusable(path, "is not a SQLite database"));
    }
    if let Err(e) = access(path, AccessFlags::R_OK | AccessFlags::W_OK) {
        return Err(unusable(
            path,
            format!("cannot be written by this user ({e}); tern apply and tern serve write it"),
        ));
    }
    let err = sql_err(path);
    // Read-write without CREATE, and query_only: the file is never created and nothing is
    // written, yet closing the last connection tidies the -wal and -shm files away as
    // `apply` does (a read-only connection would leave them behind).
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(&err)?;
    conn.pragma_update(None, "query_only", true).map_err(&err)?;
    // One read transaction, so the tables describe one moment.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred).map_err(&err)?;
    let mut missing = Vec::new();
    for t in PLANNED {
        let found: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
                [t.as_str()],
                |r| r.get(0),
            )
            .map_err(&err)?;
        if !found {
            missing.push(t.as_str());
        }
    }
    if missing.len() == PLANNED.len() {
        return Ok(Existing::Absent("the database holds no tern tables yet".into()));
    }
    if !missing.is_empty() {
        return Err(unusable(path, format!("is not a tern RIB: table {} is missing", missing.join(", "))));
    }
    let mut rows = Vec::new();
    for t in PLANNED {
        rows.extend(read_table(&tx, t, path)?);
    }
    // Made by schema version 6: a RIB from before it has no orgs yet.
    let orgs: bool = tx
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'orgs')",
            [],
            |r| r.get(0),
        )
        .map_err(&err)?;
    if orgs {
        rows.extend(read_table(&tx, Table::Orgs, path)?);
    }
    Ok(Existing::Present(ReadOnly { rows }))
}

/// No file: fine if `serve` could create one there, an error if it could not.
fn absent(path: &Path) -> Result<Existing, RibError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(unusable(path, format!("cannot be created: {} is not a directory", dir.display())));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(unusable(
                path,
                format!("cannot be created: its directory {} does not exist", dir.display()),
            ));
        }
        Err(e) => {
            return Err(unusable(
                path,
                format!("cannot be created: its directory {} cannot be read: {e}", dir.display()),
            ));
        }
    }
    if let Err(e) = access(dir, AccessFlags::W_OK | AccessFlags::X_OK) {
        return Err(unusable(
            path,
            format!("does not exist, and this user cannot create it in {} ({e})", dir.display()),
        ));
    }
    Ok(Existing::Absent("the file does not exist yet".into()))
}
