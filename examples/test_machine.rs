//! A machine for tern's integration tests, run as a real process by the `process` driver:
//! the test backend (`tests/it/backend.rs`: `/id`, `/hang` + `/release`, `/sse`, `/ws`,
//! `/healthz` + `/sick`/`/well`, …) listening on the address given as its argument.
//!
//! Usage: `test_machine 127.0.0.1:PORT`. It answers `/id` with `$FLY_MACHINE_ID`, and
//! waits `$START_DELAY_MS` before listening, to stand in for an app that boots slowly.

// Shared with the tests, which allow these lints for helpers that fail loudly by design.
#[allow(dead_code, clippy::unwrap_used, clippy::too_many_lines)]
#[path = "../tests/it/backend.rs"]
mod backend;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args().nth(1).expect("usage: test_machine 127.0.0.1:PORT");
    let addr = addr.parse().expect("an ip:port");
    let name = std::env::var("FLY_MACHINE_ID").unwrap_or_else(|_| "test_machine".into());
    if let Some(ms) = std::env::var("START_DELAY_MS").ok().and_then(|v| v.parse().ok()) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let backend = backend::Backend::start_on(&name, addr).await;
    // The bound address: with port 0, the one the kernel picked.
    eprintln!("test_machine {name} listening on {}", backend.addr);
    std::future::pending::<()>().await
}
