//! A hostname as a key of the catalog's hostname maps, held in the map's own slot when it is
//! short (almost every hostname is): a lookup compares the name it was asked for with bytes
//! it already read, instead of following a pointer to a separate allocation first. At a
//! million apps that pointer is a cache miss on nearly every lookup (the routing path's
//! hottest read), and the allocation 32 bytes a name.
//!
//! The maps borrow it as bytes (`[u8]`), so a lookup hashes and compares plain bytes; every
//! key is made from a `&str`, so the bytes are always UTF-8.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// Bytes a hostname may have to be held inline: with the length, 31 bytes, and 32 with the
/// tag, the size of the pointer-and-length it replaces plus the allocation's header.
const INLINE: usize = 30;

#[derive(Clone)]
pub enum HostKey {
    Inline { len: u8, bytes: [u8; INLINE] },
    Shared(Arc<str>),
}

impl HostKey {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            HostKey::Inline { len, bytes } => &bytes[..usize::from(*len)],
            HostKey::Shared(s) => s.as_bytes(),
        }
    }
}

impl From<&str> for HostKey {
    fn from(s: &str) -> HostKey {
        if s.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            // At most INLINE (30): fits.
            HostKey::Inline { len: s.len() as u8, bytes }
        } else {
            HostKey::Shared(Arc::from(s))
        }
    }
}

impl Borrow<[u8]> for HostKey {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

// As the borrowed form hashes and compares, whichever way the name is held.
impl Hash for HostKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl PartialEq for HostKey {
    fn eq(&self, other: &HostKey) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for HostKey {}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn short_and_long_names_are_the_same_keys_as_their_bytes() {
        let long = "a-rather-long-label.another-long-label.example.com";
        let mut m: HashMap<HostKey, u32, foldhash::fast::RandomState> = HashMap::default();
        m.insert(HostKey::from("app.test"), 1);
        m.insert(HostKey::from(long), 2);
        m.insert(HostKey::from(""), 3);
        m.insert(HostKey::from("x".repeat(INLINE).as_str()), 4);
        m.insert(HostKey::from("x".repeat(INLINE + 1).as_str()), 5);
        assert!(matches!(HostKey::from("app.test"), HostKey::Inline { len: 8, .. }));
        assert!(matches!(HostKey::from(long), HostKey::Shared(_)));
        assert_eq!(m.get(b"app.test".as_slice()), Some(&1));
        assert_eq!(m.get(long.as_bytes()), Some(&2));
        assert_eq!(m.get(b"".as_slice()), Some(&3));
        assert_eq!(m.get("x".repeat(INLINE).as_bytes()), Some(&4));
        assert_eq!(m.get("x".repeat(INLINE + 1).as_bytes()), Some(&5));
        assert_eq!(m.get(b"app.tes".as_slice()), None);
        assert_eq!(std::mem::size_of::<HostKey>(), 32);
    }
}
