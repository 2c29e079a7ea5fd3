//! Routing headers (fly-proxy's): `fly-force-instance-id`, `fly-prefer-instance-id`,
//! `fly-force-region`, `fly-prefer-region`. They steer the machine choice within the app
//! the hostname names, and never to a machine of another app.

use std::net::SocketAddr;

use crate::backend::Backend;
use crate::harness::{Ca, HttpVersion, Proxy};
use crate::wake::{backend_cmd, free_port, machine_state, metric};

/// App `app` (app.test) with machines (id, addr, region), all started; and app `other`
/// (other.test) with one machine, `o1`.
fn decl(machines: &[(&str, SocketAddr, &str)], other: SocketAddr, extra: &str) -> String {
    let mut d = format!("[[apps]]\nname = \"app\"\nhostnames = [\"app.test\"]\n{extra}\n");
    for (id, addr, region) in machines {
        d += &format!(
            "[[machines]]\nid = \"{id}\"\napp = \"app\"\nregion = \"{region}\"\naddr = \"{addr}\"\nstate = \"started\"\n\n"
        );
    }
    d += &format!(
        "[[apps]]\nname = \"other\"\nhostnames = [\"other.test\"]\n\n[[machines]]\nid = \"o1\"\napp = \"other\"\naddr = \"{other}\"\nstate = \"started\"\n"
    );
    d
}

struct Setup {
    proxy: Proxy,
    client: reqwest::Client,
    backends: Vec<Backend>,
    other: Backend,
}

async fn setup(regions: &[&str], extra: &str) -> Setup {
    let mut backends = Vec::new();
    for i in 0..regions.len() {
        backends.push(Backend::start(&format!("m{}", i + 1)).await);
    }
    let other = Backend::start("o1").await;
    let names: Vec<String> = (1..=regions.len()).map(|i| format!("m{i}")).collect();
    let machines: Vec<(&str, SocketAddr, &str)> =
        names.iter().zip(&backends).zip(regions).map(|((n, b), r)| (n.as_str(), b.addr, *r)).collect();
    let proxy = Proxy::start(&decl(&machines, other.addr, extra)).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    Setup { proxy, client, backends, other }
}

impl Setup {
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self.client.get(self.proxy.url("app.test", path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }

    /// Which machine answered each of `n` requests with these headers.
    async fn ids(&self, n: usize, headers: &[(&str, &str)]) -> Vec<String> {
        let mut ids = Vec::new();
        for _ in 0..n {
            let r = self.get("/id", headers).await;
            assert_eq!(r.status(), 200, "{:?}", r.headers().get("tern-error"));
            ids.push(r.text().await.unwrap());
        }
        ids
    }
}

fn error_code(r: &reqwest::Response) -> &str {
    r.headers().get("tern-error").map_or("-", |v| v.to_str().unwrap())
}

#[tokio::test]
async fn force_instance_goes_to_that_machine_only_and_never_to_another_app() {
    let s = setup(&["ams", "ams", "ams"], "").await;
    let ids = s.ids(30, &[("fly-force-instance-id", "m2")]).await;
    assert!(ids.iter().all(|id| id == "m2"), "{ids:?}");

    let r = s.get("/id", &[("fly-force-instance-id", "nope")]).await;
    assert_eq!((r.status().as_u16(), error_code(&r)), (503, "instance_unavailable"));
    // A machine of another app is no machine of this one.
    let before = s.other.requests.load(std::sync::atomic::Ordering::SeqCst);
    let r = s.get("/id", &[("fly-force-instance-id", "o1")]).await;
    assert_eq!((r.status().as_u16(), error_code(&r)), (503, "instance_unavailable"));
    assert_eq!(s.other.requests.load(std::sync::atomic::Ordering::SeqCst), before, "o1 never saw it");

    let m = s.proxy.metrics().await;
    assert_eq!(metric(&m, "tern_routing_decisions_total{app=\"app\",why=\"forced\"}"), 30.0);
}

#[tokio::test]
async fn a_forced_machine_at_its_hard_limit_is_waited_for_not_swapped() {
    let s =
        setup(&["ams", "ams"], "concurrency = { type = \"requests\", soft_limit = 1, hard_limit = 1 }").await;
    // m1 busy with a held request; a forced request for m1 waits for it.
    let held = {
        let (client, url) = (s.client.clone(), s.proxy.url("app.test", "/hang"));
        tokio::spawn(
            async move { client.get(url).header("fly-force-instance-id", "m1").send().await.unwrap() },
        )
    };
    crate::harness::eventually(std::time::Duration::from_secs(10), || async {
        (s.backends[0].requests.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    })
    .await
    .expect("the held request reached m1");
    let forced = {
        let (client, url) = (s.client.clone(), s.proxy.url("app.test", "/id"));
        tokio::spawn(async move {
            client.get(url).header("fly-force-instance-id", "m1").send().await.unwrap().text().await.unwrap()
        })
    };
    // A free request meanwhile goes to m2, which has room.
    assert_eq!(s.ids(1, &[]).await, ["m2"]);
    assert!(!forced.is_finished(), "the forced request waits for m1");
    s.backends[0].gate.notify_waiters();
    assert_eq!(held.await.unwrap().status(), 200);
    assert_eq!(forced.await.unwrap(), "m1", "served by m1 once it had room");
}

#[tokio::test]
async fn prefer_instance_falls_back_and_tells_the_machine() {
    let s =
        setup(&["ams", "ams"], "concurrency = { type = \"requests\", soft_limit = 1, hard_limit = 1 }").await;
    assert_eq!(s.ids(10, &[("fly-prefer-instance-id", "m2")]).await, vec!["m2"; 10]);

    // m2 full: the request goes to m1, which hears m2 was unavailable.
    let held = {
        let (client, url) = (s.client.clone(), s.proxy.url("app.test", "/hang"));
        tokio::spawn(
            async move { client.get(url).header("fly-force-instance-id", "m2").send().await.unwrap() },
        )
    };
    crate::harness::eventually(std::time::Duration::from_secs(10), || async {
        (s.backends[1].requests.load(std::sync::atomic::Ordering::SeqCst) > 10).then_some(())
    })
    .await
    .expect("the held request reached m2");
    let echo: serde_json::Value =
        s.get("/echo", &[("fly-prefer-instance-id", "m2")]).await.json().await.unwrap();
    assert_eq!(echo["headers"]["fly-preferred-instance-unavailable"][0], "m2", "{echo}");
    // An id the app does not have: any machine, told the same.
    s.backends[1].gate.notify_waiters();
    assert_eq!(held.await.unwrap().status(), 200);
    let echo: serde_json::Value =
        s.get("/echo", &[("fly-prefer-instance-id", "ghost")]).await.json().await.unwrap();
    assert_eq!(echo["headers"]["fly-preferred-instance-unavailable"][0], "ghost");
    let m = s.proxy.metrics().await;
    assert_eq!(metric(&m, "tern_routing_decisions_total{app=\"app\",why=\"preferred\"}"), 10.0);
}

#[tokio::test]
async fn force_region_keeps_to_the_region_and_prefer_region_falls_back() {
    let s = setup(&["ams", "fra", "fra"], "").await;
    let ids = s.ids(20, &[("fly-force-region", "fra")]).await;
    assert!(ids.iter().all(|id| id == "m2" || id == "m3"), "{ids:?}");
    let ids = s.ids(10, &[("fly-force-region", "syd, AMS")]).await;
    assert!(ids.iter().all(|id| id == "m1"), "a list, any case: {ids:?}");
    let r = s.get("/id", &[("fly-force-region", "syd")]).await;
    assert_eq!((r.status().as_u16(), error_code(&r)), (503, "region_unavailable"));

    let ids = s.ids(10, &[("fly-prefer-region", "ams")]).await;
    assert!(ids.iter().all(|id| id == "m1"), "{ids:?}");
    let ids = s.ids(10, &[("fly-prefer-region", "syd")]).await;
    assert_eq!(ids.len(), 10, "no machine in syd: falls back to the others");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_instance_wakes_that_stopped_machine_not_another() {
    let (p1, p2) = (free_port(), free_port());
    let mut d = String::from("[[apps]]\nname = \"sleepy\"\nhostnames = [\"sleepy.test\"]\n");
    for (id, port) in [("s1", p1), ("s2", p2)] {
        let cmd: Vec<String> = backend_cmd(port).iter().map(|c| format!("{c:?}")).collect();
        d += &format!(
            "[[machines]]\nid = \"{id}\"\napp = \"sleepy\"\naddr = \"127.0.0.1:{port}\"\nstate = \"stopped\"\ncmd = [{}]\n",
            cmd.join(", ")
        );
    }
    let mut proxy = Proxy::start(&d).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let r =
        client.get(proxy.url("sleepy.test", "/")).header("fly-force-instance-id", "s2").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(machine_state(&proxy, "s2").await, "started");
    assert_eq!(machine_state(&proxy, "s1").await, "stopped", "only the forced machine woke");
    // Stopped as tern stops, so the machine it started goes with it.
    proxy.shutdown().await.unwrap().unwrap();
}
