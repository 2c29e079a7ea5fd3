//! What an operator meets at the command line: `tern check` refusing what `tern apply` would,
//! RIB paths that cannot be used, a bad log filter, a second `tern serve` on addresses another
//! one holds, and access-log lines. The real `tern` binary throughout. Also the test bench's
//! own promise that a machine's reserved port cannot be taken by anyone else.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use crate::backend::Backend;
use crate::harness::{self, Ca, HttpVersion, Proxy, ServeProcess, app_decl};

fn tern(args: &[&str], config: &Path, extra: &[&Path]) -> Output {
    std::process::Command::new(harness::tern_bin())
        .args(args)
        .arg("-c")
        .arg(config)
        .args(extra)
        .output()
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_what_apply_would_refuse_against_a_live_rib_with_file_and_line() {
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(&app_decl("keep", &["keep.test"], &[("m1", b.addr, "started")], "")).await;
    let config = proxy.dir.path().join("tern.toml");
    std::fs::write(&config, harness::node_config(&proxy.db, "")).unwrap();
    let decl = proxy.dir.path().join("thief.toml");
    let cases = [
        // A hostname another app holds in the RIB.
        (
            "[[apps]]\nname = \"thief\"\nhostnames = [\n  \"mine.test\",\n  \"keep.test\",\n]\n",
            "thief.toml:5: apps[0].hostnames[1]: hostname \"keep.test\" is already claimed by app \"keep\" in the RIB",
        ),
        // A machine of an app neither declared nor in the RIB.
        (
            "[[machines]]\nid = \"m9\"\napp = \"ghost\"\naddr = \"127.0.0.1:1\"\nstate = \"started\"\n",
            "thief.toml:3: machines[0].app: machine \"m9\" belongs to app \"ghost\", which is neither declared nor in the RIB",
        ),
    ];
    for (text_of_decl, says) in cases {
        std::fs::write(&decl, text_of_decl).unwrap();
        for cmd in ["check", "apply"] {
            let out = tern(&[cmd], &config, &[&decl]);
            let (stdout, stderr) = text(&out);
            assert!(!out.status.success(), "{cmd}: {stdout}{stderr}");
            assert!(stderr.contains(says), "{cmd}: {stderr}");
        }
    }
    // A declaration the RIB takes: check prints what apply would change, and changes nothing.
    std::fs::write(&decl, "[[apps]]\nname = \"new\"\nhostnames = [\"new.test\"]\n").unwrap();
    let out = tern(&["check"], &config, &[&decl]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("would make:\n+ app new\n1 changed, 0 unchanged"), "{stdout}");
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    assert_eq!(client.get(proxy.url("new.test", "/")).send().await.unwrap().status(), 404);
}

#[test]
fn check_says_when_it_did_not_look_at_the_rib_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tern.toml");
    std::fs::write(&config, "[rib]\npath = \"rib.db\"\n").unwrap();
    let decl = dir.path().join("d.toml");
    std::fs::write(
        &decl,
        "[[machines]]\nid = \"m\"\napp = \"a\"\naddr = \"127.0.0.1:1\"\nstate = \"started\"\n",
    )
    .unwrap();
    let out = tern(&["check"], &config, &[&decl]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("rib.db: not looked at: the file does not exist yet")
            && stdout.contains("the declaration was checked on its own"),
        "{stdout}"
    );
    assert!(!dir.path().join("rib.db").exists(), "check created the RIB");
}

#[test]
fn check_fails_on_a_rib_path_that_cannot_be_opened() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("a-dir")).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "shopping list: eggs, milk, more eggs\n").unwrap();
    let cases = [
        ("a-dir", "is a directory"),
        ("notes.txt", "is not a SQLite database"),
        ("gone/rib.db", "cannot be created: its directory"),
    ];
    for (path, says) in cases {
        let config = dir.path().join("tern.toml");
        std::fs::write(&config, format!("[rib]\npath = \"{path}\"\n")).unwrap();
        let out = tern(&["check"], &config, &[]);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{path}: {stdout}{stderr}");
        assert!(stderr.contains(&format!("the RIB at {}", dir.path().join(path).display())), "{stderr}");
        assert!(stderr.contains(says), "{path}: {stderr}");
    }
}

#[test]
fn check_fails_on_a_rib_this_user_may_not_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    harness::apply_decl(&db, "[[apps]]\nname = \"a\"\nhostnames = [\"a.test\"]\n");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.path().join("tern.toml");
    std::fs::write(&config, "[rib]\npath = \"rib.db\"\n").unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Root reads anything: run tern as nobody there (setpriv is in util-linux).
    let euid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    let mut cmd = if euid == 0 {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", harness::tern_bin()]);
        c
    } else {
        std::process::Command::new(harness::tern_bin())
    };
    let out = cmd.args(["check", "-c"]).arg(&config).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("rib.db cannot be read: Permission denied"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_log_filter_is_refused_by_check_and_serve_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    let config = dir.path().join("tern.toml");
    for (level, says) in
        [("tern=loud", "\"tern=loud\" is not a filter directive"), ("loud", "\"loud\" is not a level")]
    {
        let text_of_config = harness::node_config(&db, "") + &format!("level = \"{level}\"\n");
        let line = text_of_config.lines().position(|l| l.starts_with("level")).unwrap() + 1;
        std::fs::write(&config, text_of_config).unwrap();
        for cmd in ["check", "serve"] {
            let run = tokio::process::Command::new(harness::tern_bin())
                .args([cmd, "-c"])
                .arg(&config)
                .kill_on_drop(true)
                .output();
            let out = tokio::time::timeout(Duration::from_secs(30), run).await.expect("exits").unwrap();
            let (_, stderr) = text(&out);
            assert!(!out.status.success(), "{cmd} {level}: {stderr}");
            assert!(stderr.contains(&format!("tern.toml:{line}: level: {says}")), "{cmd} {level}: {stderr}");
        }
    }
}

/// A config file for `tern serve` on these exact addresses, JSON logs.
fn serve_config(dir: &Path, name: &str, listen: [&str; 2], admin: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let text = format!(
        "region = \"ams\"\n[[listen]]\naddr = \"{}\"\n[[listen]]\naddr = \"{}\"\ntls = true\n[admin]\naddr = \"{admin}\"\n\
         [rib]\npath = \"rib.db\"\npoll_interval = \"5ms\"\n[log]\nformat = \"json\"\naccess = false\n",
        listen[0], listen[1]
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_the_same_addresses_is_refused_naming_the_first_pid() {
    let b = Backend::start("m1").await;
    let dir = tempfile::tempdir().unwrap();
    harness::apply_decl(
        &dir.path().join("rib.db"),
        &app_decl("app", &["app.test"], &[("m1", b.addr, "started")], ""),
    );
    harness::install_crypto();
    let first_config = serve_config(dir.path(), "first.toml", ["127.0.0.1:0", "127.0.0.1:0"], "127.0.0.1:0");
    let first = ServeProcess::start(&first_config).await;
    let (http, https, admin) = (first.http.to_string(), first.https.to_string(), first.admin.to_string());

    // The same three addresses; then only the admin address taken.
    let cases = [
        (serve_config(dir.path(), "same.toml", [&http, &https], &admin), &http),
        (serve_config(dir.path(), "admin.toml", ["127.0.0.1:0", "127.0.0.1:0"], &admin), &admin),
    ];
    for (config, taken) in cases {
        let second = tokio::process::Command::new(harness::tern_bin())
            .args(["serve", "-c"])
            .arg(&config)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), second)
            .await
            .expect("the second tern exits instead of serving beside the first")
            .unwrap();
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "{stderr}");
        let says = format!("tern: {taken} is already in use by pid {} (", first.pid());
        assert!(stderr.contains(&says), "wanted {says:?} in: {stderr}");
        assert!(stderr.contains("first.toml"), "the holder's command line: {stderr}");
    }

    // The first tern is unharmed and still takes every request.
    let client = harness::client_for(first.http, first.https, &Ca::new(), HttpVersion::Http1);
    for _ in 0..20 {
        let r = client.get(format!("http://app.test:{}/id", first.http.port())).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "m1");
    }
}

/// Digits after the decimal point of a JSON number as tern wrote it.
fn decimals(v: &serde_json::Value) -> usize {
    let s = v.to_string();
    s.split_once('.').map_or(0, |(_, frac)| frac.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_durations_are_rounded_to_hundredths_of_a_millisecond() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    let (decl, port) = crate::wake::one_process_machine("stopped");
    harness::apply_decl(&db, &decl);
    let config = dir.path().join("tern.toml");
    let text =
        harness::node_config(&db, "").replace("access = false", "access = true") + "format = \"json\"\n";
    std::fs::write(&config, text).unwrap();
    harness::install_crypto();
    let mut tern = ServeProcess::start(&config).await;
    let client = harness::client_for(tern.http, tern.https, &Ca::new(), HttpVersion::Http1);
    // The first request wakes the machine (wake_ms); the second does not.
    for _ in 0..2 {
        let r = client.get(format!("http://app.test:{}/", tern.http.port())).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let mut lines = Vec::new();
    while lines.len() < 2 {
        let v = tokio::time::timeout(Duration::from_secs(10), tern.logs.recv()).await.unwrap().unwrap();
        if v["target"] == "tern::access" {
            lines.push(v);
        }
    }
    assert!(lines[0]["wake_ms"].is_number(), "{}", lines[0]);
    assert!(lines[1].get("wake_ms").is_none_or(serde_json::Value::is_null), "{}", lines[1]);
    for v in &lines {
        assert!(v["duration_ms"].is_number(), "{v}");
        assert!(decimals(&v["duration_ms"]) <= 2, "duration_ms: {v}");
        assert!(decimals(&v["wake_ms"]) <= 2, "wake_ms: {v}");
    }
    // A graceful stop, so that tern stops the machine it started (a kill would orphan it).
    std::process::Command::new("kill").args(["-TERM", &tern.pid().to_string()]).status().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), tern.child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err(), "the machine is stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_port_refuses_connections_and_is_taken_by_its_machine_and_nobody_else() {
    let port = harness::reserve_port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let refused = tokio::net::TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    // Another test's listener (tokio's bind, SO_REUSEADDR and all) cannot take it...
    let e = tokio::net::TcpListener::bind(addr).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    // ...but the machine declared on it can, and gets every connection.
    let machine = Backend::start_on("m1", addr).await;
    harness::install_crypto();
    let r = reqwest::get(format!("http://{addr}/id")).await.unwrap();
    assert_eq!(r.text().await.unwrap(), "m1");
    drop(machine);
}
