//! What the node does when its watchdog finds it wedged: `[watchdog] action`.
//!
//! - `bounce`: start a fresh tern on this process's own listening sockets (the kernel's
//!   accept queues carry over, so no connection is refused), and once it says it serves,
//!   stop accepting and let the parts of this process that still run finish what they hold
//!   for a short while; then this process ends, whatever is still stuck in it.
//! - `exit`: exit with [`EXIT_WEDGED`] for a supervisor (systemd's `Restart=on-failure`)
//!   to start tern again.
//! - `log`: only the report (the diagnostics file, the log line, `/healthz` 503 while it
//!   lasts).
//!
//! All of it runs on the watchdog's own thread, which needs nothing from the runtimes that
//! may be the ones stuck: the sockets are kept in [`Handoff`], and the signals to the workers
//! are watch channels any thread can send on.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::catalog::Catalog;
use crate::config::{Config, WedgeAction};
use crate::listener::inherit::Handoff;
use crate::telemetry::Metrics;
use crate::watchdog::{Action, Hooks, Settings, Watchdog, Wedge};

/// The exit status of a tern that gave up on a wedge (`action = "exit"`, or a bounce whose
/// new process did not start): EX_SOFTWARE.
pub const EXIT_WEDGED: i32 = 70;

/// How long a new process gets to load the catalog and say it serves, on a bounce.
const BOUNCE_READY_WITHIN: Duration = Duration::from_secs(10);

/// After a bounce, how long the wedged process's working parts get to finish their
/// exchanges before it ends for good.
pub const BOUNCE_GRACE: Duration = Duration::from_secs(10);

/// After a bounce, the window the wedged process's working parts drain over (at most
/// `drain_window`): short, since a part of it is stuck for good.
pub const BOUNCE_DRAIN: Duration = Duration::from_secs(5);

pub(super) fn watchdog(config: &Config, metrics: &Arc<Metrics>) -> Arc<Watchdog> {
    let action = match config.watchdog.action {
        WedgeAction::Bounce => Action::Bounce,
        WedgeAction::Exit => Action::Exit,
        WedgeAction::Log => Action::Log,
    };
    Watchdog::new(
        Settings {
            stall_after: config.watchdog.stall_after,
            action,
            diagnostics_dir: config.diagnostics_dir(),
        },
        metrics.clone(),
    )
}

/// What a bounce needs, all of it usable from the watchdog thread.
pub(super) struct Bounce {
    pub handoff: Arc<Handoff>,
    pub stop_accepting: Arc<watch::Sender<bool>>,
    pub halt: Arc<watch::Sender<bool>>,
    /// Tells the control loop (if it still runs) which process took over.
    pub bounced: watch::Sender<Option<u32>>,
    pub metrics: Arc<Metrics>,
    /// Set when `proxy::run` has returned: nothing left to end.
    pub finished: Arc<AtomicBool>,
}

/// Starts the watchdog thread with the configured action as its hook.
pub(super) fn start(watchdog: &Arc<Watchdog>, catalog: Arc<Catalog>, bounce: Bounce) -> std::io::Result<()> {
    let action = watchdog.settings().action;
    watchdog.start(Hooks {
        on_wedge: Box::new(move |wedge| act(action, &bounce, wedge)),
        generation: Box::new(move || catalog.load().generation()),
    })
}

fn act(action: Action, b: &Bounce, wedge: &Wedge) {
    match action {
        Action::Log => {}
        Action::Exit => give_up(b, wedge, "action = \"exit\""),
        Action::Bounce => {
            b.metrics.watchdog_bounces.inc();
            let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
            // This process's own binary, even if the file was replaced since it started.
            match b.handoff.start_successor(Path::new("/proc/self/exe"), &args, BOUNCE_READY_WITHIN) {
                Ok(successor) => {
                    let pid = successor.pid;
                    // It outlives this process: not waited for.
                    std::mem::forget(successor.child);
                    tracing::error!(target: "tern::watchdog", successor = pid, what = wedge.what(),
                        grace = ?BOUNCE_GRACE, "bounced: a fresh tern serves on the listening sockets; this one drains and ends");
                    let _ = b.stop_accepting.send(true);
                    let _ = b.bounced.send(Some(pid));
                    let _ = b.halt.send(true);
                    std::thread::sleep(BOUNCE_GRACE);
                    if !b.finished.load(Ordering::Acquire) {
                        tracing::error!(target: "tern::watchdog",
                            "the wedged process did not finish within the grace; ending it now");
                        end_process(0);
                    }
                }
                Err(e) => {
                    tracing::error!(target: "tern::watchdog", error = %e, "cannot bounce: no new process");
                    give_up(b, wedge, "the bounce failed");
                }
            }
        }
    }
}

fn give_up(b: &Bounce, wedge: &Wedge, why: &str) {
    if b.finished.load(Ordering::Acquire) {
        return;
    }
    tracing::error!(target: "tern::watchdog", what = wedge.what(), code = EXIT_WEDGED,
        "wedged and {why}: exiting for a supervisor to restart tern");
    end_process(EXIT_WEDGED);
}

/// Exits without unwinding (stuck threads cannot be joined), after a moment for the log
/// writer thread to flush what was just logged.
fn end_process(code: i32) -> ! {
    std::thread::sleep(Duration::from_millis(200));
    std::process::exit(code)
}
