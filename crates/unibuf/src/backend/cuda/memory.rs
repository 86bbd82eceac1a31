//! Memory: device memory, mapped pinned host memory, and registered caller memory.

use super::driver::{check, CuError};
use crate::error::Error;
use crate::storage::MemoryAccess;
use cudarc::driver::sys;
use std::collections::BTreeMap;
use std::ffi::c_void;

/// Device memory (Private).
pub(super) fn alloc_device(bytes: usize) -> Result<u64, CuError> {
    let mut ptr: sys::CUdeviceptr = 0;
    // SAFETY: the out-pointer is valid; the context is current (the caller bound it).
    check(unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes) }, "cuMemAlloc")?;
    Ok(ptr)
}

/// Pinned host memory mapped into the device's address space (Shared). Never write-combined:
/// the host reads it back, and write-combined memory reads at a small fraction of normal speed.
pub(super) fn alloc_mapped_host(bytes: usize) -> Result<(u64, *mut u8), CuError> {
    let mut host: *mut c_void = std::ptr::null_mut();
    let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
    // SAFETY: the out-pointer is valid; the context is current.
    check(
        unsafe { sys::cuMemHostAlloc(&mut host, bytes, flags) },
        "cuMemHostAlloc",
    )?;
    let mut dev: sys::CUdeviceptr = 0;
    // SAFETY: `host` was just returned by cuMemHostAlloc with DEVICEMAP.
    if let Err(e) = check(
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host, 0) },
        "cuMemHostGetDevicePointer",
    ) {
        // SAFETY: allocated above, unused.
        unsafe { sys::cuMemFreeHost(host) };
        return Err(e);
    }
    Ok((dev, host.cast()))
}

/// Frees device memory.
///
/// # Safety
/// `ptr` came from `alloc_device` and no pending work uses it.
pub(super) unsafe fn free_device(ptr: u64) {
    // SAFETY: the caller's contract.
    unsafe { sys::cuMemFree_v2(ptr) };
}

/// Frees mapped host memory.
///
/// # Safety
/// `host` came from `alloc_mapped_host` and no pending work uses it.
pub(super) unsafe fn free_mapped_host(host: *mut u8) {
    // SAFETY: the caller's contract.
    unsafe { sys::cuMemFreeHost(host.cast()) };
}

/// One cuMemHostRegister call's region and how many wrapped regions use it.
struct Registration {
    len: usize,
    users: usize,
    /// How the pages were registered (`CU_MEMHOSTREGISTER_READ_ONLY` when `ReadOnly`).
    access: MemoryAccess,
}

/// The page ranges registered with the driver, with use counts.
///
/// Wrapped regions are page-rounded, so two wraps can cover the same pages (views of one
/// mapping wrapped twice, say), and the driver refuses to register a page twice. A wrap inside
/// an existing registration shares it; a registration is dropped when its last user is released.
#[derive(Default)]
pub(super) struct Registrations {
    by_start: BTreeMap<usize, Registration>,
}

impl Registrations {
    /// Registers `[start, start + len)` (page-aligned); returns the registration starts it uses.
    ///
    /// A region inside one existing registration shares it. A region that overlaps existing
    /// registrations only in part is refused: driver copies and memsets cannot span two
    /// registrations, so it could not be used as one buffer.
    pub fn register(
        &mut self,
        start: usize,
        len: usize,
        access: MemoryAccess,
    ) -> Result<Vec<usize>, Error> {
        let end = start + len;
        let containing = self
            .by_start
            .range(..=start)
            .next_back()
            .filter(|(s, r)| **s + r.len >= end)
            .map(|(s, _)| *s);
        if let Some(s) = containing {
            if let Some(r) = self.by_start.get_mut(&s) {
                if access.is_writable() && !r.access.is_writable() {
                    return Err(Error::Unsupported {
                        backend: "cuda",
                        what: format!(
                            "wrapping writable memory at {start:#x}..{end:#x}: its pages are \
                             registered read-only for another wrapped region"
                        ),
                    });
                }
                r.users += 1;
            }
            return Ok(vec![s]);
        }
        let before = self
            .by_start
            .range(..start)
            .next_back()
            .filter(|(s, r)| *s + r.len > start);
        if let Some((s, r)) = before.or_else(|| self.by_start.range(start..end).next()) {
            return Err(Error::Unsupported {
                backend: "cuda",
                what: format!(
                    "wrapping pages {start:#x}..{end:#x}: they overlap the registered host region \
                     {s:#x}..{:#x} only in part (wrap page-aligned memory such as \
                     unibuf::PageBuffer, or memory maps)",
                    s + r.len
                ),
            });
        }
        let mut flags = sys::CU_MEMHOSTREGISTER_DEVICEMAP | sys::CU_MEMHOSTREGISTER_PORTABLE;
        if !access.is_writable() {
            flags |= sys::CU_MEMHOSTREGISTER_READ_ONLY;
        }
        // SAFETY: the caller guarantees the pages are mapped and stay so until release.
        check(
            unsafe { sys::cuMemHostRegister_v2(start as *mut c_void, len, flags) },
            "cuMemHostRegister",
        )
        .map_err(|e| e.into_error("registering host memory"))?;
        self.by_start.insert(
            start,
            Registration {
                len,
                users: 1,
                access,
            },
        );
        Ok(vec![start])
    }

    /// Drops one use of each registration; unregisters those no longer used.
    ///
    /// # Safety
    /// No pending work uses the memory of the registrations whose last user this is.
    pub unsafe fn release(&mut self, starts: &[usize]) {
        for s in starts {
            let Some(r) = self.by_start.get_mut(s) else {
                continue;
            };
            r.users -= 1;
            if r.users == 0 {
                self.by_start.remove(s);
                // SAFETY: registered by `register`; the caller's contract covers pending work.
                unsafe { sys::cuMemHostUnregister(*s as *mut c_void) };
            }
        }
    }

    /// A device pointer for a registered host address. With unified addressing (every 64-bit
    /// platform CUDA 12+ supports) it is the host address itself; asking the driver keeps this
    /// correct where it is not.
    pub fn device_pointer(host: usize) -> Result<u64, CuError> {
        let mut dev: sys::CUdeviceptr = 0;
        // SAFETY: `host` lies in a registered range (registered with DEVICEMAP).
        check(
            unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host as *mut c_void, 0) },
            "cuMemHostGetDevicePointer",
        )?;
        Ok(dev)
    }
}
