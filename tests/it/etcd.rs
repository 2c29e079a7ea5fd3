//! tern on a real etcd (Debian's `etcd-server`, 3.4): apply through it, serve from it, keep
//! serving while it is away, and resynchronise when its history was compacted under a watch.
//!
//! Each cluster runs on an address of its own in 127.0.0.0/8 (random), on ports the kernel
//! picked there, so parallel tests never meet.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::backend::Backend;
use crate::harness::{self, ServeProcess, eventually};

/// One etcd member: a real `etcd` process.
pub struct Member {
    pub name: String,
    pub client: SocketAddr,
    peer: SocketAddr,
    dir: PathBuf,
    child: Option<std::process::Child>,
    cluster: String,
    fresh: bool,
}

/// A cluster of `etcd` processes on one random loopback address.
pub struct Etcd {
    pub members: Vec<Member>,
    _dir: tempfile::TempDir,
}

fn etcd_bin() -> &'static str {
    if std::process::Command::new("etcd").arg("--version").output().is_err() {
        panic!("these tests need etcd (Debian: apt-get install etcd-server); .ci/run installs it");
    }
    "etcd"
}

/// A loopback address few others use: 127.x.y.z from the process id and a counter.
fn lone_address() -> Ipv4Addr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ N.fetch_add(1, Ordering::Relaxed).wrapping_mul(40_503);
    let b = seed.to_be_bytes();
    Ipv4Addr::new(127, b[1].max(1), b[2], b[3].clamp(2, 254))
}

fn free_port(ip: Ipv4Addr) -> SocketAddr {
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
}

impl Member {
    fn start(&mut self) {
        let state = if self.fresh { "new" } else { "existing" };
        self.fresh = false;
        let child = std::process::Command::new(etcd_bin())
            .args(["--name", &self.name, "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &format!("http://{}", self.client)])
            .args(["--advertise-client-urls", &format!("http://{}", self.client)])
            .args(["--listen-peer-urls", &format!("http://{}", self.peer)])
            .args(["--initial-advertise-peer-urls", &format!("http://{}", self.peer)])
            .args(["--initial-cluster", &self.cluster, "--initial-cluster-state", state])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.with_extension("log")).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.client)
    }
}

impl Etcd {
    pub async fn cluster(n: usize) -> Etcd {
        harness::install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let ip = lone_address();
        let addrs: Vec<(SocketAddr, SocketAddr)> = (0..n).map(|_| (free_port(ip), free_port(ip))).collect();
        let cluster = addrs
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let members = addrs
            .into_iter()
            .enumerate()
            .map(|(i, (client, peer))| Member {
                name: format!("m{i}"),
                client,
                peer,
                dir: dir.path().join(format!("m{i}")),
                child: None,
                cluster: cluster.clone(),
                fresh: true,
            })
            .collect();
        let mut etcd = Etcd { members, _dir: dir };
        for m in &mut etcd.members {
            m.start();
        }
        etcd.healthy().await;
        etcd
    }

    /// Waits until every running member says it is healthy.
    pub async fn healthy(&self) {
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let url = format!("{}/health", m.url());
            let ok = eventually(Duration::from_secs(30), || async {
                let body = reqwest::get(&url).await.ok()?.text().await.ok()?;
                body.contains("\"true\"").then_some(())
            })
            .await;
            assert!(ok.is_some(), "etcd member {} did not become healthy", m.name);
        }
    }

    pub fn restart(&mut self, i: usize) {
        self.members[i].start();
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::url).collect()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            if m.child.is_some() {
                let _ = m.signal_cont();
            }
            m.kill();
        }
    }
}

impl Member {
    fn signal_cont(&self) -> nix::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)
    }
}

/// A node config on etcd: plain HTTP and admin on port 0, quick liveness probes.
pub fn etcd_config(dir: &Path, endpoints: &[String], extra: &str) -> PathBuf {
    etcd_config_probing(dir, endpoints, extra, "300ms")
}

/// [`etcd_config`] with the watch probed after `probe_after` of quiet (answer within 300ms).
pub fn etcd_config_probing(dir: &Path, endpoints: &[String], extra: &str, probe_after: &str) -> PathBuf {
    let eps = endpoints.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>().join(", ");
    let text = format!(
        "region = \"ams\"\n{extra}\n[shutdown]\ndrain_window = \"1s\"\n[watchdog]\naction = \"log\"\n\
         [[listen]]\naddr = \"127.0.0.1:0\"\n\n[[listen]]\naddr = \"127.0.0.1:0\"\ntls = true\n\n[admin]\naddr = \"127.0.0.1:0\"\n\n\
         [rib]\nkind = \"etcd\"\nendpoints = [{eps}]\nprefix = \"/t/\"\nprobe_after = \"{probe_after}\"\nprobe_timeout = \"300ms\"\n\n\
         [log]\naccess = false\nformat = \"json\"\n"
    );
    let path = dir.join(format!("tern-{}.toml", endpoints.len()));
    std::fs::write(&path, text).unwrap();
    path
}

/// `tern apply -c CONFIG DECL [--prune]`: (success, stdout, stderr).
pub fn tern_apply(config: &Path, decl: &str, prune: bool) -> (bool, String, String) {
    let file = config.with_extension("decl.toml");
    std::fs::write(&file, decl).unwrap();
    let mut cmd = std::process::Command::new(harness::tern_bin());
    cmd.arg("apply").arg("-c").arg(config).arg(&file);
    if prune {
        cmd.arg("--prune");
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn app(name: &str, host: &str, machine: SocketAddr) -> String {
    harness::app_decl(name, &[host], &[(&format!("{name}-1"), machine, "started")], "")
}

async fn status_of(serve: &ServeProcess, host: &str) -> u16 {
    let client = reqwest::Client::builder().resolve(host, serve.http).build().unwrap();
    match client.get(format!("http://{host}:{}/id", serve.http.port())).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

async fn metric(serve: &ServeProcess, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{}/metrics", serve.admin)).await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn apply_and_serve_through_etcd_and_refuse_what_sqlite_refuses() {
    let etcd = Etcd::cluster(1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = etcd_config(dir.path(), &etcd.endpoints(), "");
    let one = Backend::start("one").await;
    let two = Backend::start("two").await;

    let (ok, out, err) = tern_apply(&config, &app("one", "one.test", one.addr), false);
    assert!(ok, "{out}{err}");
    assert!(out.contains("+ app one"), "{out}");
    let serve = ServeProcess::start(&config).await;
    assert_eq!(status_of(&serve, "one.test").await, 200);
    // The etcd client's own runtime beats for the watchdog like every other.
    let dog: serde_json::Value =
        reqwest::get(format!("http://{}/v1/watchdog", serve.admin)).await.unwrap().json().await.unwrap();
    let beats: Vec<&str> =
        dog["heartbeats"].as_array().unwrap().iter().filter_map(|b| b["what"].as_str()).collect();
    assert!(beats.contains(&"rib-client"), "{beats:?}");

    // A change while it serves is served within moments; a conflict changes nothing.
    let both = format!("{}\n{}", app("one", "one.test", one.addr), app("two", "two.test", two.addr));
    assert!(tern_apply(&config, &both, false).0);
    let served = eventually(Duration::from_secs(5), || async {
        (status_of(&serve, "two.test").await == 200).then_some(())
    });
    assert!(served.await.is_some(), "the applied app is served");
    let thief = harness::app_decl("thief", &["one.test"], &[], "");
    let (ok, _, err) = tern_apply(&config, &thief, false);
    assert!(!ok);
    assert!(err.contains("hostname \"one.test\" is already claimed by app \"one\""), "{err}");
    assert!(err.contains("nothing was applied"), "{err}");

    // --prune removes what the declaration does not name, and its hostname is free again.
    let (ok, out, err) = tern_apply(&config, &app("two", "two.test", two.addr), true);
    assert!(ok, "{out}{err}");
    assert!(out.contains("- app one") && out.contains("- machine one-1"), "{out}");
    let gone = eventually(Duration::from_secs(5), || async {
        (status_of(&serve, "one.test").await == 404).then_some(())
    });
    assert!(gone.await.is_some(), "the pruned app is gone");
    assert!(tern_apply(&config, &thief.replace("thief", "three"), false).0, "the hostname is free");

    // Orgs are rows like any other, and their rules hold here as on SQLite.
    let four =
        harness::app_decl("four", &["four.test"], &[], "org = \"acme\"\nprivate_addrs = [\"10.1.0.4\"]");
    let (ok, _, err) = tern_apply(&config, &four, false);
    assert!(!ok && err.contains("its org \"acme\" is not declared"), "{err}");
    let acme = "[[orgs]]\nname = \"acme\"\nnetworks = [\"10.0.0.0/8\"]\n\n";
    let (ok, out, err) = tern_apply(&config, &format!("{acme}{four}"), false);
    assert!(ok && out.contains("+ org acme") && out.contains("+ app four"), "{out}{err}");
    let moved = harness::app_decl("two", &["two.test"], &[], "org = \"acme\"");
    let (ok, _, err) = tern_apply(&config, &moved, false);
    assert!(!ok && err.contains("app \"two\" belongs to org \"personal\""), "{err}");
}

#[tokio::test]
async fn with_the_whole_cluster_down_the_last_catalog_serves_and_says_so() {
    let mut etcd = Etcd::cluster(1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = etcd_config(dir.path(), &etcd.endpoints(), "");
    let one = Backend::start("one").await;
    assert!(tern_apply(&config, &app("one", "one.test", one.addr), false).0);
    let serve = ServeProcess::start(&config).await;
    assert_eq!(metric(&serve, "tern_rib_connected").await, Some(1.0));

    etcd.members[0].kill();
    let down = eventually(Duration::from_secs(10), || async {
        (metric(&serve, "tern_rib_connected").await == Some(0.0)).then_some(())
    });
    assert!(down.await.is_some(), "the lost store is reported");
    for _ in 0..20 {
        assert_eq!(status_of(&serve, "one.test").await, 200, "the last catalog serves");
    }
    let stale = eventually(Duration::from_secs(10), || async {
        metric(&serve, "tern_rib_staleness_seconds").await.filter(|s| *s >= 1.0)
    });
    assert!(stale.await.is_some(), "staleness grows while the store is away");
    let health = reqwest::get(format!("http://{}/healthz", serve.admin)).await.unwrap();
    assert_eq!(health.status(), 200, "an unreachable RIB is no reason to withdraw the node");

    // Back: followed again, and a change made now is served.
    etcd.restart(0);
    etcd.healthy().await;
    let two = Backend::start("two").await;
    let both = format!("{}\n{}", app("one", "one.test", one.addr), app("two", "two.test", two.addr));
    assert!(tern_apply(&config, &both, false).0);
    let served = eventually(Duration::from_secs(15), || async {
        (status_of(&serve, "two.test").await == 200).then_some(())
    });
    assert!(served.await.is_some(), "a change after recovery is served");
    assert_eq!(metric(&serve, "tern_rib_connected").await, Some(1.0));
    assert_eq!(metric(&serve, "tern_rib_staleness_seconds").await, Some(0.0));
}

#[tokio::test]
async fn a_watch_whose_history_was_compacted_away_resyncs_and_serves_on() {
    let etcd = Etcd::cluster(3).await;
    let dir = tempfile::tempdir().unwrap();
    // tern connects to the first endpoint it is given: m0. Its probe waits long enough for
    // the change and the compaction below to be made before it looks elsewhere.
    let config = etcd_config_probing(dir.path(), &etcd.endpoints(), "", "3s");
    let writer = etcd_config(dir.path(), &etcd.endpoints()[1..], "");
    let one = Backend::start("one").await;
    assert!(tern_apply(&writer, &app("one", "one.test", one.addr), false).0);
    let serve = ServeProcess::start(&config).await;
    assert_eq!(status_of(&serve, "one.test").await, 200);

    // m0 freezes: tern's watch hears nothing. Meanwhile the others take a change and
    // compact their history past tern's revision.
    etcd.members[0].signal(nix::sys::signal::Signal::SIGSTOP);
    let two = Backend::start("two").await;
    let both = format!("{}\n{}", app("one", "one.test", one.addr), app("two", "two.test", two.addr));
    let (ok, out, err) = tern_apply(&writer, &both, false);
    assert!(ok, "{out}{err}");
    // Another revision on top, so compacting to the newest removes the one tern needs next
    // (etcd keeps the compaction revision itself).
    let three = harness::app_decl("three", &["three.test"], &[], "");
    assert!(tern_apply(&writer, &format!("{both}\n{three}"), false).0);
    let compact = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.endpoints()[1..].join(",")])
        .args(["compact", "--physical"])
        .arg(current_revision(&etcd.endpoints()[1]).to_string())
        .output()
        .unwrap();
    assert!(compact.status.success(), "{}", String::from_utf8_lossy(&compact.stderr));

    // The probe goes unanswered, tern re-watches elsewhere from its revision, finds it
    // compacted, and resyncs from a snapshot; the old route never stops answering.
    let (mut failed, mut asked) = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while status_of(&serve, "two.test").await != 200 {
        assert!(tokio::time::Instant::now() < deadline, "the change made during the freeze is served");
        asked += 1;
        if status_of(&serve, "one.test").await != 200 {
            failed += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(failed, 0, "of {asked} requests on the old route while the store was frozen");
    let resyncs = metric(&serve, "tern_rib_resyncs_total{reason=\"compacted\"}").await;
    let text = reqwest::get(format!("http://{}/metrics", serve.admin)).await.unwrap().text().await.unwrap();
    let rib: Vec<&str> = text.lines().filter(|l| l.starts_with("tern_rib")).collect();
    assert_eq!(resyncs, Some(1.0), "the resync is counted with its reason: {rib:?}");
    etcd.members[0].signal(nix::sys::signal::Signal::SIGCONT);
}

/// The cluster's newest revision, from `etcdctl endpoint status`.
fn current_revision(endpoint: &str) -> i64 {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "endpoint", "status", "-w", "json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["Status"]["header"]["revision"].as_i64().unwrap()
}
