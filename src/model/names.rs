//! The grammar of names people declare: apps, machines, regions and hostnames.
//!
//! Hostnames are stored lower-case without a trailing dot, so that the request path can
//! compare them byte for byte after normalising the request's Host the same way.

/// App names: 1 to 63 lower-case letters, digits and dashes, not starting or ending with a
/// dash (they appear in hostnames, logs and metric labels).
pub fn check_app_name(s: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?} is not an app name (1-63 of a-z, 0-9 and '-', not starting or ending with '-')"))
    }
}

/// Org names: the same characters as app names (they appear in logs and errors too).
pub fn check_org_name(s: &str) -> Result<(), String> {
    check_app_name(s).map_err(|_| {
        format!("{s:?} is not an org name (1-63 of a-z, 0-9 and '-', not starting or ending with '-')")
    })
}

/// Machine ids: 1 to 128 letters, digits, '-', '_' and '.'.
pub fn check_machine_id(s: &str) -> Result<(), String> {
    let ok = (1..=128).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?} is not a machine id (1-128 of A-Z, a-z, 0-9, '-', '_', '.')"))
    }
}

/// Node names (a machine's owner, `node = ...`): 1 to 64 letters, digits, '-', '_' and '.'.
/// A name that can never beat in the RIB would leave the machine out of routing for good.
pub fn check_node_name(s: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok { Ok(()) } else { Err(format!("{s:?} is not a node name (1-64 of A-Z, a-z, 0-9, '-', '_', '.')")) }
}

/// Region codes: 1 to 32 lower-case letters, digits and dashes ("ams", "us-east-1").
pub fn check_region(s: &str) -> Result<(), String> {
    let ok = (1..=32).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok { Ok(()) } else { Err(format!("{s:?} is not a region code (1-32 of a-z, 0-9 and '-')")) }
}

/// A declared hostname, exact ("api.example.com") or wildcard ("*.example.com", one label),
/// returned in its stored form: lower-case, no trailing dot.
pub fn normalize_hostname(s: &str) -> Result<String, String> {
    let lower = s.trim_end_matches('.').to_ascii_lowercase();
    let (wild, rest) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    if !is_dns_name(rest) {
        return Err(format!(
            "{s:?} is not a hostname (labels of a-z, 0-9 and '-'; a wildcard is \"*.\" then a name)"
        ));
    }
    if wild && !rest.contains('.') {
        return Err(format!("{s:?} is too broad: a wildcard needs at least two labels after \"*.\""));
    }
    Ok(lower)
}

/// RFC 1123 host name: dot-separated labels of 1-63 letters, digits and dashes, no label
/// starting or ending with a dash, at most 253 bytes.
pub fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Whether a certificate name (exact or one-label wildcard) covers a declared hostname. A
/// wildcard hostname is covered only by the same wildcard.
pub fn cert_name_covers(cert_name: &str, hostname: &str) -> bool {
    let cert_name = cert_name.trim_end_matches('.').to_ascii_lowercase();
    if cert_name == hostname {
        return true;
    }
    match (cert_name.strip_prefix("*."), hostname.split_once('.')) {
        (Some(suffix), Some((first, rest))) => first != "*" && rest == suffix,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        assert_eq!(normalize_hostname("Hello.Example.COM.").unwrap(), "hello.example.com");
        assert_eq!(normalize_hostname("*.Example.com").unwrap(), "*.example.com");
        assert!(normalize_hostname("*.com").is_err());
        assert!(normalize_hostname("a.*.com").is_err());
        assert!(normalize_hostname("-a.com").is_err());
        assert!(normalize_hostname("a_b.com").is_err());
        assert!(normalize_hostname("").is_err());
        assert!(normalize_hostname(&"a".repeat(64)).is_err());
        assert_eq!(normalize_hostname("localhost").unwrap(), "localhost");
    }

    #[test]
    fn names() {
        assert!(check_app_name("hello-2").is_ok());
        assert!(check_app_name("Hello").is_err());
        assert!(check_app_name("-x").is_err());
        assert!(check_machine_id("hello-1.a_b").is_ok());
        assert!(check_machine_id("a b").is_err());
        assert!(check_region("ams").is_ok());
        assert!(check_region("AMS").is_err());
    }

    #[test]
    fn coverage() {
        assert!(cert_name_covers("a.example.com", "a.example.com"));
        assert!(cert_name_covers("*.example.com", "a.example.com"));
        assert!(!cert_name_covers("*.example.com", "a.b.example.com"));
        assert!(!cert_name_covers("*.example.com", "example.com"));
        assert!(cert_name_covers("*.example.com", "*.example.com"));
        assert!(!cert_name_covers("a.example.com", "*.example.com"));
        assert!(!cert_name_covers("b.example.com", "a.example.com"));
    }
}
