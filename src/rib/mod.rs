//! The RIB: the state store that holds apps, machines, certificates and the session keys
//! every node seals session tokens with (so the store holds secrets).
//!
//! The catalog is fed through [`Rib::subscribe`]: one full snapshot, then a stream of
//! changes that can be resumed from a [`Cursor`]. A store that cannot resume from a cursor
//! (it compacted its log, or it was replaced) sends a fresh snapshot instead, and the
//! catalog diffs it against what it holds. The RIB moves opaque JSON bodies; decoding them
//! is the catalog's job, so a bad row is skipped there without stopping the stream, and
//! the last good version of it (in the catalog, or found by [`Rib::look_back`]) serves on.
//!
//! SQLite is the embedded default; fleets follow a distributed store through the same trait:
//! an etcd watch ([`etcd`]) or a Corrosion subscription ([`corrosion`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::model::session_key::SessionKeyRow;

pub mod corrosion;
pub mod etcd;
pub mod sqlite;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Apps,
    Machines,
    Certificates,
    /// Machines' lifecycle states as recorded by the node managing them, apart from their
    /// declarations so that `tern apply` and lifecycle changes never overwrite each other.
    MachineStates,
    /// The keys sealed session tokens are made with, by id; written only through
    /// [`Rib::ensure_session_key`] and [`Rib::rotate_session_key`], never by `tern apply`.
    SessionKeys,
    /// The fleet's nodes, each rewriting its own row every heartbeat ([`crate::model::NodeRow`]);
    /// written only by the nodes themselves, never by `tern apply`.
    Nodes,
    /// Organisations and their private networks ([`crate::model::OrgSpec`]), by name.
    Orgs,
}

impl Table {
    /// In the order a snapshot lists them (nodes before the machines they own, machines
    /// before their states).
    pub const ALL: [Table; 7] = [
        Table::Nodes,
        Table::Orgs,
        Table::Apps,
        Table::Machines,
        Table::Certificates,
        Table::MachineStates,
        Table::SessionKeys,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Table::Apps => "apps",
            Table::Machines => "machines",
            Table::Certificates => "certificates",
            Table::MachineStates => "machine_states",
            Table::SessionKeys => "session_keys",
            Table::Nodes => "nodes",
            Table::Orgs => "orgs",
        }
    }

    pub fn parse(s: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// How a distributed store's subscription keeps itself honest: a stream can stay open and
/// say nothing while its peer is gone, so a quiet one is probed.
#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    /// A stream quiet this long is probed (etcd: a progress request; Corrosion: its health).
    pub probe_after: Duration,
    /// A probe unanswered this long means the stream is dead.
    pub probe_timeout: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness { probe_after: Duration::from_secs(5), probe_timeout: Duration::from_secs(3) }
    }
}

/// The runtime a distributed store's client runs on, owned by its RIB: the catalog's
/// subscription and the blocking callers (`tern apply`, lifecycle writes from blocking
/// threads) share it, whatever runtime (if any) they are on themselves. Shut down without
/// waiting when the RIB goes, since dropping a runtime inside another one would panic.
pub(crate) struct ClientRuntime(Option<tokio::runtime::Runtime>, crate::watchdog::Parking);

impl ClientRuntime {
    /// One worker thread named `name`: a store client does little work, mostly waiting.
    pub(crate) fn new(name: &str) -> Result<ClientRuntime, RibError> {
        let parking = crate::watchdog::Parking::default();
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(1).thread_name(name).enable_all();
        let rt = parking
            .install(&mut builder)
            .build()
            .map_err(|e| RibError::Other(format!("starting the runtime {name}: {e}")))?;
        Ok(ClientRuntime(Some(rt), parking))
    }

    pub(crate) fn get(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("the runtime lives as long as the RIB")
    }

    /// For [`Rib::client_runtime`]: its handle, and whether its one worker is parked.
    pub(crate) fn watched(&self) -> (tokio::runtime::Handle, crate::watchdog::Parking) {
        (self.get().handle().clone(), self.1.clone())
    }
}

impl Drop for ClientRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// One row: its table, its key (app name, machine id, hostname) and its JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub table: Table,
    pub key: String,
    pub body: String,
}

/// Rows packed together: every key and body in one buffer, each row a table and two ranges
/// of it. A snapshot of millions of rows moves from the store's thread to the catalog's in
/// parts of this form: two allocations a part, rather than two a row allocated on one thread
/// and freed on the other.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rows {
    text: String,
    /// (table, where the key ends, where the body ends); each starts where the one before
    /// it ended.
    rows: Vec<(Table, u32, u32)>,
    /// On a snapshot's first part: about how many rows each table holds, for the receiver to
    /// size its maps once instead of growing them (a hint: it may be off either way).
    sizes: Vec<(Table, usize)>,
}

impl Rows {
    pub fn with_capacity(rows: usize, text: usize) -> Rows {
        Rows { text: String::with_capacity(text), rows: Vec::with_capacity(rows), sizes: Vec::new() }
    }

    /// Empty, keeping its room (to be filled again: see [`Subscription::give_back`]).
    pub fn clear(&mut self) {
        self.text.clear();
        self.rows.clear();
        self.sizes.clear();
    }

    /// Says about how many rows `table` holds in the whole snapshot.
    pub fn expect(&mut self, table: Table, rows: usize) {
        self.sizes.push((table, rows));
    }

    /// The sizes the store announced, if this is a first part that has them.
    pub fn expected(&self) -> &[(Table, usize)] {
        &self.sizes
    }

    pub fn push(&mut self, table: Table, key: &str, body: &str) {
        self.text.push_str(key);
        let key_end = self.end();
        self.text.push_str(body);
        let body_end = self.end();
        self.rows.push((table, key_end, body_end));
    }

    fn end(&self) -> u32 {
        // A part is far below 4 GiB (the store sends one every few megabytes).
        u32::try_from(self.text.len()).unwrap_or(u32::MAX)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Bytes of keys and bodies held.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }

    /// Each row: its table, key and body.
    pub fn iter(&self) -> impl Iterator<Item = (Table, &str, &str)> {
        let mut start = 0usize;
        self.rows.iter().map(move |&(table, key_end, body_end)| {
            let (k, b) = (key_end as usize, body_end as usize);
            let key = self.text.get(start..k).unwrap_or_default();
            let body = self.text.get(k..b).unwrap_or_default();
            start = b;
            (table, key, body)
        })
    }

    /// As separate records (a resync diffs those).
    pub fn to_records(&self) -> Vec<Record> {
        self.iter().map(|(table, key, body)| Record { table, key: key.into(), body: body.into() }).collect()
    }
}

/// A committed change to one row. `body` is `None` when the row was deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub table: Table,
    pub key: String,
    pub body: Option<String>,
    /// When the change was committed, in milliseconds since the Unix epoch.
    pub committed_at_ms: i64,
}

/// Where a subscriber is in the store's change stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// Identifies the store's history; a cursor from another history cannot resume.
    pub epoch: String,
    pub seq: i64,
}

/// Why a store sent a snapshot: at the start, or because it could no longer prove that the
/// changes it sent were all the changes (then the catalog is diffed against it: a resync).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resync {
    /// The first snapshot of a subscription.
    Start,
    /// The store dropped the history the cursor needed (etcd compaction, SQLite's log trim).
    Compacted,
    /// Change ids skipped one (a Corrosion subscription).
    Gap,
    /// The store said in the stream that it cannot go on (Corrosion's `{"error":…}`).
    StreamError,
    /// The subscription is gone from the store (unknown id after a reconnect).
    Lost,
    /// The store is another store now (another etcd cluster, the SQLite file replaced).
    Replaced,
}

impl Resync {
    /// The `reason` label of `tern_rib_resyncs_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Resync::Start => "start",
            Resync::Compacted => "compacted",
            Resync::Gap => "gap",
            Resync::StreamError => "stream_error",
            Resync::Lost => "lost",
            Resync::Replaced => "replaced",
        }
    }
}

#[derive(Debug)]
pub enum RibEvent {
    /// The first rows of a snapshot too big to send in one event: the [`RibEvent::Snapshot`]
    /// that follows (after any number of parts) holds the rest. A subscriber may decode the
    /// rows as they come, but the snapshot is only complete (and says what was deleted) with
    /// its last event; anything but another part before it means the snapshot was abandoned
    /// (the store then starts a new one).
    SnapshotPart(Rows),
    /// Everything the store holds as of `cursor` (with the parts sent just before it, if
    /// any); anything the subscriber holds that is not here was deleted.
    Snapshot { records: Vec<Record>, cursor: Cursor, reason: Resync },
    /// Changes after the previous event, in commit order.
    Changes { changes: Vec<Change>, cursor: Cursor },
    /// The store just proved the subscription current (a liveness probe answered, a
    /// stream re-established): nothing changed that the subscriber has not been sent.
    Live,
}

#[derive(Debug, thiserror::Error)]
pub enum RibError {
    #[error("RIB database {path}: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    /// The store's file is gone (deleted or moved away). Nothing is created in its place:
    /// an empty RIB would empty the catalog.
    #[error("RIB database {path} is missing (deleted or moved)")]
    Missing { path: String },
    /// The file exists but holds no RIB yet (a writer is creating it, or it is not ours).
    #[error("{path} holds no RIB (no tern schema)")]
    NoSchema { path: String },
    #[error("RIB: {0}")]
    Other(String),
    /// The RIB's path holds something tern cannot use as its database.
    #[error("the RIB at {path} {reason}")]
    Unusable { path: String, reason: String },
}

impl RibError {
    /// Whether the store is absent rather than failing: the catalog keeps serving what it
    /// holds and the store watches for it to come back.
    pub fn is_absent(&self) -> bool {
        matches!(self, RibError::Missing { .. } | RibError::NoSchema { .. })
    }
}

/// A stream of RIB events. Errors are reported and the store retries by itself; the stream
/// ends only when the store gives up or the subscription is dropped.
pub struct Subscription {
    rx: mpsc::Receiver<Result<RibEvent, RibError>>,
    /// Kept for as long as the subscription, and dropped with it: how a store's follower
    /// that sleeps on something other than the channel hears that nobody listens any more.
    _held: Option<Box<dyn Send + Sync>>,
    spare: Option<Arc<SpareRows>>,
}

/// Snapshot parts read, emptied and handed back for the store to fill again: a snapshot of
/// millions of rows then moves through the same few buffers instead of a fresh one a part
/// (each freshly touched page costs; the allocator returns freed ones to the system).
pub struct SpareRows(crate::watchdog::lock::Mutex<Vec<Rows>>);

impl Default for SpareRows {
    fn default() -> Self {
        SpareRows(crate::watchdog::lock::Mutex::new("rib.spare_rows", Vec::new()))
    }
}

impl SpareRows {
    /// As many as the channel holds, and one each side of it.
    const KEEP: usize = 6;

    /// An emptied part to fill, if one was handed back.
    pub fn take(&self) -> Option<Rows> {
        self.0.lock().pop()
    }

    fn put(&self, mut rows: Rows) {
        rows.clear();
        let mut spare = self.0.lock();
        if spare.len() < Self::KEEP {
            spare.push(rows);
        }
    }
}

impl Subscription {
    pub fn new(rx: mpsc::Receiver<Result<RibEvent, RibError>>) -> Self {
        Subscription { rx, _held: None, spare: None }
    }

    /// The subscription, also keeping `held` until it is dropped.
    #[must_use]
    pub fn holding(mut self, held: Box<dyn Send + Sync>) -> Self {
        self._held = Some(held);
        self
    }

    /// The subscription, taking back the snapshot parts it was sent into `spare`.
    #[must_use]
    pub fn recycling(mut self, spare: Arc<SpareRows>) -> Self {
        self.spare = Some(spare);
        self
    }

    /// A snapshot part the subscriber is done with: the store may fill it again.
    pub fn give_back(&self, rows: Rows) {
        if let Some(spare) = &self.spare {
            spare.put(rows);
        }
    }

    pub async fn next(&mut self) -> Option<Result<RibEvent, RibError>> {
        self.rx.recv().await
    }
}

/// What a rotation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotated {
    /// The new key, which seals from now on.
    pub id: u32,
    /// Keys that sealed until now; they open tokens until `retire_at_ms`.
    pub retired: Vec<u32>,
    pub retire_at_ms: i64,
    /// Keys retired long ago, now deleted.
    pub deleted: Vec<u32>,
}

pub trait Rib: Send + Sync + 'static {
    /// The runtime this store's client runs on, if it has one of its own (etcd, Corrosion),
    /// and whether its thread is parked: the node's watchdog keeps a heartbeat there, so a
    /// wedged client is seen as one rather than only as a catalog growing stale.
    fn client_runtime(&self) -> Option<(tokio::runtime::Handle, crate::watchdog::Parking)> {
        None
    }

    /// Fault injection only (`[debug] faults`): runs `f` while holding the lock this store's
    /// writes go through, if it has one, so a deadlock made with it starves real writes.
    fn hold_for_fault(&self, f: &mut dyn FnMut()) {
        f();
    }

    /// Starts a subscription: changes after `from` if the store can resume there, else a
    /// snapshot first.
    fn subscribe(&self, from: Option<Cursor>) -> Subscription;

    /// Records a machine's lifecycle state (the node that manages the machine writes it),
    /// unless the store already holds a newer version; returns whether it wrote. Blocking:
    /// call it from a blocking thread.
    fn record_state(&self, id: &str, row: &crate::model::StateRow) -> Result<bool, RibError>;

    /// Makes sure the store holds a session key: if it holds none, inserts `fresh` as key 1,
    /// atomically (insert-if-absent), so nodes starting at once on one store end up with one
    /// key. Returns whether it inserted. Either way the caller uses the key the store holds,
    /// as the subscription delivers it, never `fresh` itself: another node's may have won.
    /// Blocking: call it from a blocking thread.
    fn ensure_session_key(&self, fresh: &SessionKeyRow) -> Result<bool, RibError>;

    /// Rotates session keys in one atomic step, as [`plan_rotation`] says: `fresh` becomes
    /// key max + 1 and seals from now on; every key that sealed until now keeps opening
    /// tokens for `grace_ms` after `fresh.created_ms`, then retires; keys retired more than
    /// a day ago are deleted. Blocking: call it from a blocking thread.
    ///
    /// [`plan_rotation`]: crate::model::session_key::plan_rotation
    fn rotate_session_key(&self, fresh: &SessionKeyRow, grace_ms: i64) -> Result<Rotated, RibError>;

    /// Writes this node's heartbeat row (`nodes`), replacing the last. Blocking: call it
    /// from a blocking thread. Stores that cannot hold a fleet refuse.
    fn publish_node(&self, row: &crate::model::NodeRow) -> Result<(), RibError> {
        let _ = row;
        Err(RibError::Other("this RIB kind does not hold fleet nodes".into()))
    }

    /// Deletes a node's heartbeat row (the node is leaving): the others route around it at
    /// once instead of after its heartbeats stop. Blocking.
    fn remove_node(&self, node: &str) -> Result<(), RibError> {
        let _ = node;
        Err(RibError::Other("this RIB kind does not hold fleet nodes".into()))
    }

    /// Visits the earlier changes of `keys` committed at or before `upto`, newest first,
    /// until `visit` returns false. With it the catalog serves the last good version of a
    /// row whose current body does not decode at start and after a resync, as it does at
    /// run time (where it simply keeps what it holds). Blocking: call it from a blocking
    /// thread.
    ///
    /// Optional: a store that keeps no history (or none for `upto`'s epoch) visits nothing,
    /// and such rows are skipped until they are fixed.
    fn look_back(
        &self,
        upto: &Cursor,
        keys: &[(Table, String)],
        visit: &mut dyn FnMut(Change) -> bool,
    ) -> Result<(), RibError> {
        let _ = (upto, keys, visit);
        Ok(())
    }
}
