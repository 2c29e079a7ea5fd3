//! Request ids in fly-proxy's form: a ULID (48-bit millisecond time, 80 random bits,
//! Crockford base32) followed by "-" and the node's region, e.g. `01J5…XYZ-ams`. They sort
//! by time and are unique without coordination between nodes.

use std::time::{SystemTime, UNIX_EPOCH};

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

pub fn new(region: &str) -> String {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    ulid_with(ms, fastrand::u128(..), region)
}

fn ulid_with(ms: u64, random: u128, region: &str) -> String {
    let value: u128 = (u128::from(ms & 0xFFFF_FFFF_FFFF) << 80) | (random & ((1u128 << 80) - 1));
    let mut out = String::with_capacity(27 + region.len());
    for i in (0..26).rev() {
        let digit = ((value >> (i * 5)) & 0x1F) as usize;
        out.push(CROCKFORD[digit] as char);
    }
    out.push('-');
    out.push_str(region);
    out
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
        assert_ne!(new("ams"), new("ams"));
    }
}
