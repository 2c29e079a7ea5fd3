//! The server side of a TLS handshake (`tern::tls::fuzz_handshake`): a client's bytes, read as
//! its first flight and then handed to rustls's unbuffered state machine through tern's own
//! stream. Never a panic, never a wait once the input is read.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern::tls::fuzz_handshake(data));
