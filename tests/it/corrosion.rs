//! tern on Corrosion, through the Corrosion stand-in (tests/it/corrosion_standin.rs: the
//! agent's HTTP API over SQLite, not Corrosion itself, which no registry here packages).
//! Real `tern serve` and `tern apply` processes, real HTTP. Each failure the adapter
//! documents (retention purge, a forgotten subscription, a skipped change id, a silent
//! stream, a drop in the middle of a transaction's changes) is injected while changes are
//! made, and then the catalog must be exactly the stand-in's table: every app and machine in
//! `tern_rib` as `GET /v1/apps/{app}` reports it, and every other app 404.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::backend::Backend;
use crate::corrosion_standin::{Health, Standin};
use crate::etcd::tern_apply;
use crate::harness::{self, ServeProcess, eventually};

/// A stand-in agent on port 0 over a database in its own temp dir.
struct Agent {
    standin: Standin,
    dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Agent {
        Agent::with_retention(500)
    }

    fn with_retention(retention: usize) -> Agent {
        harness::install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let schema = std::fs::read_to_string(schema_path()).unwrap();
        let standin =
            Standin::start(([127, 0, 0, 1], 0).into(), &dir.path().join("corrosion.db"), &schema, retention)
                .unwrap();
        Agent { standin, dir }
    }

    /// A node config on this agent: plain HTTP and admin on port 0, quick probes.
    fn config(&self, name: &str) -> PathBuf {
        let text = format!(
            "region = \"ams\"\n[shutdown]\ndrain_window = \"1s\"\n[watchdog]\naction = \"log\"\n\
             [[listen]]\naddr = \"127.0.0.1:0\"\n\n[[listen]]\naddr = \"127.0.0.1:0\"\ntls = true\n\n\
             [admin]\naddr = \"127.0.0.1:0\"\n\n[rib]\nkind = \"corrosion\"\nurl = \"{}\"\n\
             probe_after = \"300ms\"\nprobe_timeout = \"300ms\"\n\n[log]\naccess = false\nformat = \"json\"\n",
            self.standin.url()
        );
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn sql(&self, stmts: &[Value]) {
        self.standin.execute(stmts).unwrap();
    }

    /// What the table says tern serves: app → its machines as (id, state, addr), sorted.
    fn expected(&self) -> BTreeMap<String, Vec<(String, String, String)>> {
        let mut out: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for row in self.standin.rows("SELECT key FROM tern_rib WHERE tbl = 'apps'") {
            out.insert(row[0].as_str().unwrap().to_string(), Vec::new());
        }
        let machines = "SELECT m.key, json_extract(m.body, '$.app'), \
             coalesce(json_extract(s.body, '$.state'), json_extract(m.body, '$.state')), json_extract(m.body, '$.addr') \
             FROM tern_rib m LEFT JOIN tern_rib s ON s.tbl = 'machine_states' AND s.key = m.key \
             WHERE m.tbl = 'machines' ORDER BY m.key";
        for row in self.standin.rows(machines) {
            let s = |i: usize| row[i].as_str().unwrap().to_string();
            if let Some(list) = out.get_mut(&s(1)) {
                list.push((s(0), s(2), s(3)));
            }
        }
        out
    }

    /// The API requests that resumed a subscription (`?from=`).
    fn resumes(&self) -> usize {
        self.standin
            .requests()
            .iter()
            .filter(|(r, _)| r.starts_with("GET /v1/subscriptions/") && r.contains("from="))
            .count()
    }
}

fn schema_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/corrosion-schema.sql")
}

/// What `tern serve` reports for each of `names` (absent: 404).
async fn served(serve: &ServeProcess, names: &[String]) -> BTreeMap<String, Vec<(String, String, String)>> {
    let mut out = BTreeMap::new();
    for name in names {
        let resp = reqwest::get(format!("http://{}/v1/apps/{name}", serve.admin)).await.unwrap();
        if resp.status() == 404 {
            continue;
        }
        assert_eq!(resp.status(), 200, "{name}");
        let v: Value = resp.json().await.unwrap();
        let mut machines: Vec<_> = v["machines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let s = |k: &str| m[k].as_str().unwrap().to_string();
                (s("id"), s("state"), s("addr"))
            })
            .collect();
        machines.sort();
        out.insert(name.clone(), machines);
    }
    out
}

/// Waits until the catalog is the table, over every app name the test used.
async fn converges(serve: &ServeProcess, agent: &Agent, names: &[&str]) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let done = eventually(Duration::from_secs(15), || async {
        (served(serve, &names).await == agent.expected()).then_some(())
    })
    .await;
    if done.is_none() {
        panic!(
            "the catalog is not the table:\n served {:?}\n table  {:?}",
            served(serve, &names).await,
            agent.expected()
        );
    }
}

async fn metric(serve: &ServeProcess, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{}/metrics", serve.admin)).await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Every resync after the first snapshot, by reason.
async fn resyncs(serve: &ServeProcess) -> BTreeMap<String, f64> {
    let text = reqwest::get(format!("http://{}/metrics", serve.admin)).await.unwrap().text().await.unwrap();
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("tern_rib_resyncs_total{reason=\"")?;
            let (reason, value) = rest.split_once("\"} ")?;
            Some((reason.to_string(), value.parse().ok()?))
        })
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

async fn wait_metric(serve: &ServeProcess, name: &str, want: f64) {
    let ok = eventually(Duration::from_secs(15), || async {
        (metric(serve, name).await == Some(want)).then_some(())
    });
    assert!(ok.await.is_some(), "{name} never became {want}: {:?}", metric(serve, name).await);
}

/// An app with machines `NAME-1..=n` (no cmd: tern routes to them, never runs them).
fn app(name: &str, n: usize) -> String {
    let machines: Vec<(String, std::net::SocketAddr)> = (1..=n)
        .map(|i| (format!("{name}-{i}"), std::net::SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16))))
        .collect();
    let list: Vec<(&str, std::net::SocketAddr, &str)> =
        machines.iter().map(|(id, a)| (id.as_str(), *a, "started")).collect();
    harness::app_decl(name, &[&format!("{name}.test")], &list, "")
}

fn set_machine_state(id: &str, state: &str) -> Value {
    json!([
        "UPDATE tern_rib SET body = json_set(body, '$.state', ?) WHERE tbl = 'machines' AND key = ?",
        [state, id]
    ])
}

fn delete_row(tbl: &str, key: &str) -> Value {
    json!(["DELETE FROM tern_rib WHERE tbl = ? AND key = ?", [tbl, key]])
}

/// The row leaves what tern follows (its table is one tern does not know), which the
/// subscription reports as a delete.
fn retire_app(name: &str) -> Value {
    json!(["UPDATE tern_rib SET tbl = 'retired_apps' WHERE tbl = 'apps' AND key = ?", [name]])
}

/// A node serving `decl` from a fresh agent.
async fn serving(agent: &Agent, decl: &str) -> (PathBuf, ServeProcess) {
    let config = agent.config("node");
    let (ok, out, err) = tern_apply(&config, decl, false);
    assert!(ok, "{out}{err}");
    let serve = ServeProcess::start(&config).await;
    (config, serve)
}

#[tokio::test]
async fn apply_and_serve_through_corrosion_and_refuse_what_sqlite_refuses() {
    let agent = Agent::start();
    let config = agent.config("node");
    let one = Backend::start("one").await;
    let decl_one = harness::app_decl("one", &["one.test"], &[("one-1", one.addr, "started")], "");
    let (ok, out, err) = tern_apply(&config, &decl_one, false);
    assert!(ok && out.contains("+ app one"), "{out}{err}");
    let serve = ServeProcess::start(&config).await;
    let client = reqwest::Client::builder().resolve("one.test", serve.http).build().unwrap();
    let status =
        client.get(format!("http://one.test:{}/id", serve.http.port())).send().await.unwrap().status();
    assert_eq!(status, 200, "served from the agent's rows");

    let both = format!("{decl_one}\n{}", app("two", 2));
    assert!(tern_apply(&config, &both, false).0);
    converges(&serve, &agent, &["one", "two", "thief", "three"]).await;
    let hosts = agent.standin.rows("SELECT hostname, app FROM tern_app_hosts ORDER BY hostname");
    assert_eq!(hosts, [[json!("one.test"), json!("one")], [json!("two.test"), json!("two")]]);

    // A stolen hostname is refused exactly as the SQLite RIB refuses it, and nothing changes.
    let thief = harness::app_decl("thief", &["one.test"], &[], "");
    let before = agent.standin.rows("SELECT tbl, key, body FROM tern_rib ORDER BY tbl, key");
    let (ok, _, err) = tern_apply(&config, &thief, false);
    assert!(!ok);
    assert!(err.contains("hostname \"one.test\" is already claimed by app \"one\""), "{err}");
    assert!(err.contains("nothing was applied"), "{err}");
    assert_eq!(agent.standin.rows("SELECT tbl, key, body FROM tern_rib ORDER BY tbl, key"), before);
    let out = std::process::Command::new(harness::tern_bin())
        .args(["check", "-c"])
        .arg(&config)
        .arg(config.with_extension("decl.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("already claimed"), "tern check refuses it too: {text}");

    // --prune removes what the declaration does not name, index included.
    let (ok, out, err) = tern_apply(&config, &app("two", 2), true);
    assert!(ok, "{out}{err}");
    assert!(out.contains("- app one") && out.contains("- machine one-1"), "{out}");
    converges(&serve, &agent, &["one", "two", "thief", "three"]).await;
    assert!(tern_apply(&config, &thief.replace("thief", "three"), false).0, "the hostname is free again");
    converges(&serve, &agent, &["one", "two", "thief", "three"]).await;
    assert_eq!(resyncs(&serve).await, BTreeMap::new(), "nothing lost continuity");

    let status =
        std::process::Command::new(harness::tern_bin()).args(["status", "-c"]).arg(&config).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains(&format!("RIB corrosion {}", agent.standin.url())) && text.contains("apps (2)"),
        "{text}"
    );
    assert!(text.contains("session_keys (1)"), "tern serve made key 1 in the agent: {text}");

    // Orgs are rows of the same table (tbl 'orgs'), and their rules hold here as on SQLite.
    let four =
        harness::app_decl("four", &["four.test"], &[], "org = \"acme\"\nprivate_addrs = [\"10.1.0.4\"]");
    let (ok, _, err) = tern_apply(&config, &four, false);
    assert!(!ok && err.contains("its org \"acme\" is not declared"), "{err}");
    let acme = "[[orgs]]\nname = \"acme\"\nnetworks = [\"10.0.0.0/8\"]\n\n";
    let (ok, out, err) = tern_apply(&config, &format!("{acme}{four}"), false);
    assert!(ok && out.contains("+ org acme"), "{out}{err}");
    let orgs = agent.standin.rows("SELECT key, body FROM tern_rib WHERE tbl = 'orgs'");
    assert_eq!(orgs, [[json!("acme"), json!(r#"{"name":"acme","networks":["10.0.0.0/8"]}"#)]]);
}

#[tokio::test]
async fn a_resume_older_than_the_agents_retained_changes_resyncs_from_a_snapshot() {
    // The agent keeps the newest 3 changes of a subscription (Corrosion: 500).
    let agent = Agent::with_retention(3);
    let (config, serve) = serving(&agent, &format!("{}\n{}", app("a", 2), app("b", 1))).await;
    converges(&serve, &agent, &["a", "b", "c"]).await;

    // tern hears nothing (its probe hangs, so it drops the stream and cannot resume) while
    // more changes are made than the agent retains.
    agent.standin.go_silent(Health::Hang);
    wait_metric(&serve, "tern_rib_connected", 0.0).await;
    let (ok, out, err) = tern_apply(&config, &format!("{}\n{}", app("a", 1), app("c", 2)), true);
    assert!(ok, "{out}{err}");
    agent.sql(&[set_machine_state("a-1", "stopped"), delete_row("machines", "c-2")]);
    agent.standin.speak();

    // The resume gets {"error":"subscription already deleted older changes…"}: a snapshot.
    converges(&serve, &agent, &["a", "b", "c"]).await;
    wait_metric(&serve, "tern_rib_resyncs_total{reason=\"stream_error\"}", 1.0).await;
    assert!(agent.resumes() >= 1, "a resume was tried first");
    wait_metric(&serve, "tern_rib_connected", 1.0).await;
}

#[tokio::test]
async fn a_subscription_the_agent_forgot_resyncs_as_lost() {
    let agent = Agent::start();
    let (config, serve) = serving(&agent, &format!("{}\n{}", app("a", 2), app("b", 2))).await;
    converges(&serve, &agent, &["a", "b", "c"]).await;

    // The agent forgets the subscription (Corrosion drops one nobody listened to for a
    // while, or loses it with its state) while changes are made.
    agent.standin.go_silent(Health::Hang);
    wait_metric(&serve, "tern_rib_connected", 0.0).await;
    agent.standin.forget_subscriptions();
    agent.sql(&[delete_row("machines", "b-2"), retire_app("a"), delete_row("machines", "a-1")]);
    assert!(tern_apply(&config, &app("c", 1), false).0);
    agent.standin.speak();

    converges(&serve, &agent, &["a", "b", "c"]).await;
    wait_metric(&serve, "tern_rib_resyncs_total{reason=\"lost\"}", 1.0).await;
    let asked = agent.standin.requests();
    let resumed_404 =
        asked.iter().any(|(r, _)| r.starts_with("GET /v1/subscriptions/") && r.contains("from="));
    assert!(resumed_404, "the resume came first: {asked:?}");
}

#[tokio::test]
async fn a_skipped_change_id_resyncs_as_a_gap() {
    let agent = Agent::start();
    let (config, serve) = serving(&agent, &app("a", 2)).await;
    converges(&serve, &agent, &["a", "b"]).await;

    agent.standin.skip_change_id();
    assert!(tern_apply(&config, &format!("{}\n{}", app("a", 1), app("b", 3)), true).0);
    converges(&serve, &agent, &["a", "b"]).await;
    wait_metric(&serve, "tern_rib_resyncs_total{reason=\"gap\"}", 1.0).await;

    // And it follows on from the fresh subscription.
    agent.sql(&[set_machine_state("b-3", "stopped"), delete_row("machines", "b-1")]);
    converges(&serve, &agent, &["a", "b"]).await;
    assert_eq!(resyncs(&serve).await.get("gap"), Some(&1.0));
}

#[tokio::test]
async fn a_silent_stream_is_probed_and_resumed_without_a_resync() {
    let agent = Agent::start();
    let (config, serve) = serving(&agent, &app("a", 2)).await;
    converges(&serve, &agent, &["a", "b"]).await;
    // An idle stream says nothing; the agent's answer to the probe keeps the link up.
    let probed = eventually(Duration::from_secs(10), || async {
        agent.standin.requests().iter().any(|(r, _)| r == "GET /v1/health").then_some(())
    });
    assert!(probed.await.is_some(), "a quiet stream is probed");
    wait_metric(&serve, "tern_rib_connected", 1.0).await;

    for health in [Health::Hang, Health::Fail] {
        let resumed = agent.resumes();
        agent.standin.go_silent(health);
        agent.sql(&[set_machine_state("a-1", "stopped")]);
        wait_metric(&serve, "tern_rib_connected", 0.0).await;
        assert!(tern_apply(&config, &format!("{}\n{}", app("a", 2), app("b", 1)), false).0);
        agent.standin.speak();
        converges(&serve, &agent, &["a", "b"]).await;
        wait_metric(&serve, "tern_rib_connected", 1.0).await;
        assert!(agent.resumes() > resumed, "{health:?}: resumed with ?from=");
        agent.sql(&[delete_row("machines", "b-1"), set_machine_state("a-1", "started")]);
        converges(&serve, &agent, &["a", "b"]).await;
    }
    assert_eq!(resyncs(&serve).await, BTreeMap::new(), "resumed every time, no snapshot needed");
}

#[tokio::test]
async fn a_drop_in_the_middle_of_a_transactions_changes_resumes_from_the_last_change() {
    let agent = Agent::start();
    let (config, serve) = serving(&agent, &app("a", 1)).await;
    converges(&serve, &agent, &["a", "b"]).await;

    // One transaction: app b and its four machines, a's machine replaced. The stream breaks
    // after two of its change lines.
    agent.standin.drop_streams_after(2);
    assert!(
        tern_apply(
            &config,
            &format!("{}\n{}", app("b", 4), harness::app_decl("a", &["a.test"], &[], "")),
            true
        )
        .0
    );
    converges(&serve, &agent, &["a", "b"]).await;
    assert!(agent.resumes() >= 1, "resumed with ?from=");

    // Again with a delete and a row leaving in the transaction.
    agent.standin.drop_streams_after(1);
    agent.sql(&[delete_row("machines", "b-2"), retire_app("a"), set_machine_state("b-3", "stopped")]);
    converges(&serve, &agent, &["a", "b"]).await;
    assert_eq!(resyncs(&serve).await, BTreeMap::new(), "no change was lost, so no snapshot");
}

#[tokio::test]
async fn applying_one_app_reads_only_what_it_declares() {
    let agent = Agent::start();
    let config = agent.config("node");
    let decl = app("one", 2);
    let apply_requests = |agent: &Agent| {
        let before = agent.standin.requests().len();
        let (ok, out, err) = tern_apply(&config, &decl.replace("one", "fresh"), false);
        assert!(ok, "{out}{err}");
        agent.standin.requests()[before..].to_vec()
    };
    let small = apply_requests(&agent);
    // 2,000 more apps, written straight to the table.
    agent.sql(&[json!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) \
         INSERT INTO tern_rib (tbl, key, body) \
         SELECT 'apps', 'bulk-' || i, json_object('name', 'bulk-' || i, 'hostnames', json_array('bulk-' || i || '.test')) FROM n"
    )]);
    let big = apply_requests(agent.with_fresh_name());
    assert_eq!(small.len(), big.len(), "as many requests whatever the RIB holds: {big:?}");
    for (endpoint, body) in &big {
        if endpoint == "POST /v1/queries" {
            assert!(body.contains("WHERE") && body.contains("= ?"), "a point read: {body}");
        }
    }
    assert_eq!(big.iter().filter(|(e, _)| e == "POST /v1/transactions").count(), 1, "one transaction");
}

impl Agent {
    /// The same agent, for a second apply under a name not yet taken.
    fn with_fresh_name(&self) -> &Agent {
        self.sql(&[
            json!("DELETE FROM tern_rib WHERE key LIKE 'fresh%'"),
            json!("DELETE FROM tern_app_hosts WHERE app = 'fresh'"),
        ]);
        self
    }
}

#[test]
fn lifecycle_states_and_session_keys_are_written_as_the_rib_trait_says() {
    use tern::model::session_key::SessionKeyRow;
    use tern::model::{MachineState, StateRow};
    use tern::rib::Rib;
    let agent = Agent::start();
    let rib = tern::rib::corrosion::CorrosionRib::new(&agent.standin.url(), Default::default()).unwrap();
    let row = |version| StateRow {
        state: MachineState::Started,
        version,
        reason: "wake".into(),
        node: "n".into(),
        at_ms: 1,
    };
    assert!(rib.record_state("m-1", &row(2)).unwrap());
    assert!(!rib.record_state("m-1", &row(1)).unwrap(), "an older version does not overwrite");
    assert!(!rib.record_state("m-1", &row(2)).unwrap());
    assert!(rib.record_state("m-1", &row(3)).unwrap());
    agent.sql(&[json!("INSERT INTO tern_rib (tbl, key, body) VALUES ('machine_states', 'm-2', 'garbage')")]);
    assert!(rib.record_state("m-2", &row(1)).unwrap(), "a body that is not JSON is replaced");

    let key = SessionKeyRow::fresh(1_000).unwrap();
    assert!(rib.ensure_session_key(&key).unwrap());
    assert!(!rib.ensure_session_key(&SessionKeyRow::fresh(2_000).unwrap()).unwrap(), "one key 1 only");
    let done = rib.rotate_session_key(&SessionKeyRow::fresh(3_000).unwrap(), 60_000).unwrap();
    assert_eq!((done.id, done.retired.as_slice(), done.retire_at_ms), (2, [1].as_slice(), 63_000));
    let keys = rib.read_all(tern::rib::Table::SessionKeys).unwrap();
    assert_eq!(keys.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), ["1", "2"]);
    let states = rib.read_all(tern::rib::Table::MachineStates).unwrap();
    assert!(states[0].body.contains("\"version\":3"), "{states:?}");
}

#[test]
fn the_stand_in_refuses_a_schema_corrosion_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::cell::Cell::new(0);
    let start = |schema: &str| {
        n.set(n.get() + 1);
        Standin::start(([127, 0, 0, 1], 0).into(), &dir.path().join(format!("{}.db", n.get())), schema, 10)
            .err()
    };
    assert!(start(&std::fs::read_to_string(schema_path()).unwrap()).is_none(), "tern's own schema loads");
    assert!(
        start("CREATE TABLE t (a TEXT NOT NULL, b TEXT NOT NULL, PRIMARY KEY (a));")
            .unwrap()
            .contains("DEFAULT")
    );
    let e = start("CREATE TABLE u (a TEXT NOT NULL PRIMARY KEY, b TEXT); CREATE UNIQUE INDEX ub ON u (b);");
    assert!(e.unwrap().contains("unique index"));
    let e = start("CREATE TABLE v (a TEXT PRIMARY KEY);");
    assert!(e.unwrap().contains("NOT NULL"));
}

#[tokio::test]
async fn the_stand_in_example_runs_as_the_docs_say() {
    use tokio::io::AsyncBufReadExt;
    harness::install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(harness::tern_bin()).parent().unwrap().join("examples").join("corrosion_standin");
    let mut child = tokio::process::Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--db"])
        .arg(dir.path().join("corro.db"))
        .arg("--schema")
        .arg(schema_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url =
        tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap().unwrap().unwrap();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let health = reqwest::get(format!("{url}/v1/health")).await.unwrap().text().await.unwrap();
    assert_eq!(health, r#"{"response":{"gaps":0,"members":1,"p99_lag":0.0,"queue_size":0}}"#);
    let client = reqwest::Client::new();
    let fault = client.post(format!("{url}/standin/faults/trim?keep=1")).send().await.unwrap();
    assert_eq!(fault.status(), 200);
    let missing = reqwest::get(format!("{url}/v1/subscriptions/0000")).await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.text().await.unwrap(), r#"{"error":"could not find subscription with id 0000"}"#);
    child.kill().await.unwrap();
}
