//! Catalog events with compactions interleaved, checked against a `BTreeMap` model after
//! every step.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern::catalog::fuzz_apply(data));
