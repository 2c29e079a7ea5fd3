//! Request host normalisation: what `Host` or `:authority` names, in the form the catalog
//! stores hostnames (lower-case, no port, no trailing dot). No I/O; fuzzed.

use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("empty host")]
    Empty,
    #[error("host is too long")]
    TooLong,
    #[error("host has a character that cannot appear in a hostname")]
    BadChar,
    #[error("host has a malformed port")]
    BadPort,
    #[error("host has a malformed IPv6 literal")]
    BadIpv6,
    #[error("host has an empty label")]
    EmptyLabel,
}

/// Longest host tern will look up: a DNS name is at most 253 bytes; allow a port.
const MAX_HOST: usize = 253 + 6;

/// Normalises a Host header value or URI authority: strips a port and a trailing dot and
/// lower-cases. An IPv6 literal keeps no brackets. Borrows when nothing changes.
pub fn normalize(raw: &str) -> Result<Cow<'_, str>, HostError> {
    if raw.is_empty() {
        return Err(HostError::Empty);
    }
    if raw.len() > MAX_HOST {
        return Err(HostError::TooLong);
    }
    // userinfo ("user@host") is not allowed in Host (RFC 9110 §7.2).
    if let Some(rest) = raw.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or(HostError::BadIpv6)?;
        check_port(after)?;
        // Found by fuzzing: a character check alone let `[b.]` through.
        if inside.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(HostError::BadIpv6);
        }
        return Ok(lower(inside));
    }
    let (name, port) = match raw.bytes().rposition(|b| b == b':') {
        Some(i) => (&raw[..i], &raw[i..]),
        None => (raw, ""),
    };
    check_port(port)?;
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(HostError::Empty);
    }
    // One pass (a look-up does this for every request): the characters, the labels, the case.
    let (mut upper, mut empty_label, mut after_dot) = (false, false, true);
    for b in name.bytes() {
        match b {
            b'.' => {
                empty_label |= after_dot;
                after_dot = true;
                continue;
            }
            b'A'..=b'Z' => upper = true,
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => {}
            _ => return Err(HostError::BadChar),
        }
        after_dot = false;
    }
    if empty_label || after_dot {
        return Err(HostError::EmptyLabel);
    }
    Ok(if upper { Cow::Owned(name.to_ascii_lowercase()) } else { Cow::Borrowed(name) })
}

fn check_port(p: &str) -> Result<(), HostError> {
    if p.is_empty() {
        return Ok(());
    }
    let digits = p.strip_prefix(':').ok_or(HostError::BadPort)?;
    // An empty port (`host:`) is allowed by RFC 3986.
    if digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HostError::BadPort);
    }
    Ok(())
}

fn lower(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// The fuzz target's property: normalising never panics, and a normalised host is a
/// fixed point with no port, upper case or trailing dot.
pub fn fuzz_normalize(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(h) = normalize(s) {
        assert!(!h.is_empty());
        assert!(!h.bytes().any(|b| b.is_ascii_uppercase()));
        assert!(!h.ends_with('.'));
        if !h.contains(':') {
            assert_eq!(normalize(&h).as_deref(), Ok(&*h), "normalising {s:?} is not idempotent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises() {
        assert_eq!(normalize("Hello.Example.COM").unwrap(), "hello.example.com");
        assert_eq!(normalize("hello.example.com:8080").unwrap(), "hello.example.com");
        assert_eq!(normalize("hello.example.com.").unwrap(), "hello.example.com");
        assert_eq!(normalize("hello.example.com.:443").unwrap(), "hello.example.com");
        assert_eq!(normalize("[::1]:8080").unwrap(), "::1");
        assert_eq!(normalize("[FD00::1]").unwrap(), "fd00::1");
        assert_eq!(normalize("127.0.0.1:80").unwrap(), "127.0.0.1");
        assert_eq!(normalize("host:").unwrap(), "host");
        assert!(matches!(normalize("a.example.com"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn refuses() {
        assert_eq!(normalize(""), Err(HostError::Empty));
        assert_eq!(normalize(":80"), Err(HostError::Empty));
        assert_eq!(normalize("a b"), Err(HostError::BadChar));
        assert_eq!(normalize("user@host"), Err(HostError::BadChar));
        assert_eq!(normalize("host:http"), Err(HostError::BadPort));
        assert_eq!(normalize("host:123456"), Err(HostError::BadPort));
        assert_eq!(normalize("[::1"), Err(HostError::BadIpv6));
        assert_eq!(normalize("[zz]"), Err(HostError::BadIpv6));
        assert_eq!(normalize(&"a".repeat(300)), Err(HostError::TooLong));
        assert_eq!(normalize(".."), Err(HostError::EmptyLabel));
        assert_eq!(normalize("a..b"), Err(HostError::EmptyLabel));
        assert_eq!(normalize(".a"), Err(HostError::EmptyLabel));
    }

    /// The definition the one-pass check replaced, step by step.
    fn by_definition(raw: &str) -> Result<String, HostError> {
        let (name, port) = raw.rfind(':').map_or((raw, ""), |i| (&raw[..i], &raw[i..]));
        check_port(port)?;
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() {
            return Err(HostError::Empty);
        }
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')) {
            return Err(HostError::BadChar);
        }
        if name.split('.').any(str::is_empty) {
            return Err(HostError::EmptyLabel);
        }
        Ok(name.to_ascii_lowercase())
    }

    #[test]
    fn every_short_host_gets_the_definitions_answer() {
        const ALPHABET: &[u8] = b"aZ.:1-_!";
        let mut checked = 0;
        for len in 1..=6u32 {
            for mut n in 0..ALPHABET.len().pow(len) {
                let mut s = String::new();
                for _ in 0..len {
                    s.push(char::from(ALPHABET[n % ALPHABET.len()]));
                    n /= ALPHABET.len();
                }
                assert_eq!(normalize(&s).map(Cow::into_owned), by_definition(&s), "{s:?}");
                checked += 1;
            }
        }
        assert_eq!(checked, 299_592);
    }

    #[test]
    fn fuzz_property_holds_on_samples() {
        for s in ["A.b", "a.b.:1", "[::1]:1", "..", "a..b", "x:", "-", "[b.]", "[::ffff:1.2.3.4]:80"] {
            fuzz_normalize(s.as_bytes());
        }
    }
}
