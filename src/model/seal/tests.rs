use super::*;

const NOW: i64 = 1_700_000_000_000;

fn key(id: u32, retire_at_ms: Option<i64>) -> SessionKey {
    let mut secret = [0u8; 32];
    secret[0] = id as u8;
    secret[31] = 0xa5;
    SessionKey { id, secret, created_ms: NOW - 1000, retire_at_ms }
}

fn ring(keys: &[SessionKey]) -> Keyring {
    Keyring::new(keys.to_vec())
}

#[test]
fn a_token_opens_to_what_was_sealed() {
    let r = ring(&[key(1, None)]);
    let token = r.seal("app", "m-1", b"abc").unwrap();
    let opened = r.open("app", token.as_bytes(), NOW).unwrap();
    assert_eq!(opened, Opened { machine: "m-1".into(), value: b"abc".to_vec(), key: 1 });
    // Empty and binary values too.
    let token = r.seal("app", "m", b"").unwrap();
    assert_eq!(r.open("app", token.as_bytes(), NOW).unwrap().value, b"");
    let binary: Vec<u8> = (0..=255).collect();
    let token = r.seal("app", "m", &binary).unwrap();
    assert_eq!(r.open("app", token.as_bytes(), NOW).unwrap().value, binary);
}

#[test]
fn a_token_for_another_app_does_not_open() {
    let r = ring(&[key(1, None)]);
    let token = r.seal("app", "m-1", b"abc").unwrap();
    assert_eq!(r.open("other", token.as_bytes(), NOW), Err(SealError::Forged));
    assert_eq!(r.open("ap", token.as_bytes(), NOW), Err(SealError::Forged));
    assert_eq!(r.open("appp", token.as_bytes(), NOW), Err(SealError::Forged));
}

#[test]
fn every_flipped_byte_and_every_truncation_is_refused() {
    let r = ring(&[key(1, None)]);
    let token = r.seal("app", "machine-1", b"0123456789abcdef0123456789abcdef0123").unwrap();
    let bytes = token.as_bytes();
    for i in 0..bytes.len() {
        for flip in [0x01u8, 0x20, 0x80, 0xff] {
            let mut t = bytes.to_vec();
            t[i] ^= flip;
            assert!(r.open("app", &t, NOW).is_err(), "byte {i} ^ {flip:#x} opened");
        }
        assert!(r.open("app", &bytes[..i], NOW).is_err(), "truncated to {i} opened");
    }
    let mut longer = bytes.to_vec();
    longer.push(b'A');
    assert!(r.open("app", &longer, NOW).is_err());
}

#[test]
fn an_unknown_key_is_named() {
    let token = ring(&[key(7, None)]).seal("app", "m", b"v").unwrap();
    assert_eq!(ring(&[key(1, None)]).open("app", token.as_bytes(), NOW), Err(SealError::UnknownKey(7)));
    assert_eq!(Keyring::default().open("app", token.as_bytes(), NOW), Err(SealError::UnknownKey(7)));
}

#[test]
fn a_retired_key_opens_nothing_once_its_time_passed() {
    let token = ring(&[key(1, None)]).seal("app", "m", b"v").unwrap();
    let retiring = ring(&[key(1, Some(NOW))]);
    assert!(retiring.open("app", token.as_bytes(), NOW - 1).is_ok());
    assert_eq!(retiring.open("app", token.as_bytes(), NOW), Err(SealError::Retired(1)));
}

#[test]
fn after_a_rotation_old_tokens_open_during_the_grace_and_new_ones_use_the_new_key() {
    let old = ring(&[key(1, None)]);
    let before = old.seal("app", "m", b"v").unwrap();
    let rotated = ring(&[key(1, Some(NOW + 60_000)), key(2, None)]);
    assert_eq!(rotated.sealing_id(), Some(2));
    assert_eq!(rotated.ids().collect::<Vec<_>>(), [2, 1], "newest usable first");
    assert_eq!(rotated.open("app", before.as_bytes(), NOW).unwrap().machine.as_ref(), "m");
    let after = rotated.seal("app", "m", b"v").unwrap();
    assert_eq!(old.open("app", after.as_bytes(), NOW), Err(SealError::UnknownKey(2)));
    assert!(rotated.open("app", after.as_bytes(), NOW + 120_000).is_ok());
    assert_eq!(rotated.open("app", before.as_bytes(), NOW + 60_000), Err(SealError::Retired(1)));
}

#[test]
fn nothing_seals_without_a_key_that_is_not_retiring() {
    assert!(Keyring::default().is_empty());
    assert_eq!(Keyring::default().seal("app", "m", b"v"), None);
    let retiring = ring(&[key(1, Some(NOW))]);
    assert!(!retiring.is_empty());
    assert_eq!(retiring.seal("app", "m", b"v"), None);
}

#[test]
fn what_could_not_be_opened_is_not_sealed() {
    let r = ring(&[key(1, None)]);
    assert_eq!(r.seal("app", &"m".repeat(256), b"v"), None);
    assert_eq!(r.seal("app", "m", &[0u8; MAX_TOKEN_LEN]), None);
    let biggest = (0..MAX_TOKEN_LEN).rev().find_map(|n| r.seal("app", "m", &vec![7u8; n])).unwrap();
    assert!(biggest.len() <= MAX_TOKEN_LEN);
    assert!(r.open("app", biggest.as_bytes(), NOW).is_ok());
}

#[test]
fn tokens_are_cookie_and_header_safe_ascii() {
    let r = ring(&[key(u32::MAX, None)]);
    for value in [&b""[..], b"abc", b"\x00\xff\"; ,\\", &[0xffu8; 300]] {
        let token = r.seal("app", "m", value).unwrap();
        assert!(token.starts_with(TOKEN_PREFIX));
        // RFC 6265 cookie-octet: %x21 / %x23-2B / %x2D-3A / %x3C-5B / %x5D-7E.
        let cookie_octet = |b: u8| matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e);
        assert!(token.bytes().all(cookie_octet), "{token}");
        assert!(http::HeaderValue::from_str(&token).is_ok());
    }
}

#[test]
fn two_seals_of_the_same_input_differ() {
    let r = ring(&[key(1, None)]);
    let (a, b) = (r.seal("app", "m", b"v").unwrap(), r.seal("app", "m", b"v").unwrap());
    assert_ne!(a, b);
    let nonce =
        |t: &str| URL_SAFE_NO_PAD.decode(&t[TOKEN_PREFIX.len()..]).unwrap()[ID_LEN..HEADER_LEN].to_vec();
    assert_ne!(nonce(&a), nonce(&b));
}

#[test]
fn the_secret_never_shows_in_debug_output() {
    let k = key(1, None);
    let shown = format!("{k:?} {:?}", ring(std::slice::from_ref(&k)));
    assert!(!shown.contains("165"), "{shown}"); // 0xa5, the secret's last byte
    assert!(shown.contains("id: 1"));
}

/// Arbitrary bytes, near-misses of a real token and huge inputs: every one is refused, none
/// panics. A cheap stand-in for a fuzz target, seeded so a failure reproduces.
#[test]
fn arbitrary_input_is_refused_without_a_panic() {
    let r = ring(&[key(1, None), key(2, Some(NOW + 1))]);
    let good = r.seal("app", "m", b"value").unwrap();
    let mut rng = fastrand::Rng::with_seed(0x5ea1);
    for _ in 0..20_000 {
        let mut t: Vec<u8> = match rng.u8(..4) {
            0 => {
                let n = rng.usize(0..200);
                std::iter::repeat_with(|| rng.u8(..)).take(n).collect()
            }
            1 => {
                let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
                let mut t = TOKEN_PREFIX.as_bytes().to_vec();
                let n = rng.usize(0..120);
                t.extend(std::iter::repeat_with(|| alphabet[rng.usize(..alphabet.len())]).take(n));
                t
            }
            _ => {
                let mut t = good.as_bytes().to_vec();
                for _ in 0..rng.usize(1..4) {
                    let i = rng.usize(..t.len());
                    t[i] = rng.u8(..);
                }
                t
            }
        };
        if rng.bool() {
            t.truncate(rng.usize(0..=t.len()));
        }
        if t != good.as_bytes() {
            assert!(r.open("app", &t, NOW).is_err(), "{:?} opened", String::from_utf8_lossy(&t));
        }
    }
    let huge = format!("{TOKEN_PREFIX}{}", "A".repeat(10 * MAX_TOKEN_LEN));
    assert_eq!(r.open("app", huge.as_bytes(), NOW), Err(SealError::Malformed));
}

#[test]
fn a_token_opens_only_for_its_purpose() {
    let r = ring(&[key(1, None)]);
    let token = r.seal_as("app", "mcp-session-id", "m", b"v").unwrap();
    assert!(r.open_as("app", "mcp-session-id", token.as_bytes(), NOW).is_ok());
    assert_eq!(r.open_as("app", "cookie", token.as_bytes(), NOW), Err(SealError::Forged));
    assert_eq!(r.open("app", token.as_bytes(), NOW), Err(SealError::Forged));
    assert_eq!(r.open_as("ap", "pmcp-session-id", token.as_bytes(), NOW), Err(SealError::Forged));
}
