//! Reference points with no proxy (`WAKE_DIRECT`): this process starts the machine itself
//! with N requests already in hand, probes its port as tern does (250 µs apart, backing off
//! to 2 ms), and the moment the port accepts, releases the requests straight to it from
//! one thread, in one of three ways:
//!
//! - `herd`: a task per request, each opening its own connection, all at once: what tern
//!   does (every held request wakes, connects and sends on its own). What this takes is
//!   the floor for that design on this machine, before any proxy work.
//! - `fifo`: a connection per request, opened and written one after the other in arrival
//!   order: the first request goes out after one connect, the last after N.
//! - `reuse:K`: K keep-alive connections, each taking the next request in arrival order
//!   when its previous one is answered: K connects instead of N, but a request can wait
//!   for an earlier one's answer.
//!
//! The machine measures every request exactly as it does behind tern.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::bail;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::task::JoinSet;

use super::{Answer, Round, Settings, backend_cmd, free_port, mono_ns, parse_answer};

#[derive(Clone, Copy, Debug)]
pub enum Mode {
    Herd,
    Fifo,
    Reuse(usize),
}

impl std::str::FromStr for Mode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Mode> {
        match s.trim() {
            "herd" => Ok(Mode::Herd),
            "fifo" => Ok(Mode::Fifo),
            other => match other.strip_prefix("reuse:").and_then(|k| k.parse().ok()) {
                Some(k) if k > 0 => Ok(Mode::Reuse(k)),
                _ => bail!("WAKE_DIRECT={s:?}: expected herd, fifo or reuse:K"),
            },
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Herd => write!(f, "no proxy, a connection per request, all at once (herd)"),
            Mode::Fifo => write!(f, "no proxy, a connection per request, one after the other (fifo)"),
            Mode::Reuse(k) => write!(f, "no proxy, {k} keep-alive connections (reuse:{k})"),
        }
    }
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: wake.test\r\n\r\n";

pub async fn round(mode: Mode, n: usize, s: &Settings, me: &Path) -> anyhow::Result<Round> {
    let (_held, port) = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let cmd = backend_cmd(me, port, n, s);
    let mut machine = Command::new(&cmd[0]).args(&cmd[1..]).kill_on_drop(true).spawn()?;
    let held = mono_ns();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut gap = Duration::from_micros(250);
    while TcpStream::connect(addr).await.is_err() {
        if tokio::time::Instant::now() > deadline {
            bail!("the machine did not listen within 30 s");
        }
        tokio::time::sleep(gap).await;
        gap = (gap * 2).min(Duration::from_millis(2));
    }
    let mut answers = match mode {
        Mode::Herd => herd(addr, n).await?,
        Mode::Fifo => fifo(addr, n).await?,
        Mode::Reuse(k) => reuse(addr, n, k).await?,
    };
    for a in &mut answers {
        a.sent = held;
    }
    machine.kill().await?;
    Round::from_answers(n, held, &answers)
}

async fn herd(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Answer>> {
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        tasks.spawn(async move {
            let mut s = connect(addr).await?;
            s.write_all(REQUEST).await?;
            answer(&mut s).await
        });
    }
    collect(tasks, n).await
}

async fn fifo(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Answer>> {
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let mut s = connect(addr).await?;
        s.write_all(REQUEST).await?;
        tasks.spawn(async move { answer(&mut s).await });
    }
    collect(tasks, n).await
}

async fn reuse(addr: SocketAddr, n: usize, k: usize) -> anyhow::Result<Vec<Answer>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..k.min(n) {
        let next = next.clone();
        tasks.spawn(async move {
            let mut s = connect(addr).await?;
            let mut mine = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                s.write_all(REQUEST).await?;
                mine.push(answer(&mut s).await?);
            }
            anyhow::Ok(mine)
        });
    }
    let mut answers = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        answers.extend(r??);
    }
    Ok(answers)
}

async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Reads one answer; the machine keeps the connection open, so until its line is complete.
async fn answer(s: &mut TcpStream) -> anyhow::Result<Answer> {
    let mut buf = Vec::new();
    while !String::from_utf8_lossy(&buf).split("wake-bench ").nth(1).is_some_and(|l| l.contains('\n')) {
        if s.read_buf(&mut buf).await? == 0 {
            bail!("the machine closed the connection");
        }
    }
    parse_answer(0, mono_ns(), &buf)
}

async fn collect(mut tasks: JoinSet<anyhow::Result<Answer>>, n: usize) -> anyhow::Result<Vec<Answer>> {
    let mut answers = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        answers.push(r??);
    }
    Ok(answers)
}
