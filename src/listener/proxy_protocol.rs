//! PROXY protocol, versions 1 and 2, on the way in: a load balancer in front of tern says
//! who the client is before the connection's own bytes (TLS or HTTP) begin.
//!
//! A listener with `proxy_protocol = true` requires the header first, and only from the
//! sources in its `proxy_protocol_from`: anyone else could claim any address. The addresses
//! it carries replace the connection's peer and local address for everything after it
//! (`Fly-Client-IP`, `X-Forwarded-For`, logs, limits). A v2 `LOCAL` command (the balancer's
//! own health check) and a v1 `UNKNOWN` keep the connection's own addresses.
//!
//! The format: <https://www.haproxy.org/download/3.0/doc/proxy-protocol.txt>.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Version 2's signature: its first twelve bytes.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A version 1 header's first bytes.
const V1_START: &[u8; 6] = b"PROXY ";
/// The longest version 1 header, CRLF included (the specification's own bound).
const V1_MAX: usize = 107;
/// The longest version 2 header tern reads (16 bytes and the addresses and TLVs after
/// them): the specification allows 64 KiB, balancers send a few hundred bytes at most.
pub const V2_MAX: usize = 4096;

/// What a header said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// The client's address and the one it connected to.
    Proxied { source: SocketAddr, destination: SocketAddr },
    /// No addresses to use (v2 `LOCAL`, v1 `UNKNOWN`, a family other than TCP over IPv4 or
    /// IPv6): the connection's own stand.
    Local,
}

/// Why a connection on a PROXY protocol listener was closed; each is counted
/// (`tern_proxy_protocol_refused_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The peer is not in `proxy_protocol_from`.
    #[error("the peer is not in proxy_protocol_from")]
    UntrustedSource,
    /// The first bytes are not a PROXY header.
    #[error("the connection did not start with a PROXY protocol header")]
    Missing,
    /// A PROXY header that breaks the format.
    #[error("malformed PROXY protocol header")]
    Malformed,
    /// The header did not arrive in time.
    #[error("no complete PROXY protocol header in time")]
    Timeout,
    /// The peer closed, or the read failed, before the header was complete.
    #[error("the connection closed inside the PROXY protocol header")]
    Closed,
}

impl Refused {
    pub const ALL: [Refused; 5] =
        [Refused::UntrustedSource, Refused::Missing, Refused::Malformed, Refused::Timeout, Refused::Closed];

    pub fn as_str(self) -> &'static str {
        match self {
            Refused::UntrustedSource => "untrusted_source",
            Refused::Missing => "missing",
            Refused::Malformed => "malformed",
            Refused::Timeout => "timeout",
            Refused::Closed => "closed",
        }
    }
}

/// Parses a header at the start of `buf`: the header and its length, `Ok(None)` while
/// `buf` could still be the start of one (more bytes are needed), or why it cannot be.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, Refused> {
    if buf.is_empty() {
        return Ok(None);
    }
    let v2 = buf.len().min(V2_SIGNATURE.len());
    if buf[..v2] == V2_SIGNATURE[..v2] {
        return if buf.len() < V2_SIGNATURE.len() { Ok(None) } else { parse_v2(buf) };
    }
    let v1 = buf.len().min(V1_START.len());
    if buf[..v1] == V1_START[..v1] {
        return if buf.len() < V1_START.len() { Ok(None) } else { parse_v1(buf) };
    }
    Err(Refused::Missing)
}

/// `PROXY TCP4 192.0.2.1 198.51.100.7 51234 443\r\n`, `PROXY UNKNOWN …\r\n`.
fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, Refused> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(cr) = window.iter().position(|b| *b == b'\r') else {
        return if buf.len() >= V1_MAX { Err(Refused::Malformed) } else { Ok(None) };
    };
    // The LF must fit too: a CR as the 107th byte makes a header one byte too long.
    if cr + 2 > V1_MAX {
        return Err(Refused::Malformed);
    }
    match buf.get(cr + 1) {
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => return Err(Refused::Malformed),
    }
    let line = std::str::from_utf8(&window[V1_START.len()..cr]).map_err(|_| Refused::Malformed)?;
    let len = cr + 2;
    let mut fields = line.split(' ');
    let header = match fields.next() {
        // Whatever follows UNKNOWN is ignored (the specification's words).
        Some("UNKNOWN") => Header::Local,
        Some(family @ ("TCP4" | "TCP6")) => {
            let rest: Vec<&str> = fields.collect();
            let [src, dst, sport, dport] = rest[..] else { return Err(Refused::Malformed) };
            let (src, dst) = (v1_ip(src, family)?, v1_ip(dst, family)?);
            Header::Proxied {
                source: SocketAddr::new(src, v1_port(sport)?),
                destination: SocketAddr::new(dst, v1_port(dport)?),
            }
        }
        _ => return Err(Refused::Malformed),
    };
    Ok(Some((header, len)))
}

fn v1_ip(s: &str, family: &str) -> Result<IpAddr, Refused> {
    match family {
        "TCP4" => s.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| Refused::Malformed),
        _ => s.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| Refused::Malformed),
    }
}

/// A port in decimal: digits only, no leading zero (the specification's form).
fn v1_port(s: &str) -> Result<u16, Refused> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return Err(Refused::Malformed);
    }
    s.parse().map_err(|_| Refused::Malformed)
}

/// The signature, version and command, family and transport, the length of what follows,
/// then the addresses and any TLVs (skipped).
fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, Refused> {
    let Some(fixed) = buf.get(..16) else { return Ok(None) };
    let (version, command) = (fixed[12] >> 4, fixed[12] & 0x0f);
    if version != 2 || command > 1 {
        return Err(Refused::Malformed);
    }
    let len = 16 + usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if len > V2_MAX {
        return Err(Refused::Malformed);
    }
    let Some(body) = buf.get(16..len) else { return Ok(None) };
    // LOCAL: the balancer speaking for itself. Its address block, family included, is to be
    // discarded unread (the specification's words).
    if command == 0 {
        return Ok(Some((Header::Local, len)));
    }
    let (family, transport) = (fixed[13] >> 4, fixed[13] & 0x0f);
    if family > 3 || transport > 2 {
        return Err(Refused::Malformed);
    }
    let need = match family {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if body.len() < need {
        return Err(Refused::Malformed);
    }
    tlvs_well_formed(&body[need..])?;
    // Addresses other than TCP over IP: nothing tern can use.
    if transport != 1 {
        return Ok(Some((Header::Local, len)));
    }
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let header = match family {
        1 => {
            let ip =
                |at: usize| IpAddr::V4(Ipv4Addr::new(body[at], body[at + 1], body[at + 2], body[at + 3]));
            Header::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        2 => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&body[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            Header::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        _ => Header::Local,
    };
    Ok(Some((header, len)))
}

/// Each TLV (type, 2-byte length, value) ends inside the header.
fn tlvs_well_formed(mut tlvs: &[u8]) -> Result<(), Refused> {
    while !tlvs.is_empty() {
        let Some(head) = tlvs.get(..3) else { return Err(Refused::Malformed) };
        let end = 3 + usize::from(u16::from_be_bytes([head[1], head[2]]));
        tlvs = tlvs.get(end..).ok_or(Refused::Malformed)?;
    }
    Ok(())
}

/// Reads the header a connection must start with, within `timeout`: what it said, and the
/// bytes read past it (the client's own first bytes, to be read again by TLS or HTTP).
pub async fn read<IO: AsyncRead + Unpin>(io: &mut IO, timeout: Duration) -> Result<(Header, Bytes), Refused> {
    let reading = async {
        let mut buf = BytesMut::with_capacity(256);
        loop {
            match parse(&buf)? {
                Some((header, len)) => {
                    let rest = buf.split_off(len).freeze();
                    return Ok((header, rest));
                }
                None => {
                    // parse decides within V2_MAX bytes; this only bounds what a bug could hold.
                    if buf.len() > V2_MAX {
                        return Err(Refused::Malformed);
                    }
                    if buf.capacity() == buf.len() {
                        buf.reserve(buf.len().max(256));
                    }
                    match io.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return Err(Refused::Closed),
                        Ok(_) => {}
                    }
                }
            }
        }
    };
    tokio::time::timeout(timeout, reading).await.unwrap_or(Err(Refused::Timeout))
}

/// A v2 `PROXY` header for a TCP connection from `source` to `destination`, as tern sends it
/// to a machine (a service with `handlers = ["proxy_proto"]`). Addresses of two families
/// are both written as IPv6 (an IPv4 one in its mapped form); IPv4-mapped IPv6 addresses
/// are written as the IPv4 addresses they are when both are.
pub fn v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let plain = |a: SocketAddr| match a.ip() {
        std::net::IpAddr::V6(v6) => {
            v6.to_ipv4_mapped().map_or(a, |v4| SocketAddr::new(std::net::IpAddr::V4(v4), a.port()))
        }
        _ => a,
    };
    let (source, destination) = (plain(source), plain(destination));
    let mut h = V2_SIGNATURE.to_vec();
    h.push(0x21); // version 2, PROXY
    match (source.ip(), destination.ip()) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
            h.extend_from_slice(&[0x11, 0, 12]); // TCP over IPv4, 12 bytes
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: std::net::IpAddr| match ip {
                std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                std::net::IpAddr::V6(v6) => v6,
            };
            h.extend_from_slice(&[0x21, 0, 36]); // TCP over IPv6, 36 bytes
            h.extend_from_slice(&v6(s).octets());
            h.extend_from_slice(&v6(d).octets());
        }
    }
    h.extend_from_slice(&source.port().to_be_bytes());
    h.extend_from_slice(&destination.port().to_be_bytes());
    h
}

#[cfg(test)]
mod tests;
