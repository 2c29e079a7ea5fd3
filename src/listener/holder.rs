//! Who holds a listening address: for the error a second tern gets when its address is taken.
//!
//! Linux lists every TCP socket of this network namespace in `/proc/net/tcp` and
//! `/proc/net/tcp6` with its inode, and every open descriptor of a process as a
//! `/proc/PID/fd/N` link reading `socket:[INODE]`. Joining the two names the process. Another
//! user's descriptors cannot be read, so the owner of a socket may stay unknown; the caller
//! then says only that the address is in use.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

/// The process listening on an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Its command line, arguments joined by spaces (empty for a kernel thread or a zombie).
    pub cmdline: String,
}

/// A socket from `/proc/net/tcp*` in the LISTEN state.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listening {
    addr: SocketAddr,
    inode: u64,
}

/// The process holding a listening socket that keeps `addr` from being bound, if this user
/// can see it.
pub fn find(addr: SocketAddr) -> Option<Holder> {
    find_in(Path::new("/proc"), addr)
}

fn find_in(proc: &Path, addr: SocketAddr) -> Option<Holder> {
    let mut candidates: Vec<Listening> = ["net/tcp", "net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(proc.join(f)).ok())
        .flat_map(|text| parse_listening(&text))
        .filter(|l| blocks(addr, l.addr))
        .collect();
    // The exact address first: a wildcard listener on the same port is a weaker suspect.
    candidates.sort_by_key(|l| l.addr.ip() != addr.ip());
    candidates.iter().find_map(|l| owner_of(proc, l.inode))
}

/// Whether a socket listening on `theirs` keeps `ours` from being bound (same port, and the
/// same address or a wildcard on either side).
fn blocks(ours: SocketAddr, theirs: SocketAddr) -> bool {
    if ours.port() != theirs.port() {
        return false;
    }
    let (a, b) = (canonical(ours.ip()), canonical(theirs.ip()));
    a == b
        || (a.is_unspecified() && a.is_ipv4() == b.is_ipv4())
        || (b.is_unspecified() && (b.is_ipv6() || a.is_ipv4()))
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The LISTEN (state `0A`) rows of a `/proc/net/tcp` or `/proc/net/tcp6` table.
fn parse_listening(text: &str) -> Vec<Listening> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.get(3) != Some(&"0A") {
                return None;
            }
            let addr = parse_addr(cols.get(1)?)?;
            let inode = cols.get(9)?.parse().ok()?;
            Some(Listening { addr, inode })
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6). The kernel prints each 32-bit
/// word of the address as a native-endian number, so its bytes come back with `to_ne_bytes`.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The first process with a descriptor open on socket `inode`.
fn owner_of(proc: &Path, inode: u64) -> Option<Holder> {
    let wanted = format!("socket:[{inode}]");
    let entries = std::fs::read_dir(proc).ok()?;
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        // Another user's descriptors are unreadable: skip, do not fail.
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == wanted.as_str())
        });
        if holds {
            let raw = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(String::from_utf8_lossy)
                .collect::<Vec<_>>()
                .join(" ");
            return Some(Holder { pid, cmdline });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_the_kernel_tables() {
        // Rows as a little-endian Linux prints them: 127.0.0.1:8080 listening, a connected
        // socket (state 01), and [::1]:9090 listening.
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                  \x20  0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0 100 0 0 10 0\n\
                  \x20  1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 4343 1 0 20 4 30 10 -1\n";
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                  \x20  0: 00000000000000000000000001000000:2382 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 77 1 0 100 0 0 10 0\n";
        if cfg!(target_endian = "little") {
            assert_eq!(parse_listening(v4), [Listening { addr: sa("127.0.0.1:8080"), inode: 4242 }]);
            assert_eq!(parse_listening(v6), [Listening { addr: sa("[::1]:9090"), inode: 77 }]);
        }
        assert_eq!(parse_listening("header only\n"), []);
    }

    #[test]
    fn wildcards_block_their_port() {
        assert!(blocks(sa("127.0.0.1:80"), sa("127.0.0.1:80")));
        assert!(blocks(sa("127.0.0.1:80"), sa("0.0.0.0:80")));
        assert!(blocks(sa("0.0.0.0:80"), sa("127.0.0.1:80")));
        assert!(blocks(sa("127.0.0.1:80"), sa("[::]:80")), "a dual-stack [::] holds v4 too");
        assert!(blocks(sa("[::1]:80"), sa("[::]:80")));
        assert!(!blocks(sa("127.0.0.1:80"), sa("127.0.0.1:81")));
        assert!(!blocks(sa("127.0.0.1:80"), sa("127.0.0.2:80")));
        assert!(!blocks(sa("[::1]:80"), sa("0.0.0.0:80")), "V6ONLY: tern's [::1] is apart from v4");
    }

    #[test]
    fn finds_this_process_holding_a_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let holder = find(l.local_addr().unwrap()).expect("our own socket is visible");
        assert_eq!(holder.pid, std::process::id());
        assert!(!holder.cmdline.is_empty());
        // A socket bound but not listening keeps no one else out of a listening address.
        let bound = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        bound.bind(&sa("127.0.0.1:0").into()).unwrap();
        assert_eq!(find(bound.local_addr().unwrap().as_socket().unwrap()), None);
    }
}
