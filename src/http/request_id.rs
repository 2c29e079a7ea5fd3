//! Request ids in fly-proxy's form: a ULID (48-bit millisecond time, 80 random bits,
//! Crockford base32) followed by "-" and the node's region, e.g. `01J5…XYZ-ams`. They sort
//! by time and are unique without coordination between nodes.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderValue;

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A request's id, kept as the header value it is sent as: made once, it goes to the
/// machine (`fly-request-id`) and back to the client without another copy.
#[derive(Clone, Debug)]
pub struct RequestId(HeaderValue);

impl RequestId {
    pub fn header(&self) -> &HeaderValue {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        // Made from text (ids are ASCII): it reads back.
        self.0.to_str().unwrap_or("-")
    }
}

impl From<String> for RequestId {
    /// An id from elsewhere (a handed-over request's); text no header may carry becomes "-".
    fn from(id: String) -> RequestId {
        RequestId(HeaderValue::from_maybe_shared(Bytes::from(id)).unwrap_or(HeaderValue::from_static("-")))
    }
}

impl std::ops::Deref for RequestId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub fn new(region: &str) -> RequestId {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let random = fastrand::u128(..);
    match Inline::new(ms, random, region) {
        // One allocation, which each copy of the value shares by a count. From a `String`,
        // the first copy (the response's) made a second allocation to share the first.
        Some(id) => RequestId(
            HeaderValue::from_maybe_shared(Bytes::from_owner(id)).unwrap_or(HeaderValue::from_static("-")),
        ),
        None => RequestId::from(ulid_with(ms, random, region)),
    }
}

/// An id whose region fits in a fixed buffer (any region of a few letters).
struct Inline {
    buf: [u8; 48],
    len: u8,
}

impl Inline {
    fn new(ms: u64, random: u128, region: &str) -> Option<Inline> {
        let len = 27 + region.len();
        if len > 48 {
            return None;
        }
        let mut buf = [0; 48];
        buf[..26].copy_from_slice(&digits(ms, random));
        buf[26] = b'-';
        buf[27..len].copy_from_slice(region.as_bytes());
        Some(Inline { buf, len: len as u8 })
    }
}

impl AsRef<[u8]> for Inline {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

/// The ULID's 26 Crockford digits.
fn digits(ms: u64, random: u128) -> [u8; 26] {
    let value: u128 = (u128::from(ms & 0xFFFF_FFFF_FFFF) << 80) | (random & ((1u128 << 80) - 1));
    std::array::from_fn(|i| CROCKFORD[((value >> ((25 - i) * 5)) & 0x1F) as usize])
}

fn ulid_with(ms: u64, random: u128, region: &str) -> String {
    // Bytes, then one check that they are UTF-8: pushing 26 `char`s one by one checked room
    // and encoded each (about 300 instructions a request).
    let mut out = Vec::with_capacity(27 + region.len());
    out.extend_from_slice(&digits(ms, random));
    out.push(b'-');
    out.extend_from_slice(region.as_bytes());
    String::from_utf8(out).expect("Crockford digits, a dash and a &str are UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_and_order() {
        let a = ulid_with(1_700_000_000_000, 0, "ams");
        let b = ulid_with(1_700_000_000_001, 0, "ams");
        assert_eq!(a.len(), 30);
        assert!(a.ends_with("-ams"));
        assert!(a < b, "ids sort by time");
        assert_ne!(new("ams").as_str(), new("ams").as_str());
        assert_eq!(new("ams").header().len(), 30, "the header value is the id");
    }

    #[test]
    fn an_inline_id_is_the_same_as_a_made_one() {
        let (ms, random) = (1_700_000_000_123, 0x0123_4567_89AB_CDEF_0123_4567_89AB_CDEF);
        // By the ULID definition, worked out apart from this code: the 48-bit time, then the
        // low 80 bits of `random`, in Crockford base 32, most significant digit first.
        assert_eq!(&digits(ms, random), b"01HF7YAT3VSQQG28T5CY4TQKFF");
        for region in ["ams", "", "a-long-region-name-xx"] {
            let inline = Inline::new(ms, random, region).expect("fits");
            assert_eq!(inline.as_ref(), ulid_with(ms, random, region).as_bytes());
        }
        assert!(Inline::new(ms, random, &"r".repeat(22)).is_none());
        // A region too long for the buffer still gets its id, made the other way.
        let long = "r".repeat(40);
        assert!(new(&long).as_str().ends_with(&long));
        assert_eq!(new(&long).as_str().len(), 67);
    }
}
