//! Memory: device memory, mapped pinned host memory, and registered caller memory.

use super::driver::{check, CuError};
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
}

/// The page ranges registered with the driver.
///
/// Wrapped regions are page-rounded, so two small allocations of the caller can share a page,
/// and the driver refuses to register a page twice. Registrations are therefore kept per disjoint
/// range with a use count: wrapping registers only the pages no registration covers yet, and a
/// registration is dropped when its last user is released.
#[derive(Default)]
pub(super) struct Registrations {
    by_start: BTreeMap<usize, Registration>,
}

impl Registrations {
    /// Registers `[start, start + len)` (page-aligned); returns the registration starts it uses.
    pub fn register(
        &mut self,
        start: usize,
        len: usize,
        writable: bool,
    ) -> Result<Vec<usize>, CuError> {
        let end = start + len;
        let mut used = Vec::new();
        let mut gaps = Vec::new();
        let mut cursor = start;
        // Registrations are disjoint; walk those that overlap [start, end) in address order.
        let first = self
            .by_start
            .range(..start)
            .next_back()
            .filter(|(s, r)| *s + r.len > start)
            .map(|(s, _)| *s);
        let overlapping: Vec<(usize, usize)> = first
            .into_iter()
            .chain(self.by_start.range(start..end).map(|(s, _)| *s))
            .map(|s| (s, self.by_start[&s].len))
            .collect();
        for (s, l) in overlapping {
            if s > cursor {
                gaps.push((cursor, s - cursor));
            }
            used.push(s);
            cursor = cursor.max(s + l);
        }
        if cursor < end {
            gaps.push((cursor, end - cursor));
        }
        let mut flags = sys::CU_MEMHOSTREGISTER_DEVICEMAP | sys::CU_MEMHOSTREGISTER_PORTABLE;
        if !writable {
            flags |= sys::CU_MEMHOSTREGISTER_READ_ONLY;
        }
        let mut added = Vec::new();
        for (s, l) in gaps {
            // SAFETY: the caller guarantees the pages are mapped and stay so until release.
            let r = check(
                unsafe { sys::cuMemHostRegister_v2(s as *mut c_void, l, flags) },
                "cuMemHostRegister",
            );
            if let Err(e) = r {
                for a in added {
                    self.by_start.remove(&a);
                    // SAFETY: registered just above by this call.
                    unsafe { sys::cuMemHostUnregister(a as *mut c_void) };
                }
                return Err(e);
            }
            self.by_start.insert(s, Registration { len: l, users: 0 });
            added.push(s);
            used.push(s);
        }
        for s in &used {
            if let Some(r) = self.by_start.get_mut(s) {
                r.users += 1;
            }
        }
        Ok(used)
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
