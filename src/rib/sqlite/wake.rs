//! What wakes the SQLite watcher thread: a change to the RIB's files, the subscriber going
//! away, or the fallback poll.
//!
//! Another process commits to the RIB by writing its write-ahead log (`tern.db-wal`; a
//! checkpoint writes `tern.db` itself), and replacing or deleting the RIB changes the entries
//! of its directory. inotify reports both, so the watcher learns of a commit as it happens
//! instead of at its next poll, and sleeps for as long as nothing happens (an idle node does
//! not wake a hundred times a second to ask). The watches: the directory, for entries
//! created, deleted or renamed (any file there, filtered by name here); and the database and
//! its log themselves, for writes (a write to another file in the directory wakes nothing).
//! A log deleted and re-created is watched again when the directory says so.
//!
//! inotify cannot see everything: writes made from another machine to a network filesystem,
//! and an instance refused when the user's inotify limits are used up. So the watcher still
//! looks every `[rib] poll_interval` (1 s by default) when nothing woke it: the slowest a
//! commit can then take to be seen.
//!
//! A write to the log comes a moment before the commit is visible: the writer publishes it
//! in the log's index (`tern.db-shm`, shared memory, which raises no event) after its last
//! write. A reader woken by the write may look in between and see nothing new; it looks
//! again a few times shortly after ([`RECHECK`]) before it trusts the silence. A writer that
//! then closes the file (`tern apply` exiting) raises one more event, after the commit is
//! visible: so a writer descheduled between its write and its publication (a busy machine)
//! is caught when it closes, not at the end of the rechecks.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::time::Instant;

/// After a file event that showed no commit, the database is looked at again after each of
/// these, in turn: the commit the event announced shows within microseconds; then ever
/// rarer looks, in case the writer was descheduled between its write and its publication.
pub(super) const RECHECK: [Duration; 5] = [
    Duration::from_millis(1),
    Duration::from_millis(2),
    Duration::from_millis(5),
    Duration::from_millis(20),
    Duration::from_millis(100),
];

/// Why [`Wake::wait`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Woke {
    /// One of the RIB's files (or its directory entry) changed.
    Changed,
    /// Nothing happened for the time asked.
    Timeout,
    /// The subscription was dropped.
    Unsubscribed,
}

pub(super) struct Wake {
    inotify: Option<Watches>,
    /// Read end of a pipe whose write end the subscription holds: it hangs up when the
    /// subscription is dropped, which ends the wait at once.
    gone: OwnedFd,
    /// How long to wait when nothing wakes the watcher.
    pub(super) poll: Duration,
}

struct Watches {
    inotify: Inotify,
    dir: PathBuf,
    /// The directory's watch; `None` while it could not be set (the directory is gone).
    dir_wd: Option<WatchDescriptor>,
    /// The database file's name, and its log's.
    db: OsString,
    wal: OsString,
}

/// Entry changes in the directory: a RIB created, deleted, or renamed over.
fn dir_mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ONLYDIR
}

impl Wake {
    /// Watches the files of the RIB at `path`. Without inotify (or its directory), only the
    /// poll remains; that is logged once.
    pub(super) fn new(path: &Path, poll: Duration, gone: OwnedFd) -> Wake {
        let inotify = match Watches::new(path) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(target: "tern::rib", path = %path.display(), error = %e, every = ?poll,
                    "cannot watch the RIB's files for changes; checking it for commits every poll_interval instead");
                None
            }
        };
        Wake { inotify, gone, poll }
    }

    /// Waits until one of the RIB's files changes, the subscription is dropped, or
    /// `timeout` passes.
    pub(super) fn wait(&mut self, timeout: Duration) -> Woke {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // poll(2) counts milliseconds: round up, so a short wait is not a busy loop.
            let ms = left.as_micros().div_ceil(1000);
            let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
            let (gone, changed) = {
                let mut fds = vec![PollFd::new(self.gone.as_fd(), PollFlags::POLLIN)];
                if let Some(w) = &self.inotify {
                    fds.push(PollFd::new(w.inotify.as_fd(), PollFlags::POLLIN));
                }
                match poll(&mut fds, timeout) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => {
                        // Nothing sensible to wait on: wait the poll out instead.
                        tracing::warn!(target: "tern::rib", error = %e, "waiting for RIB changes failed");
                        std::thread::sleep(left);
                        return Woke::Timeout;
                    }
                }
                let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
                (ready(&fds[0]), fds.get(1).is_some_and(ready))
            };
            if gone {
                return Woke::Unsubscribed;
            }
            if changed && self.inotify.as_mut().is_some_and(Watches::read) {
                return Woke::Changed;
            }
            if left.is_zero() {
                if let Some(w) = &mut self.inotify {
                    w.rewatch_dir();
                }
                return Woke::Timeout;
            }
        }
    }
}

impl Watches {
    fn new(path: &Path) -> nix::Result<Watches> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let db = path.file_name().map(OsStr::to_os_string).unwrap_or_default();
        let mut wal = db.clone();
        wal.push("-wal");
        let dir_wd = Some(inotify.add_watch(&dir, dir_mask())?);
        let w = Watches { inotify, dir, dir_wd, db, wal };
        w.watch_files();
        Ok(w)
    }

    /// Watches the database and its log for writes, and for a writer closing them (`tern
    /// apply` exiting, after its commit is published), as they are now (either may be
    /// absent: the log exists only while a connection is open).
    fn watch_files(&self) {
        let mask = AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CLOSE_WRITE;
        for name in [&self.db, &self.wal] {
            // Absent now: the directory's watch says when it appears.
            let _ = self.inotify.add_watch(&self.dir.join(name), mask);
        }
    }

    /// After a directory that went away came back (or never was watched).
    fn rewatch_dir(&mut self) {
        if self.dir_wd.is_none() {
            if let Ok(wd) = self.inotify.add_watch(&self.dir, dir_mask()) {
                self.dir_wd = Some(wd);
                self.watch_files();
            }
        }
    }

    /// Reads what is queued; true if any of it concerns the RIB.
    fn read(&mut self) -> bool {
        let mut relevant = false;
        loop {
            let events = match self.inotify.read_events() {
                Ok(events) if !events.is_empty() => events,
                // EAGAIN: all read.
                _ => return relevant,
            };
            for e in events {
                if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    // Events were lost: look, and watch the files again to be sure.
                    relevant = true;
                    self.watch_files();
                    continue;
                }
                if Some(e.wd) != self.dir_wd {
                    // The database or its log was written, or its watch ended (deleted).
                    relevant = true;
                    continue;
                }
                if e.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The directory itself is gone; the poll goes on and watches it again.
                    self.dir_wd = None;
                    relevant = true;
                    continue;
                }
                let Some(name) = e.name.as_deref() else { continue };
                if name == self.db || name == self.wal {
                    relevant = true;
                    if e.mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
                        self.watch_files();
                    }
                } else if name.as_encoded_bytes().starts_with(self.db.as_encoded_bytes()) {
                    // Its other sidecars (`-shm`, `-journal`): a writer at work.
                    relevant = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wake(path: &Path, poll: Duration) -> (Wake, OwnedFd) {
        let (read, write) = nix::unistd::pipe().unwrap();
        (Wake::new(path, poll, read), write)
    }

    #[test]
    fn a_write_to_the_log_wakes_and_other_files_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("rib.db");
        std::fs::write(&db, b"").unwrap();
        let (mut w, _sub) = wake(&db, Duration::from_secs(3600));
        assert!(w.inotify.is_some(), "inotify is available here");
        std::fs::write(dir.path().join("other.log"), b"x").unwrap();
        std::fs::write(dir.path().join("other.log"), b"xy").unwrap();
        assert_eq!(w.wait(Duration::from_millis(20)), Woke::Timeout, "another file's writes are ignored");
        // The log appears (a creation in the directory), then is written (its own watch).
        std::fs::write(dir.path().join("rib.db-wal"), b"").unwrap();
        assert_eq!(w.wait(Duration::from_secs(10)), Woke::Changed);
        assert_eq!(w.wait(Duration::from_millis(1)), Woke::Timeout, "nothing left over");
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("rib.db-wal"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"frame"))
            .unwrap();
        assert_eq!(w.wait(Duration::from_secs(10)), Woke::Changed);
        std::fs::remove_file(&db).unwrap();
        assert_eq!(w.wait(Duration::from_secs(10)), Woke::Changed, "the RIB deleted");
    }

    #[test]
    fn dropping_the_subscription_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, sub) = wake(&dir.path().join("rib.db"), Duration::from_secs(3600));
        drop(sub);
        assert_eq!(w.wait(Duration::from_secs(3600)), Woke::Unsubscribed);
    }
}
