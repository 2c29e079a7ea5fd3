//! One version of the catalog and its lookups.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};
use std::sync::{Arc, OnceLock};

use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::model::seal::{Keyring, SessionKey};
use crate::model::{AppSpec, CertSpec, MachineSpec, MachineState};
use crate::telemetry::AppSeries;

use super::host_key::HostKey;
use super::layered::Layered;
use super::outlier::Outlier;

/// Live, per-machine state shared by every snapshot that holds the machine: requests in
/// flight, the machine's current lifecycle state, whether its checks pass, when it was last
/// busy, whether failed connects ejected it. Changed by the request path and the lifecycle
/// manager without a new snapshot. Small (72 bytes with its `Arc`): a catalog holds millions.
#[derive(Debug)]
pub struct MachineLive {
    in_flight: AtomicU32,
    /// Requests queued for room on this machine's app (every machine at its hard limit);
    /// while any wait, ending an exchange or the machine becoming routable wakes them.
    queued: AtomicU32,
    /// Of those, the lifecycle manager's own watches (an autostop draining the machine).
    watching: AtomicU32,
    /// False while the machine's health checks fail.
    healthy: AtomicBool,
    /// False while the machine is being stopped or suspended: it takes no new work.
    in_rotation: AtomicBool,
    /// Set once its streams were asked to end, until it starts again.
    streams_ended: AtomicBool,
    /// `version << 8 | state`: the state and the version of the record that set it, so a
    /// late echo of an older record (our own write coming back from the RIB) is ignored.
    state: AtomicU64,
    /// When the machine last finished its last exchange, as [`crate::clock::now_ms`].
    idle_since_ms: AtomicU64,
    /// Passive ejection after failed connects.
    outlier: Outlier,
    /// What queued requests and open streams wait on, made when the first one asks: most
    /// machines of a big catalog never have either.
    waits: OnceLock<Box<Waits>>,
}

/// What a machine's waiters wait on: [`MachineLive::waits`].
#[derive(Debug)]
struct Waits {
    room: tokio::sync::Notify,
    /// What the machine's open streams (SSE responses, WebSockets) wait on to end cleanly
    /// before it stops. Made when the first stream asks.
    streams_end: crate::watchdog::lock::Mutex<Option<CancellationToken>>,
}

impl MachineLive {
    pub fn new(state: MachineState, version: u64) -> Self {
        MachineLive {
            in_flight: AtomicU32::new(0),
            queued: AtomicU32::new(0),
            watching: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            in_rotation: AtomicBool::new(true),
            streams_ended: AtomicBool::new(false),
            state: AtomicU64::new(pack(state, version)),
            idle_since_ms: AtomicU64::new(crate::clock::now_ms()),
            outlier: Outlier::default(),
            waits: OnceLock::new(),
        }
    }

    fn waits(&self) -> &Waits {
        self.waits.get_or_init(|| {
            Box::new(Waits {
                room: tokio::sync::Notify::new(),
                streams_end: crate::watchdog::lock::Mutex::new("machine.streams_end", None),
            })
        })
    }

    /// The token a stream on this machine waits on: cancelled when the machine is about
    /// to stop, asking the stream to end cleanly. Once asked, the machine stays so until it
    /// is started again, so a stream whose response arrives after the request to end (its
    /// request was already in flight) ends as soon as it begins.
    pub fn streams_end(&self) -> CancellationToken {
        let waits = self.waits();
        // Pairs with the fence in `end_streams`: either this sees `streams_ended` set, or
        // that sees `waits` made (and then takes the lock, after or before this holds it).
        fence(Ordering::SeqCst);
        let mut slot = waits.streams_end.lock();
        let token = slot.get_or_insert_with(CancellationToken::new).clone();
        if self.streams_ended.load(Ordering::SeqCst) {
            token.cancel();
        }
        token
    }

    /// Asks every open stream on the machine to end cleanly. Allocates nothing for a
    /// machine without streams (shutdown asks every machine in the catalog).
    pub fn end_streams(&self) {
        self.streams_ended.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if let Some(waits) = self.waits.get() {
            let slot = waits.streams_end.lock();
            if let Some(token) = slot.as_ref() {
                token.cancel();
            }
        }
    }

    /// Streams that begin from now on run until the machine is asked again: it was
    /// started again, or kept after all.
    pub fn resume_streams(&self) {
        match self.waits.get() {
            Some(waits) => {
                let mut slot = waits.streams_end.lock();
                if self.streams_ended.swap(false, Ordering::SeqCst) {
                    *slot = None;
                }
            }
            // No stream ever asked: there is no token to drop.
            None => self.streams_ended.store(false, Ordering::SeqCst),
        }
    }

    /// A machine that starts again takes streams that run until it is asked again, and
    /// is judged afresh: connects that failed before it started say nothing about it now.
    fn started_again(&self, from: MachineState, to: MachineState) {
        if to == MachineState::Started && from != MachineState::Started {
            self.resume_streams();
            self.outlier.clear();
        }
    }

    /// Its passive-ejection state: see [`Outlier`].
    pub fn outlier(&self) -> &Outlier {
        &self.outlier
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one more exchange on the machine until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Like [`begin`](Self::begin), but only while fewer than `limit` exchanges are in
    /// flight, so that concurrent requests never push a machine past its hard limit.
    pub fn try_begin(self: &Arc<Self>, limit: u32) -> Option<InFlight> {
        let mut current = self.in_flight.load(Ordering::SeqCst);
        loop {
            if current >= limit {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(InFlight(self.clone())),
                Err(now) => current = now,
            }
        }
    }

    /// Registers a request queued for room; the guard's `notified` resolves when an
    /// exchange on the machine ends or the machine becomes routable. Check for room after
    /// registering and before awaiting, so no wake-up is lost.
    pub fn queue(self: &Arc<Self>) -> Queued {
        // Made before the count says anyone waits, so a waker that sees the count finds it.
        self.waits();
        self.queued.fetch_add(1, Ordering::SeqCst);
        Queued(self.clone(), false)
    }

    /// Like [`queue`](Self::queue), for the lifecycle manager waiting for the machine's
    /// exchanges to end (not a request waiting for room: see [`has_queued`](Self::has_queued)).
    pub fn watch(self: &Arc<Self>) -> Queued {
        self.waits();
        self.watching.fetch_add(1, Ordering::SeqCst);
        self.queued.fetch_add(1, Ordering::SeqCst);
        Queued(self.clone(), true)
    }

    /// Whether any request is queued for room on this machine's app.
    pub fn has_queued(&self) -> bool {
        self.queued.load(Ordering::SeqCst) > self.watching.load(Ordering::SeqCst)
    }

    /// Wakes requests queued for room, if there are any.
    fn wake_queued(&self) {
        if self.queued.load(Ordering::SeqCst) > 0 {
            if let Some(waits) = self.waits.get() {
                waits.room.notify_waiters();
            }
        }
    }

    pub fn state(&self) -> MachineState {
        unpack(self.state.load(Ordering::Acquire)).0
    }

    pub fn state_version(&self) -> u64 {
        unpack(self.state.load(Ordering::Acquire)).1
    }

    /// Takes `state` if `version` is newer than the one held; returns whether it did.
    pub fn observe(&self, state: MachineState, version: u64) -> bool {
        let newer = |current| (unpack(current).1 < version).then_some(pack(state, version));
        let taken = self.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, newer);
        if let Ok(previous) = taken {
            self.started_again(unpack(previous).0, state);
            self.wake_queued();
        }
        taken.is_ok()
    }

    /// Moves to `state` with the next version, whatever the current one; returns that
    /// version, minted by `node` (a [`node_tag`], or 0 for what every node does alike:
    /// applying a declaration). For the one writer that owns the machine's lifecycle.
    pub fn transition(&self, state: MachineState, node: u64) -> u64 {
        let next = |current| Some(pack(state, next_version(unpack(current).1, node)));
        // The closure always answers Some, so the update always succeeds.
        let previous =
            self.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, next).unwrap_or_else(|v| v);
        self.started_again(unpack(previous).0, state);
        self.wake_queued();
        unpack(previous).1 + 1
    }

    pub fn healthy(&self) -> bool {
        // SeqCst, like `in_rotation`, pairs with `queue`: a request queued for room either
        // sees the machine routable or is woken by the change that made it so.
        self.healthy.load(Ordering::SeqCst)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
        self.wake_queued();
    }

    pub fn in_rotation(&self) -> bool {
        self.in_rotation.load(Ordering::SeqCst)
    }

    pub fn set_in_rotation(&self, yes: bool) {
        self.in_rotation.store(yes, Ordering::SeqCst);
        self.wake_queued();
    }

    /// When the machine's last exchange ended, or `None` while one is in flight.
    pub fn idle_since_ms(&self) -> Option<u64> {
        (self.in_flight() == 0).then(|| self.idle_since_ms.load(Ordering::Relaxed))
    }

    /// Counts as activity now (a wake, a start): the idle window starts over.
    pub fn touch(&self) {
        self.idle_since_ms.store(crate::clock::now_ms(), Ordering::Relaxed);
    }
}

impl Default for MachineLive {
    fn default() -> Self {
        MachineLive::new(MachineState::Stopped, 0)
    }
}

fn pack(state: MachineState, version: u64) -> u64 {
    (version << 8) | u64::from(state.code())
}

fn unpack(v: u64) -> (MachineState, u64) {
    (MachineState::from_code((v & 0xff) as u8), v >> 8)
}

/// Bits of a lifecycle version that name the node that minted it: a version is
/// `counter << NODE_BITS | node`. The counter orders the changes to one machine; the node
/// part keeps two nodes that both change a machine at once (on one RIB) from minting the
/// same version, so every reader settles on the same one of the two. 24 bits leave 32 for
/// the counter (the state takes the lowest 8 of the packed word).
pub const NODE_BITS: u32 = 24;

/// The node part of the versions a node mints: a hash of its name, never 0 (0 is the part
/// of versions every node mints alike, from a declaration).
pub fn node_tag(name: &str) -> u64 {
    // FNV-1a: stable across builds and platforms, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h & ((1 << NODE_BITS) - 1)).max(1)
}

/// The version after `current`, minted by `node`. Versions from before node parts (small
/// counters) have a counter of 0 here, so the next one is still newer.
pub fn next_version(current: u64, node: u64) -> u64 {
    (((current >> NODE_BITS) + 1) << NODE_BITS) | (node & ((1 << NODE_BITS) - 1))
}

/// One exchange in flight on a machine; dropping it ends the exchange.
#[derive(Debug)]
pub struct InFlight(Arc<MachineLive>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // The idle window starts now, before the count says idle: the supervisor must never
        // see "nothing in flight" next to a stale idle_since.
        self.0.touch();
        // SeqCst pairs with `queue`: either the queued request sees the room, or this sees
        // the request queued and wakes it.
        let before = self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        // Every decrement pairs with the increment in `begin`; a wrap means a double drop.
        debug_assert!(before > 0, "in-flight counter underflow");
        self.0.wake_queued();
    }
}

/// A request queued for room on a machine; see [`MachineLive::queue`].
#[derive(Debug)]
pub struct Queued(Arc<MachineLive>, bool);

impl Queued {
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.waits().room.notified()
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::SeqCst);
        if self.1 {
            self.0.watching.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A machine as routing sees it: its record, its resolved address and its live counters.
#[derive(Debug)]
pub struct Machine {
    pub id: Arc<str>,
    pub spec: MachineSpec,
    /// `spec.addr` with the app's internal_port filled in.
    pub addr: SocketAddr,
    pub live: Arc<MachineLive>,
    /// The liveness of the node that owns the machine (`node = …`), if one does.
    pub owner: Option<Arc<NodeLive>>,
}

/// How fresh the catalog is, shared by every snapshot of one catalog: node liveness is
/// judged against it, so while the RIB is unreachable (no heartbeat can arrive) judgments
/// freeze instead of declaring every other node dead.
#[derive(Debug)]
pub struct Pulse {
    /// [`crate::clock::now_ms`] when the catalog was last known to be current with the RIB.
    current_ms: AtomicU64,
    /// When the catalog last came back after losing the RIB: no heartbeat could arrive
    /// before, so every node counts as heard then (none is judged dead for beats it could not
    /// have delivered; the live ones beat again within `dead_after`).
    resumed_ms: AtomicU64,
    /// A node whose heartbeat was last heard longer ago than this is dead.
    dead_after_ms: AtomicU64,
    /// This node's name: its own machines never wait on its heartbeat echoing back.
    local: std::sync::OnceLock<Arc<str>>,
}

impl Default for Pulse {
    fn default() -> Self {
        Pulse {
            current_ms: AtomicU64::new(crate::clock::now_ms()),
            resumed_ms: AtomicU64::new(0),
            dead_after_ms: AtomicU64::new(1_500),
            local: std::sync::OnceLock::new(),
        }
    }
}

impl Pulse {
    /// The catalog is current as of now (the updater heard from the RIB). After a silence
    /// longer than half of `dead_after`, which a fleet whose nodes beat never has unless the
    /// store stalled (an etcd election takes a second or two without a commit), this counts
    /// as the RIB coming back: no node is held to beats it could not write meanwhile.
    pub fn beat(&self) {
        self.beat_at(crate::clock::now_ms());
    }

    fn beat_at(&self, now: u64) {
        let before = self.current_ms.fetch_max(now, Ordering::Relaxed);
        if now.saturating_sub(before) > self.dead_after_ms.load(Ordering::Relaxed) / 2 {
            self.resumed_ms.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// The catalog follows the RIB again after losing it.
    pub fn resumed(&self) {
        self.resumed_ms.fetch_max(crate::clock::now_ms(), Ordering::Relaxed);
    }

    /// Names this node (before the catalog loads: liveness objects made earlier would not
    /// know they are local).
    pub fn set_local(&self, node: &str) {
        let _ = self.local.set(Arc::from(node));
    }

    pub fn set_dead_after(&self, d: std::time::Duration) {
        self.dead_after_ms.store(u64::try_from(d.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// Whether a fleet node is alive, as this node hears its heartbeats. One per node name,
/// kept across snapshots, so the machines a node owns see it change without a new
/// snapshot.
#[derive(Debug)]
pub struct NodeLive {
    /// When the node's last heartbeat was heard ([`crate::clock::now_ms`]); 0: never.
    heard_ms: AtomicU64,
    /// This node itself: alive whatever the RIB says.
    local: AtomicBool,
    pulse: Arc<Pulse>,
}

impl NodeLive {
    fn new(pulse: Arc<Pulse>, name: &str) -> NodeLive {
        let local = pulse.local.get().is_some_and(|l| **l == *name);
        NodeLive { heard_ms: AtomicU64::new(0), local: AtomicBool::new(local), pulse }
    }

    pub fn alive(&self) -> bool {
        if self.local.load(Ordering::Relaxed) {
            return true;
        }
        let heard = self.heard_ms.load(Ordering::Relaxed);
        if heard == 0 {
            return false;
        }
        let heard = heard.max(self.pulse.resumed_ms.load(Ordering::Relaxed));
        let current = self.pulse.current_ms.load(Ordering::Relaxed);
        current.saturating_sub(heard) <= self.pulse.dead_after_ms.load(Ordering::Relaxed)
    }

    /// A heartbeat was heard now.
    pub fn heard(&self) {
        self.heard_ms.store(crate::clock::now_ms().max(1), Ordering::Relaxed);
    }

    /// The node left (its row was deleted): dead from now on, until it beats again.
    pub fn gone(&self) {
        self.heard_ms.store(0, Ordering::Relaxed);
    }
}

/// A fleet node as the catalog knows it: its last row (none while only machines name it)
/// and its liveness.
#[derive(Debug)]
pub struct NodeEntry {
    pub row: Option<crate::model::NodeRow>,
    pub live: Arc<NodeLive>,
}

impl Machine {
    /// The machine's current state: the newest of its declared state, its recorded
    /// lifecycle state and what this node's lifecycle manager did to it.
    pub fn state(&self) -> MachineState {
        self.live.state()
    }

    /// Whether new work may go to the machine: started, passing its checks, in rotation,
    /// and with a known port.
    pub fn routable(&self) -> bool {
        self.live.state() == MachineState::Started
            && self.live.healthy()
            && self.live.in_rotation()
            && self.addr.port() != 0
            && self.owner.as_ref().is_none_or(|o| o.alive())
    }

    pub fn region(&self) -> &str {
        &self.spec.region
    }
}

/// An app as routing sees it: its spec and all its machines (any state), sorted by id.
#[derive(Debug)]
pub struct AppEntry {
    pub name: Arc<str>,
    pub spec: Arc<AppSpec>,
    pub machines: Arc<[Arc<Machine>]>,
    /// Its request-path metric handles, resolved on first use.
    pub series: AppSeries,
}

#[derive(Debug, Clone)]
pub struct CertEntry {
    pub spec: CertSpec,
    pub key: Arc<CertifiedKey>,
    pub names: Vec<String>,
    pub not_after: i64,
}

/// One immutable version of the catalog. Cloning is O(1): every map is a [`Layered`] map.
#[derive(Clone, Default)]
pub struct Snapshot {
    /// Counts applied events; stamps delta entries so compactions can be rebased.
    pub(super) generation: u64,
    /// The generation of the compaction the bases came from.
    pub(super) base_at: u64,
    pub(super) apps: Layered<Arc<str>, Arc<AppEntry>>,
    /// Exact hostname → app.
    pub(super) hosts: Layered<HostKey, Arc<AppEntry>>,
    /// Wildcard hostnames by the part after "*." → app.
    pub(super) wild_hosts: Layered<HostKey, Arc<AppEntry>>,
    /// Every machine by id, including those whose app is not (yet) in the catalog.
    pub(super) machines: Layered<Arc<str>, Arc<Machine>>,
    /// Machine ids per app name, sorted. A small slice rather than a nested map: apps have
    /// few machines, and a persistent map node costs a fixed chunk per app.
    pub(super) app_machines: Layered<Arc<str>, Arc<[Arc<str>]>>,
    pub(super) certs: Layered<Arc<str>, Arc<CertEntry>>,
    pub(super) wild_certs: Layered<Arc<str>, Arc<CertEntry>>,
    /// Recorded lifecycle states (the RIB's `machine_states`) by machine id, kept apart
    /// from the machines so a state that arrives before its machine is not lost.
    pub(super) states: Layered<Arc<str>, StateRecord>,
    /// The RIB's `session_keys` by id. A handful at most, so a plain map replaced whole on
    /// change rather than a layered one.
    pub(super) session_keys: Arc<std::collections::BTreeMap<u32, SessionKey>>,
    /// `session_keys` prepared for sealing and opening, rebuilt whenever they change.
    pub(super) keyring: Arc<Keyring>,
    /// The fleet's nodes by name (a handful: replaced whole on change).
    pub(super) nodes: Arc<std::collections::BTreeMap<Arc<str>, Arc<NodeEntry>>>,
    pub(super) pulse: Arc<Pulse>,
    /// Organisations by name (few: replaced whole on change).
    pub(super) orgs: Arc<std::collections::BTreeMap<Arc<str>, Arc<crate::model::OrgSpec>>>,
    /// Private (Flycast) address → the app that declares it. Replaced whole when an app's
    /// private addresses change, which is rare (an app's addresses are set when it is made).
    pub(super) private: Arc<std::collections::HashMap<std::net::IpAddr, Arc<str>>>,
    /// (Dedicated address, public port) → the app whose TCP service is reached there; kept
    /// like `private`.
    pub(super) tcp: Arc<std::collections::HashMap<(std::net::IpAddr, u16), Arc<str>>>,
}

/// A machine's recorded lifecycle state and the version of the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateRecord {
    pub state: MachineState,
    pub version: u64,
}

impl Snapshot {
    /// The app serving a normalised hostname (lower-case, no port, no trailing dot): the
    /// exact name first, then the wildcard one label up.
    pub fn route(&self, host: &str) -> Option<&Arc<AppEntry>> {
        self.hosts.get(host.as_bytes()).or_else(|| {
            let (_, parent) = host.split_once('.')?;
            self.wild_hosts.get(parent.as_bytes())
        })
    }

    /// The certificate for a normalised SNI name: exact first, then wildcard.
    /// The app a private listener serves on `addr` (a connection's destination), in its
    /// IPv4 form if it is an IPv4-mapped IPv6 address (a dual-stack listener's view).
    pub fn private_app(&self, addr: std::net::IpAddr) -> Option<&Arc<AppEntry>> {
        let addr = match addr {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, std::net::IpAddr::V4),
            v4 => v4,
        };
        self.private.get(&addr).and_then(|name| self.apps.get(name))
    }

    /// The app whose TCP service a connection to `addr` (its destination) is for, on a
    /// dedicated address.
    pub fn tcp_app(&self, addr: std::net::SocketAddr) -> Option<&Arc<AppEntry>> {
        let ip = match addr.ip() {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr.ip(), std::net::IpAddr::V4),
            v4 => v4,
        };
        self.tcp.get(&(ip, addr.port())).and_then(|name| self.apps.get(name))
    }

    /// An organisation by name.
    pub fn org(&self, name: &str) -> Option<&Arc<crate::model::OrgSpec>> {
        self.orgs.get(name)
    }

    pub fn cert_for(&self, name: &str) -> Option<&Arc<CertEntry>> {
        self.certs.get(name).or_else(|| {
            let (_, parent) = name.split_once('.')?;
            self.wild_certs.get(parent)
        })
    }

    pub fn app(&self, name: &str) -> Option<&Arc<AppEntry>> {
        self.apps.get(name)
    }

    pub fn machine(&self, id: &str) -> Option<&Arc<Machine>> {
        self.machines.get(id)
    }

    /// How many batches of changes built this snapshot: for diagnostics.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn app_count(&self) -> usize {
        self.apps.len()
    }

    pub fn machine_count(&self) -> usize {
        self.machines.len()
    }

    pub fn cert_count(&self) -> usize {
        self.certs.len() + self.wild_certs.len()
    }

    pub fn apps(&self) -> impl Iterator<Item = &Arc<AppEntry>> {
        self.apps.values()
    }

    /// The keyring session tokens are sealed and opened with: every session key the RIB
    /// holds, prepared. Empty until the first key arrives from the RIB.
    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }

    /// The session keys as the RIB holds them, by id (for the admin API: show no secrets).
    pub fn session_keys(&self) -> impl Iterator<Item = &SessionKey> {
        self.session_keys.values()
    }

    /// The fleet's nodes as heard from the RIB (and those only named by machines).
    pub fn nodes(&self) -> impl Iterator<Item = &Arc<NodeEntry>> {
        self.nodes.values()
    }

    pub fn node(&self, name: &str) -> Option<&Arc<NodeEntry>> {
        self.nodes.get(name)
    }

    /// How fresh this catalog is (shared by all its snapshots).
    pub fn pulse(&self) -> &Arc<Pulse> {
        &self.pulse
    }

    /// The liveness of node `name`, made (never heard) if no row or machine named it yet.
    pub(super) fn node_live(&mut self, name: &str) -> Arc<NodeLive> {
        if let Some(n) = self.nodes.get(name) {
            return n.live.clone();
        }
        let live = Arc::new(NodeLive::new(self.pulse.clone(), name));
        let entry = Arc::new(NodeEntry { row: None, live: live.clone() });
        Arc::make_mut(&mut self.nodes).insert(Arc::from(name), entry);
        live
    }

    /// The recorded lifecycle state of a machine, if any was recorded.
    pub fn recorded_state(&self, id: &str) -> Option<StateRecord> {
        self.states.get(id).copied()
    }

    pub(super) fn delta_len(&self) -> usize {
        [
            self.apps.delta_len(),
            self.hosts.delta_len(),
            self.wild_hosts.delta_len(),
            self.machines.delta_len(),
            self.app_machines.delta_len(),
            self.certs.delta_len(),
            self.wild_certs.delta_len(),
            self.states.delta_len(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }

    /// Whether enough changes have piled up in the deltas to fold them into the bases. The
    /// bound keeps every delta small (so lookups and changes stay cheap) while spacing out
    /// the O(n) compactions (a fraction of the catalog's size, at most 4096 changes).
    pub fn needs_compaction(&self) -> bool {
        let delta = self.delta_len();
        let size = self.apps.len() + self.machines.len();
        delta >= 4096 || (delta >= 512 && delta * 8 >= size)
    }

    /// The bases with every delta folded in. O(n): run it off the request and apply paths.
    pub fn compact(&self) -> Compacted {
        Compacted {
            at: self.generation,
            apps: self.apps.compacted(),
            hosts: self.hosts.compacted(),
            wild_hosts: self.wild_hosts.compacted(),
            machines: self.machines.compacted(),
            app_machines: self.app_machines.compacted(),
            certs: self.certs.compacted(),
            wild_certs: self.wild_certs.compacted(),
            states: self.states.compacted(),
        }
    }

    /// This snapshot on top of a compaction of an earlier one: the result holds the same
    /// entries, with only the changes made since the compaction left in the deltas.
    pub fn rebase(&self, c: &Compacted) -> Snapshot {
        debug_assert!(
            c.at <= self.generation,
            "a compaction of a later snapshot cannot be rebased onto an earlier one"
        );
        // Its bases lack what the bases in use folded in after it, and the deltas no longer
        // hold those changes: they would be lost.
        debug_assert!(c.at >= self.base_at, "a compaction older than the one in use cannot be rebased onto");
        Snapshot {
            generation: self.generation,
            base_at: c.at,
            apps: self.apps.rebase(c.apps.clone(), c.at),
            hosts: self.hosts.rebase(c.hosts.clone(), c.at),
            wild_hosts: self.wild_hosts.rebase(c.wild_hosts.clone(), c.at),
            machines: self.machines.rebase(c.machines.clone(), c.at),
            app_machines: self.app_machines.rebase(c.app_machines.clone(), c.at),
            certs: self.certs.rebase(c.certs.clone(), c.at),
            wild_certs: self.wild_certs.rebase(c.wild_certs.clone(), c.at),
            states: self.states.rebase(c.states.clone(), c.at),
            session_keys: self.session_keys.clone(),
            keyring: self.keyring.clone(),
            nodes: self.nodes.clone(),
            pulse: self.pulse.clone(),
            orgs: self.orgs.clone(),
            private: self.private.clone(),
            tcp: self.tcp.clone(),
        }
    }
}

type Base<V, K = Arc<str>> = Arc<std::collections::HashMap<K, V, foldhash::fast::RandomState>>;

/// A snapshot's maps with their deltas folded in, taken at generation `at`.
pub struct Compacted {
    at: u64,
    apps: Base<Arc<AppEntry>>,
    hosts: Base<Arc<AppEntry>, HostKey>,
    wild_hosts: Base<Arc<AppEntry>, HostKey>,
    machines: Base<Arc<Machine>>,
    app_machines: Base<Arc<[Arc<str>]>>,
    certs: Base<Arc<CertEntry>>,
    wild_certs: Base<Arc<CertEntry>>,
    states: Base<StateRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_machine_holds_nothing_to_wait_on_until_something_waits_and_no_ask_is_lost() {
        use futures_util::FutureExt;
        let m = Arc::new(MachineLive::default());
        m.end_streams();
        assert!(m.waits.get().is_none(), "asking a machine without streams allocates nothing");
        assert!(m.streams_end().is_cancelled(), "a stream that begins after the ask ends at once");
        m.resume_streams();
        let token = m.streams_end();
        assert!(!token.is_cancelled(), "started again: streams run");
        m.end_streams();
        assert!(token.is_cancelled());
        m.resume_streams();

        let fresh = Arc::new(MachineLive::default());
        fresh.resume_streams();
        assert!(fresh.waits.get().is_none());
        let queued = fresh.queue();
        let mut notified = std::pin::pin!(queued.notified());
        notified.as_mut().enable();
        drop(fresh.begin());
        assert!(notified.now_or_never().is_some(), "an exchange ending wakes a request queued for room");
    }

    #[test]
    fn two_nodes_never_mint_the_same_version_and_every_reader_settles_on_one() {
        let (a, b) = (node_tag("edge-1"), node_tag("worker-1"));
        assert_ne!(a, b);
        assert_ne!((a, b), (0, 0), "a node's part is never the declaration's 0");
        // Both nodes saw version v and changed the machine at once.
        let v = next_version(7, 0);
        let (va, vb) = (next_version(v, a), next_version(v, b));
        assert_ne!(va, vb);
        assert!(va > v && vb > v, "both are newer than what they saw");
        // Whichever record a node reads last, it keeps the higher one: both end alike.
        let live = [MachineLive::new(MachineState::Stopped, v), MachineLive::new(MachineState::Stopped, v)];
        live[0].observe(MachineState::Started, va);
        live[0].observe(MachineState::Stopped, vb);
        live[1].observe(MachineState::Stopped, vb);
        live[1].observe(MachineState::Started, va);
        assert_eq!(live[0].state_version(), live[1].state_version());
        assert_eq!(live[0].state(), live[1].state());
        // The next change by either is newer than both.
        assert!(next_version(va.max(vb), a) > va.max(vb));
        // Versions written before node parts (plain counters) are older than any minted now.
        assert!(next_version(5_000, a) > 5_000);
    }

    #[test]
    fn a_node_is_dead_after_dead_after_of_a_current_catalog_without_its_beat() {
        let pulse = Arc::new(Pulse::default());
        pulse.dead_after_ms.store(1_000, Ordering::Relaxed);
        pulse.set_local("edge-1");
        let at = |current: u64| pulse.current_ms.store(current, Ordering::Relaxed);
        let w = NodeLive::new(pulse.clone(), "worker-1");
        assert!(!w.alive(), "never heard: dead");
        w.heard_ms.store(10_000, Ordering::Relaxed);
        at(10_500);
        assert!(w.alive());
        at(11_001);
        assert!(!w.alive(), "a current catalog without its beat for longer than dead_after");
        // The RIB away from 10_500: the catalog's time stands still, and so do judgments.
        at(10_500);
        assert!(w.alive(), "no beat could arrive: not held against it");
        // Back 30 s later: every node counts as heard then, and must beat within dead_after.
        pulse.resumed_ms.store(40_500, Ordering::Relaxed);
        at(40_600);
        assert!(w.alive(), "a grace after the RIB comes back");
        at(41_501);
        assert!(!w.alive(), "no beat since the RIB came back");
        w.gone();
        at(40_600);
        assert!(!w.alive(), "a node that left stays dead until it beats again");
        assert!(NodeLive::new(pulse.clone(), "edge-1").alive(), "this node is alive whatever the RIB says");
    }

    #[test]
    fn a_stalled_store_is_no_nodes_death_either() {
        // An etcd election: the watch stays up, but nothing commits, heartbeats included.
        let pulse = Arc::new(Pulse::default());
        pulse.set_dead_after(std::time::Duration::from_millis(1_000));
        let w = NodeLive::new(pulse.clone(), "worker-1");
        w.heard_ms.store(100_000, Ordering::Relaxed);
        pulse.beat_at(100_000);
        assert!(w.alive());
        // Nothing heard for 800 ms (> dead_after / 2): the next event, whoever's it is, is
        // the store coming back, and worker-1 gets dead_after from then to beat again.
        pulse.beat_at(100_800);
        // Other nodes' beats every 100 ms from then on; none from worker-1.
        for t in (100_900..=101_700).step_by(100) {
            pulse.beat_at(t);
        }
        assert!(w.alive(), "not dead for the beats the stalled store could not take");
        pulse.beat_at(101_800);
        pulse.beat_at(101_900);
        assert!(!w.alive(), "dead_after after the store came back, without a beat of its own");
        w.heard_ms.store(101_900, Ordering::Relaxed);
        assert!(w.alive(), "it beats again");
    }
}
