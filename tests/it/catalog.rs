//! The catalog follows the RIB: `tern apply` while streams are open, invalid declarations,
//! bad rows, machines that leave.

use std::time::Duration;

use crate::backend::Backend;
use crate::harness::{self, Ca, HttpVersion, Proxy, app_decl, eventually};

/// Every row of the RIB, read with tern's own store.
fn rib_rows(db: &std::path::Path) -> Vec<(String, String, String)> {
    let mut store = tern::rib::sqlite::Store::open(db).unwrap();
    let mut rows = Vec::new();
    // Not session keys: the proxy writes its own at start, whenever its task gets to it.
    for t in tern::rib::Table::ALL.into_iter().filter(|t| *t != tern::rib::Table::SessionKeys) {
        for r in store.read_all(t).unwrap() {
            rows.push((t.as_str().to_string(), r.key, r.body));
        }
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_while_a_stream_is_open_serves_the_new_route_and_keeps_the_stream() {
    let ca = Ca::new();
    let b1 = Backend::start("m1").await;
    let b2 = Backend::start("m2").await;
    let proxy = Proxy::start(&app_decl("first", &["first.test"], &[("m1", b1.addr, "started")], "")).await;
    let client = proxy.client(&ca, HttpVersion::Http1);

    let mut stream = client.get(proxy.url("first.test", "/sse")).send().await.unwrap();
    let first = stream.chunk().await.unwrap().unwrap();
    assert_eq!(&first[..], b"data: one\n\n");

    // The real command, as an operator runs it, against the proxy's RIB.
    let decl_path = proxy.dir.path().join("second.toml");
    std::fs::write(&decl_path, app_decl("second", &["second.test"], &[("m2", b2.addr, "started")], ""))
        .unwrap();
    let config_path = proxy.dir.path().join("tern.toml");
    std::fs::write(&config_path, harness::node_config(&proxy.db, "")).unwrap();
    let out = tokio::process::Command::new(harness::tern_bin())
        .args(["apply", "-c"])
        .arg(&config_path)
        .arg(&decl_path)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "+ app second\n+ machine m2\n2 changed, 0 unchanged\n");

    // Served without a restart. How soon is measured by `cargo bench --bench catalog -- rib`
    // (docs/benchmarks.md), not asserted here: a wall-clock bound fails on a busy machine.
    let served = eventually(Duration::from_secs(10), || async {
        let r = client.get(proxy.url("second.test", "/id")).send().await.ok()?;
        (r.status() == 200).then_some(r.text().await.ok()?)
    })
    .await;
    assert_eq!(served.as_deref(), Some("m2"), "the new app is never served");

    // The stream opened before the change is unharmed and ends normally.
    b1.gate.notify_one();
    let second = stream.chunk().await.unwrap().unwrap();
    assert_eq!(&second[..], b"data: two\n\n");
    assert!(stream.chunk().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_declaration_exits_non_zero_and_changes_nothing() {
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(&app_decl("keep", &["keep.test"], &[("m1", b.addr, "started")], "")).await;
    let config_path = proxy.dir.path().join("tern.toml");
    std::fs::write(&config_path, harness::node_config(&proxy.db, "")).unwrap();
    let before = rib_rows(&proxy.db);

    // Valid first app, broken second one: the valid part must not land either.
    let bad = "[[apps]]\nname = \"fine\"\nhostnames = [\"fine.test\"]\n\n[[apps]]\nname = \"broken\"\nhostnames = [\"not a host\"]\n";
    let decl_path = proxy.dir.path().join("bad.toml");
    std::fs::write(&decl_path, bad).unwrap();
    for cmd in ["apply", "check"] {
        let out = std::process::Command::new(harness::tern_bin())
            .args([cmd, "-c"])
            .arg(&config_path)
            .arg(&decl_path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("bad.toml:7: apps[1].hostnames[0]:"), "{stderr}");
    }
    // A conflict only the RIB can reveal: a hostname another app holds.
    std::fs::write(&decl_path, "[[apps]]\nname = \"thief\"\nhostnames = [\"keep.test\"]\n").unwrap();
    let out = std::process::Command::new(harness::tern_bin())
        .args(["apply", "-c"])
        .arg(&config_path)
        .arg(&decl_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"keep.test\""));
    assert_eq!(rib_rows(&proxy.db), before, "the RIB is unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rib_row_is_skipped_counted_and_the_rest_applies() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(&app_decl("a", &["a.test"], &[("m1", b.addr, "started")], "")).await;
    // Another writer (an operator with sqlite3, a buggy tool) commits junk beside a good row.
    let conn = rusqlite::Connection::open(&proxy.db).unwrap();
    let good_machine = format!(r#"{{"id":"m2","app":"b","addr":"{}","state":"started"}}"#, b.addr);
    conn.execute_batch(&format!(
        "BEGIN;
         INSERT INTO apps (key, body) VALUES ('junk', '{{this is not json');
         INSERT INTO apps (key, body) VALUES ('b', '{{\"name\":\"b\",\"hostnames\":[\"b.test\"]}}');
         INSERT INTO machines (key, body) VALUES ('m2', '{good_machine}');
         COMMIT;"
    ))
    .unwrap();
    let client = proxy.client(&ca, HttpVersion::Http1);
    let ok = eventually(Duration::from_secs(5), || async {
        let r = client.get(proxy.url("b.test", "/id")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert!(ok.is_some(), "the good rows of the same commit apply");
    let m = proxy.metrics().await;
    assert!(m.contains("tern_rib_rows_skipped_total{table=\"apps\"} 1"), "{m}");
    assert_eq!(client.get(proxy.url("a.test", "/id")).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_leaving_the_catalog_finishes_its_in_flight_requests_and_gets_no_new_ones() {
    let ca = Ca::new();
    let leaving = Backend::start("leaving").await;
    let staying = Backend::start("staying").await;
    let both = app_decl("app", &["app.test"], &[("leaving", leaving.addr, "started")], "");
    let proxy = Proxy::start(&both).await;
    let client = proxy.client(&ca, HttpVersion::Http1);

    let in_flight = tokio::spawn({
        let client = client.clone();
        let url = proxy.url("app.test", "/hang");
        async move { client.get(url).send().await.unwrap().text().await.unwrap() }
    });
    eventually(Duration::from_secs(5), || async {
        (leaving.requests.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    })
    .await
    .unwrap();

    // Replace the machine: "leaving" goes, "staying" comes.
    let decl = tern::decl::parse(
        &app_decl("app", &["app.test"], &[("staying", staying.addr, "started")], ""),
        "t.toml",
        std::path::Path::new("."),
    )
    .unwrap();
    let mut store = tern::rib::sqlite::Store::open(&proxy.db).unwrap();
    tern::decl::apply(&mut store, &decl, true, false).unwrap();
    let moved = eventually(Duration::from_secs(5), || async {
        let t = client.get(proxy.url("app.test", "/id")).send().await.ok()?.text().await.ok()?;
        (t == "staying").then_some(())
    })
    .await;
    assert!(moved.is_some());
    for _ in 0..10 {
        assert_eq!(
            client.get(proxy.url("app.test", "/id")).send().await.unwrap().text().await.unwrap(),
            "staying"
        );
    }
    leaving.gate.notify_one();
    assert_eq!(
        in_flight.await.unwrap(),
        "released",
        "the in-flight request finished on the machine that left"
    );
}
