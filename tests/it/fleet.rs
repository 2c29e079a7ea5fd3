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
    let extra = format!(
        "node = \"{node}\"\n[backhaul]\naddr = \"127.0.0.1:0\"\nheartbeat = \"200ms\"\ndead_after = \"1s\"\n"
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

/// The test machine binary (`examples/test_machine.rs`), which `cargo test` builds.
fn test_machine_bin() -> PathBuf {
    PathBuf::from(harness::tern_bin()).parent().unwrap().join("examples").join("test_machine")
}

async fn admin_json(node: &ServeProcess, path: &str) -> Option<serde_json::Value> {
    reqwest::get(format!("http://{}{path}", node.admin)).await.ok()?.json().await.ok()
}

/// Waits until `edge` hears the owner of app `app`'s machine `id` beat.
async fn until_owner_heard(edge: &ServeProcess, id: &str) {
    let heard = eventually(Duration::from_secs(5), || async {
        let app = admin_json(edge, "/v1/apps/app").await?;
        let m = app["machines"].as_array()?.iter().find(|m| m["id"] == id)?.clone();
        (m["node_alive"] == true).then_some(())
    });
    assert!(heard.await.is_some(), "the edge hears the owner of {id} beat");
}

async fn metric_of(node: &ServeProcess, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", node.admin)).await.unwrap().text().await.unwrap();
    text.lines().filter_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok()).sum()
}

#[tokio::test]
async fn a_thousand_requests_for_a_sleeping_machine_over_two_edges_start_it_once_on_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    let port = harness::reserve_port();
    let decl = format!(
        "{APP}[[machines]]\nid = \"m1\"\napp = \"app\"\nregion = \"ams\"\naddr = \"127.0.0.1:{port}\"\n\
         state = \"stopped\"\nnode = \"worker-1\"\ncmd = [{:?}, \"127.0.0.1:{port}\"]\n",
        test_machine_bin().display().to_string()
    );
    harness::apply_decl(&db, &decl);
    let worker = ServeProcess::start(&fleet_config(dir.path(), &db, "worker-1")).await;
    let edges = [
        ServeProcess::start(&fleet_config(dir.path(), &db, "edge-1")).await,
        ServeProcess::start(&fleet_config(dir.path(), &db, "edge-2")).await,
    ];
    for edge in &edges {
        until_owner_heard(edge, "m1").await;
    }

    // 500 at once on each edge, from a client address that is neither edge's.
    let client_ip: std::net::IpAddr = "127.0.0.9".parse().unwrap();
    let asks = edges.iter().flat_map(|edge| {
        let client = reqwest::Client::builder()
            .resolve("app.test", edge.http)
            .local_address(client_ip)
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let url = format!("http://app.test:{}/echo", edge.http.port());
        (0..500).map(move |_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let r = client.get(url).send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            })
        })
    });
    let answers: Vec<(u16, String)> = futures_util::future::join_all(asks.collect::<Vec<_>>())
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let failed: Vec<_> = answers.iter().filter(|(s, _)| *s != 200).take(3).collect();
    assert_eq!(ok, 1000, "every request answered by the machine; some that were not: {failed:?}");
    for (_, body) in &answers {
        let seen: serde_json::Value = serde_json::from_str(body).unwrap();
        let headers = &seen["headers"];
        assert_eq!(
            headers["fly-client-ip"][0], "127.0.0.9",
            "the app sees the client, not the edge: {headers}"
        );
        assert_eq!(headers["x-forwarded-for"][0], "127.0.0.9", "{headers}");
        assert_eq!(headers["via"].as_array().map(Vec::len), Some(1), "one Via, the edge's: {headers}");
        assert!(headers.get("tern-backhaul").is_none(), "the token stays between the nodes: {headers}");
    }
    let starts = metric_of(&worker, "tern_wakes_total{result=\"ok\"}").await;
    assert_eq!(starts, 1.0, "exactly one start, on the owner");
    for edge in &edges {
        assert_eq!(
            metric_of(edge, "tern_wakes_total").await,
            0.0,
            "an edge never starts another node's machine"
        );
    }
}

#[tokio::test]
async fn an_owner_at_its_hard_limit_turns_requests_away_and_the_edge_routes_them_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    let (owned, free) = (Backend::start("owned").await, Backend::start("free").await);
    let app = "[[apps]]\nname = \"app\"\nhostnames = [\"app.test\"]\n\
               concurrency = { type = \"requests\", soft_limit = 1, hard_limit = 1 }\n\n";
    let decl = format!(
        "{app}{}{}",
        machine("m-owned", owned.addr, Some("worker-1")),
        machine("m-free", free.addr, None)
    );
    harness::apply_decl(&db, &decl);
    let worker = ServeProcess::start(&fleet_config(dir.path(), &db, "worker-1")).await;
    let edges = [
        ServeProcess::start(&fleet_config(dir.path(), &db, "edge-1")).await,
        ServeProcess::start(&fleet_config(dir.path(), &db, "edge-2")).await,
    ];
    for edge in &edges {
        until_owner_heard(edge, "m-owned").await;
    }
    // Edge 1 fills the owned machine to its hard limit with one request that hangs.
    let client = reqwest::Client::builder().resolve("app.test", edges[0].http).build().unwrap();
    let url = format!("http://app.test:{}/hang", edges[0].http.port());
    let hold = tokio::spawn(async move {
        let r = client.get(url).header("fly-force-instance-id", "m-owned").send().await.unwrap();
        r.text().await.unwrap()
    });
    let busy = eventually(Duration::from_secs(5), || async {
        (owned.requests.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    });
    assert!(busy.await.is_some(), "the hanging request reached the owned machine");
    // Edge 2 does not know: half its choices go to the owned machine, whose owner turns
    // them away; every one is answered by the free machine.
    for _ in 0..30 {
        assert_eq!(answer(&edges[1]).await.as_deref(), Ok("free"));
    }
    let turned = metric_of(&worker, "tern_errors_total{code=\"retry_elsewhere\"}").await;
    assert!(turned > 0.0, "the owner turned some away (else the test proved nothing)");
    owned.gate.notify_waiters();
    assert_eq!(hold.await.unwrap(), "released");
}

#[tokio::test]
async fn the_backhaul_listener_serves_only_requests_sealed_with_the_fleets_keys() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    let owned = Backend::start("owned").await;
    harness::apply_decl(&db, &format!("{APP}{}", machine("m-owned", owned.addr, Some("worker-1"))));
    let _worker = ServeProcess::start(&fleet_config(dir.path(), &db, "worker-1")).await;
    // Where it listens, as it tells the fleet (its row in the RIB's nodes).
    let published = eventually(Duration::from_secs(5), || async {
        let conn = rusqlite::Connection::open(&db).ok()?;
        let body: String =
            conn.query_row("SELECT body FROM nodes WHERE key = 'worker-1'", [], |r| r.get(0)).ok()?;
        let row: serde_json::Value = serde_json::from_str(&body).ok()?;
        row["backhaul"].as_str()?.parse::<SocketAddr>().ok()
    });
    let at = published.await.expect("the owner publishes its backhaul address");
    for head in [
        "GET /id HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n".to_string(),
        "GET /id HTTP/1.1\r\nHost: app.test\r\ntern-backhaul: tern1.AAAA\r\ntern-backhaul-app: app\r\n\
         fly-request-id: x\r\nConnection: close\r\n\r\n"
            .to_string(),
    ] {
        let mut s = tokio::net::TcpStream::connect(at).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 403"), "{out}");
        assert!(out.to_ascii_lowercase().contains("tern-error: backhaul_forbidden"), "{out}");
    }
    assert_eq!(owned.requests.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing reached the machine");
}

#[tokio::test]
async fn websockets_and_sse_reach_a_machine_owned_elsewhere_through_its_owner() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    let owned = Backend::start("owned").await;
    harness::apply_decl(&db, &format!("{APP}{}", machine("m-owned", owned.addr, Some("worker-1"))));
    let _worker = ServeProcess::start(&fleet_config(dir.path(), &db, "worker-1")).await;
    let edge = ServeProcess::start(&fleet_config(dir.path(), &db, "edge-1")).await;
    until_owner_heard(&edge, "m-owned").await;

    let tcp = tokio::net::TcpStream::connect(edge.http).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://app.test/ws", tcp).await.unwrap();
    assert_eq!(resp.headers().get_all("via").iter().count(), 1, "{:?}", resp.headers());
    for text in ["one", "two"] {
        ws.send(Message::text(text)).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
    }
    let client = reqwest::Client::builder().resolve("app.test", edge.http).build().unwrap();
    let mut sse = client.get(format!("http://app.test:{}/sse", edge.http.port())).send().await.unwrap();
    assert_eq!(sse.chunk().await.unwrap().unwrap(), "data: one\n\n", "events stream through both nodes");
    assert_eq!(owned.requests.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn new_work_goes_to_the_nearest_region_with_room_and_spills_to_the_next() {
    use crate::harness::{Ca, HttpVersion, Proxy};
    let (near, far) = (Backend::start("ams").await, Backend::start("fra").await);
    let decl = format!(
        "[[apps]]\nname = \"app\"\nhostnames = [\"app.test\"]\n\
         concurrency = {{ type = \"requests\", soft_limit = 1, hard_limit = 1 }}\n\n\
         [[machines]]\nid = \"m-fra\"\napp = \"app\"\nregion = \"fra\"\naddr = \"{}\"\nstate = \"started\"\n\n\
         [[machines]]\nid = \"m-ams\"\napp = \"app\"\nregion = \"ams\"\naddr = \"{}\"\nstate = \"started\"\n",
        far.addr, near.addr
    );
    // This node is in ams; fra is 9 ms away.
    let proxy = Proxy::start_with(&decl, "[regions]\nrtt_ms = { fra = 9 }\n").await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    for _ in 0..20 {
        let body = client.get(proxy.url("app.test", "/id")).send().await.unwrap().text().await.unwrap();
        assert_eq!(body, "ams", "the nearest region, though both are idle");
    }
    // ams at its hard limit: the next request goes to fra, and back once ams has room.
    let hold = tokio::spawn(client.get(proxy.url("app.test", "/hang")).send());
    let busy = eventually(Duration::from_secs(5), || async {
        (near.requests.load(std::sync::atomic::Ordering::SeqCst) > 20).then_some(())
    });
    assert!(busy.await.is_some(), "the hanging request is on the ams machine");
    let body = client.get(proxy.url("app.test", "/id")).send().await.unwrap().text().await.unwrap();
    assert_eq!(body, "fra", "spilled to the next region");
    near.gate.notify_waiters();
    hold.await.unwrap().unwrap();
    let body = client.get(proxy.url("app.test", "/id")).send().await.unwrap().text().await.unwrap();
    assert_eq!(body, "ams", "room again at home");
}
