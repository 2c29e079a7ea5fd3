//! Session affinity: a machine's session header comes back to the client as a sealed token,
//! and requests carrying it go to that machine (which sees its own value), on any node
//! sharing the RIB; the affinity cookie does the same for browsers.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use crate::backend::Backend;
use crate::harness::{Ca, HttpVersion, Proxy};
use crate::wake::metric;

fn decl(app: &str, org: &str, machines: &[(&str, SocketAddr)], extra: &str) -> String {
    let mut d =
        format!("[[apps]]\nname = \"{app}\"\norg = \"{org}\"\nhostnames = [\"{app}.test\"]\n{extra}\n");
    for (id, addr) in machines {
        d += &format!(
            "[[machines]]\nid = \"{id}\"\napp = \"{app}\"\nregion = \"ams\"\naddr = \"{addr}\"\nstate = \"started\"\n\n"
        );
    }
    d
}

async fn backends(prefix: &str, n: usize) -> Vec<Backend> {
    let mut v = Vec::new();
    for i in 1..=n {
        v.push(Backend::start(&format!("{prefix}{i}")).await);
    }
    v
}

fn ids(prefix: &str, b: &[Backend]) -> Vec<(String, SocketAddr)> {
    b.iter().enumerate().map(|(i, b)| (format!("{prefix}{}", i + 1), b.addr)).collect()
}

fn as_refs(v: &[(String, SocketAddr)]) -> Vec<(&str, SocketAddr)> {
    v.iter().map(|(s, a)| (s.as_str(), *a)).collect()
}

fn total(b: &[Backend]) -> usize {
    b.iter().map(|b| b.requests.load(Ordering::SeqCst)).sum()
}

fn code(r: &reqwest::Response) -> String {
    r.headers().get("tern-error").map_or("-".into(), |v| v.to_str().unwrap().into())
}

/// Opens a session: a request whose machine answers `mcp-session-id: value`. Returns the
/// token the client saw and the machine.
async fn open(client: &reqwest::Client, proxy: &Proxy, app: &str, value: &str) -> (String, String) {
    let r = client
        .post(proxy.url(&format!("{app}.test"), &format!("/echo?set=mcp-session-id:{value}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let token = r.headers().get("mcp-session-id").expect("a session header").to_str().unwrap().to_string();
    let echo: serde_json::Value = r.json().await.unwrap();
    (token, echo["machine"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn a_session_sticks_to_its_machine_on_both_nodes_and_the_machine_sees_its_own_value() {
    let b = backends("m", 3).await;
    let machines = ids("m", &b);
    let a = Proxy::start(&decl("mcp", "o", &as_refs(&machines), "")).await;
    let node_b = Proxy::join(&a).await;
    let ca = Ca::new();
    let (ca_client, cb_client) = (a.client(&ca, HttpVersion::Http1), node_b.client(&ca, HttpVersion::Http1));
    let (token, machine) = open(&ca_client, &a, "mcp", "sess-42").await;
    assert_ne!(token, "sess-42", "the client sees a token, not the machine's value");
    assert!(token.bytes().all(|c| (0x21..0x7f).contains(&c)), "visible ASCII only: {token}");

    // Other requests keep the machines busy; least-loaded would spread them.
    for i in 0..40 {
        let (client, proxy) = if i % 2 == 0 { (&ca_client, &a) } else { (&cb_client, &node_b) };
        let method = if i == 39 { reqwest::Method::DELETE } else { reqwest::Method::POST };
        let r = client
            .request(method, proxy.url("mcp.test", "/echo"))
            .header("mcp-session-id", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", code(&r));
        let echo: serde_json::Value = r.json().await.unwrap();
        assert_eq!(echo["machine"], machine.as_str(), "request {i} went astray");
        assert_eq!(echo["headers"]["mcp-session-id"][0], "sess-42", "the machine sees its own value");
    }
    // The machine repeats its value: the client gets the same token back.
    let r = cb_client
        .post(node_b.url("mcp.test", "/echo?set=mcp-session-id:sess-42"))
        .header("mcp-session-id", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers().get("mcp-session-id").unwrap().to_str().unwrap(), token);
    let m = a.metrics().await;
    assert_eq!(metric(&m, "tern_routing_decisions_total{app=\"mcp\",why=\"session\"}"), 20.0);
    assert_eq!(metric(&m, "tern_sessions_total{app=\"mcp\",result=\"hit\"}"), 20.0);
    assert_eq!(metric(&m, "tern_sessions_total{app=\"mcp\",result=\"opened\"}"), 1.0);
}

#[tokio::test]
async fn forged_truncated_and_other_app_tokens_reach_no_machine() {
    let b = backends("m", 2).await;
    let other = backends("x", 1).await;
    let mut d = decl("mcp", "o", &as_refs(&ids("m", &b)), "");
    d += &decl("other", "o", &as_refs(&ids("x", &other)), "");
    let proxy = Proxy::start(&d).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let (token, _) = open(&client, &proxy, "mcp", "s1").await;
    let (other_token, _) = open(&client, &proxy, "other", "s2").await;
    let before = total(&b) + total(&other);
    let truncated = &token[..token.len() - 5];
    let mut flipped = token.clone().into_bytes();
    let last = flipped.len() - 3;
    flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    for bad in ["garbage", "s1", truncated, &flipped, &other_token] {
        let r =
            client.post(proxy.url("mcp.test", "/echo")).header("mcp-session-id", bad).send().await.unwrap();
        assert_eq!((r.status().as_u16(), code(&r)), (404, "session_invalid".into()), "token {bad:?}");
    }
    assert_eq!(total(&b) + total(&other), before, "no machine saw any of them");
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "tern_sessions_total{app=\"mcp\",result=\"invalid\"}"), 5.0);
}

#[tokio::test]
async fn a_session_whose_machine_was_pruned_is_gone_and_a_new_one_works() {
    let b = backends("m", 2).await;
    let machines = ids("m", &b);
    let proxy = Proxy::start(&decl("mcp", "o", &as_refs(&machines), "")).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let (token, machine) = open(&client, &proxy, "mcp", "s1").await;
    let keep: Vec<(&str, SocketAddr)> =
        as_refs(&machines).into_iter().filter(|(id, _)| *id != machine).collect();
    proxy.apply_pruning(&decl("mcp", "o", &keep, ""));
    let gone = crate::harness::eventually(std::time::Duration::from_secs(10), || async {
        let r = client
            .post(proxy.url("mcp.test", "/echo"))
            .header("mcp-session-id", &token)
            .send()
            .await
            .unwrap();
        (code(&r) == "session_gone").then_some(r.status().as_u16())
    })
    .await;
    assert_eq!(gone, Some(404));
    let (_, again) = open(&client, &proxy, "mcp", "s2").await;
    assert_eq!(again, keep[0].0, "a fresh session on the machine that is left");
}

#[tokio::test]
async fn the_affinity_cookie_pins_browsers_and_is_replaced_when_its_machine_is_gone() {
    let b = backends("m", 3).await;
    let machines = ids("m", &b);
    let extra = "[apps.affinity]\ncookie = \"tern_affinity\"";
    let ca = Ca::new();
    let proxy =
        Proxy::start(&(decl("web", "o", &as_refs(&machines), extra) + &ca.decl("web.test", &["web.test"])))
            .await;
    let client = proxy.client(&ca, HttpVersion::Http1);
    let r = client.get(proxy.url("web.test", "/echo")).send().await.unwrap();
    let set = r.headers().get("set-cookie").expect("a cookie").to_str().unwrap().to_string();
    assert!(set.starts_with("tern_affinity=") && set.ends_with("; Path=/; HttpOnly; SameSite=Lax"), "{set}");
    let cookie = set.split(';').next().unwrap().to_string();
    let first: serde_json::Value = r.json().await.unwrap();
    for _ in 0..20 {
        let r = client
            .get(proxy.url("web.test", "/echo"))
            .header("cookie", format!("a=1; {cookie}"))
            .send()
            .await
            .unwrap();
        assert!(r.headers().get("set-cookie").is_none(), "a valid cookie is not set again");
        let echo: serde_json::Value = r.json().await.unwrap();
        assert_eq!(echo["machine"], first["machine"]);
    }
    // Over TLS the cookie is Secure.
    let r = client.get(proxy.tls_url("web.test", "/echo")).send().await.unwrap();
    assert!(r.headers().get("set-cookie").unwrap().to_str().unwrap().ends_with("; Secure"));
    // A cookie that does not open is no error to a browser: a normal pick and a new cookie.
    let r = client
        .get(proxy.url("web.test", "/echo"))
        .header("cookie", "tern_affinity=junk")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("set-cookie").is_some());
    // Its machine removed: the same.
    let keep: Vec<(&str, SocketAddr)> =
        as_refs(&machines).into_iter().filter(|(id, _)| *id != first["machine"].as_str().unwrap()).collect();
    proxy.apply_pruning(&decl("web", "o", &keep, extra));
    let replaced = crate::harness::eventually(std::time::Duration::from_secs(10), || async {
        let r = client.get(proxy.url("web.test", "/echo")).header("cookie", &cookie).send().await.unwrap();
        let fresh = r.headers().get("set-cookie").is_some();
        let echo: serde_json::Value = r.json().await.unwrap();
        (fresh && echo["machine"] != first["machine"]).then_some(())
    })
    .await;
    assert!(replaced.is_some(), "a cookie for a gone machine falls back and is replaced");
}

/// Raw bytes: two session headers (which one would route?) and a token in another affinity
/// header's place are refused before any machine sees them.
#[tokio::test]
async fn two_session_headers_on_the_wire_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = backends("m", 2).await;
    let proxy = Proxy::start(&decl("mcp", "o", &as_refs(&ids("m", &b)), "")).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let (token, _) = open(&client, &proxy, "mcp", "s1").await;
    let before = total(&b);
    let mut conn = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    let req = format!(
        "GET /echo HTTP/1.1\r\nHost: mcp.test\r\nMcp-Session-Id: {token}\r\nmcp-session-id: {token}\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    conn.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    assert!(resp.to_ascii_lowercase().contains("tern-error: session_invalid"), "{resp}");
    assert_eq!(total(&b), before, "no machine saw it");
}

/// A router app that replays each new session to another app of its org (fly's remote-MCP
/// pattern): the session's token, used at the router's hostname, goes straight to the
/// machine that holds it, never through the router again.
#[tokio::test]
async fn a_session_begun_after_a_replay_to_another_app_comes_back_to_its_machine() {
    let router = backends("r", 1).await;
    let users = backends("u", 2).await;
    let mut d = decl("router", "o", &as_refs(&ids("r", &router)), "");
    d += &decl("user", "o", &as_refs(&ids("u", &users)), "");
    let proxy = Proxy::start(&d).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let url = |q: &str| proxy.url("router.test", &format!("/echo?{q}"));
    let r = client.post(url("only=r1&replay=app%3Duser&set_any=mcp-session-id:s9")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", code(&r));
    let token = r
        .headers()
        .get("mcp-session-id")
        .unwrap_or_else(|| panic!("{:?}", r.headers()))
        .to_str()
        .unwrap()
        .to_string();
    let first: serde_json::Value = r.json().await.unwrap();
    let machine = first["machine"].as_str().unwrap().to_string();
    assert!(machine.starts_with('u'), "{first}");
    let routed_before = router[0].requests.load(Ordering::SeqCst);
    for _ in 0..10 {
        let r = client.post(url("")).header("mcp-session-id", &token).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", code(&r));
        let echo: serde_json::Value = r.json().await.unwrap();
        assert_eq!(echo["machine"], machine.as_str());
        assert_eq!(echo["headers"]["mcp-session-id"][0], "s9");
    }
    assert_eq!(router[0].requests.load(Ordering::SeqCst), routed_before, "the router saw none of them");
    // The token is the router app's: at the user app's own hostname it does not open.
    let r =
        client.post(proxy.url("user.test", "/echo")).header("mcp-session-id", &token).send().await.unwrap();
    assert_eq!((r.status().as_u16(), code(&r)), (404, "session_invalid".into()));
}

#[tokio::test]
async fn a_forced_machine_other_than_the_sessions_is_refused() {
    let b = backends("m", 2).await;
    let proxy = Proxy::start(&decl("mcp", "o", &as_refs(&ids("m", &b)), "")).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let (token, machine) = open(&client, &proxy, "mcp", "s1").await;
    let other = if machine == "m1" { "m2" } else { "m1" };
    let before = total(&b);
    let r = client
        .post(proxy.url("mcp.test", "/echo"))
        .header("mcp-session-id", &token)
        .header("fly-force-instance-id", other)
        .send()
        .await
        .unwrap();
    assert_eq!((r.status().as_u16(), code(&r)), (503, "instance_unavailable".into()));
    assert_eq!(total(&b), before);
    // Forcing the session's own machine is fine.
    let r = client
        .post(proxy.url("mcp.test", "/echo"))
        .header("mcp-session-id", &token)
        .header("fly-force-instance-id", &machine)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_token_opens_only_where_it_was_given() {
    let b = backends("m", 2).await;
    let extra = "[apps.affinity]\nheaders = [\"Mcp-Session-Id\", \"X-Session\"]\ncookie = \"tern_affinity\"";
    let proxy = Proxy::start(&decl("app", "o", &as_refs(&ids("m", &b)), extra)).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let r = client.post(proxy.url("app.test", "/echo?set=mcp-session-id:s1")).send().await.unwrap();
    let header_token = r.headers().get("mcp-session-id").unwrap().to_str().unwrap().to_string();
    let set = r.headers().get("set-cookie").unwrap().to_str().unwrap().to_string();
    let cookie_token = set.split(';').next().unwrap().split_once('=').unwrap().1.to_string();
    let before = total(&b);
    for (name, token) in [("x-session", &header_token), ("mcp-session-id", &cookie_token)] {
        let r =
            client.post(proxy.url("app.test", "/echo")).header(name, token.as_str()).send().await.unwrap();
        assert_eq!((r.status().as_u16(), code(&r)), (404, "session_invalid".into()), "{name}");
    }
    assert_eq!(total(&b), before, "no machine saw them");
    // A header token as the cookie is no cookie: a normal pick and a fresh cookie.
    let r = client
        .post(proxy.url("app.test", "/echo"))
        .header("cookie", format!("tern_affinity={header_token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("set-cookie").is_some());
}

/// After `tern keys rotate`, a session still in use is sealed again under the new key, so
/// it outlives the old key's grace.
#[tokio::test]
async fn a_session_in_use_is_resealed_under_a_rotated_key() {
    let b = backends("m", 2).await;
    let proxy = Proxy::start(&decl("mcp", "o", &as_refs(&ids("m", &b)), "")).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let (old, _) = open(&client, &proxy, "mcp", "s1").await;
    let config = proxy.dir.path().join("node.toml");
    std::fs::write(&config, crate::harness::node_config(&proxy.db, "")).unwrap();
    let out = std::process::Command::new(crate::harness::tern_bin())
        .args(["keys", "rotate", "-c"])
        .arg(&config)
        .args(["--grace", "1h"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let renewed = crate::harness::eventually(std::time::Duration::from_secs(10), || async {
        let r = client
            .post(proxy.url("mcp.test", "/echo?set=mcp-session-id:s1"))
            .header("mcp-session-id", &old)
            .send()
            .await
            .unwrap();
        let token = r.headers().get("mcp-session-id")?.to_str().ok()?.to_string();
        (token != old).then_some(token)
    })
    .await
    .expect("a fresh token once the new key seals");
    let r =
        client.post(proxy.url("mcp.test", "/echo")).header("mcp-session-id", &renewed).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", code(&r));
}
