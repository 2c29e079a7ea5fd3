//! fly-replay: a machine answers `fly-replay` (header or JSON body) and tern sends the same
//! request, body included, where it says; the client sees only the final answer.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use crate::backend::Backend;
use crate::harness::{Ca, HttpVersion, Proxy};
use crate::wake::{backend_cmd, free_port, machine_state, metric};

/// App `app` (app.test, org `o`) with machines (id, addr, region); then `extra_apps`.
fn decl(machines: &[(&str, SocketAddr, &str)], app_extra: &str, extra_apps: &str) -> String {
    let mut d = format!("[[apps]]\nname = \"app\"\norg = \"o\"\nhostnames = [\"app.test\"]\n{app_extra}\n");
    for (id, addr, region) in machines {
        d += &format!(
            "[[machines]]\nid = \"{id}\"\napp = \"app\"\nregion = \"{region}\"\naddr = \"{addr}\"\nstate = \"started\"\n\n"
        );
    }
    d + extra_apps
}

fn other_app(name: &str, org: &str, machine: &str, addr: SocketAddr) -> String {
    format!(
        "[[apps]]\nname = \"{name}\"\norg = \"{org}\"\nhostnames = [\"{name}.test\"]\n\n[[machines]]\nid = \"{machine}\"\napp = \"{name}\"\naddr = \"{addr}\"\nstate = \"started\"\n\n"
    )
}

struct Setup {
    proxy: Proxy,
    client: reqwest::Client,
    b: Vec<Backend>,
}

async fn setup(regions: &[&str], app_extra: &str, extra_apps: &str) -> Setup {
    let mut b = Vec::new();
    for i in 1..=regions.len() {
        b.push(Backend::start(&format!("m{i}")).await);
    }
    let names: Vec<String> = (1..=regions.len()).map(|i| format!("m{i}")).collect();
    let machines: Vec<(&str, SocketAddr, &str)> =
        names.iter().zip(&b).zip(regions).map(|((n, b), r)| (n.as_str(), b.addr, *r)).collect();
    let proxy = Proxy::start(&decl(&machines, app_extra, extra_apps)).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    Setup { proxy, client, b }
}

fn code(r: &reqwest::Response) -> String {
    r.headers().get("tern-error").map_or("-".into(), |v| v.to_str().unwrap().into())
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Setup {
    /// POSTs `body` to /echo with these query parameters, pinned first to m1.
    async fn post(&self, query: &str, body: &str) -> reqwest::Response {
        self.client
            .post(self.proxy.url("app.test", &format!("/echo?{query}")))
            .header("fly-force-instance-id", "m1")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn replay_to_an_instance_resends_head_and_body_and_marks_the_source() {
    let s = setup(&["ams", "ams", "ams"], "", "").await;
    let r = s.post(&format!("only=m1&replay={}", enc("instance=m3;state=secret")), "the body").await;
    assert_eq!(r.status(), 200, "{}", code(&r));
    assert!(r.headers().get("fly-replay").is_none(), "fly-replay never reaches the client");
    let echo: serde_json::Value = r.json().await.unwrap();
    assert_eq!(echo["machine"], "m3");
    assert_eq!(echo["body"], "the body");
    let src = echo["headers"]["fly-replay-src"][0].as_str().unwrap();
    assert!(
        src.contains("instance=m1") && src.contains("region=ams") && src.contains("state=secret"),
        "{src}"
    );
    assert!(src.contains(";t="), "{src}");
    let m = s.proxy.metrics().await;
    assert_eq!(metric(&m, "tern_routing_decisions_total{app=\"app\",why=\"replay\"}"), 1.0);
    assert_eq!(metric(&m, "tern_replays_total{app=\"app\",how=\"header\"}"), 1.0);
}

#[tokio::test]
async fn a_large_body_replays_whole_and_one_over_replay_buffer_is_refused() {
    let s = setup(&["ams", "ams"], "replay_buffer = \"64KiB\"", "").await;
    let body = "x".repeat(60 * 1024);
    let r = s.post(&format!("only=m1&replay={}", enc("instance=m2")), &body).await;
    assert_eq!(r.status(), 200, "{}", code(&r));
    let echo: serde_json::Value = r.json().await.unwrap();
    assert_eq!((echo["machine"].as_str().unwrap(), echo["body"].as_str().unwrap().len()), ("m2", body.len()));

    let body = "x".repeat(100 * 1024);
    let before = s.b[1].requests.load(Ordering::SeqCst);
    let r = s.post(&format!("only=m1&replay={}", enc("instance=m2")), &body).await;
    assert_eq!((r.status().as_u16(), code(&r)), (413, "replay_too_large".into()));
    assert_eq!(s.b[1].requests.load(Ordering::SeqCst), before, "m2 never saw it");
}

#[tokio::test]
async fn replays_chain_up_to_ten_then_stop() {
    let s = setup(&["ams", "ams"], "", "").await;
    let r = s.post(&format!("replay={}", enc("elsewhere=true")), "").await;
    assert_eq!((r.status().as_u16(), code(&r)), (508, "replay_loop".into()));
    let seen: usize = s.b.iter().map(|b| b.requests.load(Ordering::SeqCst)).sum();
    assert_eq!(seen, 11, "the first request and ten replays");
}

/// A plain GET goes to its machine through tern's own exchange, which hands the request's
/// fields back once it has written them: they are what a replay sends again. The target sees
/// the client's own fields and the forwarding headers with the replay's source, and not a
/// field that was the first hop's alone (the machine the client preferred and missed).
#[tokio::test]
async fn a_plain_get_replays_with_the_fields_it_was_first_sent_with() {
    let same = Backend::start("s1").await;
    let s = setup(&["ams", "ams", "ams"], "", &other_app("same", "o", "s1", same.addr)).await;
    let get = |query: String, headers: &'static [(&'static str, &'static str)]| {
        let mut req = s.client.get(s.proxy.url("app.test", &format!("/echo?{query}")));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200, "{}", code(&r));
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    for _ in 0..3 {
        let headers = &[("fly-force-instance-id", "m1"), ("x-kept", "yes")];
        let echo = get(format!("only=m1&replay={}", enc("instance=m3")), headers).await;
        assert_eq!((echo["machine"].as_str(), echo["method"].as_str()), (Some("m3"), Some("GET")), "{echo}");
        let h = &echo["headers"];
        assert_eq!(h["x-kept"][0], "yes", "{echo}");
        assert_eq!(h["x-forwarded-for"][0], "127.0.0.1", "{echo}");
        assert!(h["fly-replay-src"][0].as_str().unwrap().contains("instance=m1"), "{echo}");
        assert_eq!(h["fly-request-id"].as_array().map(Vec::len), Some(1), "{echo}");
    }
    // The only machine of `app` answers first and replays to another app's; the client
    // preferred a machine that does not exist, which the first hop's machine heard.
    let one = setup(&["ams"], "", &other_app("same", "o", "s1", same.addr)).await;
    let r = one
        .client
        .get(one.proxy.url("app.test", &format!("/echo?only=m1&replay={}", enc("app=same"))))
        .header("fly-prefer-instance-id", "ghost")
        .header("x-kept", "yes")
        .send()
        .await
        .unwrap();
    let echo: serde_json::Value = r.json().await.unwrap();
    assert_eq!(echo["machine"], "s1", "{echo}");
    assert_eq!(echo["headers"]["x-kept"][0], "yes", "{echo}");
    assert!(echo["headers"].get("fly-preferred-instance-unavailable").is_none(), "{echo}");
}

#[tokio::test]
async fn replay_to_another_app_only_within_the_org() {
    let same = Backend::start("s1").await;
    let foreign = Backend::start("f1").await;
    let apps = other_app("same", "o", "s1", same.addr) + &other_app("foreign", "x", "f1", foreign.addr);
    let s = setup(&["ams"], "", &apps).await;
    let r = s.post(&format!("only=m1&replay={}", enc("app=same")), "b").await;
    let echo: serde_json::Value = r.json().await.unwrap();
    assert_eq!(echo["machine"], "s1");
    let r = s.post(&format!("only=m1&replay={}", enc("app=foreign")), "b").await;
    assert_eq!((r.status().as_u16(), code(&r)), (502, "replay_unauthorized".into()));
    assert_eq!(foreign.requests.load(Ordering::SeqCst), 0);
    let r = s.post(&format!("only=m1&replay={}", enc("app=nope")), "b").await;
    assert_eq!((r.status().as_u16(), code(&r)), (502, "replay_invalid".into()));
    let r = s.post(&format!("only=m1&replay={}", enc("bogus=1")), "b").await;
    assert_eq!((r.status().as_u16(), code(&r)), (502, "replay_invalid".into()));
}

#[tokio::test]
async fn replay_by_region_prefer_instance_and_elsewhere() {
    let s = setup(&["ams", "fra", "fra"], "", "").await;
    for _ in 0..10 {
        let echo: serde_json::Value =
            s.post(&format!("only=m1&replay={}", enc("region=fra")), "").await.json().await.unwrap();
        assert!(echo["machine"] == "m2" || echo["machine"] == "m3", "{echo}");
    }
    let echo: serde_json::Value =
        s.post(&format!("only=m1&replay={}", enc("prefer_instance=m3")), "").await.json().await.unwrap();
    assert_eq!(echo["machine"], "m3");
    let echo: serde_json::Value =
        s.post(&format!("only=m1&replay={}", enc("prefer_instance=ghost")), "").await.json().await.unwrap();
    assert_eq!(echo["headers"]["fly-preferred-instance-unavailable"][0], "ghost");
    for _ in 0..10 {
        let echo: serde_json::Value =
            s.post(&format!("only=m1&replay={}", enc("elsewhere=true")), "").await.json().await.unwrap();
        assert_ne!(echo["machine"], "m1");
    }
}

#[tokio::test]
async fn an_unreachable_target_falls_back_to_the_origin_with_the_failure() {
    let dead = crate::harness::dead_addr();
    let extra = format!(
        "[[machines]]\nid = \"dead\"\napp = \"app\"\nregion = \"ams\"\naddr = \"{dead}\"\nstate = \"started\"\n"
    );
    let s = setup(&["ams"], "", &extra).await;
    let q = format!("only=m1&unless=fly-replay-failed&replay={}", enc("instance=dead;fallback=force_self"));
    let r = s.post(&q, "body").await;
    assert_eq!(r.status(), 200, "{}", code(&r));
    let echo: serde_json::Value = r.json().await.unwrap();
    assert_eq!(echo["machine"], "m1");
    assert_eq!(echo["body"], "body");
    let failed = echo["headers"]["fly-replay-failed"][0].as_str().unwrap();
    assert!(failed.contains("instance=m1") && failed.contains("reason="), "{failed}");
    // Without fallback: the target's error.
    let r = s.post(&format!("only=m1&replay={}", enc("instance=dead")), "").await;
    assert_eq!((r.status().as_u16(), code(&r)), (502, "upstream_connect".into()));
}

#[tokio::test]
async fn the_json_form_replays_with_its_transform() {
    let s = setup(&["ams", "ams"], "", "").await;
    let json = r#"{"instance":"m2","transform":{"path":"/echo?via=json","set_headers":[{"name":"x-added","value":"yes"}],"delete_headers":["x-gone"]}}"#;
    let r = s
        .client
        .post(s.proxy.url("app.test", &format!("/echo?only=m1&replay_json={}", enc(json))))
        .header("fly-force-instance-id", "m1")
        .header("x-gone", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", code(&r));
    let echo: serde_json::Value = r.json().await.unwrap();
    assert_eq!(echo["machine"], "m2");
    assert_eq!(echo["headers"]["x-added"][0], "yes");
    assert!(echo["headers"].get("x-gone").is_none());
    let m = s.proxy.metrics().await;
    assert_eq!(metric(&m, "tern_replays_total{app=\"app\",how=\"json\"}"), 1.0);
}

#[tokio::test]
async fn a_websocket_upgrade_replays_to_the_machine_that_serves_it() {
    use futures_util::{SinkExt, StreamExt};
    let s = setup(&["ams", "ams"], "", "").await;
    let url = format!("ws://{}/ws?only=m1&replay={}", s.proxy.http, enc("instance=m2"));
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    req.headers_mut().insert("host", "app.test".parse().unwrap());
    req.headers_mut().insert("fly-force-instance-id", "m1".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(tokio_tungstenite::tungstenite::Message::text("hi")).await.unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(echoed.to_text().unwrap(), "hi");
    assert_eq!(s.b[0].requests.load(Ordering::SeqCst), 1, "m1 replayed it");
    assert_eq!(s.b[1].requests.load(Ordering::SeqCst), 1, "m2 took the upgrade");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_to_a_stopped_machine_wakes_it() {
    let m1 = Backend::start("m1").await;
    let port = free_port();
    let cmd: Vec<String> = backend_cmd(port).iter().map(|c| format!("{c:?}")).collect();
    let d = format!(
        "[[apps]]\nname = \"sleepy\"\nhostnames = [\"sleepy.test\"]\n\n\
         [[machines]]\nid = \"m1\"\napp = \"sleepy\"\naddr = \"{}\"\nstate = \"started\"\n\n\
         [[machines]]\nid = \"s2\"\napp = \"sleepy\"\naddr = \"127.0.0.1:{port}\"\nstate = \"stopped\"\ncmd = [{}]\n",
        m1.addr,
        cmd.join(", ")
    );
    let mut proxy = Proxy::start(&d).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let r = client
        .get(proxy.url("sleepy.test", &format!("/?only=m1&replay={}", enc("instance=s2"))))
        .header("fly-force-instance-id", "m1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", code(&r));
    assert_eq!(r.text().await.unwrap(), "hello, world\n");
    assert_eq!(machine_state(&proxy, "s2").await, "started");
    // Stopped as tern stops, so the machine it started goes with it.
    proxy.shutdown().await.unwrap().unwrap();
}

/// The query parameters that make the replaying machine cache its replay for `/echo`.
fn cache_for_echo(allow_bypass: bool) -> String {
    let mut q = format!(
        "replay_header={}&replay_header={}",
        enc("fly-replay-cache:/echo/*"),
        enc("fly-replay-cache-ttl-secs:60")
    );
    if allow_bypass {
        q += &format!("&replay_header={}", enc("fly-replay-cache-allow-bypass:yes"));
    }
    q
}

impl Setup {
    /// POSTs to /echo with these query parameters and headers, pinned first to m1; the echo.
    async fn echo(&self, query: &str, headers: &[(&str, &str)]) -> serde_json::Value {
        let mut req = self
            .client
            .post(self.proxy.url("app.test", &format!("/echo?{query}")))
            // Preferred, not forced: a forced (or session) machine is never moved by the cache.
            .header("fly-prefer-instance-id", "m1");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.body("body").send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", code(&r));
        r.json().await.unwrap()
    }

    fn seen(&self, i: usize) -> u64 {
        self.b[i].requests.load(Ordering::SeqCst) as u64
    }
}

fn cache_status(echo: &serde_json::Value) -> Option<&str> {
    echo["headers"]["fly-replay-cache-status"][0].as_str()
}

#[tokio::test]
async fn a_cached_path_replay_sends_later_requests_straight_to_its_target() {
    let s = setup(&["ams", "ams", "ams"], "", "").await;
    // The same query each time: m1 would replay again if it saw the request.
    let q = format!("only=m1&replay={}&{}", enc("instance=m2"), cache_for_echo(false));
    let echo = s.echo(&q, &[]).await;
    assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m2"), Some("miss")));
    assert!(echo["headers"]["fly-replay-src"][0].is_string(), "a replay: {echo}");
    for _ in 0..3 {
        // A client's skip does nothing to an entry that does not allow it.
        let echo = s.echo(&q, &[("fly-replay-cache-control", "skip")]).await;
        assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m2"), Some("hit")));
        assert!(echo["headers"].get("fly-replay-src").is_none(), "no replay happened: {echo}");
        assert_eq!(echo["body"], "body");
    }
    assert_eq!(s.seen(0), 1, "m1 saw only the first request");
    // Outside the prefix: routed as usual.
    let r = s.client.get(s.proxy.url("app.test", "/id")).header("fly-force-instance-id", "m1").send().await;
    assert_eq!(r.unwrap().text().await.unwrap(), "m1");
    let m = s.proxy.metrics().await;
    assert_eq!(metric(&m, "tern_replays_total{app=\"app\",how=\"cache\"}"), 3.0);
    assert_eq!(metric(&m, "tern_replays_total{app=\"app\",how=\"header\"}"), 1.0);
    assert_eq!(metric(&m, "tern_routing_decisions_total{app=\"app\",why=\"replay_cache\"}"), 3.0);
}

#[tokio::test]
async fn a_client_may_skip_a_cache_entry_that_allows_it() {
    let s = setup(&["ams", "ams"], "", "").await;
    let q = format!("only=m1&replay={}&{}", enc("instance=m2"), cache_for_echo(true));
    assert_eq!(s.echo(&q, &[]).await["machine"], "m2");
    // Skipped: m1 gets it, told so (and this time it serves it).
    let echo = s.echo("", &[("fly-replay-cache-control", "skip")]).await;
    assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m1"), Some("bypass")));
    let echo = s.echo("", &[]).await;
    assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m2"), Some("hit")));
}

#[tokio::test]
async fn the_target_invalidates_the_entry_by_replaying_back() {
    let s = setup(&["ams", "ams"], "", "").await;
    let q = format!("only=m1&replay={}&{}", enc("instance=m2"), cache_for_echo(false));
    assert_eq!(s.echo(&q, &[]).await["machine"], "m2");
    // Cached to m2, which sends it back to m1 and drops the entry.
    let back =
        format!("only=m2&replay={}&replay_header={}", enc("instance=m1"), enc("fly-replay-cache:invalidate"));
    let echo = s.echo(&back, &[]).await;
    assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m1"), None));
    assert!(echo["headers"]["fly-replay-src"][0].as_str().unwrap().contains("instance=m2"), "{echo}");
    // Routed as usual again; a status the client sends is not passed on.
    let echo = s.echo("", &[("fly-replay-cache-status", "hit")]).await;
    assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m1"), None));
    assert_eq!(s.seen(1), 2, "the replay and the cached request");
}

#[tokio::test]
async fn a_replayed_request_the_client_sent_without_forwarding_fields_carries_each_once() {
    // No `fly-…` field from the client: the forwarding fields are written by the send, on
    // the first hop and again on the replay, never kept twice.
    // A GET goes by tern's own exchange; a chunked POST's body is streamed, by hyper's.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup(&["ams", "ams"], "", "").await;
    let q = format!("replay={}&unless=fly-replay-src", enc("instance=m2"));
    for method in ["GET", "POST"] {
        let body = if method == "POST" {
            "Transfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n"
        } else {
            "\r\n"
        };
        let mut tcp = tokio::net::TcpStream::connect(s.proxy.http).await.unwrap();
        let head = format!("{method} /echo?{q} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n{body}");
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut raw = String::new();
        tcp.read_to_string(&mut raw).await.unwrap();
        assert!(raw.starts_with("HTTP/1.1 200 "), "{raw}");
        let echo: serde_json::Value = serde_json::from_str(raw.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!((echo["machine"].as_str(), echo["method"].as_str()), (Some("m2"), Some(method)), "{echo}");
        let h = &echo["headers"];
        assert!(h["fly-replay-src"][0].as_str().is_some(), "replayed: {echo}");
        let port = s.proxy.http.port().to_string();
        for (name, want) in [
            ("x-forwarded-for", "127.0.0.1"),
            ("fly-client-ip", "127.0.0.1"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-ssl", "off"),
            ("x-forwarded-port", port.as_str()),
            ("fly-forwarded-port", port.as_str()),
            ("fly-region", "ams"),
            ("via", "1.1 tern"),
        ] {
            assert_eq!(h[name], serde_json::json!([want]), "{method} {name}: {echo}");
        }
        assert_eq!(h["fly-request-id"].as_array().map(Vec::len), Some(1), "{echo}");
    }
}

#[tokio::test]
async fn a_cached_target_that_cannot_be_reached_is_forgotten() {
    let dead = crate::harness::dead_addr();
    let extra = format!(
        "[[machines]]\nid = \"dead\"\napp = \"app\"\nregion = \"ams\"\naddr = \"{dead}\"\nstate = \"started\"\n"
    );
    let s = setup(&["ams"], "", &extra).await;
    let q = format!("only=m1&replay={}&{}", enc("instance=dead"), cache_for_echo(false));
    let r = s.post(&q, "").await;
    assert_eq!((r.status().as_u16(), code(&r)), (502, "upstream_connect".into()));
    // The entry sends it to the dead machine, which fails: routed as if there were none,
    // the request as the client sent it.
    for _ in 0..2 {
        let echo = s.echo("", &[("x-kept", "yes")]).await;
        assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m1"), None));
        assert!(echo["headers"].get("fly-replay-src").is_none());
        assert_eq!(echo["headers"]["x-kept"][0], "yes", "{echo}");
        assert_eq!(echo["headers"]["x-forwarded-for"][0], "127.0.0.1", "{echo}");
    }
    let m = s.proxy.metrics().await;
    assert_eq!(metric(&m, "tern_replays_total{app=\"app\",how=\"cache\"}"), 1.0, "forgotten after one try");
}

fn session_rule(kind: &str, name: &str) -> String {
    format!(
        "[[apps.replay_cache]]\npath_prefix = \"/echo\"\ntype = \"{kind}\"\nname = \"{name}\"\nttl_seconds = 60\n"
    )
}

#[tokio::test]
async fn a_session_rule_by_cookie_remembers_each_value_s_replay() {
    let s = setup(&["ams", "ams", "ams"], &session_rule("cookie", "user"), "").await;
    let to = |m: &str| format!("only=m1&replay={}", enc(&format!("instance={m}")));
    let alice = [("cookie", "theme=dark; user=alice")];
    let bob = [("cookie", "user=bob")];
    let echo = s.echo(&to("m2"), &alice).await;
    assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m2"), Some("miss")));
    let echo = s.echo(&to("m3"), &bob).await;
    assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m3"), Some("miss")));
    for _ in 0..2 {
        let echo = s.echo(&to("m3"), &alice).await;
        assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m2"), Some("hit")));
        let echo = s.echo(&to("m2"), &bob).await;
        assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m3"), Some("hit")));
    }
    assert_eq!(s.seen(0), 2, "m1 saw each value once");
    // No cookie, no session: m1 decides.
    let echo = s.echo("", &[]).await;
    assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m1"), None));
}

#[tokio::test]
async fn a_session_rule_by_header_remembers_each_value_s_replay() {
    let s = setup(&["ams", "ams", "ams"], &session_rule("header", "x-tenant"), "").await;
    let to = |m: &str| format!("only=m1&replay={}", enc(&format!("instance={m}")));
    assert_eq!(s.echo(&to("m2"), &[("x-tenant", "a")]).await["machine"], "m2");
    assert_eq!(s.echo(&to("m3"), &[("x-tenant", "b")]).await["machine"], "m3");
    let echo = s.echo("", &[("x-tenant", "a")]).await;
    assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m2"), Some("hit")));
    let echo = s.echo("", &[("x-tenant", "b")]).await;
    assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m3"), Some("hit")));
    let echo = s.echo("", &[("x-tenant", "c")]).await;
    assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m1"), None));
    assert_eq!(s.seen(0), 3);
}

#[tokio::test]
async fn the_json_form_caches_only_a_prefix_that_covers_the_request() {
    let s = setup(&["ams", "ams"], "", "").await;
    let json = |prefix: &str| {
        let body = format!(r#"{{"instance":"m2","cache":{{"prefix":"{prefix}","ttl":60}}}}"#);
        format!("only=m1&replay_json={}", enc(&body))
    };
    for _ in 0..2 {
        let echo = s.echo(&json("/elsewhere/*"), &[]).await;
        assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m2"), None));
    }
    assert_eq!(s.seen(0), 2, "not cached: m1 replayed both");
    let echo = s.echo(&json("/echo/*"), &[]).await;
    assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m2"), Some("miss")));
    let echo = s.echo(&json("/echo/*"), &[]).await;
    assert_eq!((echo["machine"].as_str(), cache_status(&echo)), (Some("m2"), Some("hit")));
    assert_eq!(s.seen(0), 3);
}

/// `timeout` bounds the wait for the target: a target at its hard limit is given up after
/// it (not after the app's much longer wake_timeout), and `fallback` sends the request back.
#[tokio::test]
async fn a_replay_timeout_gives_up_on_a_busy_target_and_falls_back() {
    let s = setup(
        &["ams", "ams"],
        "wake_timeout = \"60s\"\nconcurrency = { type = \"requests\", soft_limit = 1, hard_limit = 1 }",
        "",
    )
    .await;
    let held = {
        let (client, url) = (s.client.clone(), s.proxy.url("app.test", "/hang"));
        tokio::spawn(
            async move { client.get(url).header("fly-force-instance-id", "m2").send().await.unwrap() },
        )
    };
    crate::harness::eventually(std::time::Duration::from_secs(10), || async {
        (s.b[1].requests.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await
    .expect("m2 is busy");
    let q = format!(
        "only=m1&unless=fly-replay-failed&replay={}",
        enc("instance=m2;timeout=300ms;fallback=force_self")
    );
    // Well under the app's 60 s wake_timeout: only the replay's timeout can end the wait.
    let r = tokio::time::timeout(std::time::Duration::from_secs(20), s.post(&q, "b"))
        .await
        .expect("the replay's timeout, not wake_timeout, ended the wait");
    assert_eq!(r.status(), 200, "{}", code(&r));
    let echo: serde_json::Value = r.json().await.unwrap();
    assert_eq!(echo["machine"], "m1");
    let failed = echo["headers"]["fly-replay-failed"][0].as_str().unwrap();
    assert!(failed.contains("reason=timeout") && failed.contains("instance=m1"), "{failed}");
    s.b[1].gate.notify_waiters();
    assert_eq!(held.await.unwrap().status(), 200);
}
