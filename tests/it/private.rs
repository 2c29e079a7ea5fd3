//! Private (Flycast) listeners: the connection's destination address picks the app, and only
//! sources inside the app's org networks are served; `public = false` apps never answer on
//! public listeners.
//!
//! Loopback stands in for the private network: 127.0.0.0/8 is all local, so each private
//! address is a listener of its own (a node would listen once on `[::]`), and sources are
//! chosen by binding the client socket to one of them.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use crate::backend::Backend;
use crate::harness::{Proxy, eventually};

/// Private listeners on 127.0.0.2, .3 and .4 (in that order), before the usual two.
const LISTENERS: &str = "[[listen]]\naddr = \"127.0.0.2:0\"\nprivate = true\n\n\
    [[listen]]\naddr = \"127.0.0.3:0\"\nprivate = true\n\n\
    [[listen]]\naddr = \"127.0.0.4:0\"\nprivate = true\n";

/// Two orgs: acme (sources 127.0.0.10) with `db` on 127.0.0.2, private only; globex
/// (sources 127.0.0.20) with `api` on 127.0.0.3, public too.
fn orgs_decl(db: SocketAddr, api: SocketAddr, db_private: &str) -> String {
    format!(
        "[[orgs]]\nname = \"acme\"\nnetworks = [\"127.0.0.10/32\"]\n\n\
         [[orgs]]\nname = \"globex\"\nnetworks = [\"127.0.0.20/32\", \"::1/128\"]\n\n\
         [[apps]]\nname = \"db\"\norg = \"acme\"\nhostnames = [\"db.test\"]\npublic = false\n\
         private_addrs = [\"{db_private}\"]\n\n\
         [[apps]]\nname = \"api\"\norg = \"globex\"\nhostnames = [\"api.test\"]\nprivate_addrs = [\"127.0.0.3\"]\n\n\
         [[machines]]\nid = \"db-1\"\napp = \"db\"\nregion = \"ams\"\naddr = \"{db}\"\nstate = \"started\"\n\n\
         [[machines]]\nid = \"api-1\"\napp = \"api\"\nregion = \"ams\"\naddr = \"{api}\"\nstate = \"started\"\n"
    )
}

/// One `GET /id` from `source` to `to` with `host`: the status line, the `tern-error` code
/// if any, and the body.
async fn get_from(source: &str, to: SocketAddr, host: &str) -> (u16, String, String) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
    let mut s = socket.connect(to).await.unwrap();
    let req = format!("GET /id HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.lines().find_map(|l| l.strip_prefix("tern-error: ")).unwrap_or_default().to_string();
    (status, code, body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_address_serves_its_app_to_its_org_only() {
    let (db, api) = (Backend::start("db-1").await, Backend::start("api-1").await);
    let proxy = Proxy::start_with(&orgs_decl(db.addr, api.addr, "127.0.0.2"), LISTENERS).await;
    let (p2, p3, p4) = (proxy.listeners[0], proxy.listeners[1], proxy.listeners[2]);

    // The destination picks the app, whatever the Host says.
    assert_eq!(get_from("127.0.0.10", p2, "db.flycast").await, (200, String::new(), "db-1".into()));
    assert_eq!(get_from("127.0.0.10", p2, "api.test").await, (200, String::new(), "db-1".into()));
    assert_eq!(get_from("127.0.0.20", p3, "api.flycast").await, (200, String::new(), "api-1".into()));

    // Sources outside the app's org: the other org's, and one in no org.
    for (source, to) in [("127.0.0.20", p2), ("127.0.0.1", p2), ("127.0.0.10", p3)] {
        let (status, code, _) = get_from(source, to, "x.flycast").await;
        assert_eq!((status, code.as_str()), (403, "private_forbidden"), "{source} → {to}");
    }

    // A private address no app declares.
    let (status, code, _) = get_from("127.0.0.10", p4, "db.flycast").await;
    assert_eq!((status, code.as_str()), (404, "no_app"));

    // Public listener: the public = false app is not there by any name; the public one is.
    let (status, code, _) = get_from("127.0.0.10", proxy.http, "db.test").await;
    assert_eq!((status, code.as_str()), (404, "no_app"));
    assert_eq!(get_from("127.0.0.1", proxy.http, "api.test").await, (200, String::new(), "api-1".into()));
    let m = proxy.metrics().await;
    assert!(m.contains("tern_errors_total{code=\"private_forbidden\"} 3"), "{m}");
    // What the admin endpoint says of it.
    let v: serde_json::Value =
        reqwest::get(format!("http://{}/v1/apps/db", proxy.admin)).await.unwrap().json().await.unwrap();
    assert_eq!(
        (&v["org"], &v["public"], &v["private_addrs"]),
        (&"acme".into(), &false.into(), &serde_json::json!(["127.0.0.2"]))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tern_apply_moves_a_private_address_at_runtime_as_at_boot() {
    let (db, api) = (Backend::start("db-1").await, Backend::start("api-1").await);
    let proxy = Proxy::start_with(&orgs_decl(db.addr, api.addr, "127.0.0.2"), LISTENERS).await;
    let (p2, p4) = (proxy.listeners[0], proxy.listeners[2]);
    assert_eq!(get_from("127.0.0.10", p2, "db").await.0, 200);

    proxy.apply(&orgs_decl(db.addr, api.addr, "127.0.0.4"));
    let moved = eventually(Duration::from_secs(10), || async {
        (get_from("127.0.0.10", p4, "db").await == (200, String::new(), "db-1".into())).then_some(())
    });
    assert!(moved.await.is_some(), "db answers on its new private address");
    let (status, code, _) = get_from("127.0.0.10", p2, "db").await;
    assert_eq!((status, code.as_str()), (404, "no_app"), "the old address is no longer the app's");

    // The org's networks change at runtime too: acme now admits 127.0.0.11 only.
    let text = orgs_decl(db.addr, api.addr, "127.0.0.4").replace("127.0.0.10/32", "127.0.0.11/32");
    proxy.apply(&text);
    let narrowed = eventually(Duration::from_secs(10), || async {
        (get_from("127.0.0.10", p4, "db").await.1 == "private_forbidden").then_some(())
    });
    assert!(narrowed.await.is_some(), "acme's old network is refused");
    assert_eq!(get_from("127.0.0.11", p4, "db").await.0, 200);
}

#[test]
fn apply_keeps_orgs_apart_and_private_apps_need_their_org() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    let m = "127.0.0.1:9".parse().unwrap();
    crate::harness::apply_decl(&db, &orgs_decl(m, m, "127.0.0.2"));
    let try_apply = |text: &str| {
        let decl =
            tern::decl::parse(text, "test.toml", std::path::Path::new(".")).map_err(|p| p.to_string())?;
        let mut store = tern::rib::sqlite::Store::open(&db).unwrap();
        tern::decl::apply(&mut store, &decl, false, false).map(|_| ()).map_err(|e| e.to_string())
    };

    // Another org declaring an app of the same name does not take acme's app over.
    let e = try_apply("[[apps]]\nname = \"db\"\norg = \"globex\"\nhostnames = [\"db2.test\"]\n").unwrap_err();
    assert!(e.contains("test.toml:3: apps[0].org:") && e.contains("belongs to org \"acme\""), "{e}");

    // Private addresses without a declared org: nobody could reach them.
    let e = try_apply("[[apps]]\nname = \"cache\"\norg = \"initech\"\nprivate_addrs = [\"127.0.0.5\"]\n")
        .unwrap_err();
    assert!(e.contains("apps[0].org:") && e.contains("\"initech\" is not declared"), "{e}");
    // An org the RIB holds will do.
    try_apply("[[apps]]\nname = \"cache\"\norg = \"acme\"\nprivate_addrs = [\"127.0.0.5\"]\n").unwrap();

    // Malformed: caught before anything is written.
    for (text, field) in [
        ("[[apps]]\nname = \"x\"\nprivate_addrs = [\"::ffff:10.0.0.1\"]\n", "apps[0].private_addrs[0]"),
        (
            "[[apps]]\nname = \"x\"\nprivate_addrs = [\"10.0.0.1\", \"10.0.0.1\"]\n",
            "apps[0].private_addrs[1]",
        ),
        ("[[orgs]]\nname = \"o\"\nnetworks = [\"10.1.2.3/8\"]\n", ""),
        ("[[orgs]]\nname = \"Big Co\"\n", "orgs[0].name"),
        ("[[orgs]]\nname = \"o\"\n\n[[orgs]]\nname = \"o\"\n", "orgs[1].name"),
        (
            "[[apps]]\nname = \"x\"\nprivate_addrs = [\"10.0.0.9\"]\n\n[[apps]]\nname = \"y\"\nprivate_addrs = [\"10.0.0.9\"]\n",
            "apps[1].private_addrs[0]",
        ),
    ] {
        let e = try_apply(text).unwrap_err();
        assert!(e.contains(field), "{text}: {e}");
    }
}

/// Behind a balancer sending PROXY headers, the header's client is who the org check sees,
/// and its destination is the private address that picks the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_header_the_org_check_sees_the_client_it_names() {
    let (db, api) = (Backend::start("db-1").await, Backend::start("api-1").await);
    let listener = "[[listen]]\naddr = \"127.0.0.1:0\"\nprivate = true\nproxy_protocol = true\n\
                    proxy_protocol_from = [\"127.0.0.1/32\"]\n";
    let proxy = Proxy::start_with(&orgs_decl(db.addr, api.addr, "127.0.0.2"), listener).await;
    let at = proxy.listeners[0];
    let ask = |header: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(at).await.unwrap();
        let req = format!("{header}GET /id HTTP/1.1\r\nHost: db\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await.unwrap().unwrap();
        String::from_utf8_lossy(&out).into_owned()
    };
    // From acme's network to db's private address: served.
    let ok = ask("PROXY TCP4 127.0.0.10 127.0.0.2 40000 80\r\n").await;
    assert!(ok.starts_with("HTTP/1.1 200") && ok.ends_with("db-1"), "{ok}");
    // The same connection's real peer (127.0.0.1) is in no org; the header's client from
    // globex's network is refused.
    let refused = ask("PROXY TCP4 127.0.0.20 127.0.0.2 40000 80\r\n").await;
    assert!(
        refused.starts_with("HTTP/1.1 403") && refused.contains("tern-error: private_forbidden"),
        "{refused}"
    );
    // The header's destination picks the app: globex's api, for globex's client.
    let api_ok = ask("PROXY TCP4 127.0.0.20 127.0.0.3 40000 80\r\n").await;
    assert!(api_ok.starts_with("HTTP/1.1 200") && api_ok.ends_with("api-1"), "{api_ok}");
}

/// A private `kind = "tcp"` listener: the app's private address and the port pick its TCP
/// service; sources outside its org are closed before any byte reaches a machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_tcp_service_serves_its_org_only() {
    use tokio::net::{TcpListener, TcpSocket};
    // An echo machine.
    let machine = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let m = machine.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = machine.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let port = crate::harness::reserve_port();
    let decl = format!(
        "[[orgs]]\nname = \"acme\"\nnetworks = [\"127.0.0.10/32\"]\n\n\
         [[apps]]\nname = \"pg\"\norg = \"acme\"\npublic = false\nprivate_addrs = [\"127.0.1.22\"]\n\
         [[apps.services]]\ninternal_port = {}\n[[apps.services.ports]]\nport = {port}\n\n\
         [[machines]]\nid = \"pg-1\"\napp = \"pg\"\nregion = \"ams\"\naddr = \"{m}\"\nstate = \"started\"\n",
        m.port()
    );
    let listener = format!("[[listen]]\naddr = \"127.0.1.22:{port}\"\nkind = \"tcp\"\nprivate = true\n");
    let proxy = Proxy::start_with(&decl, &listener).await;
    let talk = |source: &'static str| async move {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
        let mut s = socket.connect(format!("127.0.1.22:{port}").parse().unwrap()).await.unwrap();
        let _ = s.write_all(b"select 1;\n").await;
        let _ = s.shutdown().await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    };
    assert_eq!(talk("127.0.0.10").await, "select 1;\n", "the org's source is relayed");
    assert_eq!(talk("127.0.0.1").await, "", "a source outside the org is closed");
    let m = proxy.metrics().await;
    assert!(m.contains("tern_tcp_refused_total{reason=\"private_forbidden\"} 1"), "{m}");
    assert!(m.contains("tern_tcp_relayed_total 1"), "{m}");
}
