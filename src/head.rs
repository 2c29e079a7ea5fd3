//! What tern's two HTTP/1.1 head parsers share (its own server's request heads, its own
//! client's response heads): a field table httparse fills without tern clearing it first,
//! and where each field sits in the read buffer, kept past the parse so that the fields can
//! share the head's bytes once it is split off that buffer.
//!
//! The table is not cleared, and the places are sized for the usual head, not the worst:
//! clearing a hundred fields and a hundred places was 5.6 KB written per head, twice per
//! proxied request, before one byte was parsed; now the 24 inline places (384 bytes) are.

use std::mem::MaybeUninit;
use std::ops::Range;

/// Most header fields in a head: hyper's limit, kept by both parsers. A request head with
/// more is left to hyper's server (which refuses it); a response head with more is refused.
pub const MAX_FIELDS: usize = 100;

/// The table httparse parses a head's fields into; it writes each entry before it is read.
pub type Table<'b> = [MaybeUninit<httparse::Header<'b>>; MAX_FIELDS];

/// A field table, not cleared (httparse's `parse_with_uninit_headers` fills it).
pub fn table<'b>() -> Table<'b> {
    [const { MaybeUninit::uninit() }; MAX_FIELDS]
}

/// Whether a field speaks only of this connection and nothing else, so that a parser can
/// leave it out of the map it builds: `Keep-Alive`, and a `Connection` that says only
/// `keep-alive` or `close` (most machines send one; browsers too). tern strips both before
/// the next hop in any case (`http::headers`). A `Connection` naming any other field stays,
/// so that the field it names is stripped too. What it said of the connection the parser
/// reads before leaving it out.
pub fn only_this_hop(name: &http::HeaderName, value: &[u8]) -> bool {
    // Compared as a name, not as text: a standard name's text is a table lookup, and a
    // standard name never equals this one.
    const KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");
    if *name == KEEP_ALIVE {
        return true;
    }
    *name == http::header::CONNECTION
        && value.split(|b| *b == b',').map(<[u8]>::trim_ascii).all(|t| {
            t.is_empty() || t.eq_ignore_ascii_case(b"keep-alive") || t.eq_ignore_ascii_case(b"close")
        })
}

/// Fields most heads fit in (a browser's request has about fifteen, a response fewer); more
/// are placed in a vector.
const FEW: usize = 24;

/// A field's name and value, as byte ranges of the buffer it was parsed from.
type Place = (Range<usize>, Range<usize>);

/// Where each field of a parsed head sits in its buffer: inline for a head of up to [`FEW`]
/// fields, in a vector for a larger one.
///
/// An inline place is four `u32`s (heads are far under 4 GiB: both parsers refuse one over
/// their limit, at most 16 MiB), so the inline table cleared for each head is 384 bytes,
/// not 768.
pub struct Places {
    few: [[u32; 4]; FEW],
    len: usize,
    many: Vec<Place>,
}

impl Places {
    /// The places of `fields`, parsed from `buf`. Inlined, so that its table is built where
    /// the caller keeps it rather than copied there.
    #[inline(always)]
    pub fn of(buf: &[u8], fields: &[httparse::Header<'_>]) -> Places {
        let base = buf.as_ptr() as usize;
        let at = |s: &[u8]| (s.as_ptr() as usize - base, s.len());
        let mut places = Places { few: [[0; 4]; FEW], len: fields.len(), many: Vec::new() };
        if fields.len() <= FEW && buf.len() <= u32::MAX as usize {
            // In range: each field lies within `buf`, whose length fits.
            let small = |n: usize| n as u32;
            for (place, field) in places.few.iter_mut().zip(fields) {
                let ((n, nl), (v, vl)) = (at(field.name.as_bytes()), at(field.value));
                *place = [small(n), small(nl), small(v), small(vl)];
            }
        } else {
            let place = |f: &httparse::Header<'_>| {
                let ((n, nl), (v, vl)) = (at(f.name.as_bytes()), at(f.value));
                (n..n + nl, v..v + vl)
            };
            places.many = fields.iter().map(place).collect();
        }
        places
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Each field's name and value ranges, in the head's order.
    pub fn iter(&self) -> impl Iterator<Item = Place> + '_ {
        let few = if self.many.is_empty() { &self.few[..self.len] } else { &[][..] };
        let wide = |n: u32| n as usize;
        few.iter()
            .map(move |&[n, nl, v, vl]| (wide(n)..wide(n) + wide(nl), wide(v)..wide(v) + wide(vl)))
            .chain(self.many.iter().cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields_of(head: &[u8]) -> Vec<(String, String)> {
        let mut table = table();
        let mut req = httparse::Request::new(&mut []);
        let status = req.parse_with_uninit_headers(head, &mut table).expect("parses");
        assert!(status.is_complete());
        let places = Places::of(head, req.headers);
        assert_eq!(places.len(), req.headers.len());
        let text = |r: Range<usize>| String::from_utf8(head[r].to_vec()).expect("ascii");
        places.iter().map(|(n, v)| (text(n), text(v))).collect()
    }

    #[test]
    fn a_few_fields_are_placed_where_they_sit_in_the_head() {
        let fields = fields_of(b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Empty:\r\nAccept: */*\r\n\r\n");
        let want = [("Host", "a.example"), ("X-Empty", ""), ("Accept", "*/*")];
        assert_eq!(fields, want.map(|(n, v)| (n.to_owned(), v.to_owned())));
    }

    #[test]
    fn more_fields_than_fit_inline_are_placed_all_the_same() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_FIELDS {
            head.extend_from_slice(format!("x-{i}: value {i}\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let fields = fields_of(&head);
        assert_eq!(fields.len(), MAX_FIELDS);
        assert!(
            fields.iter().enumerate().all(|(i, (n, v))| *n == format!("x-{i}") && *v == format!("value {i}"))
        );
    }

    #[test]
    fn a_head_over_the_field_limit_is_refused() {
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_FIELDS {
            head.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let mut table = table();
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, &head, &mut table);
        assert_eq!(parsed, Err(httparse::Error::TooManyHeaders));
    }
}
