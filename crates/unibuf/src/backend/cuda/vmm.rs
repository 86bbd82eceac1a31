//! Virtual memory for device memory: an address range reserved with cuMemAddressReserve and
//! physical memory mapped into it one granule at a time (cuMemCreate, cuMemMap, cuMemSetAccess),
//! so that the allocator can return any granule to the driver on its own.

use super::driver::check;
use super::CudaBackend;
use crate::backend::{Backend, VirtualMemory};
use crate::error::{Error, Result};
use crate::storage::MemoryKind;
use cudarc::driver::sys::{self, CUresult};
use parking_lot::Mutex;
use std::collections::HashMap;

/// Physical allocations: the one behind each mapped granule, by address, and those unmapped by
/// `unmap_for_reuse` and kept for the next `map`.
#[derive(Default)]
struct Physical {
    by_addr: HashMap<u64, sys::CUmemGenericAllocationHandle>,
    kept: Vec<sys::CUmemGenericAllocationHandle>,
}

/// The physical memory behind the reserved ranges, and the ranges themselves.
#[derive(Default)]
pub(super) struct Mappings {
    physical: Mutex<Physical>,
    reserved: Mutex<Vec<std::ops::Range<u64>>>,
}

impl Mappings {
    /// Whether `addr..addr + bytes` lies in one reserved range (memory of the allocator's arena).
    pub fn reserved(&self, addr: u64, bytes: usize) -> bool {
        let end = addr.saturating_add(bytes as u64);
        self.ranges()
            .iter()
            .any(|r| r.start <= addr && end <= r.end)
    }

    fn physical(&self) -> parking_lot::MutexGuard<'_, Physical> {
        self.physical.lock()
    }

    fn ranges(&self) -> parking_lot::MutexGuard<'_, Vec<std::ops::Range<u64>>> {
        self.reserved.lock()
    }
}

/// Device-memory allocation properties for GPU `device`.
fn properties(device: sys::CUdevice) -> sys::CUmemAllocationProp {
    // SAFETY: a plain C struct for which all-zero is a valid (empty) value; the fields that
    // matter are set below.
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device;
    prop
}

/// The mapping granularity of GPU `device`, if it supports virtual memory management.
pub(super) fn granularity(device: sys::CUdevice) -> Option<usize> {
    let mut supported = 0;
    // SAFETY: valid out-pointer and device.
    unsafe {
        sys::cuDeviceGetAttribute(
            &mut supported,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
            device,
        )
    };
    if supported == 0 {
        return None;
    }
    let prop = properties(device);
    let mut g = 0usize;
    // SAFETY: valid out-pointer and properties.
    let r = unsafe {
        sys::cuMemGetAllocationGranularity(
            &mut g,
            &prop,
            sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        )
    };
    (r == CUresult::CUDA_SUCCESS && g.is_power_of_two()).then_some(g)
}

impl VirtualMemory for CudaBackend {
    fn granularity(&self) -> usize {
        self.vmm_granule.unwrap_or(2 << 20)
    }

    unsafe fn reserve(&self, _kind: MemoryKind, bytes: usize) -> Result<u64> {
        self.bind()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; alignment is the granule.
        check(
            unsafe { sys::cuMemAddressReserve(&mut ptr, bytes, self.granularity(), 0, 0) },
            "cuMemAddressReserve",
        )
        .map_err(|e| e.into_error("reserving device address space"))?;
        self.mappings.ranges().push(ptr..ptr + bytes as u64);
        Ok(ptr)
    }

    unsafe fn map(&self, _kind: MemoryKind, addr: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        let g = self.granularity();
        let prop = properties(self.ctx.device);
        let access = sys::CUmemAccessDesc {
            location: prop.location,
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        let mut physical = self.mappings.physical();
        let mut done = 0usize;
        while done < bytes {
            let at = addr + done as u64;
            // Memory kept by `unmap_for_reuse` first: it saves a cuMemCreate now and a
            // cuMemRelease then.
            let kept = physical.kept.pop();
            let mut h: sys::CUmemGenericAllocationHandle = kept.unwrap_or(0);
            // SAFETY: valid out-pointer and properties; a kept handle is a live device
            // allocation of one granule that nothing maps; `at..at + g` lies in our reservation
            // and is unmapped (the contract); access is set on exactly that range.
            let r = unsafe {
                let created = match kept {
                    Some(_) => Ok(()),
                    None => check(sys::cuMemCreate(&mut h, g, &prop, 0), "cuMemCreate"),
                };
                created.and_then(|()| {
                    let mapped = check(sys::cuMemMap(at, g, 0, h, 0), "cuMemMap");
                    if mapped.is_err() {
                        sys::cuMemRelease(h);
                    }
                    mapped
                })
            };
            // Access is granted once for the whole range below: one driver call, not one per
            // granule (the calls dominate the cost of growing an arena).
            if let Err(e) = r {
                drop(physical);
                // SAFETY: the granules before `at` were mapped by this call and are unused.
                unsafe { self.unmap(MemoryKind::Device, addr, done) };
                return Err(match e.code {
                    CUresult::CUDA_ERROR_OUT_OF_MEMORY => Error::OutOfMemory {
                        requested: bytes,
                        reserved: 0,
                        free: self.free_memory().unwrap_or(0),
                        largest_free: 0,
                    },
                    _ => e.into_error("mapping device memory"),
                });
            }
            physical.by_addr.insert(at, h);
            done += g;
        }
        // SAFETY: `addr..addr + bytes` is mapped (just above) inside our reservation.
        let access = check(
            unsafe { sys::cuMemSetAccess(addr, bytes, &access, 1) },
            "cuMemSetAccess",
        );
        if let Err(e) = access {
            drop(physical);
            // SAFETY: mapped by this call and unused.
            unsafe { self.unmap(MemoryKind::Device, addr, bytes) };
            return Err(e.into_error("granting access to mapped device memory"));
        }
        Ok(())
    }

    unsafe fn unmap(&self, _kind: MemoryKind, addr: u64, bytes: usize) {
        // SAFETY: the caller's contract.
        unsafe { self.unmap_granules(addr, bytes, false) }
    }

    unsafe fn unmap_for_reuse(&self, _kind: MemoryKind, addr: u64, bytes: usize) {
        // SAFETY: the caller's contract; it releases what `map` does not take.
        unsafe { self.unmap_granules(addr, bytes, !self.release_unmapped) }
    }

    fn release_kept(&self, _kind: MemoryKind) {
        // Bound first: without the context the handles stay kept (a later map or release takes
        // them) rather than being dropped unreleased.
        if self.bind().is_err() {
            return;
        }
        let kept = std::mem::take(&mut self.mappings.physical().kept);
        for h in kept {
            // SAFETY: a handle `unmap_for_reuse` unmapped and nothing mapped again.
            unsafe { sys::cuMemRelease(h) };
        }
    }

    unsafe fn unreserve(&self, _kind: MemoryKind, base: u64, bytes: usize) {
        self.mappings.ranges().retain(|r| r.start != base);
        if self.bind().is_ok() {
            // SAFETY: reserved by `reserve`; nothing is mapped in it (the contract).
            unsafe { sys::cuMemAddressFree(base, bytes) };
        }
    }
}

impl CudaBackend {
    /// Unmaps the granules of `addr..addr + bytes`, releasing their physical memory or, with
    /// `keep`, keeping it for the next `map`.
    ///
    /// # Safety
    /// The range is mapped by `map`, and no pending work and no live buffer uses it.
    unsafe fn unmap_granules(&self, addr: u64, bytes: usize, keep: bool) {
        if self.bind().is_err() {
            return;
        }
        let g = self.granularity();
        let mut physical = self.mappings.physical();
        for at in (addr..addr + bytes as u64).step_by(g) {
            if let Some(h) = physical.by_addr.remove(&at) {
                // SAFETY: mapped by `map` with this handle; unused (the contract).
                unsafe { sys::cuMemUnmap(at, g) };
                if keep {
                    physical.kept.push(h);
                } else {
                    // SAFETY: unmapped just above; nothing else maps it.
                    unsafe { sys::cuMemRelease(h) };
                }
            }
        }
    }
}
