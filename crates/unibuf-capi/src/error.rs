//! The error model of the C ABI: [`ub_status`] codes, the thread-local last error, and the
//! mapping from [`unibuf::Error`].
//!
//! Every entry point returns a [`ub_status`]. When it is not `UB_STATUS_OK`, the calling
//! thread's last error holds the status, a message (the function's name, then the Display
//! text of the underlying [`unibuf::Error`] or of the binding-level problem) and whether
//! retrying can help ([`unibuf::Error::is_retryable`]). A call that succeeds clears it, so the
//! last error always describes the last call made on this thread.

use std::cell::RefCell;
use std::ffi::{c_char, CString};

/// The result of every entry point. `UB_STATUS_OK` is 0; every other value is a failure whose
/// details are in `ub_last_error_message`.
///
/// Each variant of `unibuf::Error` has a status of its own, so that a caller can switch on the
/// cause without parsing messages; the binding adds `NULL_POINTER`, `INVALID_HANDLE`,
/// `BUFFER_TOO_SMALL` and `PANIC`. Values are stable: new statuses are only appended.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ub_status {
    /// Success.
    UB_STATUS_OK = 0,
    /// An argument is invalid in a way no more specific status covers
    /// (`Error::InvalidArgument`, or an enum value this header does not define).
    UB_STATUS_INVALID_ARGUMENT = 1,
    /// A required pointer argument is NULL.
    UB_STATUS_NULL_POINTER = 2,
    /// A handle is not live: released already, never issued, or a handle of another kind.
    UB_STATUS_INVALID_HANDLE = 3,
    /// An offset, range or index lies outside what it addresses (`Error::OutOfBounds`).
    UB_STATUS_OUT_OF_RANGE = 4,
    /// Memory could not be allocated even after the cache was released and pending work
    /// waited for (`Error::OutOfMemory`). Retryable: freeing buffers can make it succeed.
    UB_STATUS_OUT_OF_MEMORY = 5,
    /// The request can never fit on this device (`Error::NeverFits`).
    UB_STATUS_NEVER_FITS = 6,
    /// The allocation would pass the memory or residency budget (`Error::BudgetExceeded`).
    /// Retryable.
    UB_STATUS_BUDGET_EXCEEDED = 7,
    /// Shapes, lengths or element counts that must agree do not (`Error::ShapeMismatch`).
    UB_STATUS_SHAPE_MISMATCH = 8,
    /// A dtype is not the one required (`Error::DTypeMismatch`).
    UB_STATUS_DTYPE_MISMATCH = 9,
    /// A value is not a multiple of the alignment it needs (`Error::Misaligned`).
    UB_STATUS_MISALIGNED = 10,
    /// The host tried to reach memory it cannot (a Private buffer; `Error::NotHostAccessible`).
    UB_STATUS_NOT_HOST_ACCESSIBLE = 11,
    /// A write to read-only memory (`Error::ReadOnly`).
    UB_STATUS_READ_ONLY = 12,
    /// A host mapping and device work overlap on the same bytes (`Error::HostAccessConflict`).
    /// Retryable: release the mapping and call again.
    UB_STATUS_HOST_ACCESS_CONFLICT = 13,
    /// An object of another device was passed (`Error::WrongDevice`).
    UB_STATUS_WRONG_DEVICE = 14,
    /// The device faulted; it stays faulted until `ub_device_reset` (`Error::DeviceFault`).
    UB_STATUS_DEVICE_FAULT = 15,
    /// The backend cannot do this (`Error::Unsupported`).
    UB_STATUS_UNSUPPORTED = 16,
    /// The named backend is not compiled in or has no device (`Error::BackendUnavailable`).
    UB_STATUS_BACKEND_UNAVAILABLE = 17,
    /// A kernel failed to compile (`Error::Compile`).
    UB_STATUS_COMPILE = 18,
    /// A weights file is malformed (`Error::Format`).
    UB_STATUS_FORMAT = 19,
    /// External work (a callback of `ub_queue_external`) failed (`Error::External`).
    UB_STATUS_EXTERNAL = 20,
    /// An I/O error (`Error::Io`).
    UB_STATUS_IO = 21,
    /// A string or array output is shorter than the result; the length needed was written.
    UB_STATUS_BUFFER_TOO_SMALL = 22,
    /// The library panicked (a bug in unibuf): the panic was caught at the boundary and the
    /// call had no effect beyond what it did before panicking.
    UB_STATUS_PANIC = 23,
    /// An error of a kind newer than this header (`unibuf::Error` is non-exhaustive).
    UB_STATUS_UNKNOWN = 24,
}

use ub_status::*;

/// A failed call: its status, its message, and whether a retry can succeed.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub status: ub_status,
    pub message: String,
    pub retryable: bool,
}

/// `Result` of the internal implementation of an entry point.
pub(crate) type CResult<T> = Result<T, Failure>;

impl Failure {
    /// A binding-level failure that is not retryable.
    pub fn new(status: ub_status, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
            retryable: false,
        }
    }

    /// `what` is NULL but must not be.
    pub fn null(what: &str) -> Failure {
        Failure::new(UB_STATUS_NULL_POINTER, format!("{what} is NULL"))
    }

    /// An invalid argument, as the core reports one.
    pub fn invalid(what: &'static str, detail: impl Into<String>) -> Failure {
        unibuf::Error::InvalidArgument {
            what,
            detail: detail.into(),
        }
        .into()
    }
}

/// The status of each `unibuf::Error` variant.
pub(crate) fn status_of(e: &unibuf::Error) -> ub_status {
    use unibuf::Error as E;
    match e {
        E::OutOfMemory { .. } => UB_STATUS_OUT_OF_MEMORY,
        E::NeverFits { .. } => UB_STATUS_NEVER_FITS,
        E::BudgetExceeded { .. } => UB_STATUS_BUDGET_EXCEEDED,
        E::OutOfBounds { .. } => UB_STATUS_OUT_OF_RANGE,
        E::ShapeMismatch { .. } => UB_STATUS_SHAPE_MISMATCH,
        E::DTypeMismatch { .. } => UB_STATUS_DTYPE_MISMATCH,
        E::Misaligned { .. } => UB_STATUS_MISALIGNED,
        E::NotHostAccessible { .. } => UB_STATUS_NOT_HOST_ACCESSIBLE,
        E::ReadOnly { .. } => UB_STATUS_READ_ONLY,
        E::HostAccessConflict { .. } => UB_STATUS_HOST_ACCESS_CONFLICT,
        E::WrongDevice { .. } => UB_STATUS_WRONG_DEVICE,
        E::InvalidArgument { .. } => UB_STATUS_INVALID_ARGUMENT,
        E::DeviceFault { .. } => UB_STATUS_DEVICE_FAULT,
        E::Unsupported { .. } => UB_STATUS_UNSUPPORTED,
        E::BackendUnavailable { .. } => UB_STATUS_BACKEND_UNAVAILABLE,
        E::Compile { .. } => UB_STATUS_COMPILE,
        E::Format { .. } => UB_STATUS_FORMAT,
        E::External { .. } => UB_STATUS_EXTERNAL,
        E::Io { .. } => UB_STATUS_IO,
        // `unibuf::Error` is non-exhaustive: a variant added later is UNKNOWN (with its
        // message) until it gets a status of its own.
        _ => UB_STATUS_UNKNOWN,
    }
}

impl From<unibuf::Error> for Failure {
    fn from(e: unibuf::Error) -> Failure {
        Failure {
            status: status_of(&e),
            message: e.to_string(),
            retryable: e.is_retryable(),
        }
    }
}

/// The calling thread's last error.
struct LastError {
    status: ub_status,
    message: CString,
    retryable: bool,
}

thread_local! {
    /// `None` while the last call on this thread succeeded (or none was made).
    static LAST: RefCell<Option<LastError>> = const { RefCell::new(None) };
}

/// A message as a C string: an interior NUL (from a label or a path) is shown as `\0`.
fn c_message(s: String) -> CString {
    CString::new(s).unwrap_or_else(|e| {
        let escaped = String::from_utf8_lossy(&e.into_vec()).replace('\0', "\\0");
        CString::new(escaped).unwrap_or_default()
    })
}

/// Records `failure` of the entry point `function` as this thread's last error and returns
/// its status.
pub(crate) fn set_last(function: &str, failure: Failure) -> ub_status {
    let status = failure.status;
    let message = c_message(format!("{function}: {}", failure.message));
    // During thread teardown the slot may be gone; the status still reaches the caller.
    let _ = LAST.try_with(|l| {
        *l.borrow_mut() = Some(LastError {
            status,
            message,
            retryable: failure.retryable,
        })
    });
    status
}

/// Clears this thread's last error after a call that succeeded.
pub(crate) fn clear_last() {
    let _ = LAST.try_with(|l| {
        l.borrow_mut().take();
    });
}

/// The message of the last failed call on this thread: `"function: what was wrong, with the
/// values"`, or `""` if the last call succeeded.
///
/// Never NULL. The string belongs to the library and stays valid until the next call on this
/// thread of a function that returns a `ub_status`; copy it to keep it.
#[no_mangle]
pub extern "C" fn ub_last_error_message() -> *const c_char {
    LAST.try_with(|l| l.borrow().as_ref().map(|e| e.message.as_ptr()))
        .ok()
        .flatten()
        .unwrap_or(c"".as_ptr())
}

/// The status of the last call on this thread (`UB_STATUS_OK` if it succeeded).
#[no_mangle]
pub extern "C" fn ub_last_error_status() -> ub_status {
    LAST.try_with(|l| l.borrow().as_ref().map(|e| e.status))
        .ok()
        .flatten()
        .unwrap_or(UB_STATUS_OK)
}

/// Whether the last failed call on this thread can succeed if made again unchanged, later:
/// after memory is freed (`OUT_OF_MEMORY`, `BUDGET_EXCEEDED`) or after a host mapping is
/// released (`HOST_ACCESS_CONFLICT`). This is `unibuf::Error::is_retryable`; every
/// binding-level failure (NULL pointers, stale handles, short buffers, panics) is not
/// retryable. `false` if the last call succeeded.
#[no_mangle]
pub extern "C" fn ub_last_error_retryable() -> bool {
    LAST.try_with(|l| l.borrow().as_ref().is_some_and(|e| e.retryable))
        .unwrap_or(false)
}

/// The name of a status, e.g. `"UB_STATUS_OUT_OF_RANGE"`: a static string, never NULL
/// (`"UB_STATUS_<invalid>"` for a value that is no status).
#[no_mangle]
pub extern "C" fn ub_status_name(status: i32) -> *const c_char {
    let name: &'static std::ffi::CStr = match status {
        0 => c"UB_STATUS_OK",
        1 => c"UB_STATUS_INVALID_ARGUMENT",
        2 => c"UB_STATUS_NULL_POINTER",
        3 => c"UB_STATUS_INVALID_HANDLE",
        4 => c"UB_STATUS_OUT_OF_RANGE",
        5 => c"UB_STATUS_OUT_OF_MEMORY",
        6 => c"UB_STATUS_NEVER_FITS",
        7 => c"UB_STATUS_BUDGET_EXCEEDED",
        8 => c"UB_STATUS_SHAPE_MISMATCH",
        9 => c"UB_STATUS_DTYPE_MISMATCH",
        10 => c"UB_STATUS_MISALIGNED",
        11 => c"UB_STATUS_NOT_HOST_ACCESSIBLE",
        12 => c"UB_STATUS_READ_ONLY",
        13 => c"UB_STATUS_HOST_ACCESS_CONFLICT",
        14 => c"UB_STATUS_WRONG_DEVICE",
        15 => c"UB_STATUS_DEVICE_FAULT",
        16 => c"UB_STATUS_UNSUPPORTED",
        17 => c"UB_STATUS_BACKEND_UNAVAILABLE",
        18 => c"UB_STATUS_COMPILE",
        19 => c"UB_STATUS_FORMAT",
        20 => c"UB_STATUS_EXTERNAL",
        21 => c"UB_STATUS_IO",
        22 => c"UB_STATUS_BUFFER_TOO_SMALL",
        23 => c"UB_STATUS_PANIC",
        24 => c"UB_STATUS_UNKNOWN",
        _ => c"UB_STATUS_<invalid>",
    };
    name.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant of the core's error maps to its own status, and the retryable flag is the
    /// core's.
    #[test]
    fn each_core_variant_has_its_status() {
        use unibuf::{DType, Error as E, FaultKind, StorageMode};
        let cases: Vec<(E, ub_status)> = vec![
            (
                E::OutOfMemory {
                    requested: 1,
                    reserved: 2,
                    free: 3,
                    largest_free: 4,
                },
                UB_STATUS_OUT_OF_MEMORY,
            ),
            (
                E::NeverFits {
                    requested: 9,
                    limit: 8,
                    limit_name: "device memory",
                },
                UB_STATUS_NEVER_FITS,
            ),
            (
                E::BudgetExceeded {
                    which: "memory",
                    requested: 1,
                    in_use: 2,
                    budget: 2,
                },
                UB_STATUS_BUDGET_EXCEEDED,
            ),
            (
                E::OutOfBounds {
                    what: "x",
                    start: 1,
                    end: 9,
                    len: 4,
                },
                UB_STATUS_OUT_OF_RANGE,
            ),
            (
                E::ShapeMismatch {
                    what: "x",
                    expected: "a".into(),
                    got: "b".into(),
                },
                UB_STATUS_SHAPE_MISMATCH,
            ),
            (
                E::DTypeMismatch {
                    what: "x",
                    expected: DType::F32,
                    got: DType::U8,
                },
                UB_STATUS_DTYPE_MISMATCH,
            ),
            (
                E::Misaligned {
                    what: "x",
                    value: 3,
                    align: 4,
                },
                UB_STATUS_MISALIGNED,
            ),
            (
                E::NotHostAccessible {
                    what: "x",
                    mode: StorageMode::Private,
                },
                UB_STATUS_NOT_HOST_ACCESSIBLE,
            ),
            (
                E::ReadOnly {
                    what: "x",
                    label: "l".into(),
                },
                UB_STATUS_READ_ONLY,
            ),
            (
                E::HostAccessConflict {
                    what: "x",
                    label: "l".into(),
                    start: 0,
                    end: 4,
                    held: "read-locked",
                },
                UB_STATUS_HOST_ACCESS_CONFLICT,
            ),
            (
                E::WrongDevice {
                    what: "x",
                    expected: 1,
                    got: 2,
                },
                UB_STATUS_WRONG_DEVICE,
            ),
            (
                E::InvalidArgument {
                    what: "x",
                    detail: "d".into(),
                },
                UB_STATUS_INVALID_ARGUMENT,
            ),
            (
                E::DeviceFault {
                    kind: FaultKind::Trap,
                    label: "l".into(),
                    detail: "d".into(),
                },
                UB_STATUS_DEVICE_FAULT,
            ),
            (
                E::Unsupported {
                    backend: "cpu",
                    what: "w".into(),
                },
                UB_STATUS_UNSUPPORTED,
            ),
            (
                E::BackendUnavailable {
                    name: "n".into(),
                    reason: "r".into(),
                },
                UB_STATUS_BACKEND_UNAVAILABLE,
            ),
            (
                E::Compile {
                    kernel: "k".into(),
                    log: "l".into(),
                },
                UB_STATUS_COMPILE,
            ),
            (
                E::Format {
                    what: "f".into(),
                    detail: "d".into(),
                },
                UB_STATUS_FORMAT,
            ),
            (
                E::External {
                    label: "l".into(),
                    detail: "d".into(),
                },
                UB_STATUS_EXTERNAL,
            ),
            (
                E::Io {
                    what: "p".into(),
                    detail: "d".into(),
                },
                UB_STATUS_IO,
            ),
        ];
        let mut seen = std::collections::HashSet::new();
        for (e, want) in cases {
            let retry = e.is_retryable();
            let text = e.to_string();
            let f = Failure::from(e);
            assert_eq!(f.status, want, "{text}");
            assert_eq!(f.retryable, retry, "{text}");
            assert_eq!(f.message, text);
            assert!(seen.insert(want as i32), "{want:?} used twice");
        }
        assert_eq!(seen.len(), 19);
    }

    #[test]
    fn status_names_match_the_variants() {
        for (s, n) in [
            (UB_STATUS_OK, "UB_STATUS_OK"),
            (UB_STATUS_PANIC, "UB_STATUS_PANIC"),
            (UB_STATUS_UNKNOWN, "UB_STATUS_UNKNOWN"),
            (UB_STATUS_BUFFER_TOO_SMALL, "UB_STATUS_BUFFER_TOO_SMALL"),
        ] {
            // SAFETY: ub_status_name returns a static NUL-terminated string.
            let got = unsafe { std::ffi::CStr::from_ptr(ub_status_name(s as i32)) };
            assert_eq!(got.to_str().unwrap(), n);
            assert_eq!(format!("{s:?}"), n);
        }
        // SAFETY: as above.
        let bad = unsafe { std::ffi::CStr::from_ptr(ub_status_name(99)) };
        assert_eq!(bad.to_str().unwrap(), "UB_STATUS_<invalid>");
    }

    #[test]
    fn interior_nul_is_escaped() {
        assert_eq!(c_message("a\0b".into()).to_str().unwrap(), "a\\0b");
    }
}
