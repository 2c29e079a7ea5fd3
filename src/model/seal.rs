//! Sealed session tokens: a machine's session id (`Mcp-Session-Id: abc`, say) rewritten into
//! a token that names the app's machine, so that any node sharing the RIB can route the
//! next request to that machine and hand it back its own value, with no session table.
//!
//! A token is `t1.` followed by base64url (no padding) of
//! `key id (u32, big-endian) | nonce (12) | AES-256-GCM(machine len (u8) | machine | value) | tag (16)`.
//! The additional data is `tern-session-v1\0` followed by the app's name, so a token opens
//! only for the app it was sealed for. The alphabet (`t`, `1`, `.`, `A-Z a-z 0-9 - _`) is
//! visible ASCII, a valid cookie value (RFC 6265 cookie-octet) and a valid header value.
//!
//! This lives among the records rather than in `routing` (which re-exports it as
//! `routing::seal`) because the catalog prepares the keyring when keys change, and the
//! catalog may not import the request path. No I/O here except one read of the system
//! random source per process.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, Tag, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// What every token starts with: the format's version, so a later format can coexist.
pub const TOKEN_PREFIX: &str = "t1.";
/// The longest token [`Keyring::open`] looks at; anything longer is rejected before any
/// decoding, and [`Keyring::seal`] never makes one (a header or cookie that long would be
/// refused by clients anyway).
pub const MAX_TOKEN_LEN: usize = 4096;
/// Domain separation for the additional data, so no other use of a key can produce a
/// ciphertext that opens as a session token.
const AAD_DOMAIN: &[u8] = b"tern-session-v1\0";
const ID_LEN: usize = 4;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = ID_LEN + NONCE_LEN;

/// One session key as the RIB holds it (`session_keys`, keyed by `id`).
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey {
    pub id: u32,
    pub secret: [u8; 32],
    /// When it was made, in milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// From then on tokens under it no longer open; while set, it seals nothing new.
    pub retire_at_ms: Option<i64>,
}

impl std::fmt::Debug for SessionKey {
    /// Never the secret: keys end up in logs through `{:?}` of whatever holds them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKey")
            .field("id", &self.id)
            .field("created_ms", &self.created_ms)
            .field("retire_at_ms", &self.retire_at_ms)
            .finish_non_exhaustive()
    }
}

/// A key ready to use: its AES key schedule is expanded once, when the keyring is built,
/// not per token.
struct Prepared {
    id: u32,
    key: LessSafeKey,
    retire_at_ms: Option<i64>,
}

/// The session keys a node seals and opens tokens with, newest usable first.
#[derive(Default)]
pub struct Keyring {
    keys: Vec<Prepared>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.ids()).finish()
    }
}

/// What a token held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    pub machine: Box<str>,
    pub value: Vec<u8>,
    /// The key it was sealed with: one that no longer seals is worth sealing again.
    pub key: u32,
}

/// Why a token did not open. Every case is the client's doing (or an expired key); none is
/// worth retrying with the same token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("the session token is malformed")]
    Malformed,
    #[error("the session token names key {0}, which this node does not hold")]
    UnknownKey(u32),
    #[error("the session token was sealed under key {0}, which has retired")]
    Retired(u32),
    #[error("the session token does not authenticate (altered, forged or sealed for another app)")]
    Forged,
}

impl SealError {
    /// A stable name for metric labels and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            SealError::Malformed => "malformed",
            SealError::UnknownKey(_) => "unknown_key",
            SealError::Retired(_) => "retired",
            SealError::Forged => "forged",
        }
    }
}

impl Keyring {
    /// Prepares `keys`; of two with the same id, the first is kept.
    pub fn new(mut keys: Vec<SessionKey>) -> Keyring {
        keys.sort_by_key(|k| k.id);
        keys.dedup_by_key(|k| k.id);
        // Newest usable first: the key that seals leads, and opening finds recent tokens'
        // keys first.
        keys.sort_by_key(|k| (k.retire_at_ms.is_some(), std::cmp::Reverse(k.id)));
        let keys = keys
            .into_iter()
            .filter_map(|k| {
                // Only a wrong key length fails, and a secret is always 32 bytes.
                let unbound = UnboundKey::new(&AES_256_GCM, &k.secret).ok()?;
                Some(Prepared { id: k.id, key: LessSafeKey::new(unbound), retire_at_ms: k.retire_at_ms })
            })
            .collect();
        Keyring { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key ids, newest usable first (for the admin API and logs).
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.keys.iter().map(|k| k.id)
    }

    /// The key new tokens are sealed with: the newest that is not retiring.
    pub fn sealing_id(&self) -> Option<u32> {
        self.sealer().map(|k| k.id)
    }

    fn sealer(&self) -> Option<&Prepared> {
        self.keys.first().filter(|k| k.retire_at_ms.is_none())
    }

    /// Seals (machine id, original value) for `app` with the newest key that is not retiring.
    /// `None` when there is no such key, or when the token would be too long to open
    /// (a machine id over 255 bytes, or a token over [`MAX_TOKEN_LEN`]).
    pub fn seal(&self, app: &str, machine: &str, value: &[u8]) -> Option<String> {
        self.seal_as(app, "", machine, value)
    }

    /// Like [`seal`](Self::seal), for one `purpose` (the header or cookie it travels in):
    /// the token opens only for that purpose, so a token moved into another header or into
    /// the cookie is refused.
    pub fn seal_as(&self, app: &str, purpose: &str, machine: &str, value: &[u8]) -> Option<String> {
        let key = self.sealer()?;
        let machine_len = u8::try_from(machine.len()).ok()?;
        let plain_len = 1 + machine.len() + value.len();
        let raw_len = HEADER_LEN + plain_len + TAG_LEN;
        if TOKEN_PREFIX.len() + base64::encoded_len(raw_len, false)? > MAX_TOKEN_LEN {
            return None;
        }
        let nonce = next_nonce()?;
        let mut raw = Vec::with_capacity(raw_len);
        raw.extend_from_slice(&key.id.to_be_bytes());
        raw.extend_from_slice(&nonce);
        raw.push(machine_len);
        raw.extend_from_slice(machine.as_bytes());
        raw.extend_from_slice(value);
        let nonce = Nonce::assume_unique_for_key(nonce);
        let tag = with_aad(app, purpose, |aad| {
            key.key.seal_in_place_separate_tag(nonce, aad, &mut raw[HEADER_LEN..])
        })
        .ok()?;
        raw.extend_from_slice(tag.as_ref());
        let mut token = String::with_capacity(TOKEN_PREFIX.len() + base64::encoded_len(raw_len, false)?);
        token.push_str(TOKEN_PREFIX);
        URL_SAFE_NO_PAD.encode_string(&raw, &mut token);
        Some(token)
    }

    /// Opens a token sealed for `app`. Fails when it is malformed, truncated, forged, sealed
    /// for another app, under an unknown key, or under a key whose `retire_at_ms` has passed
    /// (`now_ms` is milliseconds since the Unix epoch). Never panics, whatever the input.
    pub fn open(&self, app: &str, token: &[u8], now_ms: i64) -> Result<Opened, SealError> {
        self.open_as(app, "", token, now_ms)
    }

    /// Opens a token sealed by [`seal_as`](Self::seal_as) for `app` and `purpose`.
    pub fn open_as(&self, app: &str, purpose: &str, token: &[u8], now_ms: i64) -> Result<Opened, SealError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(SealError::Malformed);
        }
        let body = token.strip_prefix(TOKEN_PREFIX.as_bytes()).ok_or(SealError::Malformed)?;
        let mut raw = URL_SAFE_NO_PAD.decode(body).map_err(|_| SealError::Malformed)?;
        if raw.len() < HEADER_LEN + 1 + TAG_LEN {
            return Err(SealError::Malformed);
        }
        let (id, nonce) = raw.split_at(ID_LEN);
        let id = u32::from_be_bytes(id.try_into().map_err(|_| SealError::Malformed)?);
        let nonce =
            Nonce::try_assume_unique_for_key(&nonce[..NONCE_LEN]).map_err(|_| SealError::Malformed)?;
        let key = self.keys.iter().find(|k| k.id == id).ok_or(SealError::UnknownKey(id))?;
        if key.retire_at_ms.is_some_and(|at| now_ms >= at) {
            return Err(SealError::Retired(id));
        }
        let tag_at = raw.len() - TAG_LEN;
        let tag = Tag::try_from(&raw[tag_at..]).map_err(|_| SealError::Malformed)?;
        let sealed = &mut raw[HEADER_LEN..tag_at];
        with_aad(app, purpose, |aad| key.key.open_in_place_separate_tag(nonce, aad, tag, sealed, 0..))
            .map_err(|_| SealError::Forged)?;
        // Authenticated: only a sealer of ours wrote this, so a bad layout is a bug, and still
        // an error rather than a panic.
        let plain = &raw[HEADER_LEN..tag_at];
        let (&machine_len, rest) = plain.split_first().ok_or(SealError::Malformed)?;
        let machine = rest.get(..usize::from(machine_len)).ok_or(SealError::Malformed)?;
        let machine: Box<str> = std::str::from_utf8(machine).map_err(|_| SealError::Malformed)?.into();
        let value_at = HEADER_LEN + 1 + usize::from(machine_len);
        raw.truncate(tag_at);
        raw.drain(..value_at);
        Ok(Opened { machine, value: raw, key: id })
    }
}

/// Calls `f` with the additional data for `app` (and `purpose`, after a NUL, when there is
/// one), built on the stack for the names tern accepts, so sealing and opening allocate
/// nothing for it. App names hold no NUL, so no two (app, purpose) pairs share one.
fn with_aad<T>(app: &str, purpose: &str, f: impl FnOnce(Aad<&[u8]>) -> T) -> T {
    let parts: [&[u8]; 4] = if purpose.is_empty() {
        [AAD_DOMAIN, app.as_bytes(), b"", b""]
    } else {
        [AAD_DOMAIN, app.as_bytes(), b"\0", purpose.as_bytes()]
    };
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut buf = [0u8; 256];
    if let Some(dst) = buf.get_mut(..len) {
        let mut at = 0;
        for p in parts {
            dst[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        return f(Aad::from(&*dst));
    }
    let long: Vec<u8> = parts.concat();
    f(Aad::from(long.as_slice()))
}

/// This process's random nonce base, read once: `None` if the system random source failed.
static NONCE_BASE: OnceLock<Option<[u8; NONCE_LEN]>> = OnceLock::new();
static NONCE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The next nonce: this process's random 96-bit base XOR a process-wide 64-bit counter (in
/// the low 64 bits).
///
/// Why this never repeats under a key, across every node sharing it: within a process the
/// counter never repeats (2^64 seals would take centuries), so neither does base XOR
/// counter. Two processes collide only if their random bases happen to differ by exactly
/// the XOR of two counter values; over all tokens sealed under one key that is no likelier
/// than two fully random 96-bit nonces colliding (about n²/2^97 for n tokens), the bound
/// AES-GCM is specified for with random nonces, and rotation keeps n per key bounded.
/// Unlike a random nonce per token, it costs one atomic add rather than a `getrandom`
/// call. A forked child would repeat its parent's nonces, but tern seals only in the
/// process that read the base (the process driver forks only to `exec`).
fn next_nonce() -> Option<[u8; NONCE_LEN]> {
    let base = NONCE_BASE.get_or_init(|| {
        let mut b = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut b).ok().map(|()| b)
    });
    let mut nonce = (*base)?;
    let count = NONCE_COUNTER.fetch_add(1, Ordering::Relaxed);
    for (n, c) in nonce[NONCE_LEN - 8..].iter_mut().zip(count.to_be_bytes()) {
        *n ^= c;
    }
    Some(nonce)
}

#[cfg(test)]
mod tests;
