//! The one error type of unibuf.
//!
//! Every public call validates its input and returns one of these instead of panicking. Each
//! message names the values that were wrong. [`Error::is_retryable`] tells a caller whether trying
//! again later (after freeing memory, or after pending work completes) can succeed.

use crate::dtype::DType;
use crate::storage::StorageMode;
use std::fmt;

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a device fault was classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// A kernel read or wrote memory it does not own.
    IllegalAddress,
    /// A launch was rejected by the device (bad configuration, missing resources).
    LaunchFailed,
    /// A kernel aborted: a trap on a GPU, an error returned or a panic in a CPU kernel.
    Trap,
    /// The device did not finish the work in time.
    Timeout,
    /// A page fault on a GPU with virtual memory (Metal's page fault error).
    PageFault,
    /// The device ran out of memory while executing work already submitted.
    OutOfMemory,
    /// A resource used by the work was invalid (released, purged, or of the wrong kind).
    InvalidResource,
    /// Any other fault the backend reported.
    Other,
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            FaultKind::IllegalAddress => "illegal address",
            FaultKind::LaunchFailed => "launch failed",
            FaultKind::Trap => "kernel trap",
            FaultKind::Timeout => "timeout",
            FaultKind::PageFault => "page fault",
            FaultKind::OutOfMemory => "out of memory during execution",
            FaultKind::InvalidResource => "invalid resource",
            FaultKind::Other => "fault",
        };
        f.write_str(s)
    }
}

/// Everything that can go wrong in unibuf.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The memory could not be allocated even after the cache was released and pending work
    /// was waited for. Transient: freeing buffers can make the same request succeed.
    #[error(
        "out of memory: requested {requested} bytes with {reserved} bytes reserved, {free} bytes \
         free on the device, largest cached free block {largest_free} bytes"
    )]
    OutOfMemory {
        /// Bytes asked for (after size-class rounding).
        requested: usize,
        /// Bytes the allocator holds from the backend.
        reserved: usize,
        /// Bytes the backend reports free, where known.
        free: usize,
        /// The largest cached block not in use.
        largest_free: usize,
    },
    /// The request can never be satisfied on this device, whatever is freed.
    #[error("{requested} bytes can never fit: the {limit_name} is {limit} bytes")]
    NeverFits {
        /// Bytes asked for.
        requested: usize,
        /// The limit in bytes that the request exceeds.
        limit: usize,
        /// Which limit: "device memory", "maximum buffer length", "memory budget".
        limit_name: &'static str,
    },
    /// The allocation would take the device past the budget set for it.
    #[error(
        "{which} budget exceeded: {requested} more bytes with {in_use} bytes in use would pass \
         the budget of {budget} bytes"
    )]
    BudgetExceeded {
        /// Which budget: "memory" (the allocator's limit) or "residency".
        which: &'static str,
        /// Bytes asked for.
        requested: usize,
        /// Bytes reserved from the backend when asked.
        in_use: usize,
        /// The budget in bytes.
        budget: usize,
    },
    /// An offset, range or index lies outside the object it addresses.
    #[error("{what}: range {start}..{end} is out of bounds for length {len}")]
    OutOfBounds {
        /// What was being addressed.
        what: &'static str,
        /// Start of the requested range.
        start: usize,
        /// End (exclusive) of the requested range.
        end: usize,
        /// Length of what was addressed.
        len: usize,
    },
    /// Two shapes, lengths or element counts that must agree do not.
    #[error("{what}: expected {expected}, got {got}")]
    ShapeMismatch {
        /// What was being compared.
        what: &'static str,
        /// The size or shape required.
        expected: String,
        /// The size or shape given.
        got: String,
    },
    /// A dtype does not match the one required.
    #[error("{what}: expected dtype {expected}, got {got}")]
    DTypeMismatch {
        /// What was being checked.
        what: &'static str,
        /// The dtype required.
        expected: DType,
        /// The dtype given.
        got: DType,
    },
    /// A value is not a multiple of the alignment it needs.
    #[error("{what}: {value} is not a multiple of {align}")]
    Misaligned {
        /// What was misaligned.
        what: &'static str,
        /// The offending value (an offset, a length or an address).
        value: usize,
        /// The alignment required.
        align: usize,
    },
    /// The host tried to read or write memory it cannot reach.
    #[error("{what}: a {mode:?} buffer is not host-accessible; use a transfer instead")]
    NotHostAccessible {
        /// The operation.
        what: &'static str,
        /// The buffer's storage mode.
        mode: StorageMode,
    },
    /// A write to memory that is read-only (an External buffer over a read-only mapping).
    #[error("{what}: buffer '{label}' wraps read-only memory")]
    ReadOnly {
        /// The operation.
        what: &'static str,
        /// The buffer's label.
        label: String,
    },
    /// Host access and device work (or two host accesses) overlap on the same bytes.
    #[error(
        "{what}: bytes {start}..{end} of buffer '{label}' are {held} by a host access guard; \
         drop the guard first"
    )]
    HostAccessConflict {
        /// The operation refused.
        what: &'static str,
        /// The buffer's label.
        label: String,
        /// Start of the conflicting byte range (within the allocation).
        start: usize,
        /// End of the conflicting byte range.
        end: usize,
        /// "read-locked" or "write-locked".
        held: &'static str,
    },
    /// A buffer, queue or kernel from another device was passed.
    #[error("{what} belongs to device #{got}, not to device #{expected}")]
    WrongDevice {
        /// The object.
        what: &'static str,
        /// The device used.
        expected: u64,
        /// The device the object belongs to.
        got: u64,
    },
    /// An argument is invalid in a way not covered by a more specific variant.
    #[error("invalid argument {what}: {detail}")]
    InvalidArgument {
        /// The argument.
        what: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// The device faulted while executing work. Sticky: the device stays in this state until
    /// [`Device::reset`](crate::Device::reset).
    #[error("device fault ({kind}) in submission '{label}': {detail}")]
    DeviceFault {
        /// The classification.
        kind: FaultKind,
        /// The label of the submission that faulted.
        label: String,
        /// The backend's own description.
        detail: String,
    },
    /// The backend cannot do this.
    #[error("backend {backend} does not support {what}")]
    Unsupported {
        /// The backend's name.
        backend: &'static str,
        /// What it cannot do.
        what: String,
    },
    /// The named backend is not compiled in, or no device of it was found.
    #[error("backend '{name}' is not available: {reason}")]
    BackendUnavailable {
        /// The name asked for.
        name: String,
        /// Why it is not available.
        reason: String,
    },
    /// A kernel failed to compile, or no source exists for this backend.
    #[error("kernel '{kernel}' failed to compile: {log}")]
    Compile {
        /// The kernel's name.
        kernel: String,
        /// The compiler's log.
        log: String,
    },
    /// A file (weights, traces) is malformed.
    #[error("format error in {what}: {detail}")]
    Format {
        /// The file or object.
        what: String,
        /// The problem.
        detail: String,
    },
    /// Foreign work run through [`Queue::external`](crate::Queue::external) failed: its
    /// closure returned an error or panicked.
    #[error("external work '{label}' failed: {detail}")]
    External {
        /// The submission's label.
        label: String,
        /// The foreign library's error.
        detail: String,
    },
    /// An I/O error, with the path or operation.
    #[error("I/O error in {what}: {detail}")]
    Io {
        /// The path or operation.
        what: String,
        /// The operating system's message.
        detail: String,
    },
}

impl Error {
    /// Whether the same call can succeed later without the caller changing its arguments:
    /// after memory is freed or after pending work completes.
    ///
    /// ```
    /// use unibuf::Error;
    /// let e = Error::OutOfMemory { requested: 1 << 20, reserved: 0, free: 0, largest_free: 0 };
    /// assert!(e.is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::OutOfMemory { .. }
                | Error::BudgetExceeded { .. }
                | Error::HostAccessConflict { .. }
        )
    }

    /// Whether the device is now in a fault state that needs [`Device::reset`](crate::Device::reset).
    pub fn is_device_fault(&self) -> bool {
        matches!(self, Error::DeviceFault { .. })
    }

    pub(crate) fn invalid(what: &'static str, detail: impl Into<String>) -> Error {
        Error::InvalidArgument {
            what,
            detail: detail.into(),
        }
    }

    pub(crate) fn io(what: impl Into<String>, err: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            detail: err.to_string(),
        }
    }
}

/// Checks that `start..start + len` fits in `bound`, without overflow.
pub(crate) fn check_range(
    what: &'static str,
    start: usize,
    len: usize,
    bound: usize,
) -> Result<()> {
    match start.checked_add(len) {
        Some(end) if end <= bound => Ok(()),
        _ => Err(Error::OutOfBounds {
            what,
            start,
            end: start.saturating_add(len),
            len: bound,
        }),
    }
}
