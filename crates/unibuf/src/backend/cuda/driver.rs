//! Driver plumbing: result checking, the context binding per thread, fault classification.

use crate::error::{Error, FaultKind};
use cudarc::driver::sys::{self, CUresult};
use std::cell::Cell;
use std::ffi::CStr;
use std::sync::atomic::{AtomicU64, Ordering};

/// A driver call's failure: the result code and the call's name.
#[derive(Clone, Copy, Debug)]
pub(super) struct CuError {
    pub code: CUresult,
    pub call: &'static str,
}

impl CuError {
    /// The driver's name for the code ("CUDA_ERROR_ILLEGAL_ADDRESS").
    pub fn name(&self) -> String {
        let mut p: *const std::ffi::c_char = std::ptr::null();
        // SAFETY: cuGetErrorName writes a pointer to a static string or leaves it null.
        let ok = unsafe { sys::cuGetErrorName(self.code, &mut p) } == CUresult::CUDA_SUCCESS;
        if ok && !p.is_null() {
            // SAFETY: the driver returned a NUL-terminated static string.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        } else {
            format!("{:?}", self.code)
        }
    }

    /// The error for a call that failed outside of device execution.
    pub fn into_error(self, what: &str) -> Error {
        match self.code {
            CUresult::CUDA_ERROR_OUT_OF_MEMORY => Error::OutOfMemory {
                requested: 0,
                reserved: 0,
                free: 0,
                largest_free: 0,
            },
            code => match fault_kind(code) {
                Some(kind) => Error::DeviceFault {
                    kind,
                    label: what.to_owned(),
                    detail: format!("{} returned {}", self.call, self.name()),
                },
                None => Error::Unsupported {
                    backend: "cuda",
                    what: format!("{what}: {} returned {}", self.call, self.name()),
                },
            },
        }
    }
}

/// Turns a result code into `Result`.
pub(super) fn check(code: CUresult, call: &'static str) -> Result<(), CuError> {
    if code == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CuError { code, call })
    }
}

/// Classifies the codes that asynchronous work reports (they leave the context unusable).
pub(super) fn fault_kind(code: CUresult) -> Option<FaultKind> {
    use CUresult::*;
    Some(match code {
        CUDA_ERROR_ILLEGAL_ADDRESS
        | CUDA_ERROR_MISALIGNED_ADDRESS
        | CUDA_ERROR_INVALID_ADDRESS_SPACE => FaultKind::IllegalAddress,
        CUDA_ERROR_ASSERT
        | CUDA_ERROR_ILLEGAL_INSTRUCTION
        | CUDA_ERROR_INVALID_PC
        | CUDA_ERROR_HARDWARE_STACK_ERROR => FaultKind::Trap,
        CUDA_ERROR_LAUNCH_FAILED | CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES => FaultKind::LaunchFailed,
        CUDA_ERROR_LAUNCH_TIMEOUT => FaultKind::Timeout,
        CUDA_ERROR_ECC_UNCORRECTABLE => FaultKind::Other,
        _ => return None,
    })
}

thread_local! {
    /// The serial of the context last made current on this thread, so that binding costs one
    /// compare when it is already current (the common case: one device per process). Serials,
    /// not handles: a primary context released and retained again can come back at the same
    /// address, and a thread that bound the old one must still bind the new one.
    static BOUND: Cell<u64> = const { Cell::new(0) };
}

/// Serials of `Context` values, from 1 (0: none bound).
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

/// The primary context of one device; made current on whichever thread calls into it.
pub(super) struct Context {
    pub raw: sys::CUcontext,
    pub device: sys::CUdevice,
    serial: u64,
}

// SAFETY: a CUcontext handle may be used from any thread once made current there (the driver
// API is thread-safe); `bind` makes it current before every use.
unsafe impl Send for Context {}
// SAFETY: as above; the handle itself is immutable.
unsafe impl Sync for Context {}

impl Context {
    /// Wraps a retained primary context of `device`.
    pub fn new(raw: sys::CUcontext, device: sys::CUdevice) -> Context {
        Context {
            raw,
            device,
            serial: NEXT_SERIAL.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Makes this context current on the calling thread.
    pub fn bind(&self) -> Result<(), CuError> {
        if BOUND.with(|b| b.get()) == self.serial {
            return Ok(());
        }
        // SAFETY: `raw` is a retained primary context, valid until Drop releases it.
        check(unsafe { sys::cuCtxSetCurrent(self.raw) }, "cuCtxSetCurrent")?;
        BOUND.with(|b| b.set(self.serial));
        Ok(())
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        BOUND.with(|b| {
            if b.get() == self.serial {
                b.set(0)
            }
        });
        // SAFETY: retained once in `open`, released once here.
        unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.device) };
    }
}
