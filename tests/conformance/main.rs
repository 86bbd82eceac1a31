//! The conformance suite: one set of tests against the public API, for every backend.
//!
//! Run with `UNIBUF_BACKEND=cpu|cuda|metal cargo test -p unibuf-conformance` (default cpu).
//! Naming a backend that is absent fails every test; nothing is skipped.

mod bad_input;
mod external;
mod faults;
mod interop;
mod interop_dlpack;
mod kernels;
mod ledger;
mod memory;
mod model;
mod ops_attention;
mod ops_ggml;
mod ops_ggml_fused;
mod ops_matmul;
mod ops_norm;
mod ops_q4_sample;
mod queues;
mod transfers;
mod views;
mod weights;
