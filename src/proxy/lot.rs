//! A worker's parking lot: quiet HTTP/1.1 connections waiting for their next bytes with no
//! task of their own.
//!
//! A connection parked by [`crate::http::park`] gave hyper's state back but still kept a
//! task and its serving future (about 3 KB). Handed to the lot it keeps its socket, its
//! addresses, its place in the drain and its limits, its socket taken out of Tokio's reactor:
//! a plain one about 200 bytes; a TLS one its TLS session too (rustls's keys and state,
//! about 5 KB, 3.6 KB of it heap; its buffers are freed, see [`crate::tls::Stream`]). One
//! task waits on all of them through an epoll set of
//! the lot's own: when a client sends (or closes), its connection gets a task again and is
//! served from where it stood; when its keep-alive limit passes, or its time in a drain
//! comes, the lot closes it (TLS with close_notify).
//!
//! A connection parked frees what served it (hyper's buffers, its task) into its worker's
//! heap. A second after the first of them parked, the lot hands what was freed back to the
//! system ([`crate::alloc::give_back`]), so an idle worker does not keep a burst's memory.
//!
//! Each socket is registered one-shot: it is reported once and then taken out, so a
//! connection is never served by two tasks. While a drain runs nothing new is parked (a
//! connection waits for its time in its own task, as before); what was parked gets its time
//! like any connection and is closed then.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::time::Instant;

#[cfg(test)]
use std::sync::Arc;

use crate::alloc::GIVE_BACK_AFTER;
use crate::http::drain::Seat;

/// What a lot holds for a connection: a socket to wait on, and what takes it up again.
pub trait Car: Send {
    /// The socket whose next bytes the lot waits for.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Closes the connection: its limit or its time in a drain came while it was parked.
    fn close(self);
}

/// A parked connection.
pub struct Parked<T> {
    /// Its place in the drain; it is closed at its time if still parked.
    pub seat: Seat,
    /// When it is closed if the client has sent nothing.
    pub quiet_until: Instant,
    /// Its socket, and what its owner needs to serve it again.
    pub rest: T,
}

/// How many ready connections one pass takes from the kernel.
const BATCH: usize = 64;

/// The epoll instance, as Tokio needs it to wait on it.
struct EpollFd(Epoll);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.as_raw_fd()
    }
}

pub struct Lot<T> {
    epoll: AsyncFd<EpollFd>,
    spaces: Mutex<Spaces<T>>,
    /// A deadline earlier than the one the lot sleeps to was set, or the drain began.
    changed: Notify,
    parked_now: prometheus::IntGauge,
    /// Returns freed memory to the system, on the lot's thread.
    give_back: fn(),
}

struct Spaces<T> {
    /// Indexed by the low half of the key each socket is registered with; the high half is
    /// the slot's generation, so a late report for a slot since reused is told apart.
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    /// Closing times, earliest first; entries for connections gone since are skipped.
    deadlines: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    /// Connections parked now.
    count: usize,
    /// A drain began: nothing new is parked.
    draining: bool,
    /// When freed memory is next given back: set when a connection parks and none is due.
    give_back_at: Option<Instant>,
}

struct Slot<T> {
    generation: u32,
    parked: Option<Parked<T>>,
}

impl<T: Car> Lot<T> {
    /// A lot on the current Tokio runtime. `parked_now` is the gauge of connections in it;
    /// `give_back` returns freed memory to the system, called [`GIVE_BACK_AFTER`] after a
    /// connection parks (once for all that park meanwhile).
    pub fn new(parked_now: prometheus::IntGauge, give_back: fn()) -> std::io::Result<Lot<T>> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        // `new` is deprecated for types that need not own their descriptor; this one owns
        // it and closes it only when dropped, after Tokio let go of it (what `register`,
        // which is `unsafe` and so closed to this crate, asks of its caller).
        #[allow(deprecated)]
        let epoll = AsyncFd::new(EpollFd(epoll))?;
        Ok(Lot {
            epoll,
            spaces: Mutex::new(Spaces {
                slots: Vec::new(),
                free: Vec::new(),
                deadlines: BinaryHeap::new(),
                count: 0,
                draining: false,
                give_back_at: None,
            }),
            changed: Notify::new(),
            parked_now,
            give_back,
        })
    }

    /// Parks a connection; gives it back if it cannot be (a drain runs, or the kernel refused
    /// the registration), to be served in a task as before.
    pub fn park(&self, parked: Parked<T>) -> Result<(), Parked<T>> {
        let mut spaces = self.spaces.lock();
        if spaces.draining || parked.seat.draining() {
            return Err(parked);
        }
        let index = match spaces.free.pop() {
            Some(i) => i,
            None => match u32::try_from(spaces.slots.len()) {
                Ok(i) => {
                    spaces.slots.push(Slot { generation: 0, parked: None });
                    i
                }
                Err(_) => return Err(parked),
            },
        };
        let slot = &mut spaces.slots[index as usize];
        slot.generation = slot.generation.wrapping_add(1);
        let generation = slot.generation;
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT;
        let key = u64::from(generation) << 32 | u64::from(index);
        if let Err(e) = self.epoll.get_ref().0.add(parked.rest.fd(), EpollEvent::new(flags, key)) {
            tracing::debug!(target: "tern::http", error = %e, "a connection could not be parked");
            spaces.free.push(index);
            return Err(parked);
        }
        let earliest = spaces.deadlines.peek().map(|Reverse((at, ..))| *at);
        let at = parked.quiet_until;
        spaces.deadlines.push(Reverse((at, index, generation)));
        spaces.slots[index as usize].parked = Some(parked);
        spaces.count += 1;
        self.parked_now.inc();
        let give_back = spaces.give_back_at.is_none();
        if give_back {
            spaces.give_back_at = Some(Instant::now() + GIVE_BACK_AFTER);
        }
        drop(spaces);
        if give_back || earliest.is_none_or(|e| at < e) {
            self.changed.notify_one();
        }
        Ok(())
    }

    /// Connections parked now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.spaces.lock().count
    }

    /// Takes a connection out, if it is still there.
    fn take(&self, spaces: &mut Spaces<T>, index: u32, generation: u32) -> Option<Parked<T>> {
        let slot = spaces.slots.get_mut(index as usize)?;
        if slot.generation != generation {
            return None;
        }
        let parked = slot.parked.take()?;
        spaces.free.push(index);
        spaces.count -= 1;
        // Gone from the interest list before Tokio registers the socket again (a closed
        // socket leaves it by itself).
        let _ = self.epoll.get_ref().0.delete(parked.rest.fd());
        self.parked_now.dec();
        Some(parked)
    }

    /// Waits on every parked connection until `draining` resolves and the lot is empty after
    /// it: calls `ready` with each connection whose client sent something or closed, and
    /// closes those whose time passed.
    pub async fn run(
        &self,
        draining: impl std::future::Future<Output = ()>,
        mut ready: impl FnMut(Parked<T>),
    ) {
        tokio::pin!(draining);
        let mut drain_seen = false;
        let mut events = [EpollEvent::empty(); BATCH];
        loop {
            let next = {
                let spaces = self.spaces.lock();
                if drain_seen && spaces.count == 0 {
                    return;
                }
                let deadline = spaces.deadlines.peek().map(|Reverse((at, ..))| *at);
                match (deadline, spaces.give_back_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            };
            tokio::select! {
                guard = self.epoll.readable() => {
                    let Ok(mut guard) = guard else { return };
                    loop {
                        let n = match self.epoll.get_ref().0.wait(&mut events, EpollTimeout::ZERO) {
                            Ok(n) => n,
                            Err(nix::errno::Errno::EINTR) => continue,
                            Err(_) => 0,
                        };
                        let taken: Vec<_> = {
                            let mut spaces = self.spaces.lock();
                            events[..n]
                                .iter()
                                .filter_map(|e| self.take(&mut spaces, e.data() as u32, (e.data() >> 32) as u32))
                                .collect()
                        };
                        taken.into_iter().for_each(&mut ready);
                        if n < BATCH {
                            guard.clear_ready();
                            break;
                        }
                    }
                }
                () = sleep_until(next) => {
                    let now = Instant::now();
                    self.close_due(now);
                    self.give_back_due(now);
                }
                () = self.changed.notified() => {}
                () = &mut draining, if !drain_seen => {
                    drain_seen = true;
                    self.drain_begun();
                }
            }
        }
    }

    /// Closes every connection whose keep-alive limit or drain time is `now` or past.
    fn close_due(&self, now: Instant) {
        let mut closed = Vec::new();
        let mut spaces = self.spaces.lock();
        while let Some(Reverse((at, index, generation))) = spaces.deadlines.peek().copied() {
            if at > now {
                break;
            }
            spaces.deadlines.pop();
            if let Some(parked) = self.take(&mut spaces, index, generation) {
                closed.push(parked);
            }
        }
        drop(spaces);
        for mut parked in closed {
            if parked.seat.due().is_some_and(|due| due <= now) {
                parked.seat.ended();
            }
            // Its client had nothing in flight. Once the seat drops, the drain counts it gone.
            parked.rest.close();
        }
    }

    /// Gives freed memory back if its time is `now` or past.
    fn give_back_due(&self, now: Instant) {
        let due = {
            let mut spaces = self.spaces.lock();
            let due = spaces.give_back_at.is_some_and(|at| at <= now);
            if due {
                spaces.give_back_at = None;
            }
            due
        };
        if due {
            (self.give_back)();
        }
    }

    /// The drain began: each parked connection gets its time, and nothing new is parked.
    fn drain_begun(&self) {
        let mut spaces = self.spaces.lock();
        spaces.draining = true;
        let Spaces { slots, deadlines, .. } = &mut *spaces;
        for (index, slot) in slots.iter_mut().enumerate() {
            if let Some(parked) = slot.parked.as_mut() {
                if let Some(due) = parked.seat.due() {
                    deadlines.push(Reverse((due.min(parked.quiet_until), index as u32, slot.generation)));
                }
            }
        }
    }
}

/// Sleeps until `at`, or forever if there is no deadline.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use std::net::TcpStream;
    use std::os::fd::AsFd;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::http::Drain;

    /// A plain socket and a number to tell it by.
    struct Test(TcpStream, u32);

    impl Car for Test {
        fn fd(&self) -> BorrowedFd<'_> {
            self.0.as_fd()
        }

        fn close(self) {}
    }

    /// A connected pair over loopback: tern's side (out of Tokio, as parked) and the client's.
    async fn pair() -> (TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (server.into_std().unwrap(), client)
    }

    fn gauge() -> prometheus::IntGauge {
        prometheus::IntGauge::new("parked", "parked").unwrap()
    }

    fn parked(drain: &Drain, stream: TcpStream, quiet: Duration, id: u32) -> Parked<Test> {
        let (conn, registration) = drain.connection();
        Parked {
            seat: Seat::new(&conn, registration),
            quiet_until: Instant::now() + quiet,
            rest: Test(stream, id),
        }
    }

    #[tokio::test]
    async fn a_client_that_sends_gets_its_connection_back_with_the_bytes_unread() {
        let lot = Arc::new(Lot::new(gauge(), || {}).unwrap());
        let drain = Drain::default();
        let (a, mut client_a) = pair().await;
        let (b, _client_b) = pair().await;
        assert!(lot.park(parked(&drain, a, Duration::from_secs(60), 1)).is_ok());
        assert!(lot.park(parked(&drain, b, Duration::from_secs(60), 2)).is_ok());
        assert_eq!(lot.len(), 2);
        assert_eq!(lot.parked_now.get(), 2);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let waiting = lot.clone();
        let run = tokio::spawn(async move {
            waiting.run(std::future::pending(), |p| tx.send(p).unwrap()).await;
        });
        client_a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let back = rx.recv().await.unwrap();
        assert_eq!(back.rest.1, 1, "only the connection whose client sent comes back");
        assert_eq!(lot.len(), 1);
        let mut socket = tokio::net::TcpStream::from_std(back.rest.0).unwrap();
        let mut buf = [0u8; 16];
        socket.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET / HTTP/1.1\r\n");
        // Parked again, it is reported again: each report takes it out once.
        let again = Parked { rest: Test(socket.into_std().unwrap(), 1), ..back };
        assert!(lot.park(again).is_ok());
        client_a.write_all(b"x").await.unwrap();
        assert_eq!(rx.recv().await.unwrap().rest.1, 1);
        run.abort();
    }

    /// How many times this module's `counting_give_back` was called.
    static GIVEN_BACK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn counting_give_back() {
        GIVEN_BACK.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_given_back_once_a_second_after_connections_park_and_never_while_idle() {
        let given_back = || GIVEN_BACK.load(std::sync::atomic::Ordering::SeqCst);
        let lot = Arc::new(Lot::new(gauge(), counting_give_back).unwrap());
        let drain = Drain::default();
        let mut pairs = Vec::new();
        for _ in 0..4 {
            pairs.push(pair().await);
        }
        let waiting = lot.clone();
        tokio::spawn(
            async move { waiting.run(std::future::pending(), |_| panic!("nothing was sent")).await },
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(given_back(), 0, "a lot where nothing parked has nothing to give back");
        // A burst: three connections park within 600 ms; one call gives back what all freed.
        let start = Instant::now();
        let mut clients = Vec::new();
        for (i, (server, client)) in pairs.drain(..3).enumerate() {
            assert!(lot.park(parked(&drain, server, Duration::from_secs(3600), i as u32)).is_ok());
            clients.push(client);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        tokio::time::sleep_until(start + Duration::from_millis(990)).await;
        assert_eq!(given_back(), 0, "not before a second has passed since the first parked");
        tokio::time::sleep_until(start + Duration::from_millis(1010)).await;
        assert_eq!(given_back(), 1);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(given_back(), 1, "once for the burst, then nothing while idle");
        // The next connection to park starts the clock again.
        let (server, _client) = pairs.pop().unwrap();
        assert!(lot.park(parked(&drain, server, Duration::from_secs(3600), 9)).is_ok());
        tokio::time::sleep(Duration::from_millis(1010)).await;
        assert_eq!(given_back(), 2);
        assert_eq!(lot.len(), 4, "giving memory back closes nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_is_closed_at_its_keep_alive_limit() {
        let lot = Arc::new(Lot::new(gauge(), || {}).unwrap());
        let drain = Drain::default();
        let (server, mut client) = pair().await;
        let start = Instant::now();
        assert!(lot.park(parked(&drain, server, Duration::from_secs(30), 0)).is_ok());
        let waiting = lot.clone();
        tokio::spawn(
            async move { waiting.run(std::future::pending(), |_| panic!("nothing was sent")).await },
        );
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0, "closed");
        assert!(start.elapsed() >= Duration::from_secs(30), "not before its limit");
        assert_eq!(lot.len(), 0);
        assert_eq!(drain.open_connections(), 0, "the drain no longer counts it");
    }

    #[tokio::test(start_paused = true)]
    async fn in_a_drain_parked_connections_close_at_their_times_and_none_is_parked() {
        let lot = Arc::new(Lot::new(gauge(), || {}).unwrap());
        let drain = Drain::default();
        let (mut clients, mut start) = (Vec::new(), None);
        for i in 0..2 {
            let (server, client) = pair().await;
            assert!(lot.park(parked(&drain, server, Duration::from_secs(3600), i)).is_ok());
            clients.push(client);
        }
        let waiting = lot.clone();
        let began = drain.clone();
        let run = tokio::spawn(async move {
            waiting.run(async move { began.begun().await }, |_| panic!("nothing was sent")).await;
        });
        tokio::task::yield_now().await;
        assert!(drain.begin(Duration::from_secs(10)));
        start.get_or_insert(Instant::now());
        let mut closed_at = Vec::new();
        for client in &mut clients {
            let mut buf = [0u8; 1];
            assert_eq!(client.read(&mut buf).await.unwrap(), 0);
            closed_at.push(start.unwrap().elapsed());
        }
        // Two connections spread over ten seconds: one at once, one at five.
        assert!(closed_at[0] < Duration::from_secs(1), "{closed_at:?}");
        assert!(
            closed_at[1] >= Duration::from_secs(5) && closed_at[1] < Duration::from_secs(6),
            "{closed_at:?}"
        );
        run.await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), drain.finished()).await.expect("the drain saw them end");
        let (server, _client) = pair().await;
        assert!(
            lot.park(parked(&drain, server, Duration::from_secs(60), 9)).is_err(),
            "nothing new in a drain"
        );
    }
}
