//! Listening sockets that pass from one tern process to the next.
//!
//! A hitless upgrade, or a bounce out of a wedge, starts a fresh tern that takes over the
//! running one's listening sockets themselves, not their addresses: the kernel's accept
//! queues carry over, so a connection that arrives at any moment is queued on a socket
//! someone will accept from, and none is refused. The old process stops accepting only once
//! the new one says it is ready.
//!
//! The sockets travel the way systemd's socket activation passes them (so `tern serve` run
//! from a `.socket` unit takes its sockets the same way): as descriptors 3, 4, … in the
//! child, counted by `LISTEN_FDS`. tern adds `TERN_LISTEN_ROLES`, one word per descriptor
//! naming the configured address it was bound for (`admin=ADDR` for the admin socket), so a
//! listener configured with port 0 finds its own socket again. Without roles (systemd), a
//! socket is matched by the address it is bound to.
//!
//! Readiness goes back over an abstract Unix socket whose name is in `TERN_READY`: the child
//! connects and writes its pid once it serves. No file, no descriptor to leak.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use command_fds::{CommandFdExt, FdMapping};
use parking_lot::Mutex;

/// The first descriptor number passed sockets take in the child (systemd's SD_LISTEN_FDS_START).
const FIRST_FD: i32 = 3;
const ROLES_VAR: &str = "TERN_LISTEN_ROLES";
const READY_VAR: &str = "TERN_READY";
const ADMIN_ROLE: &str = "admin=";

/// Sockets this process was given at start, waiting to be claimed by the config's
/// listeners.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<(Option<String>, Option<TcpListener>)>,
}

impl Inherited {
    /// Takes the sockets passed in `LISTEN_FDS` (by a predecessor or by systemd). Call it
    /// first thing in `main`, before any thread starts: it clears those variables.
    pub fn from_env() -> Inherited {
        let roles: Vec<String> = std::env::var(ROLES_VAR)
            .map(|r| r.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let mut fds = listenfd::ListenFd::from_env();
        let mut sockets = Vec::with_capacity(fds.len());
        for i in 0..fds.len() {
            // Logging is not set up yet: [`Inherited::take`] logs what it takes; what is not
            // a TCP listener stays open and unused, as systemd would leave it.
            if let Ok(Some(l)) = fds.take_tcp_listener(i) {
                sockets.push((roles.get(i).cloned(), Some(l)));
            }
        }
        Inherited { sockets }
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.iter().all(|(_, s)| s.is_none())
    }

    /// The inherited socket for the listener configured as `addr` (`admin`: the admin
    /// address), if one was passed: the one tagged with that role, else one bound to
    /// exactly that address.
    pub fn take(&mut self, addr: SocketAddr, admin: bool) -> Option<TcpListener> {
        let wanted = role_of(addr, admin);
        let by_role = self.sockets.iter().position(|(r, s)| s.is_some() && r.as_deref() == Some(&wanted));
        let by_addr = || {
            self.sockets.iter().position(|(r, s)| {
                r.is_none() && s.as_ref().and_then(|s| s.local_addr().ok()) == Some(addr) && addr.port() != 0
            })
        };
        let i = by_role.or_else(by_addr)?;
        let socket = self.sockets[i].1.take()?;
        socket.set_nonblocking(true).ok()?;
        tracing::info!(target: "tern::listener", addr = ?socket.local_addr().ok(), admin,
            "took over a listening socket from the process that started this one");
        Some(socket)
    }

    /// Closes whatever no listener claimed (a listener removed from the config between two
    /// processes), saying so.
    pub fn close_unclaimed(&mut self) {
        for (role, socket) in &mut self.sockets {
            if let Some(s) = socket.take() {
                tracing::warn!(target: "tern::listener", addr = ?s.local_addr().ok(), role = ?role,
                    "an inherited socket matches no configured listener; closing it");
            }
        }
    }
}

fn role_of(addr: SocketAddr, admin: bool) -> String {
    if admin { format!("{ADMIN_ROLE}{addr}") } else { addr.to_string() }
}

/// This process's listening sockets, kept so they can be handed to a successor however
/// the rest of the process is doing (the watchdog bounces out of a wedge with them).
#[derive(Debug, Default)]
pub struct Handoff {
    sockets: Mutex<Option<Vec<(String, TcpListener)>>>,
}

/// A successor process that said it is ready.
#[derive(Debug)]
pub struct Successor {
    pub pid: u32,
    /// Kept so it is not reaped as a zombie while this process lives; never killed.
    pub child: Child,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("the listening sockets were already closed or handed over")]
    Closed,
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: String,
        #[source]
        source: io::Error,
    },
    #[error("the new process exited ({status}) before it was ready; see its log lines above")]
    Exited { status: std::process::ExitStatus },
    #[error("the new process (pid {pid}) was not ready within {waited:?}; it was stopped")]
    NotReady { pid: u32, waited: Duration },
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl Handoff {
    /// Keeps a descriptor of each socket: `listeners` (with the address each was configured
    /// as) and the admin socket.
    pub fn keep(
        listeners: &[(SocketAddr, &TcpListener)],
        admin: (SocketAddr, &TcpListener),
    ) -> io::Result<Handoff> {
        let mut sockets = Vec::with_capacity(listeners.len() + 1);
        for (addr, l) in listeners {
            sockets.push((role_of(*addr, false), l.try_clone()?));
        }
        sockets.push((role_of(admin.0, true), admin.1.try_clone()?));
        Ok(Handoff { sockets: Mutex::new(Some(sockets)) })
    }

    /// Closes this process's kept descriptors (at a plain stop, so the sockets close once
    /// the accept loops let go of theirs).
    pub fn close(&self) {
        self.sockets.lock().take();
    }

    /// Starts `binary` with `args`, handing it the sockets, and waits up to `ready_within`
    /// for it to say it serves. Blocking: call it from a thread that may block.
    pub fn start_successor(
        &self,
        binary: &Path,
        args: &[OsString],
        ready_within: Duration,
    ) -> Result<Successor, HandoffError> {
        let (mappings, roles) = {
            let guard = self.sockets.lock();
            let sockets = guard.as_ref().ok_or(HandoffError::Closed)?;
            let mut mappings = Vec::with_capacity(sockets.len());
            let mut roles = Vec::with_capacity(sockets.len());
            for (i, (role, socket)) in sockets.iter().enumerate() {
                let fd: OwnedFd = socket.try_clone()?.into();
                mappings
                    .push(FdMapping { parent_fd: fd, child_fd: FIRST_FD + i32::try_from(i).unwrap_or(0) });
                roles.push(role.clone());
            }
            (mappings, roles)
        };
        let name = format!("tern-ready-{}-{:016x}", std::process::id(), fastrand::u64(..));
        let ready = UnixListener::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes())?)?;
        ready.set_nonblocking(true)?;
        let mut command = Command::new(binary);
        command
            .args(args)
            .env("LISTEN_FDS", roles.len().to_string())
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .env(ROLES_VAR, roles.join(" "))
            .env(READY_VAR, &name)
            .stdin(Stdio::null())
            .fd_mappings(mappings)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let mut child = command
            .spawn()
            .map_err(|source| HandoffError::Spawn { binary: binary.display().to_string(), source })?;
        let pid = child.id();
        tracing::info!(target: "tern::proxy", pid, binary = %binary.display(), "started a new tern with the listening sockets");
        let started = Instant::now();
        loop {
            match ready.accept() {
                Ok((mut conn, _)) => {
                    let mut said = String::new();
                    conn.set_nonblocking(false)?;
                    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
                    let _ = conn.read_to_string(&mut said);
                    if said.trim() == pid.to_string() {
                        return Ok(Successor { pid, child });
                    }
                    tracing::warn!(target: "tern::proxy", said = %said.trim(), "a readiness message from someone else; ignored");
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(status) = child.try_wait()? {
                return Err(HandoffError::Exited { status });
            }
            if started.elapsed() >= ready_within {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HandoffError::NotReady { pid, waited: ready_within });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Tells whoever started this process that it serves: a predecessor tern (`TERN_READY`) and
/// systemd (`NOTIFY_SOCKET`, with `MAINPID` so a unit follows the new process when the old
/// one exits; the unit needs `NotifyAccess=all`).
pub fn notify_ready() {
    let pid = std::process::id();
    // systemd first: once the previous tern hears, it may exit, and systemd must already
    // follow this process by then.
    sd_notify(&format!("READY=1\nMAINPID={pid}"));
    if let Ok(name) = std::env::var(READY_VAR) {
        let sent = UnixAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| UnixStream::connect_addr(&a))
            .and_then(|mut s| s.write_all(pid.to_string().as_bytes()));
        if let Err(e) = sent {
            tracing::warn!(target: "tern::proxy", error = %e, "cannot tell the previous tern this one is ready");
        }
    }
}

/// Sends a state line to systemd, if it is listening (`NOTIFY_SOCKET`).
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => {
            UnixAddr::from_abstract_name(name).and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
        }
        None => sock.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = sent {
        tracing::debug!(target: "tern::proxy", error = %e, "sd_notify failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_by_role_then_by_bound_address() {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let b_addr = b.local_addr().unwrap();
        let configured: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let a_addr = a.local_addr().unwrap();
        let mut inherited =
            Inherited { sockets: vec![(Some(role_of(configured, false)), Some(a)), (None, Some(b))] };
        // Port 0 in the config: only the role finds it.
        let got = inherited.take(configured, false).expect("by role");
        assert_eq!(got.local_addr().unwrap(), a_addr);
        assert!(inherited.take(configured, false).is_none(), "each socket is taken once");
        // No role (systemd): by the address it is bound to.
        let got = inherited.take(b_addr, false).expect("by address");
        assert_eq!(got.local_addr().unwrap(), b_addr);
        assert!(inherited.is_empty());
    }
}
