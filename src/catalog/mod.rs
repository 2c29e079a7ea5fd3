//! The catalog (FIB): tern's in-memory, lock-free copy of the RIB, and the only thing the
//! request path reads.
//!
//! One immutable [`Snapshot`] is published through `ArcSwap`; readers load it without a
//! lock and keep using the version they loaded, so a request never waits on a writer. The
//! snapshot is built from persistent maps (`imbl`), so the next version shares almost all
//! of its structure with the current one: applying one change costs O(log n) map updates
//! plus the changed app's own hostnames and machines, never a copy of the whole catalog.
//!
//! Per-machine live counters (requests in flight) are atomics in [`MachineLive`], outside
//! the snapshot, and carried over when a machine's record changes.
//!
//! Applying a change ([`Snapshot::apply`]) is a pure function of (snapshot, event) with no
//! I/O; [`updater`] is the task that feeds it from the RIB. This module may not import the
//! request path (routing, http, tls) or any store.

use std::sync::Arc;

use arc_swap::ArcSwap;

mod apply;
mod decode;
pub mod layered;
mod snapshot;
pub mod updater;

pub use apply::Event;
pub use decode::{DecodeError, decode};
pub use snapshot::{AppEntry, CertEntry, Compacted, InFlight, Machine, MachineLive, Snapshot, StateRecord};

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
