//! The SNI peek of TCP services on shared addresses (`tern::tls::peek_sni`): a client's
//! first bytes, read up to the end of a ClientHello without answering. Never a panic; a
//! server name found is normalised, and the bytes handed on name the same server.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern::tls::fuzz_sni_peek(data));
