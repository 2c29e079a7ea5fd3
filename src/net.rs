//! IP prefixes (`10.0.0.0/8`, `fdaa::/16`): which sources a listener trusts.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address prefix. An IPv4 prefix also matches the IPv4-mapped IPv6 form of its
/// addresses (`::ffff:10.1.2.3`), as a dual-stack listener on `[::]` sees IPv4 peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u128::from(u32::from(net)), 32, self.len)
                    == masked(u128::from(u32::from(ip)), 32, self.len)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), 128, self.len) == masked(u128::from(ip), 128, self.len)
            }
            _ => false,
        }
    }
}

/// The top `len` bits of a `bits`-bit number.
fn masked(v: u128, bits: u32, len: u8) -> u128 {
    let len = u32::from(len);
    if len == 0 { 0 } else { v >> (bits - len) }
}

impl FromStr for Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Prefix, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr =
            addr.parse().map_err(|_| format!("{s:?} is not an IP prefix (like 10.0.0.0/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => l
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("{s:?}: length over {max}"))?,
            Some(_) => return Err(format!("{s:?} is not an IP prefix (like 10.0.0.0/8)")),
        };
        // An IPv4-mapped prefix would never match: peers are compared in their IPv4 form.
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            return Err(format!("{s:?}: write IPv4 prefixes as such ({v4}/{})", len.saturating_sub(96)));
        }
        let prefix = Prefix { addr, len };
        // Host bits set (10.1.2.3/8) most likely mean a typo: refused rather than guessed.
        if masked_addr(addr, len) != addr {
            return Err(format!(
                "{s:?} has bits set past its length (did you mean {}/{len}?)",
                masked_addr(addr, len)
            ));
        }
        Ok(prefix)
    }
}

/// `addr` with the bits past `len` cleared.
fn masked_addr(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let v = u32::from(a);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
            IpAddr::V4((v & mask).into())
        }
        IpAddr::V6(a) => {
            let v = u128::from(a);
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
            IpAddr::V6((v & mask).into())
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl serde::Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Prefix, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes_match_their_addresses_and_no_others() {
        assert!(p("10.0.0.0/8").contains(ip("10.255.1.2")));
        assert!(!p("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(p("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!p("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(p("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!p("0.0.0.0/0").contains(ip("2001:db8::1")), "an IPv4 prefix never matches IPv6");
        assert!(p("::/0").contains(ip("2001:db8::1")));
        assert!(p("fdaa:0:1::/48").contains(ip("fdaa:0:1:a7b::2")));
        assert!(!p("fdaa:0:1::/48").contains(ip("fdaa:0:2::2")));
    }

    #[test]
    fn an_ipv4_prefix_matches_the_mapped_form_a_dual_stack_listener_sees() {
        assert!(p("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(!p("10.0.0.0/8").contains(ip("::ffff:11.1.2.3")));
    }

    #[test]
    fn malformed_prefixes_are_refused_with_what_was_wrong() {
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/x",
            "10.0.0/8",
            "::/129",
            "10.1.2.3/8",
            "",
            "/8",
            "10.0.0.0/+8",
            "::ffff:10.0.0.0/104",
        ] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad:?} accepted");
        }
        let e = "10.1.2.3/8".parse::<Prefix>().unwrap_err();
        assert!(e.contains("10.0.0.0/8"), "{e}");
    }
}
