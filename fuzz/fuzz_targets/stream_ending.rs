//! SSE and WebSocket boundary readers (`src/http/ending.rs`), fed any bytes split at any
//! points: never panic, and report the boundaries a whole-stream reading finds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern::http::ending::fuzz_boundaries(data));
