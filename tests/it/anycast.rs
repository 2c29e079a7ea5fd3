//! The anycast lab (`examples/anycast/lab.sh`): two tern edges behind a BIRD router in
//! network namespaces, each announcing the same address while its `/healthz` says 200.
//! `tern drain` on one edge under load must lose no new connection.
//!
//! Needs root (network namespaces), BIRD 2, wrk and curl; skipped, saying which is missing,
//! where they are not (`.ci/run` installs them).

use std::path::PathBuf;

fn missing() -> Option<String> {
    let out = std::process::Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        return Some("root (network namespaces)".into());
    }
    let tools = ["ip", "bird", "birdc", "wrk", "curl"];
    let absent: Vec<&str> =
        tools.iter().copied().filter(|t| crate::proxy_protocol::which(t).is_none()).collect();
    if !absent.is_empty() {
        return Some(format!("{} (Debian: iproute2 bird2 wrk curl)", absent.join(", ")));
    }
    let probe = format!("tern-probe-{}", std::process::id());
    let ok =
        std::process::Command::new("ip").args(["netns", "add", &probe]).status().is_ok_and(|s| s.success());
    let _ = std::process::Command::new("ip").args(["netns", "del", &probe]).status();
    (!ok).then(|| "a kernel that lets this process make network namespaces".into())
}

#[test]
fn draining_one_anycast_edge_under_load_loses_no_new_connection() {
    if let Some(what) = missing() {
        eprintln!("SKIPPED draining_one_anycast_edge_under_load_loses_no_new_connection: needs {what}");
        return;
    }
    let tern = PathBuf::from(crate::harness::tern_bin());
    let backend = crate::wake::backend_bin();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // Bounded: the lab's own waits are, and this too, so a wedged lab fails rather than hangs.
    let out = std::process::Command::new("timeout")
        .args(["300", root.join("examples/anycast/lab.sh").to_str().unwrap(), "check"])
        .env("LAB", format!("tl{}", std::process::id()))
        .env("TERN", &tern)
        .env("BACKEND", &backend)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the lab's drain check failed:\n{stdout}\n{stderr}");
    // requests=N errors=0 non2xx=0 resets=R withdrawn_ms=M exit_status=0 exited_ms=K
    let field = |name: &str| -> u64 {
        stdout
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {stdout}"))
    };
    assert!(field("requests") > 1000, "too few connections to tell anything: {stdout}");
    // No new connection failed or got an error; resets of connections made before the route
    // moved are ECMP's doing (docs/anycast.md) and are reported, not judged.
    assert_eq!(field("errors") + field("non2xx"), 0, "{stdout}\n{stderr}");
    eprintln!("{stdout}");
    assert_eq!(field("exit_status"), 0, "the drained edge exits 0: {stderr}");
    assert!(field("withdrawn_ms") < 1000, "the route is withdrawn within a second of tern drain: {stderr}");
}
