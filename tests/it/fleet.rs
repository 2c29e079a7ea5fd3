//! Nodes of one fleet on a shared RIB: each node with a `[backhaul]` beats in the RIB's
//! `nodes`; machines owned by a node (`node = "worker-1"`) are routed to only while their
//! owner beats, and leave routing on every other node soon after it dies, at once when it
//! leaves cleanly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::Backend;
use crate::harness::{self, ServeProcess, eventually};

/// A node config on the shared RIB at `db`, named `node`, beating every 200ms.
fn fleet_config(dir: &Path, db: &Path, node: &str) -> PathBuf {
    let backhaul = harness::dead_addr();
    let extra = format!(
        "node = \"{node}\"\n[backhaul]\naddr = \"{backhaul}\"\nheartbeat = \"200ms\"\ndead_after = \"1s\"\n"
    );
    let path = dir.join(format!("{node}.toml"));
    // Appended to node_config's closing [log] table: ServeProcess reads JSON logs.
    std::fs::write(&path, harness::node_config(db, &extra) + "format = \"json\"\n").unwrap();
    path
}

fn machine(id: &str, addr: SocketAddr, owner: Option<&str>) -> String {
    let node = owner.map(|n| format!("node = \"{n}\"\n")).unwrap_or_default();
    format!(
        "[[machines]]\nid = \"{id}\"\napp = \"app\"\nregion = \"ams\"\naddr = \"{addr}\"\nstate = \"started\"\n{node}\n"
    )
}

const APP: &str = "[[apps]]\nname = \"app\"\nhostnames = [\"app.test\"]\n\n";

async fn answer(edge: &ServeProcess) -> Result<String, String> {
    let client = reqwest::Client::builder().resolve("app.test", edge.http).build().unwrap();
    let r = client
        .get(format!("http://app.test:{}/id", edge.http.port()))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let code = r.headers().get("tern-error").map(|v| v.to_str().unwrap().to_string());
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    match code {
        Some(code) => Err(format!("{status} {code}: {body}")),
        None => Ok(body),
    }
}

/// Asks `edge` until `owned` stops answering; returns how long after `since` it last did,
/// and checks every answer meanwhile came from a machine (none failed).
async fn last_answer_from(edge: &ServeProcess, owned: &str, since: Instant, watch: Duration) -> Duration {
    let mut last = Duration::ZERO;
    while since.elapsed() < watch {
        let got = answer(edge).await.expect("every request is answered by a machine");
        if got == owned {
            last = since.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    last
}

#[tokio::test]
async fn a_dead_owners_machines_leave_routing_on_every_edge_within_two_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    let (owned, free) = (Backend::start("owned").await, Backend::start("free").await);
    let decl = format!(
        "{APP}{}{}{}",
        machine("m-owned", owned.addr, Some("worker-1")),
        machine("m-free", free.addr, None),
        // Owned by a node that never beat: never routed to.
        machine("m-ghost", harness::dead_addr(), Some("worker-9")),
    );
    harness::apply_decl(&db, &decl);
    let mut worker = ServeProcess::start(&fleet_config(dir.path(), &db, "worker-1")).await;
    let edges = [
        ServeProcess::start(&fleet_config(dir.path(), &db, "edge-1")).await,
        ServeProcess::start(&fleet_config(dir.path(), &db, "edge-2")).await,
    ];
    for edge in &edges {
        let both = eventually(Duration::from_secs(5), || async {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..40 {
                seen.insert(answer(edge).await.ok()?);
            }
            (seen.len() == 2).then_some(())
        });
        assert!(both.await.is_some(), "both machines of live owners (and none of worker-9) take requests");
    }

    // A crash: no goodbye, the heartbeats just stop.
    worker.child.start_kill().unwrap();
    let killed = Instant::now();
    // Both edges watched at once: each must stop on its own within 2 s.
    let watched = edges.iter().map(|e| last_answer_from(e, "owned", killed, Duration::from_millis(2500)));
    for last in futures_util::future::join_all(watched).await {
        eprintln!("the dead owner's machine last answered {last:?} after the kill");
        assert!(last <= Duration::from_secs(2), "the dead owner's machine answered {last:?} after the kill");
    }

    // Back, then a clean stop: it leaves the fleet, and every edge routes around at once.
    let mut worker = ServeProcess::start(&fleet_config(dir.path(), &db, "worker-1")).await;
    for edge in &edges {
        let back = eventually(Duration::from_secs(5), || async {
            (answer(edge).await.ok()? == "owned").then_some(())
        });
        assert!(back.await.is_some(), "the owner beats again: its machine is back in routing");
    }
    let pid = nix::unistd::Pid::from_raw(worker.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    worker.child.wait().await.unwrap();
    let left = Instant::now();
    let watched = edges.iter().map(|e| last_answer_from(e, "owned", left, Duration::from_millis(600)));
    for last in futures_util::future::join_all(watched).await {
        assert_eq!(last, Duration::ZERO, "a node that left is routed around at once");
    }

    // With only the dead owner's machine left, the edge says why nothing can serve.
    harness::apply_decl_pruning(&db, &format!("{APP}{}", machine("m-owned", owned.addr, Some("worker-1"))));
    let refused = eventually(Duration::from_secs(5), || async { answer(&edges[0]).await.err() });
    let refused = refused.await.expect("no machine can take the request");
    assert!(refused.starts_with("503 Service Unavailable no_machine"), "{refused}");
}
