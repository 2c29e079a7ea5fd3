//! [`Build`] against the one-by-one path it replaces at boot: any snapshot, in any row order
//! (stores other than SQLite order their snapshots otherwise), gives the same catalog.

use std::collections::BTreeSet;

use super::*;
use crate::catalog::updater::apply_snapshot;
use crate::rib::Record;

const HOSTS: [&str; 6] = ["h0.test", "h1.test", "*.h0.test", "*.h1.test", "w.h0.test", "h2.test"];
const PROBES: [&str; 7] = ["h0.test", "h1.test", "h2.test", "x.h0.test", "x.h1.test", "w.h0.test", "h3.test"];

fn app_row(rng: &mut fastrand::Rng, i: usize) -> Record {
    let hosts: Vec<String> =
        (0..rng.usize(0..3)).map(|_| format!("\"{}\"", HOSTS[rng.usize(..HOSTS.len())])).collect();
    let body = if rng.u8(..20) == 0 {
        "{not json".to_string()
    } else {
        // Some with private and dedicated addresses of their own (tern apply refuses two
        // apps claiming one; the catalog's choice between such is not compared here).
        let addrs = if rng.bool() {
            format!(
                r#","private_addrs":["10.0.0.{i}"],"addrs":["203.0.113.{i}"],"services":[{{"internal_port":5432,"ports":[{{"port":5432}}]}}]"#
            )
        } else {
            String::new()
        };
        format!(
            r#"{{"name":"a{i}","hostnames":[{}],"internal_port":{}{addrs}}}"#,
            hosts.join(","),
            8000 + rng.u16(..3)
        )
    };
    Record { table: Table::Apps, key: format!("a{i}"), body }
}

fn machine_row(rng: &mut fastrand::Rng, i: usize, apps: usize) -> Record {
    let addr = if rng.bool() { "127.0.0.1".to_string() } else { format!("127.0.0.1:{}", 9000 + i) };
    let state = ["started", "stopped", "suspended"][rng.usize(..3)];
    let node = if rng.u8(..4) == 0 { format!(r#","node":"n{}""#, rng.u8(..2)) } else { String::new() };
    let body = if rng.u8(..20) == 0 {
        format!(r#"{{"id":"other","app":"a0","addr":"{addr}","state":"{state}"}}"#)
    } else {
        format!(
            r#"{{"id":"m{i}","app":"a{}","addr":"{addr}","state":"{state}"{node}}}"#,
            rng.usize(..apps + 1)
        )
    };
    Record { table: Table::Machines, key: format!("m{i}"), body }
}

fn state_row(rng: &mut fastrand::Rng, i: usize) -> Record {
    let state = ["started", "stopped", "suspended"][rng.usize(..3)];
    let body = format!(
        r#"{{"state":"{state}","version":{},"reason":"","node":"","at_ms":0}}"#,
        rng.u64(..3) << crate::catalog::snapshot::NODE_BITS
    );
    Record { table: Table::MachineStates, key: format!("m{i}"), body }
}

fn snapshot(rng: &mut fastrand::Rng) -> Vec<Record> {
    let (apps, machines) = (rng.usize(0..6), rng.usize(0..8));
    let mut rows: Vec<Record> = (0..apps).map(|i| app_row(rng, i)).collect();
    rows.extend((0..machines).map(|i| machine_row(rng, i, apps)));
    for i in 0..machines {
        if rng.bool() {
            rows.push(state_row(rng, i));
        }
    }
    for n in 0..rng.usize(0..2) {
        let body = format!(r#"{{"node":"n{n}","region":"ams","pid":1,"beat_ms":1}}"#);
        rows.push(Record { table: Table::Nodes, key: format!("n{n}"), body });
    }
    rows.push(Record { table: Table::Certificates, key: "c.test".into(), body: "{\"hostname\":1}".into() });
    if rng.bool() {
        let body = r#"{"name":"acme","networks":["10.0.0.0/8"]}"#.to_string();
        rows.push(Record { table: Table::Orgs, key: "acme".into(), body });
    }
    if rng.bool() {
        // Any order: SQLite lists tables in Table::ALL's order, other stores may not.
        rng.shuffle(&mut rows);
    }
    rows
}

/// What routing and the lifecycle manager can see of a catalog.
fn view(s: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for p in PROBES {
        let routed = s.route(p).map(|a| {
            let ms: Vec<String> =
                a.machines.iter().map(|m| format!("{}@{}:{:?}", m.id, m.addr, m.state())).collect();
            format!("{} [{}]", a.name, ms.join(" "))
        });
        out.push(format!("{p} -> {routed:?}"));
    }
    let mut machines: Vec<String> = s
        .machines
        .iter()
        .map(|(id, m)| {
            let owner = m.owner.as_ref().map(|o| o.alive());
            format!(
                "{id}: {} {} {:?} v{} owner {owner:?}",
                m.spec.app,
                m.addr,
                m.state(),
                m.live.state_version()
            )
        })
        .collect();
    machines.sort();
    out.extend(machines);
    let mut ids: Vec<String> =
        s.app_machines.iter().map(|(app, ids)| format!("{app}: {}", ids.join(","))).collect();
    ids.sort();
    out.extend(ids);
    let states: BTreeSet<String> = s.states.iter().map(|(id, r)| format!("{id}={r:?}")).collect();
    out.extend(states);
    let nodes: Vec<String> = s.nodes().map(|n| format!("{:?}", n.row)).collect();
    out.extend(nodes);
    for i in 0..6 {
        let private = s.private_app(format!("10.0.0.{i}").parse().unwrap()).map(|a| a.name.clone());
        let tcp = s.tcp_app(format!("203.0.113.{i}:5432").parse().unwrap()).map(|a| a.name.clone());
        out.push(format!("10.0.0.{i} -> {private:?}, 203.0.113.{i}:5432 -> {tcp:?}"));
    }
    out.push(format!("org acme: {:?}", s.org("acme")));
    out.push(format!("{} apps {} machines {} certs", s.app_count(), s.machine_count(), s.cert_count()));
    out
}

#[test]
fn a_build_is_the_catalog_the_rows_applied_one_by_one_make() {
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    for round in 0..2_000 {
        let rows = snapshot(&mut rng);
        let metrics = Metrics::new();
        let (one_by_one, bad) = apply_snapshot(&Snapshot::default(), rows.clone(), &metrics);
        let mut build = Build::new(&Snapshot::default());
        // In parts, as the store sends it.
        let mut rest = rows.clone();
        while !rest.is_empty() {
            let part: Vec<Record> = rest.drain(..rng.usize(1..=rest.len())).collect();
            build.add(part.iter().map(|r| (r.table, r.key.as_str(), r.body.as_str())), &metrics);
        }
        let (built, unserved) = build.finish();
        assert_eq!(view(&built), view(&one_by_one), "seed {seed}, round {round}: {rows:#?}");
        let keys =
            |v: &[(Table, DecodeError)]| v.iter().map(|(t, e)| (*t, e.key.clone())).collect::<Vec<_>>();
        assert_eq!(keys(&unserved), keys(&bad), "seed {seed}, round {round}");
        assert_eq!(built.delta_len(), 0, "compact from the start");
    }
}
