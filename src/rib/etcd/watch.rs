//! Following the etcd prefix for one subscription: snapshot, watch, and the rules for when
//! a re-watch from the last revision is enough and when only a fresh snapshot will do.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::grpc::GrpcError;
use super::{Inner, prefix_end, proto};
use crate::rib::{Change, Cursor, Record, Resync, RibError, RibEvent};

type Tx = mpsc::Sender<Result<RibEvent, RibError>>;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The cursor's epoch: which cluster and prefix its revisions count in.
fn epoch(cluster: u64, prefix: &str) -> String {
    format!("etcd {cluster:016x} {prefix}")
}

/// Why following the watch stopped.
enum Ended {
    Unsubscribed,
    /// Only a fresh snapshot restores continuity.
    Resync(Resync),
    /// The stream broke (or went unanswered); a re-watch from `last` continues it.
    Broken(String),
}

pub(super) async fn run(inner: Arc<Inner>, from: Option<Cursor>, tx: Tx) {
    // Where to resume: the cursor, if it counts in this prefix (the cluster is checked on
    // the first answer).
    let mut at: Option<(String, i64)> =
        from.filter(|c| c.epoch.ends_with(&inner.prefix)).map(|c| (c.epoch, c.seq));
    let mut reason = Resync::Start;
    let mut backoff = FIRST_BACKOFF;
    loop {
        if tx.is_closed() {
            return;
        }
        let (ep, rev) = match at.clone() {
            Some(resume) => resume,
            None => match snapshot(&inner).await {
                Ok((records, rev, cluster)) => {
                    let ep = epoch(cluster, &inner.prefix);
                    let cursor = Cursor { epoch: ep.clone(), seq: rev };
                    if tx.send(Ok(RibEvent::Snapshot { records, cursor, reason })).await.is_err() {
                        return;
                    }
                    (ep, rev)
                }
                Err(e) if e.is_compacted() => continue, // compacted between pages: again
                Err(e) => {
                    if tx.send(Err(RibError::Other(e.to_string()))).await.is_err() {
                        return;
                    }
                    sleep(&mut backoff).await;
                    continue;
                }
            },
        };
        let mut last = rev;
        match follow(&inner, &ep, &mut last, &tx, &mut backoff).await {
            Ended::Unsubscribed => return,
            Ended::Resync(why) => {
                tracing::warn!(target: "tern::rib", reason = why.as_str(), revision = last,
                    "the etcd watch cannot continue; resynchronising from a fresh snapshot");
                reason = why;
                at = None;
            }
            Ended::Broken(why) => {
                at = Some((ep, last));
                let e = RibError::Other(format!("etcd watch: {why}; re-watching from revision {}", last + 1));
                if tx.send(Err(e)).await.is_err() {
                    return;
                }
                sleep(&mut backoff).await;
            }
        }
    }
}

async fn sleep(backoff: &mut Duration) {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
}

/// Every row under the prefix as of one revision.
async fn snapshot(inner: &Inner) -> Result<(Vec<Record>, i64, u64), GrpcError> {
    let p = inner.prefix.as_bytes().to_vec();
    let end = prefix_end(&p);
    let (kvs, rev, cluster) = inner.range_all(p, end, 0, false).await?;
    let records = kvs
        .into_iter()
        .filter_map(|kv| {
            let (table, key) = inner.parse_key(&kv.key)?;
            Some(Record { table, key, body: String::from_utf8_lossy(&kv.value).into_owned() })
        })
        .collect();
    Ok((records, rev, cluster))
}

fn now_ms() -> i64 {
    crate::clock::unix_ms()
}

/// Opens a watch on the prefix from `last + 1`.
async fn open(inner: &Inner, last: i64) -> Result<super::grpc::Stream, Ended> {
    let p = inner.prefix.as_bytes().to_vec();
    let create = proto::WatchRequest {
        request: Some(proto::watch_request::Request::Create(proto::WatchCreateRequest {
            range_end: prefix_end(&p),
            key: p,
            start_revision: last + 1,
            progress_notify: true,
            prev_kv: false,
        })),
    };
    let wait = inner.liveness.probe_timeout;
    match tokio::time::timeout(wait, inner.grpc.stream("/etcdserverpb.Watch/Watch", &create)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(Ended::Broken(e.to_string())),
        Err(_) => {
            inner.grpc.reset().await;
            Err(Ended::Broken(format!("no answer to the watch within {wait:?}")))
        }
    }
}

/// The rows a response's events change (other keys under the prefix only move `last`).
fn changes_of(inner: &Inner, events: Vec<proto::Event>, last: &mut i64) -> Vec<Change> {
    let at = now_ms();
    let mut changes = Vec::with_capacity(events.len());
    for ev in events {
        let Some(kv) = ev.kv else { continue };
        *last = (*last).max(kv.mod_revision);
        let Some((table, key)) = inner.parse_key(&kv.key) else { continue };
        let body =
            (ev.kind == proto::event_type::PUT).then(|| String::from_utf8_lossy(&kv.value).into_owned());
        changes.push(Change { table, key, body, committed_at_ms: at });
    }
    changes
}

/// Watches from `*last + 1`, sending changes and advancing `*last`, until the stream ends.
async fn follow(inner: &Inner, ep: &str, last: &mut i64, tx: &Tx, backoff: &mut Duration) -> Ended {
    let live = inner.liveness;
    let mut stream = match open(inner, *last).await {
        Ok(s) => s,
        Err(ended) => return ended,
    };
    let mut created = false;
    let mut heard = Instant::now();
    let mut probe_sent: Option<Instant> = None;
    loop {
        let deadline = match probe_sent {
            Some(sent) => sent + live.probe_timeout,
            None => heard + live.probe_after,
        };
        let msg = tokio::select! {
            () = tx.closed() => return Ended::Unsubscribed,
            m = stream.next::<proto::WatchResponse>() => m,
            () = tokio::time::sleep_until(deadline) => {
                if probe_sent.is_some() || !created {
                    // The connection is open but the member does not answer: try another.
                    inner.grpc.reset().await;
                    return Ended::Broken(format!("no answer to a progress request within {:?}", live.probe_timeout));
                }
                let probe = proto::WatchRequest {
                    request: Some(proto::watch_request::Request::Progress(proto::WatchProgressRequest {})),
                };
                if let Err(e) = stream.send(&probe).await {
                    return Ended::Broken(e.to_string());
                }
                probe_sent = Some(Instant::now());
                continue;
            }
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => return Ended::Broken("etcd ended the watch stream".into()),
            Err(e) => return Ended::Broken(e.to_string()),
        };
        heard = Instant::now();
        probe_sent = None;
        let cluster = resp.header.as_ref().map_or(0, |h| h.cluster_id);
        if cluster != 0 && epoch(cluster, &inner.prefix) != ep {
            return Ended::Resync(Resync::Replaced);
        }
        if resp.canceled {
            if resp.compact_revision > 0 {
                return Ended::Resync(Resync::Compacted);
            }
            return Ended::Broken(format!("etcd cancelled the watch: {}", resp.cancel_reason));
        }
        if resp.created && !created {
            created = true;
            *backoff = FIRST_BACKOFF;
        }
        if resp.events.is_empty() {
            // Created, a progress notification, or the answer to a probe: current as of now.
            if tx.send(Ok(RibEvent::Live)).await.is_err() {
                return Ended::Unsubscribed;
            }
            continue;
        }
        let changes = changes_of(inner, resp.events, last);
        let event = if changes.is_empty() {
            RibEvent::Live
        } else {
            RibEvent::Changes { changes, cursor: Cursor { epoch: ep.to_string(), seq: *last } }
        };
        if tx.send(Ok(event)).await.is_err() {
            return Ended::Unsubscribed;
        }
    }
}
