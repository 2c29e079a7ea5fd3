//! Following the Corrosion subscription for one subscriber: snapshot, changes, and the
//! rules for when resuming from the last change id is enough and when only a fresh
//! subscription and snapshot will do.
//!
//! | what happened                                   | what follows                         |
//! |-------------------------------------------------|--------------------------------------|
//! | the stream dropped, or a quiet one's probe failed | resume: `GET …/{id}?from={last}`   |
//! | the resume got 404 (the agent forgot the id)    | fresh subscription, `Resync::Lost`   |
//! | `{"error":…}` in the stream (changes purged)    | fresh subscription, `Resync::StreamError` |
//! | a change id other than last + 1                 | fresh subscription, `Resync::Gap`    |
//!
//! Every failure is reported to the subscriber (the catalog marks the link down) and the
//! next attempt waits a back-off, 100 ms doubling to 5 s, reset once a stream proves itself.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Inner;
use super::client::{CorroError, Lines};
use super::wire::{self, ChangeKind, Event};
use crate::rib::{Change, Cursor, Record, Resync, RibError, RibEvent, Table};

type Tx = mpsc::Sender<Result<RibEvent, RibError>>;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The subscription being followed: its id on the agent, its query's hash, and the last
/// change id the subscriber has been sent.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Position {
    id: String,
    hash: String,
    last: i64,
}

/// The cursor's epoch: change ids count within one subscription of one agent.
fn epoch(url: &str, id: &str, hash: &str) -> String {
    format!("corrosion {url} {id} {hash}")
}

/// The subscription id and query hash of a cursor made by this agent's subscription.
fn parse_epoch(url: &str, epoch: &str) -> Option<(String, String)> {
    let rest = epoch.strip_prefix("corrosion ")?.strip_prefix(url)?.strip_prefix(' ')?;
    let (id, hash) = rest.split_once(' ')?;
    (!id.is_empty()).then(|| (id.to_string(), hash.to_string()))
}

/// Why following a stream stopped.
enum Ended {
    Unsubscribed,
    /// Only a fresh subscription and snapshot restore continuity.
    Resync(Resync),
    /// The stream broke or went quiet; resuming from the last change id continues it.
    Broken(String),
}

/// What opening a stream gave.
enum Opened {
    /// A stream to follow from `Position`, with lines already read after the snapshot.
    Stream(Position, Lines, Vec<Bytes>),
    Unsubscribed,
    Resync(Resync),
    Failed(String),
}

pub(super) async fn run(inner: Arc<Inner>, from: Option<Cursor>, tx: Tx) {
    // A cursor from this agent's subscription resumes it; anything else starts afresh.
    let mut at: Option<Position> = from.and_then(|c| {
        let (id, hash) = parse_epoch(&inner.url, &c.epoch)?;
        Some(Position { id, hash, last: c.seq })
    });
    let mut reason = Resync::Start;
    let mut backoff = FIRST_BACKOFF;
    loop {
        if tx.is_closed() {
            return;
        }
        let opened = match &at {
            Some(pos) => resume(&inner, pos, &tx).await,
            None => snapshot(&inner, reason, &tx).await,
        };
        let (mut pos, lines, pending) = match opened {
            Opened::Stream(pos, lines, pending) => (pos, lines, pending),
            Opened::Unsubscribed => return,
            Opened::Resync(why) => {
                tracing::warn!(target: "tern::rib", url = %inner.url, reason = why.as_str(),
                    "the Corrosion subscription cannot be resumed; subscribing afresh for a snapshot");
                (reason, at) = (why, None);
                continue;
            }
            Opened::Failed(why) => {
                let e = RibError::Other(format!("Corrosion agent {}: {why}", inner.url));
                if tx.send(Err(e)).await.is_err() {
                    return;
                }
                sleep(&mut backoff, &tx).await;
                continue;
            }
        };
        match follow(&inner, lines, pending, &mut pos, &tx, &mut backoff).await {
            Ended::Unsubscribed => return,
            Ended::Resync(why) => {
                tracing::warn!(target: "tern::rib", url = %inner.url, subscription = %pos.id,
                    change_id = pos.last, reason = why.as_str(),
                    "the Corrosion subscription lost continuity; subscribing afresh for a snapshot");
                (reason, at) = (why, None);
                // A stream that fails again straight after its snapshot must not spin.
                sleep(&mut backoff, &tx).await;
            }
            Ended::Broken(why) => {
                let e = RibError::Other(format!(
                    "Corrosion agent {}: subscription {}: {why}; resuming from change {}",
                    inner.url, pos.id, pos.last
                ));
                at = Some(pos);
                if tx.send(Err(e)).await.is_err() {
                    return;
                }
                sleep(&mut backoff, &tx).await;
            }
        }
    }
}

/// Waits out the back-off and doubles it; cut short when the subscriber goes (the loop
/// then sees the closed channel and ends).
async fn sleep(backoff: &mut Duration, tx: &Tx) {
    tokio::select! {
        () = tokio::time::sleep(*backoff) => {}
        () = tx.closed() => {}
    }
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
}

fn header(head: &http::Response<()>, name: &str) -> Option<String> {
    head.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// `GET /v1/subscriptions/{id}?from={last}`: the changes after `last`, then live ones.
async fn resume(inner: &Inner, pos: &Position, tx: &Tx) -> Opened {
    let path = format!("/v1/subscriptions/{}?from={}", pos.id, pos.last);
    match inner.client.stream(Method::GET, &path, None, inner.liveness.probe_timeout).await {
        Ok((head, lines)) => {
            let hash = header(&head, "corro-query-hash").unwrap_or_default();
            if !pos.hash.is_empty() && !hash.is_empty() && hash != pos.hash {
                // The id answers for another query now: its change ids say nothing of ours.
                return Opened::Resync(Resync::Replaced);
            }
            tracing::info!(target: "tern::rib", url = %inner.url, subscription = %pos.id,
                from = pos.last, "resumed the Corrosion subscription");
            // Re-established: the subscriber may count the link as up again.
            if tx.send(Ok(RibEvent::Live)).await.is_err() {
                return Opened::Unsubscribed;
            }
            Opened::Stream(pos.clone(), lines, Vec::new())
        }
        Err(e) if e.is_not_found() => Opened::Resync(Resync::Lost),
        Err(e) => Opened::Failed(format!("resuming subscription {} from change {}: {e}", pos.id, pos.last)),
    }
}

/// `POST /v1/subscriptions`: the rows up to the end-of-query line become a snapshot sent with
/// `reason`; the stream goes on with the changes after it.
async fn snapshot(inner: &Inner, reason: Resync, tx: &Tx) -> Opened {
    let query = Value::from(wire::SUBSCRIPTION);
    let deadline = inner.liveness.probe_timeout;
    let (head, mut lines) =
        match inner.client.stream(Method::POST, "/v1/subscriptions", Some(&query), deadline).await {
            Ok(x) => x,
            Err(e) => return Opened::Failed(format!("subscribing: {e}")),
        };
    let Some(id) = header(&head, "corro-query-id") else {
        return Opened::Failed("the agent's subscription answer has no corro-query-id".into());
    };
    let hash = header(&head, "corro-query-hash").unwrap_or_default();
    let quiet = inner.liveness.probe_after + inner.liveness.probe_timeout;
    let mut records = Vec::new();
    loop {
        let batch = match tokio::time::timeout(quiet, lines.next_batch()).await {
            Ok(Ok(Some(batch))) => batch,
            Ok(Ok(None)) => {
                return Opened::Failed(format!("subscription {id} ended before its initial rows did"));
            }
            Ok(Err(e)) => return Opened::Failed(format!("subscription {id}: {e}")),
            Err(_) => {
                return Opened::Failed(format!("subscription {id}: its initial rows stalled for {quiet:?}"));
            }
        };
        for (i, line) in batch.iter().enumerate() {
            match wire::parse_line(line) {
                Ok(Event::Columns(c)) if c != wire::COLUMNS => {
                    return Opened::Failed(format!(
                        "subscription {id} has columns {c:?}, not tbl, key, body"
                    ));
                }
                Ok(Event::Columns(_)) => {}
                Ok(Event::Row(_, cells)) => match row_of(&cells) {
                    Ok(Some(r)) => records.push(r),
                    Ok(None) => {}
                    Err(e) => return Opened::Failed(format!("subscription {id}: {e}")),
                },
                Ok(Event::Eoq(eoq)) => {
                    let last = eoq.change_id.unwrap_or(0);
                    // Listed table by table (machines before their states), as every store does.
                    records.sort_by_key(|r| r.table);
                    let count = records.len();
                    let cursor = Cursor { epoch: epoch(&inner.url, &id, &hash), seq: last };
                    if tx.send(Ok(RibEvent::Snapshot { records, cursor, reason })).await.is_err() {
                        return Opened::Unsubscribed;
                    }
                    tracing::info!(target: "tern::rib", url = %inner.url, subscription = %id, rows = count,
                        change_id = last, reason = reason.as_str(), "Corrosion snapshot read");
                    let pending = batch[i + 1..].to_vec();
                    return Opened::Stream(Position { id, hash, last }, lines, pending);
                }
                Ok(Event::Change(..)) => {
                    return Opened::Failed(format!(
                        "subscription {id} sent a change before its initial rows ended"
                    ));
                }
                Ok(Event::Error(e)) => {
                    return Opened::Failed(format!("subscription {id}: the agent says: {e}"));
                }
                Err(e) => return Opened::Failed(format!("subscription {id}: {e}")),
            }
        }
    }
}

/// A row of the subscription as a record: `None` for another table's row (ignored, as
/// etcd's adapter ignores other keys), an error for cells of another shape (a row tern
/// cannot tell the key of must not be dropped silently).
fn row_of(cells: &[Value]) -> Result<Option<Record>, String> {
    match cells {
        [Value::String(tbl), Value::String(_), Value::String(_)] => {
            Ok(if Table::parse(tbl).is_some() { wire::record(cells) } else { None })
        }
        _ => Err(format!("a row of another shape than [tbl, key, body]: {}", Value::from(cells.to_vec()))),
    }
}

type Probe<'a> = Pin<Box<dyn Future<Output = Result<wire::Health, CorroError>> + Send + 'a>>;

/// Follows the stream from `pos.last`, sending changes and advancing `pos.last`, until it
/// ends. A stream quiet for `probe_after` gets a health probe beside it.
async fn follow(
    inner: &Inner,
    mut lines: Lines,
    pending: Vec<Bytes>,
    pos: &mut Position,
    tx: &Tx,
    backoff: &mut Duration,
) -> Ended {
    let ep = epoch(&inner.url, &pos.id, &pos.hash);
    if let Some(end) = apply_batch(&pending, pos, &ep, tx).await {
        return end;
    }
    let live = inner.liveness;
    let mut heard = Instant::now();
    let mut probe: Option<Probe<'_>> = None;
    loop {
        let batch = tokio::select! {
            () = tx.closed() => return Ended::Unsubscribed,
            b = lines.next_batch() => b,
            r = async { probe.as_mut().expect("guarded by the branch condition").await }, if probe.is_some() => {
                probe = None;
                match r {
                    Ok(_) => {
                        // The agent answers, and an idle stream has nothing to say.
                        heard = Instant::now();
                        *backoff = FIRST_BACKOFF;
                        if tx.send(Ok(RibEvent::Live)).await.is_err() {
                            return Ended::Unsubscribed;
                        }
                        continue;
                    }
                    Err(e) => return Ended::Broken(format!(
                        "quiet for {:?} and the agent's health probe failed ({e})", live.probe_after)),
                }
            }
            () = tokio::time::sleep_until(heard + live.probe_after), if probe.is_none() => {
                probe = Some(Box::pin(inner.client.health(live.probe_timeout)));
                continue;
            }
        };
        match batch {
            Ok(Some(batch)) => {
                heard = Instant::now();
                probe = None;
                *backoff = FIRST_BACKOFF;
                if let Some(end) = apply_batch(&batch, pos, &ep, tx).await {
                    return end;
                }
            }
            Ok(None) => return Ended::Broken("the agent ended the stream".into()),
            Err(e) => return Ended::Broken(e.to_string()),
        }
    }
}

/// Sends the changes in `batch` as one event (they arrived together: Corrosion flushes what
/// one transaction made at once but marks no transaction boundary, and orders rows within one
/// arbitrarily; each change carries the row's cells, so applying them in change id order is
/// right). Returns why following must stop, if it must.
async fn apply_batch(batch: &[Bytes], pos: &mut Position, ep: &str, tx: &Tx) -> Option<Ended> {
    let at = crate::clock::unix_ms();
    let (changes, ended) = read_changes(batch, pos, at);
    if !changes.is_empty() {
        let cursor = Cursor { epoch: ep.to_string(), seq: pos.last };
        if tx.send(Ok(RibEvent::Changes { changes, cursor })).await.is_err() {
            return Some(Ended::Unsubscribed);
        }
    }
    ended
}

/// The changes of `batch` after `pos.last`, advancing it, up to the first line that ends the
/// stream's continuity.
fn read_changes(batch: &[Bytes], pos: &mut Position, at: i64) -> (Vec<Change>, Option<Ended>) {
    let mut changes = Vec::with_capacity(batch.len());
    for line in batch {
        let event = match wire::parse_line(line) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(target: "tern::rib", subscription = %pos.id, error = %e,
                    "an unreadable line in the Corrosion stream");
                return (changes, Some(Ended::Resync(Resync::StreamError)));
            }
        };
        match event {
            // Already sent (a replay may overlap what came before the drop).
            Event::Change(_, _, _, id) if id <= pos.last => {}
            Event::Change(_, _, _, id) if id != pos.last + 1 => {
                tracing::warn!(target: "tern::rib", subscription = %pos.id, expected = pos.last + 1, got = id,
                    "the Corrosion subscription skipped change ids");
                return (changes, Some(Ended::Resync(Resync::Gap)));
            }
            Event::Change(kind, _, cells, id) => {
                match row_of(&cells) {
                    Ok(Some(r)) => {
                        let body = (kind != ChangeKind::Delete).then_some(r.body);
                        changes.push(Change { table: r.table, key: r.key, body, committed_at_ms: at });
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(target: "tern::rib", subscription = %pos.id, change_id = id, error = %e,
                            "an unreadable change in the Corrosion stream");
                        return (changes, Some(Ended::Resync(Resync::StreamError)));
                    }
                }
                pos.last = id;
            }
            Event::Error(e) => {
                tracing::warn!(target: "tern::rib", subscription = %pos.id, error = %e,
                    "the Corrosion agent ended the subscription stream with an error");
                return (changes, Some(Ended::Resync(Resync::StreamError)));
            }
            // A resumed stream sends changes only; a fresh one's rows ended at its eoq.
            Event::Columns(_) | Event::Row(..) | Event::Eoq(_) => {}
        }
    }
    (changes, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(last: i64) -> Position {
        Position { id: "5f9e".into(), hash: "h".into(), last }
    }

    fn lines(text: &[&str]) -> Vec<Bytes> {
        text.iter().map(|l| Bytes::copy_from_slice(l.as_bytes())).collect()
    }

    #[test]
    fn changes_apply_in_change_id_order_and_replays_are_skipped() {
        let batch = lines(&[
            r#"{"change":["insert",3,["apps","b","{\"name\":\"b\"}"],4]}"#,
            r#"{"change":["update",1,["apps","a","{\"name\":\"a2\"}"],5]}"#,
            r#"{"change":["delete",2,["machines","a-1","{}"],6]}"#,
            r#"{"change":["insert",9,["nat_rules","x","{}"],7]}"#,
        ]);
        let mut p = pos(4);
        let (changes, ended) = read_changes(&batch, &mut p, 0);
        assert!(ended.is_none());
        assert_eq!(p.last, 7, "an ignored table's change still counts");
        let got: Vec<_> = changes.iter().map(|c| (c.table, c.key.as_str(), c.body.is_some())).collect();
        assert_eq!(got, [(Table::Apps, "a", true), (Table::Machines, "a-1", false)]);
    }

    #[test]
    fn a_gap_an_error_or_a_garbled_line_ends_continuity_after_what_came_before() {
        let mut p = pos(1);
        let (changes, ended) = read_changes(
            &lines(&[
                r#"{"change":["insert",1,["apps","a","{}"],2]}"#,
                r#"{"change":["insert",2,["apps","b","{}"],4]}"#,
            ]),
            &mut p,
            0,
        );
        assert!(matches!(ended, Some(Ended::Resync(Resync::Gap))));
        assert_eq!((changes.len(), p.last), (1, 2));
        let purged = r#"{"error":"subscription already deleted older changes, min change id: 108"}"#;
        let (_, ended) = read_changes(&lines(&[purged]), &mut pos(1), 0);
        assert!(matches!(ended, Some(Ended::Resync(Resync::StreamError))));
        let (_, ended) = read_changes(&lines(&[r#"{"change":["delete",1,[],2]}"#]), &mut pos(1), 0);
        assert!(matches!(ended, Some(Ended::Resync(Resync::StreamError))), "a delete of no known row");
        let (_, ended) = read_changes(&lines(&["{\"chan"]), &mut pos(1), 0);
        assert!(matches!(ended, Some(Ended::Resync(Resync::StreamError))));
    }

    #[test]
    fn a_cursor_resumes_only_this_agents_subscription() {
        let ep = epoch("http://127.0.0.1:8081", "5f9e-11", "abc");
        assert_eq!(parse_epoch("http://127.0.0.1:8081", &ep), Some(("5f9e-11".into(), "abc".into())));
        assert_eq!(parse_epoch("http://127.0.0.1:8082", &ep), None);
        assert_eq!(parse_epoch("http://127.0.0.1:8081", "etcd 00ff /tern/"), None);
        assert_eq!(parse_epoch("http://127.0.0.1:8081", "corrosion http://127.0.0.1:8081  x"), None);
    }
}
