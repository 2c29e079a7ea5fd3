//! The pool against a real machine: a loopback server that counts its connections and
//! answers every request on them, until told to close them.

use std::sync::atomic::AtomicUsize;

use http_body::Body;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

/// A machine: counts the connections it accepted; answers `ok` to each request (reading
/// a `content-length` body first), or `101` to one asking to upgrade, then echoes; closes
/// every connection it holds when `close` is notified, and sends a stray byte on each when
/// `babble` is.
struct Machine {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    close: Arc<Notify>,
    babble: Arc<Notify>,
}

async fn machine() -> Machine {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, close, babble) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (count, closing, babbling) = (accepted.clone(), close.clone(), babble.clone());
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(socket, closing.clone(), babbling.clone()));
        }
    });
    Machine { addr, accepted, close, babble }
}

async fn serve(mut socket: tokio::net::TcpStream, closing: Arc<Notify>, babbling: Arc<Notify>) {
    let (mut read, mut buf, mut upgraded) = (Vec::new(), [0u8; 1024], false);
    loop {
        tokio::select! {
            n = socket.read(&mut buf) => {
                let Ok(n @ 1..) = n else { return };
                if upgraded {
                    socket.write_all(&buf[..n]).await.unwrap();
                    continue;
                }
                read.extend_from_slice(&buf[..n]);
                while let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&read[..end]).to_ascii_lowercase();
                    let body: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if read.len() < end + 4 + body {
                        break;
                    }
                    read.drain(..end + 4 + body);
                    if head.contains("\r\nupgrade:") {
                        let switching = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n";
                        socket.write_all(switching).await.unwrap();
                        upgraded = true;
                        break;
                    }
                    socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.unwrap();
                }
            }
            () = closing.notified() => return,
            () = babbling.notified() => socket.write_all(b"x").await.unwrap(),
        }
    }
}

pub(super) fn pool() -> Arc<Pool> {
    let config = PoolConfig {
        // Generous: Tokio's paused clock jumps to the next timer whenever the test waits on
        // a socket.
        connect_timeout: Duration::from_secs(3600),
        idle_timeout: Duration::from_secs(90),
        max_idle_per_host: 8,
        max_connecting: 8,
        max_response_head: 16 * 1024,
    };
    Pool::new(config, Arc::new(Metrics::new()))
}

fn request(body: &'static str, upgrade: bool) -> Request<UpBody> {
    let body = UpBody::stream(
        http_body_util::Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|e| -> BoxError { match e {} }),
    );
    let mut req = Request::builder().method(if body.is_end_stream() { "GET" } else { "POST" }).uri("/");
    req = req.header("host", "m");
    if upgrade {
        req = req.header("connection", "upgrade").header("upgrade", "echo");
    }
    req.body(body).unwrap()
}

/// One exchange on a connection from the pool, its body read to the end and the connection
/// given back; whether the connection came from the pool.
async fn exchange(pool: &Arc<Pool>, addr: SocketAddr, body: &'static str) -> bool {
    let conn = pool.checkout(addr, Proto::Http1, false).await.unwrap();
    let reused = conn.reused();
    let Ok((resp, lease)) = conn.send(request(body, false), false).await else {
        panic!("the machine answers")
    };
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
    // hyper's connection is leased; tern's own exchange gives its back from the body's end.
    assert!(lease.is_some() || body.is_empty(), "a request with a body goes through hyper");
    if let Some(lease) = lease {
        lease.release();
    }
    reused
}

/// Connections to `addr` in the pool: warm, and cooled.
fn pooled(pool: &Pool, addr: SocketAddr) -> (usize, usize) {
    let host = pool.host(Key { addr, proto: Proto::Http1 });
    let warm = host.idle.lock().len();
    let cold = host.cold.lock().len();
    (warm, cold)
}

/// A machine, and a pool (its reaper running while the sender lives) holding one
/// connection to it, cooled.
async fn one_cooled() -> (Machine, Arc<Pool>, tokio::sync::watch::Sender<bool>) {
    let m = machine().await;
    let pool = pool();
    let (reaping, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(pool.clone().reap_until(stop, || {}));
    exchange(&pool, m.addr, "").await;
    tokio::time::sleep(COOL_AFTER * 3).await;
    assert_eq!(pooled(&pool, m.addr), (0, 1), "cooled");
    (m, pool, reaping)
}

static GIVEN_BACK: AtomicUsize = AtomicUsize::new(0);

fn counting_give_back() {
    GIVEN_BACK.fetch_add(1, Ordering::SeqCst);
}

#[tokio::test(start_paused = true)]
async fn a_quiet_pooled_connection_cools_to_its_socket_and_serves_again_on_it() {
    let m = machine().await;
    let pool = pool();
    let (_stop, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(pool.clone().reap_until(stop, counting_give_back));
    assert!(!exchange(&pool, m.addr, "").await, "the first exchange opens a connection");
    assert_eq!(pooled(&pool, m.addr), (1, 0), "back in the pool warm");
    tokio::time::sleep(COOL_AFTER / 2).await;
    assert_eq!(pooled(&pool, m.addr), (1, 0), "still warm before its time");
    tokio::time::sleep(COOL_AFTER * 3).await;
    assert_eq!(pooled(&pool, m.addr), (0, 1), "cooled: its socket alone");
    assert_eq!(GIVEN_BACK.load(Ordering::SeqCst), 1, "what hyper held was given back, once");
    assert!(exchange(&pool, m.addr, "").await, "the cooled connection is taken");
    assert_eq!(m.accepted.load(Ordering::SeqCst), 1, "on the same socket: no new connection");
    assert_eq!(pooled(&pool, m.addr), (1, 0), "and warm again");
    tokio::time::sleep(COOL_AFTER * 30).await;
    assert_eq!(pooled(&pool, m.addr), (0, 1));
    assert_eq!(GIVEN_BACK.load(Ordering::SeqCst), 2, "once per cooling, nothing while idle");
}

#[tokio::test(start_paused = true)]
async fn a_cooled_connection_its_machine_closed_is_not_taken() {
    let (m, pool, _reaping) = one_cooled().await;
    // The machine closes it; over loopback the FIN is in tern's socket once close returns.
    m.close.notify_waiters();
    tokio::task::yield_now().await;
    let fresh = !exchange(&pool, m.addr, "").await;
    assert!(fresh, "a closed socket is not handed out");
    assert_eq!(m.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_cooled_connection_with_stray_bytes_waiting_is_not_taken() {
    let (m, pool, _reaping) = one_cooled().await;
    m.babble.notify_waiters();
    // The byte is in tern's socket once the machine's write returned, over loopback.
    tokio::task::yield_now().await;
    assert!(!exchange(&pool, m.addr, "").await, "a socket with bytes nobody asked for is not handed out");
    assert_eq!(m.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_connection_whose_last_request_had_a_body_stays_warm() {
    let m = machine().await;
    let pool = pool();
    let (_stop, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(pool.clone().reap_until(stop, || {}));
    exchange(&pool, m.addr, "hello").await;
    tokio::time::sleep(COOL_AFTER * 3).await;
    assert_eq!(pooled(&pool, m.addr), (1, 0), "hyper may hold some of a body unsent: not cooled");
    assert!(exchange(&pool, m.addr, "").await, "taken warm");
    tokio::time::sleep(COOL_AFTER * 3).await;
    assert_eq!(pooled(&pool, m.addr), (0, 1), "after a request without a body it cools");
}

#[tokio::test]
async fn an_upgrade_gets_a_connection_of_its_own_that_becomes_the_tunnel() {
    let m = machine().await;
    let pool = pool();
    exchange(&pool, m.addr, "").await;
    assert_eq!(pooled(&pool, m.addr), (1, 0));
    let conn = pool.checkout(m.addr, Proto::Http1, true).await.unwrap();
    assert!(!conn.reused(), "not the pooled one");
    let Ok((mut resp, lease)) = conn.send(request("", true), true).await else {
        panic!("the machine answers")
    };
    assert_eq!(resp.status(), 101);
    assert!(lease.is_none(), "an upgraded connection is not given back");
    let mut tunnel =
        TokioIo::new(hyper::upgrade::on(&mut resp).await.expect("the connection is handed over"));
    tunnel.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tunnel.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping");
    assert_eq!(m.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(pooled(&pool, m.addr), (1, 0), "the pooled one is untouched");
}

#[tokio::test(start_paused = true)]
async fn a_connection_given_back_wakes_a_waiting_request_not_a_waiting_upgrade() {
    let m = machine().await;
    let pool = pool();
    let key = Key { addr: m.addr, proto: Proto::Http1 };
    let held = pool.checkout(m.addr, Proto::Http1, false).await.unwrap();
    // Every connect place taken: both wait, the upgrade first.
    let places: Vec<Slot> =
        (0..pool.config.max_connecting).map(|_| Slot::force(&pool.host(key), Proto::Http1)).collect();
    let upgrading = tokio::spawn({
        let pool = pool.clone();
        async move { pool.checkout(m.addr, Proto::Http1, true).await.map(|c| c.reused()) }
    });
    tokio::task::yield_now().await;
    let plain = tokio::spawn({
        let pool = pool.clone();
        async move { pool.checkout(m.addr, Proto::Http1, false).await.map(|c| c.reused()) }
    });
    tokio::task::yield_now().await;
    // The held connection's exchange ends and it goes back to the pool.
    let Ok((resp, _)) = held.send(request("", false), false).await else { panic!("the machine answers") };
    // Read to its end, tern's own exchange gives the connection back.
    resp.into_body().collect().await.unwrap();
    let reused = tokio::time::timeout(Duration::from_secs(10), plain).await;
    assert!(matches!(reused, Ok(Ok(Ok(true)))), "the waiting request got the connection: {reused:?}");
    assert!(!upgrading.is_finished(), "the upgrade waits for a connect place");
    drop(places);
    let fresh = tokio::time::timeout(Duration::from_secs(10), upgrading).await;
    assert!(matches!(fresh, Ok(Ok(Ok(false)))), "then opens its own: {fresh:?}");
}

#[tokio::test(start_paused = true)]
async fn the_reaper_closes_cooled_sockets_their_machine_closed() {
    let (m, pool, _reaping) = one_cooled().await;
    pool.reap();
    assert_eq!(pooled(&pool, m.addr), (0, 1), "an open one is kept");
    m.close.notify_waiters();
    tokio::task::yield_now().await;
    pool.reap();
    assert_eq!(pooled(&pool, m.addr), (0, 0), "a half-closed one is closed, not kept to its idle timeout");
}

#[tokio::test(start_paused = true)]
async fn a_reaper_started_over_a_warm_pool_cools_it() {
    let m = machine().await;
    let pool = pool();
    // A first reaper sees the connection go back, and stops before cooling it (as one that
    // panicked would, before `tasks` restarts it).
    let (first, stop) = tokio::sync::watch::channel(false);
    let reaping = tokio::spawn(pool.clone().reap_until(stop, || {}));
    exchange(&pool, m.addr, "").await;
    tokio::task::yield_now().await;
    first.send(true).unwrap();
    reaping.await.unwrap();
    assert_eq!(pooled(&pool, m.addr), (1, 0), "warm, its cue taken by the first reaper");
    let (_second, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(pool.clone().reap_until(stop, || {}));
    tokio::time::sleep(COOL_AFTER * 3).await;
    assert_eq!(pooled(&pool, m.addr), (0, 1), "the second cools it with no new cue");
}
