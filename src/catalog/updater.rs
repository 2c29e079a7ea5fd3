//! The task that keeps the catalog in step with the RIB: it subscribes, decodes each row,
//! applies the events to a copy of the current snapshot and publishes the result once per
//! batch. Bad rows are logged, counted and skipped; store errors are logged, counted and
//! retried with back-off from the last cursor, so a change is never applied twice or lost.
//! After each publication it sends what the batch changed on the feed ([`Changes`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::rib::{Change, Cursor, Record, Rib, RibError, RibEvent, Subscription};
use crate::telemetry::Metrics;

use super::changes::{Feed, Touched};
use super::{Catalog, Compacted, Snapshot, decode};

/// Loads the RIB's snapshot into the catalog, then keeps applying changes in a background
/// task until `shutdown` turns true. Fails if the first snapshot cannot be read, so that a
/// proxy never starts serving from an empty catalog by mistake. The first snapshot is not
/// sent on `feed` (what boot does with it is the caller's business); every later batch is.
pub async fn start(
    catalog: Arc<Catalog>,
    rib: Arc<dyn Rib>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
    feed: Feed,
) -> Result<JoinHandle<()>, RibError> {
    let mut sub = rib.subscribe(None);
    let cursor = match sub.next().await {
        Some(Ok(RibEvent::Snapshot { records, cursor })) => {
            let mut next = apply_snapshot(&catalog.load(), records, &metrics);
            // Start from compact maps: nothing is serving yet, so the O(n) fold is free.
            next = next.rebase(&next.compact());
            publish(&catalog, next, &metrics);
            let snap = catalog.load();
            tracing::info!(target: "tern::catalog", apps = snap.app_count(),
                machines = snap.machine_count(), certificates = snap.cert_count(), "catalog loaded");
            cursor
        }
        Some(Ok(RibEvent::Changes { .. })) => {
            return Err(RibError::Other("the RIB sent changes before a snapshot".into()));
        }
        Some(Err(e)) => return Err(e),
        None => return Err(RibError::Other("the RIB closed the subscription".into())),
    };
    Ok(tokio::spawn(async move {
        follow(catalog, rib, metrics, sub, cursor, &mut shutdown, feed).await;
    }))
}

async fn follow(
    catalog: Arc<Catalog>,
    rib: Arc<dyn Rib>,
    metrics: Arc<Metrics>,
    mut sub: Subscription,
    mut cursor: Cursor,
    shutdown: &mut watch::Receiver<bool>,
    feed: Feed,
) {
    let mut backoff = Duration::from_millis(100);
    let mut compaction: Option<JoinHandle<Compacted>> = None;
    loop {
        if compaction.is_none() && catalog.load().needs_compaction() {
            let snap = catalog.load_full();
            compaction = Some(tokio::task::spawn_blocking(move || snap.compact()));
        }
        let event = tokio::select! {
            () = crate::shutdown::requested(shutdown) => return,
            done = async { compaction.as_mut().expect("guarded by the select condition").await }, if compaction.is_some() => {
                compaction = None;
                match done {
                    // Changes published while it ran stay in the deltas.
                    Ok(c) => publish(&catalog, catalog.load().rebase(&c), &metrics),
                    Err(e) => tracing::error!(target: "tern::catalog", error = %e, "catalog compaction failed"),
                }
                continue;
            }
            e = sub.next() => e,
        };
        match event {
            Some(Ok(RibEvent::Snapshot { records, cursor: c })) => {
                let prev = catalog.load_full();
                let touched = Touched::of_resync(&prev, &records);
                let next = apply_snapshot(&prev, records, &metrics);
                publish(&catalog, next, &metrics);
                tell(&feed, &touched, &prev, &catalog);
                tracing::info!(target: "tern::catalog", "catalog resynchronised from a RIB snapshot");
                cursor = c;
                backoff = Duration::from_millis(100);
            }
            Some(Ok(RibEvent::Changes { changes, cursor: c })) => {
                let prev = catalog.load_full();
                let touched = Touched::of_changes(&changes);
                let next = apply_changes(&prev, changes, &metrics);
                publish(&catalog, next, &metrics);
                tell(&feed, &touched, &prev, &catalog);
                cursor = c;
                backoff = Duration::from_millis(100);
            }
            Some(Err(e)) => {
                metrics.rib_errors.inc();
                tracing::error!(target: "tern::catalog", error = %e, "reading the RIB failed; it will be retried");
            }
            None => {
                metrics.rib_errors.inc();
                tracing::error!(target: "tern::catalog", retry_in = ?backoff,
                    "the RIB subscription ended; resubscribing");
                tokio::select! {
                    () = crate::shutdown::requested(shutdown) => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                sub = rib.subscribe(Some(cursor.clone()));
            }
        }
    }
}

fn publish(catalog: &Catalog, next: Snapshot, metrics: &Metrics) {
    metrics.catalog_apps.set(next.app_count() as i64);
    metrics.catalog_machines.set(next.machine_count() as i64);
    metrics.catalog_certificates.set(next.cert_count() as i64);
    catalog.publish(next);
}

/// Sends what the batch just published changed, if anything. Nobody listening (a closed
/// feed) is fine: the catalog does not depend on it.
fn tell(feed: &Feed, touched: &Touched, prev: &Snapshot, catalog: &Catalog) {
    let changes = touched.diff(prev, &catalog.load());
    if !changes.is_empty() {
        let _ = feed.send(changes);
    }
}

/// "Diff, then apply": rows that differ from the catalog become events, and whatever the
/// catalog holds that the snapshot lacks is removed.
pub fn apply_snapshot(current: &Snapshot, records: Vec<Record>, metrics: &Metrics) -> Snapshot {
    let mut next = current.clone();
    let present: HashSet<_> = records.iter().map(|r| (r.table, r.key.clone())).collect();
    next.retain_only(&present);
    for r in records {
        apply_row(&mut next, r.table, &r.key, Some(&r.body), metrics);
    }
    next
}

/// Applies a batch of changes in commit order.
pub fn apply_changes(current: &Snapshot, changes: Vec<Change>, metrics: &Metrics) -> Snapshot {
    let mut next = current.clone();
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    for c in &changes {
        apply_row(&mut next, c.table, &c.key, c.body.as_deref(), metrics);
        let lag_ms = (now_ms - c.committed_at_ms).max(0);
        metrics.catalog_apply_lag.observe(lag_ms as f64 / 1000.0);
    }
    metrics.catalog_changes.inc_by(changes.len() as u64);
    next
}

fn apply_row(
    next: &mut Snapshot,
    table: crate::rib::Table,
    key: &str,
    body: Option<&str>,
    metrics: &Metrics,
) {
    match decode(next, table, key, body) {
        Ok(Some(event)) => next.apply(event),
        Ok(None) => {}
        Err(e) => {
            metrics.rib_rows_skipped.with_label_values(&[table.as_str()]).inc();
            tracing::warn!(target: "tern::catalog", table = table.as_str(), key, reason = %e.reason,
                "RIB row does not decode; skipped, the rest applies");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rib::Table;

    fn change(table: Table, key: &str, body: Option<&str>) -> Change {
        Change { table, key: key.into(), body: body.map(String::from), committed_at_ms: 0 }
    }

    #[test]
    fn a_bad_row_is_skipped_and_counted_and_the_rest_applies() {
        let metrics = Metrics::new();
        let changes = vec![
            change(Table::Apps, "good", Some(r#"{"name":"good","hostnames":["good.test"]}"#)),
            change(Table::Apps, "bad", Some("{not json")),
            change(Table::Apps, "liar", Some(r#"{"name":"other"}"#)),
            // Parses, but would probe its machines in a tight loop.
            change(Table::Apps, "spin", Some(r#"{"name":"spin","checks":[{"type":"tcp","interval":"0s"}]}"#)),
            // Every start would fail before its machine could answer.
            change(Table::Apps, "hasty", Some(r#"{"name":"hasty","start_timeout":"0s"}"#)),
            change(
                Table::Apps,
                "upside",
                Some(r#"{"name":"upside","concurrency":{"soft_limit":5,"hard_limit":2}}"#),
            ),
            change(
                Table::Machines,
                "m",
                Some(r#"{"id":"m","app":"good","addr":"nowhere","state":"started"}"#),
            ),
        ];
        let next = apply_changes(&Snapshot::default(), changes, &metrics);
        assert!(next.route("good.test").is_some());
        assert_eq!(next.app_count(), 1);
        assert_eq!(next.machine_count(), 0);
        assert_eq!(metrics.rib_rows_skipped.with_label_values(&["apps"]).get(), 5);
        assert_eq!(metrics.rib_rows_skipped.with_label_values(&["machines"]).get(), 1);
    }

    #[test]
    fn a_snapshot_is_diffed_against_the_catalog() {
        let metrics = Metrics::new();
        let a = Record {
            table: Table::Apps,
            key: "a".into(),
            body: r#"{"name":"a","hostnames":["a.test"]}"#.into(),
        };
        let b = Record {
            table: Table::Apps,
            key: "b".into(),
            body: r#"{"name":"b","hostnames":["b.test"]}"#.into(),
        };
        let first = apply_snapshot(&Snapshot::default(), vec![a.clone(), b], &metrics);
        let a_entry = first.app("a").unwrap().clone();
        let second = apply_snapshot(&first, vec![a], &metrics);
        assert!(second.route("b.test").is_none());
        // An unchanged row is not re-applied: the entry is the very same allocation.
        assert!(Arc::ptr_eq(&a_entry, second.app("a").unwrap()));
    }
}
