//! PROXY protocol v1/v2 headers: never a panic; a header found is no longer than the input,
//! parses the same on its own, and every shorter prefix of it asks for more bytes; and no
//! input of V2_MAX bytes or more still asks for more (what a reader buffers is bounded).
#![no_main]

use tern::listener::proxy_protocol::{V2_MAX, parse};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() >= V2_MAX {
        assert_ne!(parse(data), Ok(None), "still undecided after {} bytes", data.len());
    }
    if let Ok(Some((header, len))) = parse(data) {
        assert!(len <= data.len());
        assert_eq!(parse(&data[..len]), Ok(Some((header, len))));
        for cut in 0..len {
            assert_eq!(parse(&data[..cut]), Ok(None), "a prefix of {cut} bytes");
        }
    }
});
