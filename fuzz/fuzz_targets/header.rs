//! Fuzzes safetensors header parsing: any bytes must give a header whose tensors tile the data
//! section, or a `Format` error; never a panic, an overflow or an allocation the size of a
//! lying length.
//!
//! `cargo +nightly fuzz run header` (from `fuzz/`). Seeds worth adding to `corpus/header/`:
//! the files under `tests/conformance/data/`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use unibuf::weights::Header;

fuzz_target!(|data: &[u8]| {
    match Header::parse(data) {
        Ok(h) => {
            let mut at = h.data_start();
            for t in h.tensors() {
                assert_eq!(t.range.start, at, "tensors tile the data section");
                assert!(t.range.end >= t.range.start);
                at = t.range.end;
            }
            assert_eq!(at, data.len() as u64, "no trailing bytes");
        }
        Err(unibuf::Error::Format { .. }) => {}
        Err(e) => panic!("header parsing returned a non-Format error: {e}"),
    }
});
