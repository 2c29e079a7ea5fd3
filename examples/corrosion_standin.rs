//! A STAND-IN for a Corrosion agent's HTTP API (not Corrosion: one node, no CRDTs), for
//! trying tern's Corrosion RIB where no agent can be installed. The same server the
//! integration tests use (tests/it/corrosion_standin.rs); docs/rib-corrosion.md describes
//! what it serves and where it differs from Corrosion.
//!
//! ```sh
//! cargo run --example corrosion_standin -- --listen 127.0.0.1:0 --db /tmp/corro.db \
//!     --schema docs/corrosion-schema.sql [--retention 500]
//! ```
//! prints `http://ADDR` (the `[rib] url` for tern) on stdout and serves until killed. Faults
//! are injected with `curl -X POST http://ADDR/standin/faults/{drop|gap|forget|speak}`,
//! `…/drop-after?k=K`, `…/trim?keep=N`, `…/silent?health=hang|fail`.

#[path = "../tests/it/corrosion_standin.rs"]
mod standin;

use std::io::Write;
use std::path::PathBuf;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corrosion_standin: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let (mut listen, mut db, mut schema, mut retention) = (None, None, None, 500usize);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = Some(value.parse().map_err(|e| format!("--listen {value}: {e}"))?),
            "--db" => db = Some(PathBuf::from(value)),
            "--schema" => schema = Some(PathBuf::from(value)),
            "--retention" => retention = value.parse().map_err(|e| format!("--retention {value}: {e}"))?,
            other => return Err(format!("unknown flag {other} (--listen, --db, --schema, --retention)")),
        }
    }
    let listen = listen.unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let db = db.ok_or("--db PATH is required")?;
    let schema_path = schema.ok_or("--schema PATH is required (docs/corrosion-schema.sql)")?;
    let schema =
        std::fs::read_to_string(&schema_path).map_err(|e| format!("{}: {e}", schema_path.display()))?;
    let standin = standin::Standin::start(listen, &db, &schema, retention)?;
    eprintln!("corrosion stand-in (not Corrosion) serving {} on http://{}", db.display(), standin.addr);
    println!("http://{}", standin.addr);
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}
