//! Upgraded connections (WebSocket or any HTTP/1.1 Upgrade): once the machine answers 101,
//! bytes are copied both ways until either side closes, the exchange has been silent for
//! the app's idle_timeout, or the tunnel is asked to end (its machine is about to stop, or
//! its time in a drain came). Nothing is buffered beyond one copy buffer per direction.
//!
//! Asked to end, a WebSocket is closed the way RFC 6455 asks (see [`super::ending`]): each
//! direction finishes the frame it is in, the client gets a close frame (1001, going away,
//! its reason saying why) and so does the machine, and the client has [`GRACE`] to send its
//! own close frame before tern closes the connection. Any other upgraded protocol is shut
//! down.

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

use super::activity::{Activity, TouchIo, silent_for};
use super::body::ExchangeGuards;
use super::drain::{Registration, StreamEnd};
use super::ending::{self, GRACE, Why, WsFrames};

/// Bytes read at a time in each direction (what `copy_bidirectional` uses).
const BUF: usize = 8 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    WebSocket,
    /// An upgrade to a protocol tern does not read.
    Other,
}

pub struct Settings {
    pub idle_timeout: Duration,
    pub kind: Kind,
    /// Resolves when the tunnel is to end: its machine is about to stop, or its time in a
    /// drain came.
    pub end: StreamEnd,
    /// Counts the tunnel as open in a drain while it runs.
    pub registered: Registration,
}

/// The tunnel's request to end, as both directions see it.
struct Asked {
    token: CancellationToken,
    why: OnceLock<Why>,
}

impl Asked {
    fn why(&self) -> Why {
        self.why.get().copied().unwrap_or(Why::Machine)
    }
}

/// How one direction of the tunnel finished.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Finish {
    /// Its source closed.
    Eof,
    /// Asked to end, it reached a frame boundary (and sent its close frame) in time.
    Ended,
    /// Asked to end, it did not reach a frame boundary in time.
    Cut,
}

pub async fn run(
    client: OnUpgrade,
    machine: OnUpgrade,
    settings: Settings,
    metrics: Arc<Metrics>,
    guards: ExchangeGuards,
) {
    // Both sides' connections must hand over first; a side that never does (a request body
    // never finished, say) must not hold the exchange for ever.
    let upgraded = tokio::time::timeout(settings.idle_timeout, async { tokio::try_join!(client, machine) });
    let (client, machine) = match upgraded.await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            tracing::debug!(target: "tern::http", error = %e, "upgrade did not complete");
            return;
        }
        Err(_) => {
            tracing::debug!(target: "tern::http", "upgrade did not complete within the app's idle_timeout");
            return;
        }
    };
    relay(TokioIo::new(client), TokioIo::new(machine), settings, &metrics).await;
    drop(guards);
}

/// Copies bytes both ways between a client and a machine until both sides closed, either
/// failed, the exchange was silent for the idle timeout, or the end was asked for.
pub async fn relay<C, M>(client: C, machine: M, settings: Settings, metrics: &Metrics)
where
    C: AsyncRead + AsyncWrite + Unpin,
    M: AsyncRead + AsyncWrite + Unpin,
{
    let Settings { idle_timeout, kind, end: asked_by, registered: _registered } = settings;
    let activity = Arc::new(Activity::new());
    let client = TouchIo::new(client, activity.clone());
    let machine = TouchIo::new(machine, activity.clone());
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut machine_rx, mut machine_tx) = tokio::io::split(machine);
    let ws = kind == Kind::WebSocket;
    let end = &Asked { token: CancellationToken::new(), why: OnceLock::new() };
    let kind = if ws { "websocket" } else { "tunnel" };
    // One side closing is passed on as a half-close while the other keeps flowing; one side
    // failing ends both, as `copy_bidirectional` did.
    let both = async {
        tokio::try_join!(
            one_way(&mut machine_rx, &mut client_tx, ws, end, Toward::Client),
            one_way(&mut client_rx, &mut machine_tx, ws, end, Toward::Machine),
        )
    };
    tokio::select! {
        r = both => match r {
            Ok((down, up)) if down != Finish::Eof || up != Finish::Eof => {
                let how = match (down, up) {
                    _ if !ws => "closed",
                    (Finish::Cut, _) | (_, Finish::Cut) => "cut",
                    _ => "clean",
                };
                metrics.streams_ended.with_label_values(&[kind, how]).inc();
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(target: "tern::http", error = %e, "tunnel ended with an error"),
        },
        // A side that stopped reading can hold a write past both graces; asked to end, the
        // tunnel is gone within two.
        () = async {
            let _ = end.why.set(asked_by.wait().await);
            end.token.cancel();
            tokio::time::sleep(GRACE * 2).await;
        } => {
            metrics.streams_ended.with_label_values(&[kind, "cut"]).inc();
        }
        () = silent_for(&activity, idle_timeout) => {
            metrics.streams_cut_idle.inc();
            tracing::debug!(target: "tern::http", ?idle_timeout,
                "tunnel closed after the app's idle_timeout of silence");
        }
    }
    // Best effort: the peer may be gone already.
    let _ = client_tx.shutdown().await;
    let _ = machine_tx.shutdown().await;
}

/// Which way one half of the tunnel carries bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Toward {
    Client,
    Machine,
}

/// One direction of the tunnel. Asked to end, a WebSocket finishes the frame in progress
/// and sends a close frame the way it flows: plain to the client, masked to the machine
/// (frames from a client must be). Client → machine then waits up to [`GRACE`] for the
/// client's own close frame, answering tern's, reading and dropping what comes. Nothing
/// more is passed on either way.
async fn one_way<R, W>(from: &mut R, to: &mut W, ws: bool, end: &Asked, toward: Toward) -> io::Result<Finish>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frames = ws.then(WsFrames::default);
    if copy_until_end(from, to, frames.as_mut(), &end.token).await? {
        return Ok(Finish::Eof);
    }
    let Some(frames) = frames.as_mut() else { return Ok(Finish::Ended) };
    let mut sent = false;
    let closing = async {
        if !finish_frame(from, to, frames).await? {
            return Ok(Finish::Eof);
        }
        // A close frame already went this way (a closing handshake under way): no second.
        if !frames.saw_close() {
            let mask = (toward == Toward::Machine).then(|| fastrand::u32(..).to_be_bytes());
            to.write_all(&ending::close_frame(end.why(), mask)).await?;
            to.flush().await?;
        }
        sent = true;
        if toward == Toward::Machine {
            let mut buf = vec![0; BUF];
            while !frames.saw_close() {
                let n = from.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                frames.feed(&buf[..n], false);
            }
        }
        io::Result::Ok(Finish::Ended)
    };
    match tokio::time::timeout(GRACE, closing).await {
        Ok(r) => r,
        // A side that does not reach a frame boundary in time is cut; a client that does
        // not answer its close frame is not waited for, and the end was still clean.
        Err(_) => Ok(if sent { Finish::Ended } else { Finish::Cut }),
    }
}

/// Copies until the source closes (true) or `end` is cancelled (false). Only the read is
/// raced against `end`, and a read that loses the race has taken nothing, so no byte is
/// lost between the two phases.
async fn copy_until_end<R, W>(
    from: &mut R,
    to: &mut W,
    mut frames: Option<&mut WsFrames>,
    end: &CancellationToken,
) -> io::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0; BUF];
    loop {
        let n = tokio::select! {
            biased;
            () = end.cancelled() => return Ok(false),
            r = from.read(&mut buf) => r?,
        };
        if n == 0 {
            to.shutdown().await?;
            return Ok(true);
        }
        if let Some(f) = frames.as_deref_mut() {
            f.feed(&buf[..n], false);
        }
        to.write_all(&buf[..n]).await?;
        // TLS may keep what it could not send yet; nothing else would push it out.
        to.flush().await?;
    }
}

/// Passes on the rest of the frame in progress, if any, and nothing after it. True once
/// between frames; false if the source closed first.
async fn finish_frame<R, W>(from: &mut R, to: &mut W, frames: &mut WsFrames) -> io::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Never read past the frame's end: what follows it must stay unread, not dropped halfway.
    let mut buf = vec![0; BUF];
    while !frames.at_boundary() {
        let want = frames.remaining_hint().min(BUF);
        let n = from.read(&mut buf[..want]).await?;
        if n == 0 {
            return Ok(false);
        }
        let took = frames.feed(&buf[..n], true);
        to.write_all(&buf[..took]).await?;
        to.flush().await?;
    }
    Ok(true)
}
