//! Session keys across nodes: every `tern serve` on one RIB holds the same keys, made by
//! whichever started first, and picks up `tern keys rotate` without a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::harness::{self, ServeProcess, eventually};

/// `GET /v1/session-keys` on a node: (sealing id, [(id, created_ms, retire_at_ms)]).
async fn keys_of(admin: SocketAddr) -> Option<(Option<u64>, Vec<(u64, i64, Option<i64>)>)> {
    let v: serde_json::Value =
        reqwest::get(format!("http://{admin}/v1/session-keys")).await.ok()?.json().await.ok()?;
    let keys = v["keys"]
        .as_array()?
        .iter()
        .map(|k| Some((k["id"].as_u64()?, k["created_ms"].as_i64()?, k["retire_at_ms"].as_i64())))
        .collect::<Option<Vec<_>>>()?;
    Some((v["sealing"].as_u64(), keys))
}

fn tern_keys(config: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(harness::tern_bin())
        .arg("-c")
        .arg(config)
        .arg("keys")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "tern keys {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_session_key_and_both_pick_up_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    let config = dir.path().join("tern.toml");
    std::fs::write(&config, harness::node_config(&db, "") + "format = \"json\"\n").unwrap();

    // Both start at once on a RIB that does not exist yet: one key, whoever made it.
    let (a, b) = tokio::join!(ServeProcess::start(&config), ServeProcess::start(&config));
    let first = keys_of(a.admin).await.expect("node a answers");
    assert_eq!(first.0, Some(1));
    assert_eq!(first.1.len(), 1);
    assert_eq!(first.1[0].2, None, "key 1 does not retire");
    let same = eventually(Duration::from_secs(10), || async {
        let got = keys_of(b.admin).await?;
        (got == first).then_some(())
    })
    .await;
    assert!(same.is_some(), "node b holds another key: {:?} vs {first:?}", keys_of(b.admin).await);

    let printed = tern_keys(&config, &["rotate", "--grace", "1h"]);
    assert!(printed.contains("session key 2 seals new tokens"), "{printed}");
    assert!(printed.contains("key 1 keep opening tokens until"), "{printed}");
    for node in [&a, &b] {
        let rotated = eventually(Duration::from_secs(10), || async {
            let (sealing, keys) = keys_of(node.admin).await?;
            (sealing == Some(2) && keys.len() == 2).then_some(keys)
        })
        .await
        .expect("the node never saw the rotation");
        let (old, new) = (rotated[0], rotated[1]);
        assert_eq!((old.0, old.1), (1, first.1[0].1));
        let retire = old.2.expect("key 1 retires");
        assert!((retire - new.1 - 3_600_000).abs() < 1_000, "an hour after the rotation: {retire} {}", new.1);
        assert_eq!((new.0, new.2), (2, None));
    }

    // The list shows ids and times, never a secret (nor does the admin endpoint).
    let listed = tern_keys(&config, &["list"]);
    assert!(listed.lines().any(|l| l.starts_with("1 ") && l.contains("in 59m")), "{listed}");
    assert!(listed.lines().any(|l| l.starts_with("2 ") && l.contains("never")), "{listed}");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let body: String =
        conn.query_row("SELECT body FROM session_keys WHERE key = '1'", [], |r| r.get(0)).unwrap();
    let secret =
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["secret"].as_str().unwrap().to_string();
    let admin =
        reqwest::get(format!("http://{}/v1/session-keys", a.admin)).await.unwrap().text().await.unwrap();
    assert!(!listed.contains(&secret) && !admin.contains(&secret), "{secret} {listed} {admin}");
}
