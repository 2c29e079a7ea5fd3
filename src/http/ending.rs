//! Ending a stream cleanly when its machine is about to stop or tern is draining, rather
//! than cutting it when the process goes away.
//!
//! - An SSE response ends at the next event boundary (after a blank line), so the client
//!   sees a whole last event and a clean end of body; `EventSource` then reconnects, and
//!   routing sends it to a machine that is staying (or, in a drain, the client reaches the
//!   node or process that is staying).
//! - A WebSocket gets a close frame with status 1001 (going away) in each direction, each
//!   written between two frames (RFC 6455 §5.4 lets control frames go between fragments),
//!   then tern waits briefly for the client's own close frame before closing the socket.
//!   The frame's reason says which of the two ([`Why`]).
//! - Any other upgraded connection is shut down; tern cannot speak its protocol.
//!
//! The signal comes from the machine ([`crate::catalog::MachineLive::end_streams`]) or from
//! the drain ([`super::drain`]). A stream that is in the middle of an event or frame when
//! asked gets [`GRACE`] to reach the end of it; past that it is cut.

use std::time::Duration;

/// How long a stream asked to end may take to reach the end of its current event or frame,
/// and how long a WebSocket client gets to answer tern's close frame.
pub const GRACE: Duration = Duration::from_secs(1);

/// WebSocket close status 1001, "going away": the server is going down.
const GOING_AWAY: [u8; 2] = 1001u16.to_be_bytes();

/// Why a stream is asked to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// Its machine is about to stop or suspend.
    Machine,
    /// tern is draining (stopping, upgrading): this stream's time in the drain came.
    Drain,
}

impl Why {
    /// The reason text of the WebSocket close frame: what a client's log will show.
    pub fn close_reason(self) -> &'static [u8] {
        match self {
            Why::Machine => b"machine stopping",
            Why::Drain => b"proxy going away",
        }
    }
}

/// A close frame (1001, with `why`'s reason): unmasked for the client, masked with `mask`
/// for the machine (frames a client sends must be masked, RFC 6455 §5.3).
pub fn close_frame(why: Why, mask: Option<[u8; 4]>) -> Vec<u8> {
    let reason = why.close_reason();
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&GOING_AWAY);
    payload.extend_from_slice(reason);
    let len = u8::try_from(payload.len()).unwrap_or(125).min(125);
    let mut frame = vec![0x88]; // FIN + opcode 8 (close)
    match mask {
        None => frame.push(len),
        Some(key) => {
            frame.push(0x80 | len);
            frame.extend_from_slice(&key);
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= key[i % 4];
            }
        }
    }
    frame.extend_from_slice(&payload);
    frame
}

/// Where an SSE body is between events: after a blank line (two line endings in a row,
/// each `\n`, `\r` or `\r\n`), the stream may end without cutting an event in half.
#[derive(Debug)]
pub struct SseEdge {
    /// Line endings in a row at the end of what has passed so far.
    endings: u8,
    /// The last byte was `\r`, so a `\n` right after it belongs to the same line ending.
    after_cr: bool,
}

impl Default for SseEdge {
    fn default() -> Self {
        // Nothing has passed yet: a boundary.
        SseEdge { endings: 2, after_cr: false }
    }
}

impl SseEdge {
    /// Takes in `bytes`; returns the offset just after the last event boundary in them
    /// (0 if the only one is where they start), if any.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut last = (self.at_boundary() && !self.after_cr).then_some(0);
        for (i, &b) in bytes.iter().enumerate() {
            // A blank line that ended in a lone `\r`: the boundary was just before `b`.
            if self.after_cr && b != b'\n' && self.at_boundary() {
                last = Some(i);
            }
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' => self.endings = self.endings.saturating_add(1),
                b'\r' => {
                    self.endings = self.endings.saturating_add(1);
                    self.after_cr = true;
                }
                _ => {
                    self.endings = 0;
                    self.after_cr = false;
                }
            }
            // A `\r` that a `\n` may follow is not a boundary yet: that `\n` belongs to it.
            if self.at_boundary() && !self.after_cr {
                last = Some(i + 1);
            }
        }
        last
    }

    pub fn at_boundary(&self) -> bool {
        self.endings >= 2
    }
}

/// Where a WebSocket byte stream (one direction) is between frames: reads frame headers
/// just far enough to know each frame's length.
#[derive(Debug, Default)]
pub struct WsFrames {
    /// Header bytes of the current frame seen so far (a header is at most 14 bytes).
    head: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to come, once its header is complete.
    left: u64,
    /// The opcode of the last complete header.
    last_opcode: Option<u8>,
}

impl WsFrames {
    /// Between two frames.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }

    /// Whether a close frame has been seen (its header, at least).
    pub fn saw_close(&self) -> bool {
        self.last_opcode == Some(0x8)
    }

    /// Takes in `bytes` in order. With `stop_at_boundary`, stops at the first frame
    /// boundary (possibly at once) and returns how many bytes it took; otherwise takes all.
    pub fn feed(&mut self, bytes: &[u8], stop_at_boundary: bool) -> usize {
        let mut at = 0;
        loop {
            if stop_at_boundary && self.at_boundary() {
                return at;
            }
            if at == bytes.len() {
                return at;
            }
            if self.left > 0 {
                let take = usize::try_from(self.left).unwrap_or(usize::MAX).min(bytes.len() - at);
                self.left -= take as u64;
                at += take;
                continue;
            }
            self.head[self.have] = bytes[at];
            self.have += 1;
            at += 1;
            if let Some(len) = self.header_done() {
                self.last_opcode = Some(self.head[0] & 0x0f);
                self.have = 0;
                self.left = len;
            }
        }
    }

    /// How many bytes may be read without going past the end of the current frame (or of
    /// its header, while that is incomplete): at least 1.
    pub fn remaining_hint(&self) -> usize {
        if self.left > 0 {
            return usize::try_from(self.left).unwrap_or(usize::MAX);
        }
        self.header_len().map_or(2, |len| len) - self.have
    }

    /// The length of the header being read, once its first two bytes are in.
    fn header_len(&self) -> Option<usize> {
        if self.have < 2 {
            return None;
        }
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        Some(2 + ext + if self.head[1] & 0x80 != 0 { 4 } else { 0 })
    }

    /// The payload length, once the header in `head` is complete.
    fn header_done(&self) -> Option<u64> {
        let need = self.header_len()?;
        if self.have < need {
            return None;
        }
        let len7 = self.head[1] & 0x7f;
        let ext = need - 2 - if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        Some(match ext {
            2 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.head[2..10]);
                u64::from_be_bytes(b)
            }
            _ => u64::from(len7),
        })
    }
}

/// The fuzz target's property: whatever the bytes and however they are split into reads,
/// [`SseEdge`] and [`WsFrames`] report the boundaries a whole-stream reading finds, and never
/// panic. Two leading bytes seed how the rest is split (and, for WebSocket, which reads stop
/// at a boundary).
///
/// - SSE: after each read, `at_boundary` says whether the stream so far ends in a blank line
///   (two line endings in a row, `\r\n` counting as one; the start counts as a boundary),
///   and `feed` returns the last such place in the read that is not between a `\r` and a
///   `\n` that may follow it, so passing on bytes up to it never splits a line ending.
/// - WebSocket: a boundary is exactly where a frame ends, by its header's length. `feed`
///   with `stop_at_boundary` takes up to the next frame end and no further; without, it
///   takes everything. `remaining_hint` is at least 1, and a read no larger than it is taken
///   whole (the tunnel reads that much and must never drop what it read). `saw_close` says
///   whether the last complete header was a close frame's.
pub fn fuzz_boundaries(data: &[u8]) {
    let (seed, stream) = match data {
        [a, b, rest @ ..] => (u64::from(u16::from_le_bytes([*a, *b])), rest),
        _ => return,
    };
    let sse = SseModel::new(stream);
    let ws = WsModel::new(stream);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut stops = fastrand::Rng::with_seed(!seed);
    let max = 1 + rng.usize(..64);
    for split in [Split::Whole, Split::Bytes, Split::Random] {
        let mut chunk = || match split {
            Split::Whole => stream.len(),
            Split::Bytes => 1,
            Split::Random => rng.usize(..=max),
        };
        // SSE: every byte offered is taken.
        let mut edge = SseEdge::default();
        let mut at = 0;
        while at < stream.len() {
            let end = (at + chunk()).min(stream.len());
            let got = edge.feed(&stream[at..end]).map(|off| at + off);
            assert_eq!(got, sse.last_boundary(at, end), "SSE read {at}..{end} of {stream:?}");
            assert_eq!(edge.at_boundary(), sse.at_boundary(end), "SSE after {end} of {stream:?}");
            at = end;
        }
        ws_reads(&ws, stream, &mut chunk, &mut || stops.bool());
    }
}

#[derive(Clone, Copy)]
enum Split {
    Whole,
    Bytes,
    Random,
}

fn ws_reads(ws: &WsModel, stream: &[u8], chunk: &mut dyn FnMut() -> usize, stop: &mut dyn FnMut() -> bool) {
    let mut frames = WsFrames::default();
    let mut at = 0;
    let mut stalled = false;
    while at < stream.len() {
        let hint = frames.remaining_hint();
        assert!(hint >= 1, "remaining_hint is 0 at {at}");
        // After a read that took nothing (already at a boundary), read on as the tunnel does.
        let stop_at_boundary = !stalled && stop();
        let end = (at + chunk()).min(stream.len());
        let took = frames.feed(&stream[at..end], stop_at_boundary);
        let want = if stop_at_boundary { ws.next_end(at).map_or(end, |e| e.min(end)) } else { end };
        assert_eq!(at + took, want, "WebSocket read {at}..{end} (stop {stop_at_boundary}) of {stream:?}");
        if stop_at_boundary && !ws.is_end(at) && end - at <= hint {
            assert_eq!(took, end - at, "a read of at most remaining_hint ({hint}) was not taken whole");
        }
        at += took;
        stalled = took == 0;
        assert_eq!(frames.at_boundary(), ws.is_end(at), "WebSocket boundary at {at} of {stream:?}");
        assert_eq!(frames.saw_close(), ws.closed_by(at), "close seen by {at} of {stream:?}");
    }
}

/// SSE boundaries found by reading the whole stream backwards from each position.
struct SseModel<'a> {
    bytes: &'a [u8],
}

impl<'a> SseModel<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        SseModel { bytes }
    }

    /// Whether `bytes[..p]` ends in a blank line: two line endings in a row at its end, a
    /// `\r\n` being one and the start of the stream counting as two.
    fn at_boundary(&self, p: usize) -> bool {
        let mut endings = 0;
        let mut j = p;
        while endings < 2 {
            if j == 0 {
                return true;
            }
            match self.bytes[j - 1] {
                b'\n' if j >= 2 && self.bytes[j - 2] == b'\r' => j -= 2,
                b'\n' | b'\r' => j -= 1,
                _ => return false,
            }
            endings += 1;
        }
        true
    }

    /// The last boundary in `from..=to` that reading up to `to` confirms: not right after a
    /// `\r` whose next byte is a `\n` or not read yet.
    fn last_boundary(&self, from: usize, to: usize) -> Option<usize> {
        (from..=to).rev().find(|&q| {
            let after_cr = q > 0 && self.bytes[q - 1] == b'\r';
            self.at_boundary(q) && !(after_cr && (q == to || self.bytes[q] == b'\n'))
        })
    }
}

/// WebSocket frames found by parsing the whole stream from its start.
struct WsModel {
    /// Where each frame ends (its header and payload complete), in order.
    ends: Vec<u128>,
    /// Where each header is complete, with its opcode.
    headers: Vec<(u128, u8)>,
}

impl WsModel {
    fn new(bytes: &[u8]) -> Self {
        let (mut ends, mut headers) = (Vec::new(), Vec::new());
        let mut at: u128 = 0;
        let len = bytes.len() as u128;
        while at + 2 <= len {
            let start = at as usize;
            let (b0, b1) = (bytes[start], bytes[start + 1]);
            let ext = match b1 & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let header = 2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 };
            if at + header as u128 > len {
                break;
            }
            let payload = match ext {
                2 => u128::from(u16::from_be_bytes([bytes[start + 2], bytes[start + 3]])),
                8 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&bytes[start + 2..start + 10]);
                    u128::from(u64::from_be_bytes(b))
                }
                _ => u128::from(b1 & 0x7f),
            };
            headers.push((at + header as u128, b0 & 0x0f));
            at += header as u128 + payload;
            ends.push(at);
        }
        WsModel { ends, headers }
    }

    fn is_end(&self, p: usize) -> bool {
        p == 0 || self.ends.binary_search(&(p as u128)).is_ok()
    }

    /// The first frame end at or after `p`, if the stream holds it.
    fn next_end(&self, p: usize) -> Option<usize> {
        if self.is_end(p) {
            return Some(p);
        }
        let e = *self.ends.iter().find(|e| **e > p as u128)?;
        usize::try_from(e).ok()
    }

    fn closed_by(&self, p: usize) -> bool {
        self.headers.iter().rev().find(|(h, _)| *h <= p as u128).is_some_and(|(_, op)| *op == 0x8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_boundaries_follow_blank_lines_in_any_line_ending() {
        let mut e = SseEdge::default();
        assert!(e.at_boundary(), "nothing sent yet");
        for (chunk, boundary) in [
            (&b"data: one\n"[..], false),
            (b"\n", true),
            (b"data: two\r\n\r", true), // a lone \r ends a line too
            (b"\n", true),              // and this \n completes its \r\n
            (b"event: x\rdata: 3\r\r", true),
            (b"data: partial", false),
            (b"\n\ndata: next", false),
        ] {
            e.feed(chunk);
            assert_eq!(e.at_boundary(), boundary, "after {:?}", String::from_utf8_lossy(chunk));
        }
    }

    #[test]
    fn sse_feed_says_where_the_last_boundary_is() {
        let mut e = SseEdge::default();
        assert_eq!(e.feed(b"data: a\n\ndata: b\n\ndata: c"), Some(18));
        assert_eq!(e.feed(b"ontinued"), None);
        assert_eq!(e.feed(b"\n\n"), Some(2));
        assert_eq!(e.feed(b"data: d\r\n\r\ndata: e"), Some(11));
        assert_eq!(e.feed(b"\r\rx"), Some(2), "a blank line of lone CRs");
        let mut e = SseEdge::default();
        assert_eq!(e.feed(b"data: x"), Some(0), "at the very start");
    }

    fn frame(opcode: u8, masked: bool, payload_len: usize) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        let m = if masked { 0x80 } else { 0 };
        match payload_len {
            0..=125 => f.push(m | payload_len as u8),
            126..=65535 => {
                f.push(m | 126);
                f.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                f.push(m | 127);
                f.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(b'x', payload_len));
        f
    }

    #[test]
    fn websocket_frames_are_followed_across_any_split() {
        let mut stream = Vec::new();
        let mut ends = vec![];
        for (op, masked, len) in
            [(1, false, 5), (2, true, 300), (0, false, 70_000), (9, true, 0), (8, false, 2)]
        {
            stream.extend(frame(op, masked, len));
            ends.push(stream.len());
        }
        // Fed one byte at a time, it is at a boundary exactly at each frame's end.
        let mut f = WsFrames::default();
        for (i, b) in stream.iter().enumerate() {
            f.feed(std::slice::from_ref(b), false);
            assert_eq!(f.at_boundary(), ends.contains(&(i + 1)), "after byte {i}");
        }
        assert!(f.saw_close());
        // Asked to stop at a boundary, it takes exactly the rest of the current frame.
        let mut f = WsFrames::default();
        assert_eq!(f.feed(&stream[..3], false), 3);
        assert_eq!(f.feed(&stream[3..], true), ends[0] - 3);
        assert_eq!(f.feed(&stream[ends[0]..], true), 0, "already between frames");
    }

    #[test]
    fn close_frames_say_going_away_and_are_masked_for_the_machine() {
        let plain = close_frame(Why::Machine, None);
        assert_eq!(&plain[..4], &[0x88, 18, 0x03, 0xe9]);
        assert_eq!(&plain[4..], b"machine stopping");
        let drain = close_frame(Why::Drain, None);
        assert_eq!(&drain[..4], &[0x88, 18, 0x03, 0xe9]);
        assert_eq!(&drain[4..], b"proxy going away");
        let masked = close_frame(Why::Machine, Some([9, 8, 7, 6]));
        assert_eq!(&masked[..2], &[0x88, 0x80 | 18]);
        let unmasked: Vec<u8> =
            masked[6..].iter().enumerate().map(|(i, b)| b ^ [9, 8, 7, 6][i % 4]).collect();
        assert_eq!(&unmasked[..], &plain[2..]);
        let mut f = WsFrames::default();
        assert_eq!(f.feed(&masked, false), masked.len());
        assert!(f.at_boundary() && f.saw_close());
    }

    #[test]
    fn fuzz_property_holds_on_samples() {
        let mut ws = Vec::new();
        for (op, masked, len) in
            [(1, false, 5), (2, true, 300), (0, false, 70_000), (9, true, 0), (8, false, 2)]
        {
            ws.extend(frame(op, masked, len));
        }
        let samples: [&[u8]; 7] = [
            b"\x01\x00data: a\n\ndata: b\r\n\r\ndata: c\r\rx",
            b"\x07\x00\r\n\r\n\r\r\n\n\r",
            b"\x02\x01\x81\x7f\xff\xff\xff\xff\xff\xff\xff\xffabc",
            b"\x03\x01\x82\x7f\x00\x00\x00\x00\x00\x00\x00\x03abc\x88\x00",
            b"\x05\x00\x88\xfe\x00\x02\x01\x02\x03\x04\x05\x06\x07\x08",
            b"\x00\x00",
            &ws,
        ];
        for s in samples {
            fuzz_boundaries(s);
        }
        let mut rng = fastrand::Rng::with_seed(0x55e);
        for _ in 0..500 {
            let len = rng.usize(2..120);
            // Mostly line endings and small frame headers, so boundaries come often.
            let alphabet = [b'\n', b'\r', b'a', 0x81, 0x88, 0x02, 0x7e, 0x7f, 0x00];
            let data: Vec<u8> = (0..len).map(|_| alphabet[rng.usize(..alphabet.len())]).collect();
            fuzz_boundaries(&data);
        }
    }
}
