//! Declaration parsing (`tern apply`): never panics; every input either parses into hostnames
//! that re-validate or yields a problem pointing at a line of the input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern::decl::fuzz_parse(data));
