use std::path::Path;

use super::*;
use crate::rib::sqlite::Store;

const GOOD: &str = r#"
[[apps]]
name = "hello"
hostnames = ["Hello.Example.com", "*.hello.example.com"]
internal_port = 8080
idle_timeout = "60s"
concurrency = { type = "requests", soft_limit = 20, hard_limit = 25 }

[[machines]]
id = "hello-1"
app = "hello"
region = "ams"
addr = "127.0.0.1:9001"
state = "started"
"#;

fn parse_str(text: &str) -> Result<Declaration, Problem> {
    parse(text, "decl.toml", Path::new("."))
}

#[test]
fn parses_and_normalises() {
    let d = parse_str(GOOD).unwrap();
    assert_eq!(d.apps[0].hostnames, ["hello.example.com", "*.hello.example.com"]);
    assert_eq!(d.machines[0].addr.to_string(), "127.0.0.1:9001");
}

#[test]
fn problems_name_file_line_and_field() {
    let bad_host = GOOD.replace("\"*.hello.example.com\"", "\"bad host\"");
    let p = parse_str(&bad_host).unwrap_err();
    assert_eq!(p.field, "apps[0].hostnames[1]");
    assert_eq!(p.line, 4, "{p}");
    assert!(p.to_string().starts_with("decl.toml:4: apps[0].hostnames[1]: "), "{p}");

    let bad_limits = GOOD.replace("hard_limit = 25", "hard_limit = 5");
    let p = parse_str(&bad_limits).unwrap_err();
    assert_eq!(p.field, "apps[0].concurrency");
    assert_eq!(p.line, 7, "{p}");

    let instant = GOOD.replace("idle_timeout = \"60s\"", "idle_timeout = \"60s\"\nstart_timeout = \"0s\"");
    let p = parse_str(&instant).unwrap_err();
    assert_eq!(p.field, "apps[0].start_timeout");
    assert_eq!(p.line, 7, "{p}");

    let typo = GOOD.replace("internal_port", "internal_prot");
    let p = parse_str(&typo).unwrap_err();
    assert!(p.message.contains("internal_prot"), "{p}");
    assert_eq!(p.line, 5, "{p}");

    let bad_state = GOOD.replace("state = \"started\"", "state = \"sleeping\"");
    let p = parse_str(&bad_state).unwrap_err();
    assert_eq!(p.line, 14, "{p}");

    let dup = format!("{GOOD}\n[[apps]]\nname = \"other\"\nhostnames = [\"hello.example.com\"]\n");
    let p = parse_str(&dup).unwrap_err();
    assert!(p.message.contains("already claimed by app \"hello\""), "{p}");
    assert_eq!(p.field, "apps[1].hostnames[0]");
}

#[test]
fn certificates_are_checked_when_declared() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["hello.example.com".into()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["hello.example.com".into()]).unwrap();
    std::fs::write(dir.path().join("c.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.path().join("k.pem"), ck.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("other.pem"), other.signing_key.serialize_pem()).unwrap();
    let decl = |host: &str, key: &str| {
        format!("[[certificates]]\nhostname = \"{host}\"\ncert_file = \"c.pem\"\nkey_file = \"{key}\"\n")
    };
    assert!(parse(&decl("hello.example.com", "k.pem"), "d.toml", dir.path()).is_ok());
    let p = parse(&decl("hello.example.com", "other.pem"), "d.toml", dir.path()).unwrap_err();
    assert!(p.message.contains("does not match"), "{p}");
    let p = parse(&decl("bye.example.com", "k.pem"), "d.toml", dir.path()).unwrap_err();
    assert!(p.message.contains("do not cover \"bye.example.com\""), "{p}");
    assert_eq!(p.field, "certificates[0].hostname");
    let p = parse(&decl("hello.example.com", "missing.pem"), "d.toml", dir.path()).unwrap_err();
    assert!(p.message.contains("cannot read"), "{p}");
}

#[test]
fn apply_upserts_reports_and_prunes() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("rib.db")).unwrap();
    let d = parse_str(GOOD).unwrap();
    let plan = apply(&mut store, &d, false, false).unwrap();
    assert_eq!(plan.to_string(), "+ app hello\n+ machine hello-1\n2 changed, 0 unchanged");
    let plan = apply(&mut store, &d, false, false).unwrap();
    assert_eq!(plan.changes.len(), 0);
    assert_eq!(plan.unchanged, 2);

    let changed = parse_str(&GOOD.replace("\"60s\"", "\"90s\"")).unwrap();
    let plan = apply(&mut store, &changed, false, true).unwrap();
    assert_eq!(plan.to_string(), "~ app hello (idle_timeout)\n1 changed, 1 unchanged");

    let only_app = parse_str(&GOOD[..GOOD.find("[[machines]]").unwrap()]).unwrap();
    let plan = apply(&mut store, &only_app, true, false).unwrap();
    assert_eq!(plan.to_string(), "- machine hello-1\n1 changed, 1 unchanged");
}

#[test]
fn prune_never_deletes_session_keys() {
    use crate::model::session_key::SessionKeyRow;
    use crate::rib::Table;
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("rib.db")).unwrap();
    apply(&mut store, &parse_str(GOOD).unwrap(), false, false).unwrap();
    let key = SessionKeyRow { secret: [1; 32], created_ms: 1, retire_at_ms: None };
    assert!(store.ensure_session_key(&key).unwrap());
    store.rotate_session_key(&SessionKeyRow { created_ms: 2, ..key }, 1000).unwrap();

    let plan = apply(&mut store, &parse_str("").unwrap(), true, false).unwrap();
    assert_eq!(plan.to_string(), "- app hello\n- machine hello-1\n2 changed, 0 unchanged");
    assert!(store.read_all(Table::Apps).unwrap().is_empty());
    let keys: Vec<String> = store.read_all(Table::SessionKeys).unwrap().into_iter().map(|r| r.key).collect();
    assert_eq!(keys, ["1", "2"]);
}

#[test]
fn apply_refuses_conflicts_with_the_rib_at_their_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("rib.db")).unwrap();
    apply(&mut store, &parse_str(GOOD).unwrap(), false, false).unwrap();
    let thief = "[[apps]]\nname = \"thief\"\nhostnames = [\n  \"thief.test\",\n  \"hello.example.com\",\n]\n";
    let err = apply(&mut store, &parse_str(thief).unwrap(), false, false).unwrap_err();
    let PlanError::Conflict(p) = &err else { panic!("{err:?}") };
    assert_eq!((p.line, p.field.as_str()), (5, "apps[0].hostnames[1]"), "{p}");
    assert!(
        p.to_string().starts_with(
            "decl.toml:5: apps[0].hostnames[1]: hostname \"hello.example.com\" is already claimed by app \"hello\""
        ),
        "{p}"
    );
    let orphan = "[[apps]]\nname = \"x\"\n\n[[machines]]\nid = \"x\"\napp = \"ghost\"\naddr = \"127.0.0.1:1\"\nstate = \"started\"\n";
    let err = apply(&mut store, &parse_str(orphan).unwrap(), false, false).unwrap_err();
    let PlanError::Conflict(p) = &err else { panic!("{err:?}") };
    assert_eq!((p.line, p.field.as_str()), (6, "machines[0].app"), "{p}");
    assert!(p.message.contains("\"ghost\""), "{p}");
    assert_eq!(store.read_all(crate::rib::Table::Apps).unwrap().len(), 1);
    assert_eq!(store.read_all(crate::rib::Table::Machines).unwrap().len(), 1);

    // Re-declaring the holder with other names frees the name; --prune drops the holder.
    let moved = format!("{thief}\n[[apps]]\nname = \"hello\"\nhostnames = [\"new.example.com\"]\n");
    assert!(apply(&mut store, &parse_str(&moved).unwrap(), false, true).is_ok());
    assert!(apply(&mut store, &parse_str(thief).unwrap(), true, true).is_ok());
}

#[test]
fn check_plans_against_a_read_only_view_exactly_as_apply_does() {
    use crate::rib::sqlite::{Existing, open_existing};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rib.db");
    let Existing::Absent(why) = open_existing(&path).unwrap() else { panic!("nothing there yet") };
    assert_eq!(why, "the file does not exist yet");
    assert!(!path.exists(), "looking creates nothing");

    let mut store = Store::open(&path).unwrap();
    apply(&mut store, &parse_str(GOOD).unwrap(), false, false).unwrap();
    let Existing::Present(view) = open_existing(&path).unwrap() else { panic!("a RIB is there") };
    let thief = parse_str("[[apps]]\nname = \"thief\"\nhostnames = [\"hello.example.com\"]\n").unwrap();
    let by_check = dry_run(&view, &thief, false).unwrap_err().to_string();
    let by_apply = apply(&mut store, &thief, false, true).unwrap_err().to_string();
    assert_eq!(by_check, by_apply);
    let changed = parse_str(&GOOD.replace("\"60s\"", "\"90s\"")).unwrap();
    let plan = dry_run(&view, &changed, false).unwrap();
    assert_eq!(plan.to_string(), "~ app hello (idle_timeout)\n1 changed, 1 unchanged");
}

#[test]
fn unusable_rib_paths_are_errors_that_say_why() {
    use crate::rib::sqlite::{Existing, open_existing};
    let dir = tempfile::tempdir().unwrap();
    let err = |p: &std::path::Path| match open_existing(p) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("{} should not be usable", p.display()),
    };
    assert!(err(dir.path()).ends_with("is a directory; [rib] path must name the database file"));
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, "this is not a database, but it is long enough").unwrap();
    assert!(err(&junk).ends_with("is not a SQLite database"), "{}", err(&junk));
    let nowhere = dir.path().join("missing").join("rib.db");
    assert!(err(&nowhere).contains("its directory"), "{}", err(&nowhere));
    assert!(err(&nowhere).contains("does not exist"), "{}", err(&nowhere));
    // Some other program's SQLite database is not a RIB; an empty one is just not set up yet.
    let other = dir.path().join("other.db");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE apps (x); CREATE TABLE t (y);")
        .unwrap();
    assert!(
        err(&other).contains("is not a tern RIB: table machines, certificates is missing"),
        "{}",
        err(&other)
    );
    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, "").unwrap();
    assert!(matches!(open_existing(&empty), Ok(Existing::Absent(_))));
}

#[test]
fn fuzz_property_holds_on_samples() {
    for s in [GOOD, "", "[[apps]]", "apps = 3", "[[apps]]\nname=\"a\"\nhostnames=[\"*.x\"]", "\u{0}"] {
        fuzz_parse(s.as_bytes());
    }
}

const SESSIONS: &str = r#"
[[apps]]
name = "mcp"
hostnames = ["mcp.example.com"]
replay_buffer = "512KiB"
[apps.affinity]
headers = ["Mcp-Session-Id", "X-Session"]
cookie = "tern_affinity"
[[apps.replay_cache]]
path_prefix = "/"
type = "cookie"
name = "session"
ttl_seconds = 300
[[apps.replay_cache]]
path_prefix = "mcp.example.com/api"
type = "header"
name = "X-Tenant"
ttl_seconds = 10
allow_bypass = true
"#;

#[test]
fn session_fields_parse_with_their_defaults() {
    let d = parse_str(SESSIONS).unwrap();
    let a = &d.apps[0];
    assert_eq!(a.affinity.headers, ["Mcp-Session-Id", "X-Session"]);
    assert_eq!(a.affinity.cookie.as_deref(), Some("tern_affinity"));
    assert_eq!(a.replay_buffer, 512 * 1024);
    assert_eq!(a.replay_cache.len(), 2);
    assert_eq!(a.replay_cache[1].kind, model::ReplayCacheKind::Header);
    assert!(a.replay_cache[1].allow_bypass && !a.replay_cache[0].allow_bypass);
    assert_eq!(a.replay_cache[1].host_and_path(), (Some("mcp.example.com"), "/api"));

    let plain = parse_str("[[apps]]\nname = \"plain\"\n").unwrap();
    let a = &plain.apps[0];
    assert_eq!(a.affinity, model::Affinity::default());
    assert_eq!(a.affinity.headers, ["Mcp-Session-Id"]);
    assert_eq!(a.replay_buffer, 1024 * 1024);
    assert!(a.replay_cache.is_empty());

    let off = parse_str("[[apps]]\nname = \"off\"\n[apps.affinity]\nheaders = []\n").unwrap();
    assert!(off.apps[0].affinity.headers.is_empty());
}

#[test]
fn replay_buffer_sizes() {
    for (written, bytes) in [
        ("\"1MiB\"", 1 << 20),
        ("\"512KiB\"", 512 << 10),
        ("\"10MB\"", 10_000_000),
        ("\"2048\"", 2048),
        ("4096", 4096),
        ("0", 0),
        ("\"64mib\"", 64 << 20),
    ] {
        let d = parse_str(&format!("[[apps]]\nname = \"a\"\nreplay_buffer = {written}\n")).unwrap();
        assert_eq!(d.apps[0].replay_buffer, bytes, "{written}");
    }
    for bad in ["\"1 parsec\"", "\"MiB\"", "\"-1\"", "\"99999999999999999999GiB\""] {
        let p = parse_str(&format!("[[apps]]\nname = \"a\"\nreplay_buffer = {bad}\n")).unwrap_err();
        assert_eq!(p.line, 3, "{bad}: {p}");
    }
    let p = parse_str("[[apps]]\nname = \"a\"\nreplay_buffer = \"65MiB\"\n").unwrap_err();
    assert_eq!((p.line, p.field.as_str()), (3, "apps[0].replay_buffer"), "{p}");
    assert!(p.message.contains("64MiB"), "{p}");
}

/// CONTRACT.md's example writes `replay_buffer` right after `[apps.affinity]`, which TOML
/// reads as part of that table; both placements mean the app's buffer.
#[test]
fn replay_buffer_inside_the_affinity_table_is_the_apps() {
    let contract = "[[apps]]\nname = \"hello\"\n[apps.affinity]\nheaders = [\"Mcp-Session-Id\"]\n\
                    cookie = \"tern_affinity\"\nreplay_buffer = \"2MiB\"\n";
    let d = parse_str(contract).unwrap();
    assert_eq!(d.apps[0].replay_buffer, 2 << 20);
    // The RIB holds it at the top level only, and reads it back the same.
    let json = serde_json::to_value(&d.apps[0]).unwrap();
    assert_eq!(json["replay_buffer"], 2 << 20);
    assert!(json["affinity"].get("replay_buffer").is_none(), "{json}");
    let back: AppSpec = serde_json::from_value(json).unwrap();
    assert_eq!(back, d.apps[0]);

    // Both, agreeing: fine. Both, disagreeing: refused, naming both.
    let same = contract.replace("name = \"hello\"\n", "name = \"hello\"\nreplay_buffer = 2097152\n");
    assert_eq!(parse_str(&same).unwrap().apps[0].replay_buffer, 2 << 20);
    let two = contract.replace("name = \"hello\"\n", "name = \"hello\"\nreplay_buffer = \"1MiB\"\n");
    let p = parse_str(&two).unwrap_err();
    assert!(p.message.contains("replay_buffer is given twice"), "{p}");
    assert!(p.message.contains("1048576") && p.message.contains("2097152"), "{p}");
    assert!((1..=2).contains(&p.line), "{p}");

    // A rule broken inside the affinity table is reported where it is written.
    let big = contract.replace("\"2MiB\"", "\"1GiB\"");
    let p = parse_str(&big).unwrap_err();
    assert_eq!((p.line, p.field.as_str()), (6, "apps[0].affinity.replay_buffer"), "{p}");
}

#[test]
fn session_rules_are_reported_at_their_field() {
    let cases: &[(&str, &str, usize, &str, &str)] = &[
        ("\"X-Session\"]", "\"X Session\"]", 7, "apps[0].affinity.headers[1]", "not an HTTP header name"),
        ("\"X-Session\"]", "\"\"]", 7, "apps[0].affinity.headers[1]", "not an HTTP header name"),
        ("\"X-Session\"]", "\"mcp-session-id\"]", 7, "apps[0].affinity.headers[1]", "listed twice"),
        ("\"X-Session\"]", "\"Content-Length\"]", 7, "apps[0].affinity.headers[1]", "tern owns"),
        ("\"X-Session\"]", "\"Set-Cookie\"]", 7, "apps[0].affinity.headers[1]", "tern owns"),
        ("\"X-Session\"]", "\"Fly-Replay\"]", 7, "apps[0].affinity.headers[1]", "tern owns"),
        ("\"X-Session\"]", "\"tern-error\"]", 7, "apps[0].affinity.headers[1]", "tern owns"),
        ("\"X-Session\"]", "\"X-Forwarded-For\"]", 7, "apps[0].affinity.headers[1]", "tern owns"),
        ("\"X-Session\"]", "\"Proxy-Authorization\"]", 7, "apps[0].affinity.headers[1]", "tern owns"),
        ("\"tern_affinity\"", "\"tern affinity\"", 8, "apps[0].affinity.cookie", "not a cookie name"),
        ("\"tern_affinity\"", "\"a=b\"", 8, "apps[0].affinity.cookie", "not a cookie name"),
        ("ttl_seconds = 10", "ttl_seconds = 9", 18, "apps[0].replay_cache[1].ttl_seconds", "at least 10"),
        ("\"X-Tenant\"", "\"\"", 17, "apps[0].replay_cache[1].name", "not an HTTP header name"),
        ("\"X-Tenant\"", "\"X:Tenant\"", 17, "apps[0].replay_cache[1].name", "not an HTTP header name"),
        ("\"session\"", "\"se;ssion\"", 12, "apps[0].replay_cache[0].name", "not a cookie name"),
        (
            "path_prefix = \"/\"",
            "path_prefix = \"api\"",
            10,
            "apps[0].replay_cache[0].path_prefix",
            "start with '/'",
        ),
        (
            "path_prefix = \"/\"",
            "path_prefix = \"\"",
            10,
            "apps[0].replay_cache[0].path_prefix",
            "start with '/'",
        ),
        (
            "path_prefix = \"/\"",
            "path_prefix = \"/a b\"",
            10,
            "apps[0].replay_cache[0].path_prefix",
            "character",
        ),
        (
            "\"mcp.example.com/api\"",
            "\"mcp.example.com:443/api\"",
            15,
            "apps[0].replay_cache[1].path_prefix",
            "not a hostname",
        ),
        (
            "\"mcp.example.com/api\"",
            "\"*.example.com/api\"",
            15,
            "apps[0].replay_cache[1].path_prefix",
            "not a hostname",
        ),
        ("\"mcp.example.com/api\"", "\"/\"", 15, "apps[0].replay_cache[1].path_prefix", "two rules"),
        ("type = \"header\"", "type = \"query\"", 16, "", "unknown variant"),
        ("allow_bypass = true", "allow_bypass = true\nttl = 5", 20, "", "unknown field"),
        ("cookie = \"tern_affinity\"", "cookie = \"tern_affinity\"\nheader = \"x\"", 9, "", "unknown field"),
    ];
    for (from, to, line, field, message) in cases {
        let text = SESSIONS.replacen(from, to, 1);
        assert_ne!(text, SESSIONS, "{from}");
        let p = parse_str(&text).unwrap_err();
        assert_eq!((p.line, p.field.as_str()), (*line, *field), "{to}: {p}");
        assert!(p.message.contains(message), "{to}: {p}");
    }
}

/// Every declaration example in docs/declarations.md is one `tern check` accepts.
#[test]
fn the_documented_examples_parse() {
    let doc = include_str!("../../docs/declarations.md");
    let blocks: Vec<&str> = doc.split("```toml\n").skip(1).filter_map(|b| b.split("```").next()).collect();
    assert!(blocks.iter().any(|b| b.contains("[apps.affinity]")), "the sessions example is there");
    for b in blocks.iter().filter(|b| b.contains("[[apps]]")) {
        parse_str(b).unwrap_or_else(|p| panic!("{p}\n{b}"));
    }
}

#[test]
fn a_machines_owner_must_be_a_node_name() {
    let decl = |node: &str| {
        format!(
            "[[apps]]\nname = \"a\"\n\n[[machines]]\nid = \"m1\"\napp = \"a\"\naddr = \"127.0.0.1:1\"\nstate = \"started\"\nnode = {node:?}\n"
        )
    };
    assert!(parse_str(&decl("worker-1")).is_ok());
    let p = parse_str(&decl("")).unwrap_err();
    assert_eq!((p.line, p.field.as_str()), (9, "machines[0].node"), "{p}");
    assert!(p.message.contains("not a node name"), "{p}");
    assert!(parse_str(&decl("worker 1")).is_err());
}

#[test]
fn tcp_services_are_checked_before_anything_is_written() {
    let app = |services: &str, extra: &str| {
        format!("[[apps]]\nname = \"db\"\naddrs = [\"10.0.0.7\"]\n{extra}\n{services}")
    };
    let service = |port: u16, handlers: &str| {
        format!(
            "[[apps.services]]\ninternal_port = 5432\n[[apps.services.ports]]\nport = {port}\nhandlers = [{handlers}]\n"
        )
    };
    let good = app(&(service(5432, "") + &service(6432, "\"tls\", \"proxy_proto\"")), "");
    let d = parse_str(&good).unwrap();
    let h = d.apps[0].services[1].ports[0].handling().unwrap();
    assert!(h.tls && h.proxy_proto && !h.http);
    for (text, wanted) in [
        (app(&service(5432, "\"proxy_proto\", \"tls\""), ""), "\"tls\" comes first"),
        (app(&service(5432, "\"http\", \"proxy_proto\""), ""), "do not combine"),
        (app(&service(5432, "\"tls\", \"tls\""), ""), "listed twice"),
        (app(&service(5432, "\"gzip\""), ""), "unknown variant"),
        (app(&(service(5432, "") + &service(5432, "")), ""), "port 5432 is used twice"),
        (
            app(&service(80, "\"http\""), ""),
            "an \"http\" service forwards to the app's internal_port (8080), not 5432",
        ),
        (app(&service(0, ""), ""), "must be a port number"),
        (app("[[apps.services]]\ninternal_port = 5432\n", ""), "needs at least one port"),
        (
            app("", "addrs = [\"0.0.0.0\"]").replacen("addrs = [\"10.0.0.7\"]\n", "", 1),
            "cannot be a dedicated address",
        ),
    ] {
        let p = parse_str(&text).unwrap_err();
        assert!(p.to_string().contains(wanted), "{text}\n→ {p}");
    }
    // Two apps on one dedicated address and port.
    let two = good.clone() + &good.replace("name = \"db\"", "name = \"db2\"");
    let p = parse_str(&two).unwrap_err();
    assert!(p.to_string().contains("10.0.0.7 port 5432 is already app \"db\"'s"), "{p}");
    assert_eq!(p.field, "apps[1].addrs");
}

#[test]
fn an_apps_org_stays_free_text_unless_it_has_private_addresses() {
    // Declarations written before [[orgs]] existed keep working.
    let d = parse_str("[[apps]]\nname = \"a\"\norg = \"Acme Inc.\"\n").unwrap();
    assert_eq!(d.apps[0].org, "Acme Inc.");
    // [[orgs]] names are keys in the RIB: held to the name rules.
    let p = parse_str("[[orgs]]\nname = \"Acme Inc.\"\n").unwrap_err();
    assert_eq!(p.field, "orgs[0].name");
}
