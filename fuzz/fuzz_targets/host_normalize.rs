//! Host header / `:authority` normalisation: never panics; a normalised host is a
//! lower-case fixed point with no port and no trailing dot.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern::routing::host::fuzz_normalize(data));
