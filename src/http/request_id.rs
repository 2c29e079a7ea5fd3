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
    RequestId::from(ulid_with(ms, fastrand::u128(..), region))
}

fn ulid_with(ms: u64, random: u128, region: &str) -> String {
    let value: u128 = (u128::from(ms & 0xFFFF_FFFF_FFFF) << 80) | (random & ((1u128 << 80) - 1));
    // Bytes, then one check that they are UTF-8: pushing 26 `char`s one by one checked room
    // and encoded each (about 300 instructions a request).
    let mut out = Vec::with_capacity(27 + region.len());
    out.extend((0..26).rev().map(|i| CROCKFORD[((value >> (i * 5)) & 0x1F) as usize]));
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
}
