//! Fuzz target for the GGUF reader (and the write-back path): see `moa::gguf::exercise`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    moa::gguf::exercise(data);
});
