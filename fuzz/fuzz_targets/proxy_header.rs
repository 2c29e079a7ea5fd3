//! PROXY protocol v1/v2 headers: never a panic; a header found is no longer than the input,
//! parses the same on its own, and every shorter prefix of it asks for more bytes.
#![no_main]

use tern::listener::proxy_protocol::parse;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(Some((header, len))) = parse(data) {
        assert!(len <= data.len());
        assert_eq!(parse(&data[..len]), Ok(Some((header, len))));
        for cut in 0..len {
            assert_eq!(parse(&data[..cut]), Ok(None), "a prefix of {cut} bytes");
        }
    }
});
