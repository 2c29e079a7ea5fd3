//! The SQLite RIB as operators handle it: hand edits with the `sqlite3` shell Debian ships,
//! databases made by an earlier tern, rows that do not decode across a restart, and the
//! file replaced under a running proxy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backend::Backend;
use crate::harness::{self, Ca, HttpVersion, Proxy, ServeProcess, app_decl, eventually};

/// The `sqlite3` shell, which these tests need (Debian: `apt-get install sqlite3`; `.ci/run`
/// installs it). Missing, the test fails saying so rather than skipping.
fn sqlite3_shell() -> std::process::Command {
    let probe = std::process::Command::new("sqlite3").arg("-version").output();
    match probe {
        Ok(out) if out.status.success() => {
            println!("sqlite3 shell {}", String::from_utf8_lossy(&out.stdout).trim());
        }
        Ok(out) => panic!("`sqlite3 -version` failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => panic!(
            "this test needs the sqlite3 shell on PATH ({e}); on Debian: apt-get install sqlite3 \
             (.ci/run installs it)"
        ),
    }
    std::process::Command::new("sqlite3")
}

/// Runs a shell command line, failing the test with its stderr if it fails.
fn sh(line: &str) {
    let out = std::process::Command::new("sh").arg("-c").arg(line).output().unwrap();
    assert!(out.status.success(), "`{line}` failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The hand-edit example of docs/rib.md, for the database at `db`.
fn documented_hand_edit(db: &Path) -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/rib.md")).unwrap();
    let line = doc
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("sqlite3 tern.db "))
        .expect("docs/rib.md shows a `sqlite3 tern.db ...` hand edit");
    line.replacen("tern.db", &format!("'{}'", db.display()), 1)
}

async fn machine_state(admin: std::net::SocketAddr, app: &str, id: &str) -> Option<String> {
    crate::harness::install_crypto();
    let r = reqwest::get(format!("http://{admin}/v1/apps/{app}")).await.ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    let m = v["machines"].as_array()?.iter().find(|m| m["id"] == id)?;
    m["state"].as_str().map(String::from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_hand_edit_works_with_the_debian_sqlite3_shell() {
    let _ = sqlite3_shell();
    let b = Backend::start("hello-1").await;
    let proxy =
        Proxy::start(&app_decl("hello", &["hello.test"], &[("hello-1", b.addr, "started")], "")).await;
    assert_eq!(machine_state(proxy.admin, "hello", "hello-1").await.as_deref(), Some("started"));

    sh(&documented_hand_edit(&proxy.db));
    let stopped = eventually(Duration::from_secs(5), || async {
        (machine_state(proxy.admin, "hello", "hello-1").await.as_deref() == Some("stopped")).then_some(())
    })
    .await;
    assert!(stopped.is_some(), "the running proxy never served the hand edit");
}

/// The schema tern wrote before it recorded a version (times from `unixepoch('subsec')`).
const SCHEMA_V1: &str = r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, key TEXT NOT NULL,
    body TEXT, at INTEGER NOT NULL);
INSERT INTO meta (key, value) VALUES ('epoch', '00000000000000000000000000000v1');
"#;

fn table_v1(t: &str) -> String {
    let now = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";
    format!(
        "CREATE TABLE {t} (key TEXT PRIMARY KEY, body TEXT NOT NULL, updated_at INTEGER NOT NULL DEFAULT ({now}));
CREATE TRIGGER {t}_ins AFTER INSERT ON {t} BEGIN
    INSERT INTO changes (tbl, key, body, at) VALUES ('{t}', NEW.key, NEW.body, {now});
END;
CREATE TRIGGER {t}_upd AFTER UPDATE ON {t} WHEN OLD.body IS NOT NEW.body OR OLD.key IS NOT NEW.key BEGIN
    INSERT INTO changes (tbl, key, body, at) SELECT '{t}', OLD.key, NULL, {now} WHERE OLD.key IS NOT NEW.key;
    INSERT INTO changes (tbl, key, body, at) VALUES ('{t}', NEW.key, NEW.body, {now});
END;
CREATE TRIGGER {t}_del AFTER DELETE ON {t} BEGIN
    INSERT INTO changes (tbl, key, body, at) VALUES ('{t}', OLD.key, NULL, {now});
END;"
    )
}

/// Every row of every table but `meta`, as text, in a stable order.
fn dump(db: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut rows = Vec::new();
    for t in ["apps", "machines", "certificates", "machine_states"] {
        let mut st = conn.prepare(&format!("SELECT key, body, updated_at FROM {t} ORDER BY key")).unwrap();
        let it = st
            .query_map([], |r| {
                Ok(format!(
                    "{t} {} {} {}",
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?
                ))
            })
            .unwrap();
        rows.extend(it.map(Result::unwrap));
    }
    // Session keys are tern's own (a proxy adds one at start), not the operator's rows.
    let mut st = conn
        .prepare("SELECT seq, tbl, key, body, at FROM changes WHERE tbl != 'session_keys' ORDER BY seq")
        .unwrap();
    let it = st
        .query_map([], |r| {
            Ok(format!(
                "change {} {} {} {:?} {}",
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, i64>(4)?
            ))
        })
        .unwrap();
    rows.extend(it.map(Result::unwrap));
    rows
}

fn write_config(dir: &Path, db: &Path) -> PathBuf {
    let config = dir.join("tern.toml");
    // JSON logs: `ServeProcess` reads its addresses from them.
    std::fs::write(&config, harness::node_config(db, "") + "format = \"json\"\n").unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rib_made_by_an_earlier_tern_is_migrated_keeping_its_rows_and_cursors() {
    let mut shell = sqlite3_shell();
    let ca = Ca::new();
    let b = Backend::start("hello-1").await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        let mut ddl = SCHEMA_V1.to_string();
        for t in ["apps", "machines", "certificates", "machine_states"] {
            ddl += &table_v1(t);
        }
        conn.execute_batch(&ddl).unwrap();
        let app = r#"{"name":"hello","hostnames":["hello.test"]}"#;
        let machine = format!(
            r#"{{"id":"hello-1","app":"hello","region":"ams","addr":"{}","state":"started"}}"#,
            b.addr
        );
        conn.execute("INSERT INTO apps (key, body) VALUES ('hello', ?1)", [app]).unwrap();
        conn.execute("INSERT INTO apps (key, body) VALUES ('gone', '{}')", []).unwrap();
        conn.execute("DELETE FROM apps WHERE key = 'gone'", []).unwrap();
        conn.execute("INSERT INTO machines (key, body) VALUES ('hello-1', ?1)", [machine]).unwrap();
    }
    let before = dump(&db);
    assert_eq!(before.iter().filter(|r| r.starts_with("change ")).count(), 4);
    let cursor = tern::rib::Cursor { epoch: "00000000000000000000000000000v1".into(), seq: 4 };

    // A proxy of this version opens it: it migrates, and serves what it holds.
    let serve = ServeProcess::start(&write_config(dir.path(), &db)).await;
    let client = harness::client_for(serve.http, serve.https, &ca, HttpVersion::Http1);
    let url = format!("http://hello.test:{}/id", serve.http.port());
    assert_eq!(client.get(&url).send().await.unwrap().text().await.unwrap(), "hello-1");
    assert_eq!(dump(&db), before, "rows, their times and the change log are kept as they were");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let version: String =
        conn.query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| r.get(0)).unwrap();
    assert_eq!(version, tern::rib::sqlite::SCHEMA_VERSION.to_string());

    // A cursor from before the migration resumes: it gets the next change, not a snapshot.
    let rib = tern::rib::sqlite::SqliteRib::open(&db, Duration::from_millis(5)).unwrap();
    let mut sub = tern::rib::Rib::subscribe(&rib, Some(cursor));
    // The Debian shell writes through the migrated triggers and column defaults.
    // With a busy timeout, as an operator's retry would: the proxy may be writing a state.
    let out = shell
        .args(["-cmd", ".timeout 5000"])
        .arg(&db)
        .arg("INSERT INTO apps (key, body) VALUES ('shell', '{\"name\":\"shell\",\"hostnames\":[\"shell.test\"]}')")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The session key the proxy made at start comes first (in the same batch or its own).
    let mut seen = Vec::new();
    let mut last = None;
    while !seen.iter().any(|(_, key)| key == "shell") {
        let event =
            tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap().unwrap();
        let (changes, cursor) = match event {
            tern::rib::RibEvent::Changes { changes, cursor } => (changes, cursor),
            tern::rib::RibEvent::Live => continue,
            tern::rib::RibEvent::Snapshot { .. } | tern::rib::RibEvent::SnapshotPart(_) => {
                panic!("a snapshot, not a resume")
            }
        };
        seen.extend(changes.iter().map(|c| (c.table.as_str(), c.key.clone())));
        last = changes.last().cloned().map(|c| (c, cursor.seq));
    }
    assert_eq!(seen, [("session_keys", "1".to_string()), ("apps", "shell".to_string())]);
    let (shell_change, seq) = last.unwrap();
    assert_eq!(seq, 6);
    assert!(
        shell_change.committed_at_ms > 1_600_000_000_000,
        "a time in milliseconds: {}",
        shell_change.committed_at_ms
    );
    let served = eventually(Duration::from_secs(5), || async {
        let r = client.get(format!("http://shell.test:{}/", serve.http.port())).send().await.ok()?;
        (r.headers().get("tern-error").map(|v| v.as_bytes()) != Some(b"no_app")).then_some(())
    })
    .await;
    assert!(served.is_some(), "the shell's row is never served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_row_keeps_its_last_good_version_serving_across_a_restart() {
    crate::harness::install_crypto();
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    harness::apply_decl(&db, &app_decl("a", &["a.test"], &[("m1", b.addr, "started")], ""));
    let config = write_config(dir.path(), &db);
    let get = |serve: &ServeProcess| {
        let client = harness::client_for(serve.http, serve.https, &ca, HttpVersion::Http1);
        let url = format!("http://a.test:{}/id", serve.http.port());
        async move { client.get(url).send().await.unwrap().status() }
    };

    let mut serve = ServeProcess::start(&config).await;
    assert_eq!(get(&serve).await, 200);
    // Another writer breaks the row; the running proxy keeps the version it has.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("UPDATE apps SET body = '{\"name\": \"a\", \"hostnames\": [' WHERE key = 'a'", []).unwrap();
    let kept = eventually(Duration::from_secs(5), || async {
        let m = reqwest::get(format!("http://{}/metrics", serve.admin)).await.ok()?.text().await.ok()?;
        m.contains("tern_rib_rows_skipped_total{table=\"apps\"} 1").then_some(())
    })
    .await;
    assert!(kept.is_some(), "the running proxy never saw the bad row");
    assert_eq!(get(&serve).await, 200);

    // Restarted on the same RIB, it serves the same.
    serve.child.kill().await.unwrap();
    let serve = ServeProcess::start(&config).await;
    assert_eq!(get(&serve).await, 200, "the app vanished at restart");
    let m = reqwest::get(format!("http://{}/metrics", serve.admin)).await.unwrap().text().await.unwrap();
    assert!(m.contains("tern_rib_rows_kept_total{table=\"apps\"} 1"), "counted as kept: {m}");
}

/// Removes a database's write-ahead log and its index, as a replacement must (docs/rib.md).
fn remove_log(db: &Path) {
    for suffix in ["-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rib_file_replaced_under_a_running_proxy_is_resynced() {
    let ca = Ca::new();
    let b = Backend::start("m").await;
    let proxy = Proxy::start(&app_decl("first", &["first.test"], &[("m1", b.addr, "started")], "")).await;
    let client = proxy.client(&ca, HttpVersion::Http1);
    let status = |host: &'static str| {
        let (client, url) = (client.clone(), proxy.url(host, "/id"));
        async move { client.get(url).send().await.unwrap().status().as_u16() }
    };
    let serves = |host: &'static str, want: u16| async move {
        eventually(Duration::from_secs(5), || async { (status(host).await == want).then_some(()) })
            .await
            .is_some()
    };
    let rib_errors = || async {
        let m = proxy.metrics().await;
        m.lines().find_map(|l| l.strip_prefix("tern_rib_errors_total ")).map(|v| v.trim().to_string())
    };
    let config = write_config(proxy.dir.path(), &proxy.db);
    let tern_apply = |decl: &str, db_config: &Path| {
        let path = proxy.dir.path().join("decl.toml");
        std::fs::write(&path, decl).unwrap();
        let out = std::process::Command::new(harness::tern_bin())
            .args(["apply", "-c"])
            .arg(db_config)
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "tern apply: {}", String::from_utf8_lossy(&out.stderr));
    };
    assert_eq!(status("first.test").await, 200);

    // Deleted: the proxy says so once, keeps serving, and puts no empty RIB in its place.
    std::fs::remove_file(&proxy.db).unwrap();
    let noticed = eventually(Duration::from_secs(5), || async {
        (rib_errors().await.as_deref() == Some("1")).then_some(())
    })
    .await;
    assert!(noticed.is_some(), "the deletion was not noticed");
    assert_eq!(status("first.test").await, 200);
    assert!(!proxy.db.exists(), "an empty RIB was created in place of the deleted one");

    // Re-created by `tern apply`, the old file's log removed with it (docs/rib.md): the proxy
    // serves the new file, and only it.
    remove_log(&proxy.db);
    tern_apply(&app_decl("second", &["second.test"], &[("m2", b.addr, "started")], ""), &config);
    assert!(serves("second.test", 200).await, "the re-created RIB is never served");
    assert!(serves("first.test", 404).await, "what the deleted RIB held is still served");

    // Renamed over, its log removed first (docs/rib.md), with the old file's latest changes
    // still in that log (the proxy's open connection keeps them from being checkpointed).
    tern_apply(
        &app_decl("second", &["second.test", "again.test"], &[("m2", b.addr, "started")], ""),
        &config,
    );
    assert!(serves("again.test", 200).await);
    let elsewhere = proxy.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let other_db = elsewhere.join("rib.db");
    tern_apply(
        &app_decl("third", &["third.test"], &[("m3", b.addr, "started")], ""),
        &write_config(&elsewhere, &other_db),
    );
    remove_log(&proxy.db);
    std::fs::rename(&other_db, &proxy.db).unwrap();
    // Written at once, before the proxy can have noticed: nothing of it may be lost (tern
    // never deletes a log at the path, nor closes the replaced file's connection, which would
    // delete it by name).
    tern_apply(&app_decl("late", &["late.test"], &[("m5", b.addr, "started")], ""), &config);
    assert!(serves("late.test", 200).await, "a write right after the rename was lost");
    assert!(serves("third.test", 200).await, "the file renamed over the RIB is never served");
    assert!(serves("second.test", 404).await);
    assert!(serves("again.test", 404).await);

    // Restored in place by the shell: pages copied, log and epoch included, no trigger fired.
    let fourth_db = elsewhere.join("fourth.db");
    tern_apply(
        &app_decl("fourth", &["fourth.test"], &[("m4", b.addr, "started")], ""),
        &write_config(&elsewhere, &fourth_db),
    );
    let out =
        sqlite3_shell().arg(&proxy.db).arg(format!(".restore '{}'", fourth_db.display())).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(serves("fourth.test", 200).await, "the restored RIB is never served");
    assert!(serves("third.test", 404).await);
    assert_eq!(rib_errors().await.as_deref(), Some("1"), "a replacement is no error");
    let mut store = tern::rib::sqlite::Store::open(&proxy.db).unwrap();
    let apps: Vec<String> =
        store.read_all(tern::rib::Table::Apps).unwrap().into_iter().map(|r| r.key).collect();
    assert_eq!(apps, vec!["fourth"], "the new file is intact");
    let conn = rusqlite::Connection::open(&proxy.db).unwrap();
    let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(ok, "ok");
}
