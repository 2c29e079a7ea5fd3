//! Reading the ClientHello before rustls does.
//!
//! rustls buffers at most 64 KiB of handshake data, record headers included: a ClientHello
//! sent in small records (say 512 bytes each, 5 bytes of header apiece) runs out of room
//! well before 64 KiB, and rustls then fails the read with an I/O error, so the client gets
//! no alert at all. Here the hello's records are read first and, when the hello spans more
//! than one, handed to rustls re-framed into full 16 KiB records. A hello too big even so
//! gets a fatal `illegal_parameter` alert, as OpenSSL sends for an excessive message.
//!
//! Anything that is not a handshake record is passed on untouched, for rustls to refuse
//! with the alert it chooses.

use tokio::io::{AsyncRead, AsyncReadExt};

/// The largest ClientHello (handshake header included) rustls can take once re-framed:
/// 64 KiB less five record headers, less the byte rustls keeps free.
pub const MAX_HELLO: usize = 0xffff - 5 * 5 - 1;

/// Payload bytes per TLS record.
const MAX_RECORD: usize = 16 * 1024;

const HANDSHAKE: u8 = 0x16;

/// A fatal `illegal_parameter` (47) alert in a plaintext record.
pub const ILLEGAL_PARAMETER_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 47];

#[derive(Debug, PartialEq, Eq)]
pub enum HelloError {
    /// The connection failed or closed before the hello was whole.
    Io,
    /// The hello is larger than [`MAX_HELLO`].
    TooLarge,
}

/// Reads the client's first flight up to the end of its ClientHello. Returns the bytes for
/// rustls: as read, if the hello came in one record (or is not a hello at all), else the
/// hello re-framed into as few records as possible, followed by whatever was read past it.
/// It holds at most one record beyond the hello itself, and refuses empty records (RFC 8446
/// §5.1 forbids them), so a client cannot make it buffer without bound.
pub async fn read<IO: AsyncRead + Unpin>(io: &mut IO) -> Result<Vec<u8>, HelloError> {
    // Read but not yet taken into `message`: the record being parsed is at its start.
    let mut buf = Vec::with_capacity(READ_AHEAD);
    // The handshake bytes of a hello that spans records (none while it fits in one).
    let mut message: Option<Vec<u8>> = None;
    let mut version = [0x03, 0x01];
    loop {
        fill(io, &mut buf, 5).await?;
        let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
        if buf[0] != HANDSHAKE || len == 0 || len > MAX_RECORD {
            // Not a record of a hello rustls could take: it decides what that is.
            return Ok(match &message {
                None => buf,
                Some(m) => [reframe(m, version), buf].concat(),
            });
        }
        fill(io, &mut buf, 5 + len).await?;
        if message.is_none() {
            version = [buf[1], buf[2]];
            match message_size(&buf[5..5 + len]) {
                // The whole hello in its first record (the usual case): hand it over as read.
                Some(size) if size <= len => return Ok(buf),
                Some(size) if size > MAX_HELLO => return Err(HelloError::TooLarge),
                _ => {}
            }
        }
        let m = message.get_or_insert_with(|| Vec::with_capacity(2 * MAX_RECORD));
        m.extend_from_slice(&buf[5..5 + len]);
        buf.drain(..5 + len);
        let Some(size) = message_size(m) else { continue };
        if size > MAX_HELLO {
            return Err(HelloError::TooLarge);
        }
        if m.len() >= size {
            return Ok([reframe(m, version), buf].concat());
        }
    }
}

/// Bytes asked of the socket at a time.
const READ_AHEAD: usize = 4096;

/// Reads until `buf` holds at least `want` bytes.
async fn fill<IO: AsyncRead + Unpin>(io: &mut IO, buf: &mut Vec<u8>, want: usize) -> Result<(), HelloError> {
    while buf.len() < want {
        buf.reserve(READ_AHEAD.max(want - buf.len()));
        if io.read_buf(buf).await.map_err(|_| HelloError::Io)? == 0 {
            return Err(HelloError::Io);
        }
    }
    Ok(())
}

/// The whole size of the first handshake message (its 4-byte header included), once its
/// header has arrived.
fn message_size(message: &[u8]) -> Option<usize> {
    let header = message.get(..4)?;
    Some(4 + (usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3])))
}

/// The handshake bytes in full-size records.
fn reframe(message: &[u8], version: [u8; 2]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 5 * message.len().div_ceil(MAX_RECORD));
    for chunk in message.chunks(MAX_RECORD) {
        out.push(HANDSHAKE);
        out.extend_from_slice(&version);
        out.extend_from_slice(&u16::try_from(chunk.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handshake message of `size` bytes (header included) in records of `record` bytes.
    fn fragmented(size: usize, record: usize) -> (Vec<u8>, Vec<u8>) {
        let body = size - 4;
        let mut message = vec![1, (body >> 16) as u8, (body >> 8) as u8, body as u8];
        message.extend((0..body).map(|i| i as u8));
        let mut wire = Vec::new();
        for chunk in message.chunks(record) {
            wire.extend_from_slice(&[HANDSHAKE, 3, 1]);
            wire.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            wire.extend_from_slice(chunk);
        }
        (message, wire)
    }

    #[tokio::test]
    async fn a_fragmented_hello_is_reframed_and_a_whole_one_passes_as_is() {
        let (message, wire) = fragmented(60_000, 512);
        let out = read(&mut &wire[..]).await.unwrap();
        assert_eq!(out, reframe(&message, [3, 1]));
        assert_eq!(out.len(), message.len() + 5 * 4, "four full records");

        let (_, wire) = fragmented(300, 16 * 1024);
        assert_eq!(read(&mut &wire[..]).await.unwrap(), wire);
        // Not a handshake: passed on as read, for rustls to refuse.
        assert_eq!(read(&mut &b"GET / HTTP/1.1\r\n"[..]).await.unwrap(), b"GET / HTTP/1.1\r\n");
        // Byte by byte, the same.
        let (message, wire) = fragmented(60_000, 1);
        assert_eq!(read(&mut &wire[..]).await.unwrap(), reframe(&message, [3, 1]));
    }

    #[tokio::test]
    async fn empty_records_are_not_buffered() {
        // A hello's first record, then empty handshake records: handed over at the first one.
        let (_, wire) = fragmented(5_000, 1024);
        let mut stream = wire[..1029].to_vec();
        for _ in 0..1000 {
            stream.extend_from_slice(&[HANDSHAKE, 3, 1, 0, 0]);
        }
        let out = read(&mut &stream[..]).await.unwrap();
        assert!(out.len() < 1029 + 5 + READ_AHEAD + 16, "{}", out.len());
    }

    #[tokio::test]
    async fn too_big_or_cut_short() {
        let (_, wire) = fragmented(MAX_HELLO + 1, 16 * 1024);
        assert_eq!(read(&mut &wire[..]).await, Err(HelloError::TooLarge));
        let (_, wire) = fragmented(MAX_HELLO, 1024);
        assert!(read(&mut &wire[..]).await.is_ok());
        let (_, wire) = fragmented(5_000, 1024);
        assert_eq!(read(&mut &wire[..3000]).await, Err(HelloError::Io));
    }
}
