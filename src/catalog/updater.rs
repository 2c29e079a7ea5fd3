//! The task that keeps the catalog in step with the RIB: it subscribes, decodes each row,
//! applies the events to a copy of the current snapshot and publishes the result once per
//! batch. Store errors are logged, counted and retried with back-off from the last cursor,
//! so a change is never applied twice or lost. After each publication it sends what the batch
//! changed on the feed ([`Changes`]).
//!
//! A row that does not decode is logged, counted and skipped, and the row's last good
//! version keeps serving: at run time that is simply the entry the catalog holds. A snapshot
//! (at start, or a resync) may bring a bad row the catalog holds nothing for; then the RIB's
//! history is asked for the newest earlier body of that row that decodes, back to the row's
//! last deletion ([`Rib::look_back`]), so that a restart serves what the running proxy did.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::rib::{Change, Cursor, Record, Rib, RibError, RibEvent, Rows, Subscription, Table};
use crate::telemetry::Metrics;

use super::build::{Build, Decoded, decode_part};
use super::changes::{Feed, Touched};
use super::{Catalog, Compacted, DecodeError, Event, Snapshot, decode};

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
    let started = tokio::time::Instant::now();
    let mut sub = rib.subscribe(None);
    let current = catalog.load_full();
    // Nothing is held yet: the catalog is built whole from the snapshot, with compact maps
    // from the start.
    let mut build = Build::new(&current);
    let (cursor, waited) = first_snapshot(&mut sub, &mut build, &metrics).await?;
    metrics.rib_connected.set(1);
    let read = started.elapsed();
    let (next, unserved) = build.finish();
    let next = keep_last_good(next, unserved, &cursor, &rib, &metrics).await;
    publish(&catalog, next, &metrics);
    let snap = catalog.load();
    // Where the time went: waiting (for the store's parts, or for their decoding), adding
    // them as they came, and making the maps at the end.
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    tracing::info!(target: "tern::catalog", apps = snap.app_count(), machines = snap.machine_count(),
        certificates = snap.cert_count(), took_ms = ms(started.elapsed()), waiting_ms = ms(waited),
        adding_ms = ms(read.saturating_sub(waited)), building_ms = ms(started.elapsed() - read), "catalog loaded");
    drop(snap);
    Ok(tokio::spawn(async move {
        follow(catalog, rib, metrics, sub, cursor, &mut shutdown, feed).await;
    }))
}

/// The first snapshot, into `build`. Its parts are decoded on a blocking thread, each while
/// the part before it is added here: boot has nothing else to do, and a small node's second
/// core (the store's reader is mostly waiting) halves the time. Returns the cursor and how
/// long this waited for the store and the decoding.
async fn first_snapshot(
    sub: &mut Subscription,
    build: &mut Build,
    metrics: &Metrics,
) -> Result<(Cursor, Duration), RibError> {
    let mut decoding: Option<Decoding> = None;
    let mut spare: Option<Vec<Decoded>> = None;
    let mut waited = Duration::ZERO;
    loop {
        let asked = tokio::time::Instant::now();
        let event = sub.next().await;
        waited += asked.elapsed();
        match event {
            Some(Ok(RibEvent::Live)) => {}
            Some(Ok(RibEvent::SnapshotPart(rows))) => {
                build.reserve(rows.expected());
                let mut out = spare.take().unwrap_or_default();
                let next = tokio::task::spawn_blocking(move || {
                    decode_part(&rows, &mut out);
                    (out, rows)
                });
                if let Some(part) = decoding.replace(next) {
                    spare = Some(add_part(part, build, sub, &mut waited, metrics).await?);
                }
            }
            Some(Ok(RibEvent::Snapshot { records, cursor, .. })) => {
                if let Some(part) = decoding.take() {
                    add_part(part, build, sub, &mut waited, metrics).await?;
                }
                build.add(records.iter().map(|r| (r.table, r.key.as_str(), r.body.as_str())), metrics);
                return Ok((cursor, waited));
            }
            Some(Ok(RibEvent::Changes { .. })) => {
                return Err(RibError::Other("the RIB sent changes before a snapshot".into()));
            }
            Some(Err(e)) => return Err(e),
            None => return Err(RibError::Other("the RIB closed the subscription".into())),
        }
    }
}

type Decoding = JoinHandle<(Vec<Decoded>, Rows)>;

/// Adds a part once decoded, hands its buffer back to the store, and returns the emptied
/// list of decoded rows for the next part.
async fn add_part(
    part: Decoding,
    build: &mut Build,
    sub: &Subscription,
    waited: &mut Duration,
    metrics: &Metrics,
) -> Result<Vec<Decoded>, RibError> {
    let asked = tokio::time::Instant::now();
    let (mut decoded, rows) = part.await.map_err(|e| RibError::Other(format!("decoding the RIB: {e}")))?;
    *waited += asked.elapsed();
    build.add_decoded(decoded.drain(..), metrics);
    sub.give_back(rows);
    Ok(decoded)
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
    let mut link = Link::new(&metrics);
    // The parts of a snapshot whose last event has not come yet.
    let mut parts: Vec<Record> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            // Only while the RIB is lost is there an age to keep up to date; a node following
            // it is not woken for nothing.
            _ = tick.tick(), if !link.connected => {
                link.age(&metrics);
                continue;
            }
            e = sub.next() => e,
        };
        link.hear(&event, &catalog, &metrics);
        if let Some(Ok(RibEvent::SnapshotPart(rows))) = event {
            parts.extend(rows.to_records());
            sub.give_back(rows);
            continue;
        }
        // Anything else ends the parts: with them, a snapshot; else they were abandoned.
        let parts = std::mem::take(&mut parts);
        match event {
            Some(Ok(RibEvent::Live | RibEvent::SnapshotPart(_))) => {}
            Some(Ok(RibEvent::Snapshot { mut records, cursor: c, reason })) => {
                if !parts.is_empty() {
                    records.splice(0..0, parts);
                }
                metrics.rib_resyncs.with_label_values(&[reason.as_str()]).inc();
                resync_to(&catalog, records, &c, (&rib, &metrics, &feed)).await;
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
            Some(Err(e)) if e.is_absent() => {
                metrics.rib_errors.inc();
                tracing::error!(target: "tern::catalog", error = %e,
                    "the RIB is gone; serving the last catalog until it is back");
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

/// A resync: the snapshot diffed against the catalog and applied, published, and told.
async fn resync_to(
    catalog: &Catalog,
    records: Vec<Record>,
    cursor: &Cursor,
    with: (&Arc<dyn Rib>, &Metrics, &Feed),
) {
    let (rib, metrics, feed) = with;
    let prev = catalog.load_full();
    let touched = Touched::of_resync(&prev, &records);
    let next = resync(&prev, records, cursor, rib, metrics).await;
    publish(catalog, next, metrics);
    tell(feed, &touched, &prev, catalog);
    tracing::info!(target: "tern::catalog", "catalog resynchronised from a RIB snapshot");
}

/// Whether the catalog follows the RIB, for `tern_rib_connected` and
/// `tern_rib_staleness_seconds`: any event from the store proves it current as of now; an
/// error or an ended subscription means it may be falling behind from then on.
struct Link {
    last_current: tokio::time::Instant,
    connected: bool,
}

impl Link {
    fn new(metrics: &Metrics) -> Link {
        metrics.rib_connected.set(1);
        metrics.rib_staleness.set(0.0);
        Link { last_current: tokio::time::Instant::now(), connected: true }
    }

    /// What an event from the store says about the link; any answer proves the catalog
    /// current (node liveness is judged against that).
    fn hear(&mut self, event: &Option<Result<RibEvent, RibError>>, catalog: &Catalog, metrics: &Metrics) {
        match event {
            Some(Ok(_)) => {
                let pulse = catalog.load().pulse().clone();
                if !self.connected {
                    pulse.resumed();
                }
                self.up(metrics);
                pulse.beat();
            }
            Some(Err(_)) | None => self.down(metrics),
        }
    }

    fn up(&mut self, metrics: &Metrics) {
        self.last_current = tokio::time::Instant::now();
        if !self.connected {
            tracing::info!(target: "tern::catalog", "following the RIB again");
        }
        self.connected = true;
        metrics.rib_connected.set(1);
        metrics.rib_staleness.set(0.0);
    }

    fn down(&mut self, metrics: &Metrics) {
        self.connected = false;
        metrics.rib_connected.set(0);
        self.age(metrics);
    }

    fn age(&self, metrics: &Metrics) {
        if !self.connected {
            metrics.rib_staleness.set(self.last_current.elapsed().as_secs_f64());
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
/// catalog holds that the snapshot lacks is removed. Returns the rows that did not decode
/// and that the catalog held no version of.
pub fn apply_snapshot(
    current: &Snapshot,
    records: Vec<Record>,
    metrics: &Metrics,
) -> (Snapshot, Vec<(Table, DecodeError)>) {
    let mut next = current.clone();
    let present: HashSet<_> = records.iter().map(|r| (r.table, r.key.clone())).collect();
    next.retain_only(&present);
    let mut unserved = Vec::new();
    for r in records {
        if let Err(e) = apply_row(&mut next, r.table, &r.key, Some(&r.body), metrics) {
            unserved.push((r.table, e));
        }
    }
    (next, unserved)
}

/// [`apply_snapshot`], then the last good version from the RIB's history for each bad row
/// the catalog held nothing for.
async fn resync(
    current: &Snapshot,
    records: Vec<Record>,
    cursor: &Cursor,
    rib: &Arc<dyn Rib>,
    metrics: &Metrics,
) -> Snapshot {
    let (next, unserved) = apply_snapshot(current, records, metrics);
    keep_last_good(next, unserved, cursor, rib, metrics).await
}

/// `next`, with the last good version from the RIB's history (up to `cursor`) of each row of
/// `unserved` that has one; the others are logged as skipped.
async fn keep_last_good(
    mut next: Snapshot,
    unserved: Vec<(Table, DecodeError)>,
    cursor: &Cursor,
    rib: &Arc<dyn Rib>,
    metrics: &Metrics,
) -> Snapshot {
    if unserved.is_empty() {
        return next;
    }
    let (rib, base, upto) = (rib.clone(), next.clone(), cursor.clone());
    let keys: Vec<(Table, String)> = unserved.iter().map(|(t, e)| (*t, e.key.clone())).collect();
    let found = tokio::task::spawn_blocking(move || last_good(&*rib, &base, &upto, &keys)).await;
    let found = match found {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            metrics.rib_errors.inc();
            tracing::error!(target: "tern::catalog", error = %e, "reading the RIB's history failed");
            Vec::new()
        }
        Err(e) => {
            tracing::error!(target: "tern::catalog", error = %e, "reading the RIB's history failed");
            Vec::new()
        }
    };
    let mut found: std::collections::HashMap<_, _> = found.into_iter().map(|(t, k, e)| ((t, k), e)).collect();
    for (table, e) in unserved {
        let (table_name, key, reason) = (table.as_str(), &e.key, &e.reason);
        if let Some(event) = found.remove(&(table, e.key.clone())) {
            next.apply(event);
            metrics.rib_rows_kept.with_label_values(&[table_name]).inc();
            tracing::warn!(target: "tern::catalog", table = table_name, key, reason,
                "RIB row does not decode; serving its last good version from the RIB's history");
        } else {
            tracing::warn!(target: "tern::catalog", table = table_name, key, reason,
                "RIB row does not decode and has no earlier good version; skipped");
        }
    }
    next
}

/// For each of `unserved`, the newest body at or before `upto` that decodes, unless the row
/// was deleted after it: exactly what a proxy running all along would hold.
fn last_good(
    rib: &dyn Rib,
    base: &Snapshot,
    upto: &Cursor,
    unserved: &[(Table, String)],
) -> Result<Vec<(Table, String, Event)>, RibError> {
    let mut pending: HashSet<(Table, String)> = unserved.iter().cloned().collect();
    let mut found = Vec::new();
    rib.look_back(upto, unserved, &mut |c: Change| {
        let row = (c.table, c.key);
        if !pending.contains(&row) {
            return true;
        }
        match c.body {
            // Deleted since: nothing before the deletion may come back.
            None => {
                pending.remove(&row);
            }
            Some(body) => {
                if let Ok(Some(event)) = decode(base, row.0, &row.1, Some(&body)) {
                    pending.remove(&row);
                    found.push((row.0, row.1, event));
                }
            }
        }
        !pending.is_empty()
    })?;
    Ok(found)
}

/// Applies a batch of changes in commit order.
pub fn apply_changes(current: &Snapshot, changes: Vec<Change>, metrics: &Metrics) -> Snapshot {
    let mut next = current.clone();
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    for c in &changes {
        if let Err(e) = apply_row(&mut next, c.table, &c.key, c.body.as_deref(), metrics) {
            tracing::warn!(target: "tern::catalog", table = c.table.as_str(), key = %c.key, reason = %e.reason,
                "RIB row does not decode and the catalog holds no earlier version; skipped");
        }
        let lag_ms = (now_ms - c.committed_at_ms).max(0);
        metrics.catalog_apply_lag.observe(lag_ms as f64 / 1000.0);
    }
    metrics.catalog_changes.inc_by(changes.len() as u64);
    next
}

/// Applies one row. A row that does not decode is counted and skipped; if the catalog holds
/// a version of it, that version keeps serving (logged here); if not, the error is returned
/// and the caller says what becomes of the row.
fn apply_row(
    next: &mut Snapshot,
    table: Table,
    key: &str,
    body: Option<&str>,
    metrics: &Metrics,
) -> Result<(), DecodeError> {
    match decode(next, table, key, body) {
        Ok(Some(event)) => next.apply(event),
        Ok(None) => {}
        Err(e) => {
            metrics.rib_rows_skipped.with_label_values(&[table.as_str()]).inc();
            if !next.holds(table, key) {
                return Err(e);
            }
            metrics.rib_rows_kept.with_label_values(&[table.as_str()]).inc();
            tracing::warn!(target: "tern::catalog", table = table.as_str(), key, reason = %e.reason,
                "RIB row does not decode; its last good version keeps serving, the rest applies");
        }
    }
    Ok(())
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
        let (first, _) = apply_snapshot(&Snapshot::default(), vec![a.clone(), b], &metrics);
        let a_entry = first.app("a").unwrap().clone();
        let (second, _) = apply_snapshot(&first, vec![a], &metrics);
        assert!(second.route("b.test").is_none());
        // An unchanged row is not re-applied: the entry is the very same allocation.
        assert!(Arc::ptr_eq(&a_entry, second.app("a").unwrap()));
    }

    /// The catalog a proxy loads from a RIB that `write` made, with its metrics (and the
    /// directory that must outlive them).
    async fn load(
        write: impl FnOnce(&crate::rib::sqlite::Tx<'_>) -> Result<(), RibError>,
    ) -> (Arc<Catalog>, Arc<Metrics>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rib.db");
        crate::rib::sqlite::Store::open(&path).unwrap().transact(write).unwrap();
        let rib = crate::rib::sqlite::SqliteRib::open(&path, Duration::from_millis(5)).unwrap();
        let (catalog, metrics) = (Arc::new(Catalog::new()), Arc::new(Metrics::new()));
        let (_stop, rx) = watch::channel(false);
        let (feed, _) = tokio::sync::mpsc::unbounded_channel();
        start(catalog.clone(), Arc::new(rib), metrics.clone(), rx, feed).await.unwrap();
        (catalog, metrics, dir)
    }

    fn app(name: &str, host: &str) -> Record {
        let body = format!(r#"{{"name":"{name}","hostnames":["{host}"]}}"#);
        Record { table: Table::Apps, key: name.into(), body }
    }

    fn bad(name: &str) -> Record {
        Record { table: Table::Apps, key: name.into(), body: "{not json".into() }
    }

    #[tokio::test]
    async fn at_start_a_bad_row_serves_its_newest_good_version_from_the_history() {
        let (catalog, metrics, _dir) = load(|tx| {
            tx.put(&app("a", "one.test"))?;
            tx.put(&app("a", "two.test"))?;
            tx.put(&bad("a"))?;
            tx.put(&Record { body: "{still not json".into(), ..bad("a") })?;
            tx.put(&app("ok", "ok.test"))
        })
        .await;
        let snap = catalog.load();
        assert_eq!(snap.route("two.test").map(|a| &*a.name), Some("a"), "the newest good version serves");
        assert!(snap.route("one.test").is_none());
        assert!(snap.route("ok.test").is_some());
        assert_eq!(metrics.rib_rows_skipped.with_label_values(&["apps"]).get(), 1);
        assert_eq!(metrics.rib_rows_kept.with_label_values(&["apps"]).get(), 1);
    }

    #[tokio::test]
    async fn a_snapshot_in_parts_loads_whole_and_a_bad_row_among_them_keeps_its_last_good_version() {
        let machine = |i: usize| {
            let body = format!(r#"{{"id":"m{i}","app":"app{i}","addr":"127.0.0.1","state":"started"}}"#);
            Record { table: Table::Machines, key: format!("m{i}"), body }
        };
        let (catalog, metrics, _dir) = load(|tx| {
            for i in 0..8 {
                tx.put(&app(&format!("app{i}"), &format!("app{i}.test")))?;
                tx.put(&machine(i))?;
            }
            tx.put(&bad("app3"))
        })
        .await;
        let snap = catalog.load();
        assert_eq!((snap.app_count(), snap.machine_count()), (8, 8));
        for i in 0..8 {
            let entry = snap.route(&format!("app{i}.test")).expect("routed");
            assert_eq!(entry.machines.len(), 1);
            assert_eq!(entry.machines[0].addr.port(), 8080, "the app's internal_port");
        }
        assert_eq!(metrics.rib_rows_skipped.with_label_values(&["apps"]).get(), 1);
        assert_eq!(metrics.rib_rows_kept.with_label_values(&["apps"]).get(), 1);
        assert_eq!(snap.delta_len(), 1, "only the row from history, on top of compact maps");
    }

    #[tokio::test]
    async fn a_resync_in_parts_replaces_the_catalog_with_the_new_files_rows() {
        use crate::rib::sqlite::Store;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rib.db");
        let apps = |names: &[&str]| {
            let rows: Vec<Record> = names.iter().map(|n| app(n, &format!("{n}.test"))).collect();
            move |tx: &crate::rib::sqlite::Tx<'_>| rows.iter().try_for_each(|r| tx.put(r))
        };
        Store::open(&path).unwrap().transact(apps(&["old0", "old1", "old2", "old3"])).unwrap();
        let rib = crate::rib::sqlite::SqliteRib::open(&path, Duration::from_secs(3600)).unwrap();
        let (catalog, metrics) = (Arc::new(Catalog::new()), Arc::new(Metrics::new()));
        let (_stop, rx) = watch::channel(false);
        let (feed, mut told) = tokio::sync::mpsc::unbounded_channel();
        start(catalog.clone(), Arc::new(rib), metrics.clone(), rx, feed).await.unwrap();
        // Another file renamed over the RIB (its log removed first: docs/rib.md).
        let other = dir.path().join("new.db");
        Store::open(&other)
            .unwrap()
            .transact(apps(&["old1", "new0", "new1", "new2", "new3", "new4"]))
            .unwrap();
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        std::fs::rename(&other, &path).unwrap();
        let changes = tokio::time::timeout(Duration::from_secs(10), told.recv()).await.unwrap().unwrap();
        assert_eq!(changes.removed_apps.len(), 3, "old0, old2 and old3: {changes:?}");
        let snap = catalog.load();
        let mut names: Vec<String> = snap.apps().map(|a| a.name.to_string()).collect();
        names.sort();
        assert_eq!(names, ["new0", "new1", "new2", "new3", "new4", "old1"]);
        assert!(snap.route("old0.test").is_none() && snap.route("new4.test").is_some());
        assert_eq!(metrics.rib_resyncs.with_label_values(&["replaced"]).get(), 1);
    }

    #[tokio::test]
    async fn nothing_from_before_a_deletion_comes_back() {
        let (catalog, metrics, _dir) = load(|tx| {
            tx.put(&app("a", "old.test"))?;
            tx.delete(Table::Apps, "a")?;
            tx.put(&bad("a"))
        })
        .await;
        assert!(catalog.load().app("a").is_none(), "a proxy running all along would not serve it either");
        assert_eq!(metrics.rib_rows_skipped.with_label_values(&["apps"]).get(), 1);
        assert_eq!(metrics.rib_rows_kept.with_label_values(&["apps"]).get(), 0);
    }

    #[tokio::test]
    async fn a_bad_machine_keeps_its_last_good_version_at_start_too() {
        let (catalog, _, _dir) = load(|tx| {
            tx.put(&app("a", "a.test"))?;
            let m = r#"{"id":"m","app":"a","addr":"127.0.0.1:1","state":"started"}"#;
            tx.put(&Record { table: Table::Machines, key: "m".into(), body: m.into() })?;
            tx.put(&Record { table: Table::Machines, key: "m".into(), body: r#"{"id":"m"}"#.into() })
        })
        .await;
        let snap = catalog.load();
        assert_eq!(snap.route("a.test").unwrap().machines.len(), 1);
    }
}
