//! Log setup: text or JSON lines on stderr, written by a background thread so that a slow
//! terminal or pipe never stalls the request path.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// Keeps the background log writer alive; logs written after it drops may be lost.
pub struct LogGuard {
    _guard: tracing_appender::non_blocking::WorkerGuard,
}

/// Installs the global subscriber. `level` is a tracing filter (`info`, `tern=debug`);
/// `RUST_LOG`, when set, wins. Calling it twice keeps the first subscriber.
pub fn init_logging(json: bool, level: &str) -> LogGuard {
    // `level` was checked with the config; a bad RUST_LOG is reported once logs work.
    let env = std::env::var(EnvFilter::DEFAULT_ENV).ok().filter(|v| !v.trim().is_empty());
    let from_env = env.as_deref().map(EnvFilter::try_new);
    let bad_env = matches!(from_env, Some(Err(_)));
    let filter = match from_env {
        Some(Ok(f)) => f,
        _ => EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        // Drop lines rather than block the runtime when the reader cannot keep up.
        .lossy(true)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_span_events(FmtSpan::NONE)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true);
    let installed = if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
    if installed.is_err() {
        tracing::debug!(target: "tern::telemetry", "a log subscriber was already installed");
    }
    if bad_env {
        tracing::warn!(target: "tern::telemetry", rust_log = env.as_deref().unwrap_or_default(), level,
            "RUST_LOG is not a valid filter; using [log] level instead");
    }
    LogGuard { _guard: guard }
}
