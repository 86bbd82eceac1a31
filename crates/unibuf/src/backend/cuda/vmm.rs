//! Virtual memory for device memory: an address range reserved with cuMemAddressReserve and
//! physical memory mapped into it one granule at a time (cuMemCreate, cuMemMap, cuMemSetAccess),
//! so that the allocator can return any granule to the driver on its own. Unmapping happens on
//! a worker thread, which also keeps a few physical allocations for reuse (`reclaim.rs`).

use super::driver::{check, CuError};
use super::reclaim::{Reclaimer, Reuse};
use super::CudaBackend;
use crate::backend::{Backend, VirtualMemory};
use crate::error::{Error, Result};
use crate::storage::MemoryKind;
use cudarc::driver::sys::{self, CUresult};
use std::collections::HashMap;
use std::sync::Mutex;

/// The physical allocation behind each mapped granule, by address, and the reserved ranges.
#[derive(Default)]
pub(super) struct Mappings(
    Mutex<HashMap<u64, sys::CUmemGenericAllocationHandle>>,
    Mutex<Vec<std::ops::Range<u64>>>,
);

impl Mappings {
    /// Whether `addr..addr + bytes` lies in one reserved range (memory of the allocator's arena).
    pub fn reserved(&self, addr: u64, bytes: usize) -> bool {
        let end = addr.saturating_add(bytes as u64);
        self.1
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|r| r.start <= addr && end <= r.end)
    }
}

/// Maps one granule at `at`: one taken back from the unmap queue as it is, else a spare
/// physical allocation, else a new one (after a retry with the queue drained and the spares
/// released when the device is out of memory). Returns the allocation and whether it was
/// mapped afresh (and so needs access granted).
///
/// # Safety
/// `at..at + g` lies in a reservation of the backend and no live block uses it; the context
/// is current.
unsafe fn map_granule(
    reclaimer: &Reclaimer,
    at: u64,
    g: usize,
    prop: &sys::CUmemAllocationProp,
) -> std::result::Result<(sys::CUmemGenericAllocationHandle, bool), CuError> {
    let h = match reclaimer.reuse(at) {
        Reuse::StillMapped(h) => return Ok((h, false)),
        Reuse::Spare(h) => h,
        Reuse::Create => {
            let mut h: sys::CUmemGenericAllocationHandle = 0;
            // SAFETY: valid out-pointer and properties.
            let mut created = check(
                unsafe { sys::cuMemCreate(&mut h, g, prop, 0) },
                "cuMemCreate",
            );
            if created
                .as_ref()
                .is_err_and(|e| e.code == CUresult::CUDA_ERROR_OUT_OF_MEMORY)
            {
                // Memory on its way back to the driver may be what is missing.
                reclaimer.settle(true);
                // SAFETY: as above.
                created = check(
                    unsafe { sys::cuMemCreate(&mut h, g, prop, 0) },
                    "cuMemCreate",
                );
            }
            created?;
            reclaimer.created();
            h
        }
    };
    // SAFETY: `at..at + g` is in our reservation and unmapped (the contract; `reuse` waited out
    // any pending unmap of it); `h` is an unmapped allocation of one granule.
    match check(unsafe { sys::cuMemMap(at, g, 0, h, 0) }, "cuMemMap") {
        Ok(()) => Ok((h, true)),
        Err(e) => {
            // SAFETY: `h` is mapped nowhere.
            unsafe { sys::cuMemRelease(h) };
            reclaimer.released();
            Err(e)
        }
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
        self.mappings
            .1
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ptr..ptr + bytes as u64);
        Ok(ptr)
    }

    unsafe fn map(&self, _kind: MemoryKind, addr: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        let reclaimer = self.reclaimer.as_ref().ok_or_else(|| {
            Error::invalid("device memory", "virtual memory is off on this device")
        })?;
        let g = self.granularity();
        let prop = properties(self.ctx.device);
        let access = sys::CUmemAccessDesc {
            location: prop.location,
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        let mut handles = self.mappings.0.lock().unwrap_or_else(|e| e.into_inner());
        // Runs of granules mapped afresh, which need access granted; granules taken back from
        // the unmap queue are still mapped and accessible.
        let mut fresh: Vec<std::ops::Range<u64>> = Vec::new();
        let mut done = 0usize;
        while done < bytes {
            let at = addr + done as u64;
            // SAFETY: `at..at + g` lies in our reservation and is unmapped as far as the
            // allocator knows (the contract); `map_granule` waits out or takes back a pending
            // unmap of it first.
            let r = unsafe { map_granule(reclaimer, at, g, &prop) };
            match r {
                Ok((h, is_fresh)) => {
                    handles.insert(at, h);
                    if is_fresh {
                        match fresh.last_mut() {
                            Some(run) if run.end == at => run.end = at + g as u64,
                            _ => fresh.push(at..at + g as u64),
                        }
                    }
                }
                Err(e) => {
                    drop(handles);
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
            }
            done += g;
        }
        drop(handles);
        // Access is granted once per run: one driver call, not one per granule (the calls
        // dominate the cost of growing an arena).
        for run in fresh {
            // SAFETY: `run` is mapped (just above) inside our reservation.
            let granted = check(
                unsafe {
                    sys::cuMemSetAccess(run.start, (run.end - run.start) as usize, &access, 1)
                },
                "cuMemSetAccess",
            );
            if let Err(e) = granted {
                // SAFETY: mapped by this call and unused.
                unsafe { self.unmap(MemoryKind::Device, addr, bytes) };
                return Err(e.into_error("granting access to mapped device memory"));
            }
        }
        Ok(())
    }

    unsafe fn unmap(&self, _kind: MemoryKind, addr: u64, bytes: usize) {
        if self.bind().is_err() {
            return;
        }
        let Some(reclaimer) = self.reclaimer.as_ref() else {
            return; // nothing is ever mapped without one
        };
        let g = self.granularity();
        let granules: Vec<_> = {
            let mut handles = self.mappings.0.lock().unwrap_or_else(|e| e.into_inner());
            (addr..addr + bytes as u64)
                .step_by(g)
                .filter_map(|at| handles.remove(&at).map(|h| (at, h)))
                .collect()
        };
        reclaimer.unmap(granules);
    }

    fn physical(&self) -> Option<(usize, usize)> {
        self.reclaimer.as_ref().map(Reclaimer::physical)
    }

    fn return_unmapped(&self) {
        if let (Some(r), Ok(())) = (&self.reclaimer, self.bind()) {
            r.settle(true);
        }
    }

    fn reset_physical_peak(&self) {
        if let Some(r) = &self.reclaimer {
            r.reset_peak();
        }
    }

    unsafe fn unreserve(&self, _kind: MemoryKind, base: u64, bytes: usize) {
        self.mappings
            .1
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|r| r.start != base);
        if self.bind().is_ok() {
            if let Some(r) = &self.reclaimer {
                // Granules of the range may still wait in the unmap queue.
                r.settle(false);
            }
            // SAFETY: reserved by `reserve`; nothing is mapped in it (the contract).
            unsafe { sys::cuMemAddressFree(base, bytes) };
        }
    }
}
