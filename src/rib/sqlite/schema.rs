//! The SQLite RIB's schema, and the migration of databases made by earlier versions.
//!
//! Why the schema is versioned: the triggers and the `updated_at` default are evaluated by
//! whichever SQLite library writes the row, and that is not always tern's own: an operator's
//! `sqlite3` shell writes through the triggers too. Version 1 used `unixepoch('subsec')`,
//! which SQLite 3.40 (Debian 12's shell) evaluates to NULL, so a hand edit there failed a
//! NOT NULL constraint. Version 2 computes the time from `julianday('now')`, which every
//! SQLite since 3.0 evaluates. A column default cannot be altered in SQLite, so the
//! migration rebuilds the four record tables (copying their rows, `updated_at` included)
//! and recreates their triggers, in the same transaction that records the new version. The
//! change log and the epoch are left alone, so subscribers' cursors stay valid.
//!
//! Version 3 adds the `session_keys` table (with its triggers); a version 2 database only
//! gains it, nothing is rebuilt.
//!
//! Version 4 adds `app_hosts`, an index of the hostnames each app row claims, kept by
//! triggers on `apps` (so hand edits keep it too) and filled from the rows at migration:
//! `tern apply` checks a declared hostname with one lookup instead of reading every app.
//!
//! Version 5 adds the `nodes` table (with its triggers), where fleet nodes publish their
//! heartbeats; nothing is rebuilt.
//!
//! Version 6 adds the `orgs` table (with its triggers); nothing is rebuilt.
//!
//! The version is `meta.schema`; a database without it predates versioning (version 1 when
//! it has a `meta` table, new otherwise).

use std::path::Path;

use rusqlite::{OptionalExtension, Transaction};

use crate::rib::{RibError, Table};

/// The schema this build writes.
pub const VERSION: i64 = 6;
/// Tables made before this version have the old `updated_at` default and are rebuilt.
const REBUILT_BEFORE: i64 = 2;

/// The current time in milliseconds since the Unix epoch, as an SQL expression. 2440587.5
/// is the Julian day of 1970-01-01T00:00Z; `'now'` has millisecond precision, and the
/// rounding keeps floating-point error from taking a millisecond off.
pub const NOW_MS: &str = "CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)";

const BASE: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS changes (
    seq  INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl  TEXT NOT NULL,
    key  TEXT NOT NULL,
    body TEXT,
    at   INTEGER NOT NULL
);
"#;

fn create_table(name: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {name} (
    key        TEXT PRIMARY KEY,
    body       TEXT NOT NULL,
    updated_at INTEGER NOT NULL DEFAULT ({NOW_MS})
);"
    )
}

/// The triggers that append every change of table `t` to the log.
fn create_triggers(t: &str) -> String {
    let now = NOW_MS;
    format!(
        r#"
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

/// The hostnames an app row's body claims, as rows of `json_each` (for `app` = `key`); a
/// body that is not JSON claims nothing, and is not refused: a bad row is the catalog's to
/// skip, not the index's to block.
fn hosts_of(body: &str) -> String {
    format!("json_each(CASE WHEN json_valid({body}) THEN {body} ELSE '{{}}' END, '$.hostnames')")
}

/// The hostname index (version 4) and the triggers that keep it.
fn create_host_index() -> String {
    let new = hosts_of("NEW.body");
    format!(
        r#"
CREATE TABLE IF NOT EXISTS app_hosts (hostname TEXT NOT NULL, app TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS app_hosts_by_hostname ON app_hosts (hostname);
CREATE INDEX IF NOT EXISTS app_hosts_by_app ON app_hosts (app);
CREATE TRIGGER IF NOT EXISTS apps_hosts_ins AFTER INSERT ON apps BEGIN
    INSERT INTO app_hosts (hostname, app) SELECT value, NEW.key FROM {new} WHERE type = 'text';
END;
CREATE TRIGGER IF NOT EXISTS apps_hosts_upd AFTER UPDATE ON apps WHEN OLD.body IS NOT NEW.body OR OLD.key IS NOT NEW.key BEGIN
    DELETE FROM app_hosts WHERE app = OLD.key;
    INSERT INTO app_hosts (hostname, app) SELECT value, NEW.key FROM {new} WHERE type = 'text';
END;
CREATE TRIGGER IF NOT EXISTS apps_hosts_del AFTER DELETE ON apps BEGIN
    DELETE FROM app_hosts WHERE app = OLD.key;
END;
"#
    )
}

/// Fills the hostname index from the app rows (a database from before version 4).
fn fill_host_index() -> String {
    let each = hosts_of("apps.body");
    format!(
        "DELETE FROM app_hosts;
INSERT INTO app_hosts (hostname, app) SELECT j.value, apps.key FROM apps, {each} AS j WHERE j.type = 'text';"
    )
}

fn drop_triggers(t: &str) -> String {
    format!("DROP TRIGGER IF EXISTS {t}_ins; DROP TRIGGER IF EXISTS {t}_upd; DROP TRIGGER IF EXISTS {t}_del;")
}

/// Rebuilds table `t` with the current definition, keeping its rows. Its triggers must be
/// gone first, so the copy writes nothing to the change log.
fn rebuild_table(t: &str) -> String {
    let new = format!("{t}__v{REBUILT_BEFORE}");
    format!(
        "{create}
INSERT INTO {new} (key, body, updated_at) SELECT key, body, updated_at FROM {t};
DROP TABLE {t};
ALTER TABLE {new} RENAME TO {t};",
        create = create_table(&new),
    )
}

fn table_exists(tx: &Transaction<'_>, name: &str) -> rusqlite::Result<bool> {
    tx.query_row("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [name], |r| {
        r.get::<_, i64>(0)
    })
    .map(|n| n > 0)
}

/// Brings the schema in `tx` to [`VERSION`], creating what is missing; refuses a database
/// written by a newer tern rather than guess at its meaning.
pub fn ensure(tx: &Transaction<'_>, path: &Path) -> Result<(), RibError> {
    let other = super::sql_err(path);
    let had_meta = table_exists(tx, "meta").map_err(&other)?;
    tx.execute_batch(BASE).map_err(&other)?;
    let recorded: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| r.get(0))
        .optional()
        .map_err(&other)?;
    let version = match &recorded {
        Some(v) => v
            .parse::<i64>()
            .map_err(|_| RibError::Other(format!("{}: unreadable schema version {v:?}", path.display())))?,
        None if had_meta => 1,
        None => VERSION,
    };
    if version > VERSION {
        return Err(RibError::Other(format!(
            "{}: schema version {version}, but this tern understands up to {VERSION}: upgrade tern",
            path.display()
        )));
    }
    let mut sql = String::new();
    for t in Table::ALL.map(Table::as_str) {
        if version < REBUILT_BEFORE {
            sql += &drop_triggers(t);
            if table_exists(tx, t).map_err(&other)? {
                sql += &rebuild_table(t);
            }
        }
        sql += &create_table(t);
        sql += &create_triggers(t);
    }
    sql += &create_host_index();
    if version < 4 {
        sql += &fill_host_index();
    }
    tx.execute_batch(&sql).map_err(&other)?;
    if recorded.as_deref() != Some(VERSION.to_string().as_str()) {
        // Only then: a write wakes every subscriber's poll.
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('schema', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [VERSION.to_string()],
        )
        .map_err(&other)?;
    }
    if version < VERSION {
        tracing::info!(target: "tern::rib", from = version, to = VERSION, "RIB schema migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_ms_is_the_current_time_in_milliseconds() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        let sql: i64 = conn.query_row(&format!("SELECT {NOW_MS}"), [], |r| r.get(0)).unwrap();
        let after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        // SQLite's clock has millisecond resolution; allow for the truncation either side.
        assert!(sql >= before.as_millis() as i64 - 1 && sql <= after.as_millis() as i64 + 1, "{sql}");
    }
}
