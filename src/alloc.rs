//! Giving memory back to the system once a burst has passed.
//!
//! tern runs on mimalloc (installed in `main.rs`). mimalloc keeps the pages a thread freed,
//! to reuse them, and returns them to the system ("purges" them) only a while later, and only
//! when that thread calls into the allocator again. A worker whose connections have all gone
//! quiet makes no such calls: after a burst of 10,000 connections, each of which held about
//! 20 KB of hyper's state until it was parked, it kept 5 to 10 MB it no longer used, for as
//! long as it stayed idle. [`give_back`] asks mimalloc to hand those pages back now; the
//! parking lot calls it on its worker's thread once connections have been parked
//! (see [`crate::proxy`]'s lot), at most once per [`GIVE_BACK_AFTER`].
//!
//! This is the crate's one `unsafe` block: the call into mimalloc's C API. `mi_collect`
//! takes no pointers and has no precondition; it frees the calling thread's empty pages and
//! decommits what is due. On a thread that never allocated through mimalloc (the test
//! binaries use the system allocator) it finds nothing to free.
#![allow(unsafe_code)]

use std::time::Duration;

/// How long after the first connection parked the lot gives memory back: the connections
/// of a burst park within about this long of each other, and one call returns them all.
pub const GIVE_BACK_AFTER: Duration = Duration::from_secs(1);

/// Returns the calling thread's freed pages to the system. Takes about 2 ms after a burst
/// of 10,000 connections, some tens of microseconds when there is little to return.
pub fn give_back() {
    // SAFETY: `mi_collect` takes a flag and no pointers, and may be called from any thread
    // at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
