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
fn apply_refuses_conflicts_with_the_rib_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("rib.db")).unwrap();
    apply(&mut store, &parse_str(GOOD).unwrap(), false, false).unwrap();
    let thief = parse_str("[[apps]]\nname = \"thief\"\nhostnames = [\"hello.example.com\"]\n").unwrap();
    let err = apply(&mut store, &thief, false, false).unwrap_err();
    assert!(err.to_string().contains("\"hello.example.com\""), "{err}");
    let orphan =
        parse_str("[[machines]]\nid = \"x\"\napp = \"ghost\"\naddr = \"127.0.0.1:1\"\nstate = \"started\"\n")
            .unwrap();
    let err = apply(&mut store, &orphan, false, false).unwrap_err();
    assert!(err.to_string().contains("\"ghost\""), "{err}");
    assert_eq!(store.read_all(crate::rib::Table::Apps).unwrap().len(), 1);
    assert_eq!(store.read_all(crate::rib::Table::Machines).unwrap().len(), 1);
}

#[test]
fn fuzz_property_holds_on_samples() {
    for s in [GOOD, "", "[[apps]]", "apps = 3", "[[apps]]\nname=\"a\"\nhostnames=[\"*.x\"]", "\u{0}"] {
        fuzz_parse(s.as_bytes());
    }
}
