//! What session affinity adds to routing: opening the client's sealed token, finding the
//! machine it names and sealing the machine's session id for the response, against a plain
//! pick. Target: (b) - (a) at most 1 µs.
//!
//! - `session/a_plain_pick`: `routing::select::acquire` over an app of 3 started machines.
//! - `session/b_open_find_pick_seal`: open a token, find its machine in the app, count the
//!   exchange on it (the pick, over that one machine), seal a token for the response.
//! - `session/c_open_find_seal`: (b) without the pick.
//! - `session/open`, `session/seal`: each half alone.
//!
//! Run: `cargo bench --bench session` (add `-- --quick` for a fast look).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};

use tern::catalog::{AppEntry, Event, Snapshot};
use tern::model::{AppSpec, MachineAddr, MachineSpec, MachineState};
use tern::routing::seal::{Keyring, SessionKey};
use tern::routing::select;

/// A session id as MCP servers make them: a UUID, 36 bytes.
const VALUE: &[u8] = b"3f2a9c1e-5b7d-4e8a-9c0f-1a2b3c4d5e6f";
const NOW_MS: i64 = 1_800_000_000_000;

/// A catalog holding one app ("mcp") with three started machines and one session key, as
/// `tern serve` holds it after loading.
fn snapshot() -> Snapshot {
    let mut s = Snapshot::default();
    let mut app: AppSpec =
        toml::from_str("name = \"mcp\"\nhostnames = [\"mcp.example.com\"]").expect("valid app");
    app.internal_port = 8080;
    s.apply(Event::App(app));
    for i in 1..=3 {
        s.apply(Event::Machine(MachineSpec {
            id: format!("mcp-{i}").into(),
            app: "mcp".into(),
            region: "ams".into(),
            addr: format!("10.0.0.{i}").parse::<MachineAddr>().expect("addr"),
            state: MachineState::Started,
            cmd: None,
            node: None,
        }));
    }
    s.apply(Event::SessionKey(SessionKey { id: 1, secret: [7; 32], created_ms: 0, retire_at_ms: None }));
    s.rebase(&s.compact())
}

/// The affinity path without the pick: the machine the token names, and the response token.
fn open_find_seal<'a>(
    ring: &Keyring,
    app: &'a AppEntry,
    token: &[u8],
) -> Option<(&'a Arc<tern::catalog::Machine>, String)> {
    let opened = ring.open(&app.name, token, NOW_MS).ok()?;
    let machine = app.machines.iter().find(|m| *m.id == *opened.machine)?;
    let sealed = ring.seal(&app.name, &machine.id, &opened.value)?;
    Some((machine, sealed))
}

fn session(c: &mut Criterion) {
    let snap = snapshot();
    let app = snap.app("mcp").expect("the app").clone();
    let ring = snap.keyring().clone();
    let token = ring.seal("mcp", "mcp-2", VALUE).expect("a key");
    let token = token.as_bytes();
    println!("token for a {}-byte value: {} bytes", VALUE.len(), token.len());

    let mut g = c.benchmark_group("session");
    g.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    g.bench_function("a_plain_pick", |b| {
        b.iter(|| black_box(select::acquire(&app.machines, &[], &app.spec.concurrency)))
    });
    g.bench_function("b_open_find_pick_seal", |b| {
        b.iter(|| {
            let (machine, sealed) = open_find_seal(&ring, &app, black_box(token)).expect("opens");
            let pick = select::acquire(std::slice::from_ref(machine), &[], &app.spec.concurrency);
            black_box((pick, sealed))
        })
    });
    g.bench_function("c_open_find_seal", |b| {
        b.iter(|| black_box(open_find_seal(&ring, &app, black_box(token))))
    });
    g.bench_function("open", |b| b.iter(|| black_box(ring.open("mcp", black_box(token), NOW_MS))));
    g.bench_function("seal", |b| b.iter(|| black_box(ring.seal("mcp", "mcp-2", black_box(VALUE)))));
    g.bench_function("refuse_forged", |b| {
        let mut forged = token.to_vec();
        let last = forged.len() - 2;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        b.iter(|| black_box(ring.open("mcp", black_box(&forged), NOW_MS)))
    });
    g.finish();
}

criterion_group!(benches, session);
criterion_main!(benches);
