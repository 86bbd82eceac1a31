//! The conformance suite. Run with `UNIBUF_BACKEND=cpu|cuda|metal cargo test -p unibuf-conformance`.

mod bad_input;
mod core;
