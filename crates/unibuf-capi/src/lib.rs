//! # unibuf-capi
//!
//! The stable C ABI of [`unibuf`]: devices, queues, buffers and views, transfers with
//! fences, host mappings and wrapped host memory, interop with foreign memory, streams and
//! work, the fused inference ops, GGUF block matrices and the ops over them, launch batches
//! (a decode step recorded once and replayed as one submission), weights files, memory stats
//! and the copy audit. The header
//! `include/unibuf.h` is generated from this crate by cbindgen (and checked against it by the
//! crate's tests); `include/unibuf.hpp` is a header-only C++17 wrapper over it with RAII types
//! and exceptions. This layer is thin: every call is the Rust API's, never a second
//! implementation.
//!
//! ## The contract, in brief
//! - **Errors.** Every entry point returns a [`ub_status`]; on failure the thread's last error
//!   ([`ub_last_error_message`], [`ub_last_error_retryable`]) says what was wrong with which
//!   values. Nothing unwinds into C: a panic is caught at the boundary and becomes
//!   `UB_STATUS_PANIC` ([`call`]).
//! - **Handles** are opaque values checked against a registry ([`handle`]): `ub_*_release(NULL)`
//!   is a no-op, a double release or a stale handle is `UB_STATUS_INVALID_HANDLE`, never
//!   undefined behaviour, and no freed memory is read to find that out.
//! - **Fences** are plain value structs ([`ub_fence`]): they own nothing and need no release.
//! - **Pointers and sizes** from C are checked: NULL, alignment for the pointee, lengths that
//!   overflow, offsets out of range. What cannot be checked (dangling pointers, a length
//!   longer than the memory) is stated in each function's `# Safety` section: every function
//!   that reads or writes through a pointer argument is an `unsafe extern "C" fn`. A function
//!   whose only pointer arguments are handles (`ub_buffer_release`, `ub_queue_copy`, ...) is a
//!   safe `extern "C" fn`: a handle is never dereferenced, only looked up, so any value a
//!   caller passes is checked rather than trusted and there is no contract left to state.
//! - **Threads.** Every handle may be used from any thread, concurrently; the last error is
//!   per thread.
//!
//! One concept per module: [`error`] (statuses, the last error), [`call`] (the boundary
//! helper and pointer checks), [`handle`] (the registry), [`types`] (dtypes, storage modes),
//! [`device`], [`queue`], [`fence`], [`buffer`] (allocation and views), [`host`] (wrapped host
//! memory, host mappings), [`transfer`], [`interop`], [`ops`], [`ggml`] (GGUF block matrices
//! and their ops), [`batch`] (launch batches and their recording queues), [`weights`],
//! [`stats`] (memory stats, the copy audit, live handle counts).

#![allow(non_camel_case_types)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(clippy::missing_safety_doc)]

pub mod batch;
pub mod buffer;
pub mod call;
pub mod device;
pub mod error;
pub mod fence;
pub mod ggml;
pub mod handle;
pub mod host;
pub mod interop;
pub mod ops;
pub mod queue;
pub mod stats;
pub mod transfer;
pub mod types;
pub mod weights;

pub use batch::*;
pub use buffer::*;
pub use device::*;
pub use error::{ub_last_error_message, ub_last_error_retryable, ub_last_error_status, ub_status};
pub use fence::*;
pub use ggml::*;
pub use host::*;
pub use interop::*;
pub use ops::*;
pub use queue::*;
pub use stats::*;
pub use transfer::*;
pub use types::*;
pub use weights::*;

/// The major version of the ABI: changes only with an incompatible change (none so far).
pub const UB_ABI_VERSION_MAJOR: u32 = 1;
/// The minor version of the ABI: grows when functions, statuses or fields are added.
pub const UB_ABI_VERSION_MINOR: u32 = 1;

/// The ABI version of the library loaded, `major << 16 | minor`: compare its major with
/// `UB_ABI_VERSION_MAJOR` of the header you compiled against.
#[no_mangle]
pub extern "C" fn ub_abi_version() -> u32 {
    (UB_ABI_VERSION_MAJOR << 16) | UB_ABI_VERSION_MINOR
}
