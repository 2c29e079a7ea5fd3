//! The catalog (FIB): tern's in-memory, lock-free copy of the RIB, and the only thing the
//! request path reads.
//!
//! One immutable [`Snapshot`] is published through `ArcSwap`; readers load it without a
//! lock and keep using the version they loaded, so a request never waits on a writer. Each
//! map is a compacted hash-map base under a small persistent delta ([`layered`]), so the next
//! version shares almost everything with the current one: one change touches only the
//! delta, never a copy of the whole catalog.
//!
//! Per-machine live state (requests in flight, lifecycle state with its version, health,
//! passive ejection) is atomics in [`MachineLive`], outside the snapshot, and carried over when a machine's record
//! changes.
//!
//! Applying a change ([`Snapshot::apply`]) does no I/O; its only effect outside the new
//! snapshot is on that shared live state (a newer lifecycle state). [`updater`] is the task
//! that feeds it from the RIB, and tells what each batch changed on a channel ([`changes`])
//! for whoever acts on machines. This module may not import the request path (routing, http,
//! tls) or any store.

use std::sync::Arc;

use arc_swap::ArcSwap;

mod apply;
mod build;
pub mod changes;

mod decode;
mod fuzz;
pub mod host_key;
pub mod layered;
pub mod outlier;
mod snapshot;
pub mod updater;

pub use apply::Event;
pub use changes::{Changes, Feed};
pub use decode::{DecodeError, decode};
pub use fuzz::fuzz_apply;
pub use snapshot::{
    AppEntry, CertEntry, Compacted, InFlight, Machine, MachineLive, Queued, Snapshot, StateRecord,
    next_version, node_tag,
};

/// The published catalog.
pub struct Catalog {
    current: ArcSwap<Snapshot>,
}

impl Catalog {
    pub fn new() -> Self {
        Catalog { current: ArcSwap::from_pointee(Snapshot::default()) }
    }

    /// The current snapshot. Lock-free; hold it for the duration of one decision, not
    /// across awaits on the network.
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// A snapshot to keep (an `Arc`), for work that outlives one decision.
    pub fn load_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn publish(&self, next: Snapshot) {
        self.current.store(Arc::new(next));
    }
}

impl Default for Catalog {
    fn default() -> Self {
        Self::new()
    }
}
