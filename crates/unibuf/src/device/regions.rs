//! Growable regions: the address range behind a growable buffer, reserved whole up front and
//! mapped as the buffer grows, so that its address never changes and no byte is copied to
//! make room (what a KV cache wants).
//!
//! A region exists only where the backend has virtual memory for the memory kind
//! (`Backend::virtual_memory`); elsewhere a growable buffer reallocates and copies. The mapped
//! bytes count against the device's memory budget like the allocator's reservations, and
//! appear in the memory stats as `growable_bytes`.

use crate::alloc::Allocator;
use crate::backend::{Backend, RawAlloc};
use crate::error::{Error, Result};
use crate::storage::MemoryKind;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A reserved range of device address space and how much of it, from the base, is mapped.
/// Shared by the growable buffer's handle (which grows it) and its allocation (which releases
/// it once the last view and the work using it are gone).
pub(crate) struct GrowableRegion {
    pub kind: MemoryKind,
    pub base: u64,
    /// Bytes of address space reserved, a multiple of the mapping granularity.
    pub reserved: usize,
    /// Bytes mapped from the base. Only the buffer's `&mut` handle grows it (`grow`).
    mapped: AtomicUsize,
}

impl GrowableRegion {
    /// Bytes mapped from the base.
    pub fn mapped(&self) -> usize {
        self.mapped.load(Ordering::Acquire)
    }

    /// The whole reservation as raw memory, for the allocation and its commands.
    pub fn raw(&self) -> RawAlloc {
        RawAlloc {
            addr: self.base,
            handle: self.base,
            bytes: self.reserved,
            kind: self.kind,
        }
    }

    /// Reserves address space for up to `capacity` bytes of `kind` memory and maps its first
    /// `initial` bytes; `None` where the backend has no virtual memory for `kind`. Refuses
    /// capacities past twice the device's largest buffer (`max_buffer_len`), and mapped bytes
    /// past the allocator's memory budget.
    pub fn reserve(
        backend: &dyn Backend,
        allocator: &Mutex<Allocator>,
        kind: MemoryKind,
        capacity: usize,
        initial: usize,
        max_buffer_len: usize,
    ) -> Result<Option<GrowableRegion>> {
        let Some(vm) = backend.virtual_memory(kind) else {
            return Ok(None);
        };
        let granularity = vm.granularity();
        let too_big = || Error::NeverFits {
            requested: capacity,
            limit: max_buffer_len,
            limit_name: "maximum buffer length",
        };
        let reserved = capacity
            .max(1)
            .checked_next_multiple_of(granularity)
            .ok_or_else(too_big)?;
        if reserved > max_buffer_len.saturating_mul(2) {
            return Err(too_big());
        }
        let mapped = initial.next_multiple_of(granularity);
        // Held from the budget check to the count, so that two reservations cannot both pass
        // the check for the same remaining bytes.
        let mut a = allocator.lock();
        check_budget(&a, mapped)?;
        // SAFETY: released by `release` (unreserve) after unmapping what was mapped.
        let base = unsafe { vm.reserve(kind, reserved)? };
        if mapped > 0 {
            // SAFETY: inside the fresh reservation, nothing mapped yet.
            if let Err(e) = unsafe { vm.map(kind, base, mapped) } {
                // SAFETY: the reservation has nothing mapped and nothing uses it.
                unsafe { vm.unreserve(kind, base, reserved) };
                return Err(e);
            }
        }
        let s = a.stats_mut();
        s.growable_bytes += mapped;
        s.growable_count += 1;
        Ok(Some(GrowableRegion {
            kind,
            base,
            reserved,
            mapped: AtomicUsize::new(mapped),
        }))
    }

    /// Maps more of the region so that its first `bytes` (at most the capacity it was reserved
    /// for) are backed. Returns the bytes mapped by this call: 0 when they were already.
    pub fn grow(
        &self,
        backend: &dyn Backend,
        allocator: &Mutex<Allocator>,
        bytes: usize,
    ) -> Result<usize> {
        let vm = backend
            .virtual_memory(self.kind)
            .ok_or_else(|| Error::invalid("grow", "the backend lost its virtual memory"))?;
        let need = bytes.next_multiple_of(vm.granularity());
        let have = self.mapped();
        if need <= have {
            return Ok(0);
        }
        let mut a = allocator.lock();
        check_budget(&a, need - have)?;
        // SAFETY: `have..need` lies inside the reservation (need <= reserved, since `bytes` is
        // at most the capacity) and is not mapped yet; only the buffer's `&mut` handle grows
        // the region, so no other call maps it meanwhile.
        unsafe { vm.map(self.kind, self.base + have as u64, need - have)? };
        self.mapped.store(need, Ordering::Release);
        a.stats_mut().growable_bytes += need - have;
        Ok(need - have)
    }

    /// Unmaps what is mapped and gives the address space back.
    ///
    /// # Safety
    /// No view of the region is left and every fence of work that used it has retired.
    pub unsafe fn release(&self, backend: &dyn Backend, allocator: &Mutex<Allocator>) {
        let mapped = self.mapped();
        if let Some(vm) = backend.virtual_memory(self.kind) {
            // SAFETY: the caller's contract: nothing uses the region any more; `mapped` bytes
            // from the base are exactly what `reserve` and `grow` mapped.
            unsafe {
                if mapped > 0 {
                    vm.unmap(self.kind, self.base, mapped);
                }
                vm.unreserve(self.kind, self.base, self.reserved);
            }
        }
        let mut a = allocator.lock();
        let s = a.stats_mut();
        s.growable_bytes -= mapped;
        s.growable_count -= 1;
    }
}

/// Refuses `more` bytes past the memory budget: the allocator's reservations and the mapped
/// parts of growable regions count against it.
fn check_budget(allocator: &Allocator, more: usize) -> Result<()> {
    if let Some(budget) = allocator.budget().memory_limit {
        let s = allocator.stats();
        let in_use = s.reserved_bytes + s.growable_bytes;
        if in_use + more > budget {
            return Err(Error::BudgetExceeded {
                which: "memory",
                requested: more,
                in_use,
                budget,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::Budget;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn a_region_maps_as_it_grows_within_the_budget_and_releases_all() {
        let backend = CpuBackend::new().unwrap();
        let g = backend
            .virtual_memory(MemoryKind::Device)
            .expect("the CPU backend has virtual memory")
            .granularity();
        let allocator = Mutex::new(Allocator::new(Budget {
            memory_limit: Some(3 * g),
            cache_limit: None,
        }));
        let region =
            GrowableRegion::reserve(&backend, &allocator, MemoryKind::Device, 8 * g, 1, 1 << 40)
                .unwrap()
                .expect("a region");
        assert_eq!((region.reserved, region.mapped()), (8 * g, g));
        assert_eq!(region.raw().bytes, 8 * g);
        assert_eq!(
            region.grow(&backend, &allocator, g).unwrap(),
            0,
            "mapped already"
        );
        assert_eq!(region.grow(&backend, &allocator, 2 * g + 1).unwrap(), 2 * g);
        assert_eq!(allocator.lock().stats().growable_bytes, 3 * g);
        match region.grow(&backend, &allocator, 4 * g) {
            Err(Error::BudgetExceeded { requested, .. }) => assert_eq!(requested, g),
            other => panic!("expected the budget to refuse, got {other:?}"),
        }
        assert_eq!(region.mapped(), 3 * g, "a refused grow maps nothing");
        // SAFETY: no view of the region exists and no work used it.
        unsafe { region.release(&backend, &allocator) };
        let stats = allocator.lock().stats();
        assert_eq!((stats.growable_bytes, stats.growable_count), (0, 0));
    }

    #[test]
    fn capacities_past_twice_the_largest_buffer_never_fit() {
        let backend = CpuBackend::new().unwrap();
        let allocator = Mutex::new(Allocator::new(Budget::default()));
        let r = GrowableRegion::reserve(
            &backend,
            &allocator,
            MemoryKind::Device,
            1 << 30,
            0,
            1 << 20,
        );
        assert!(matches!(r, Err(Error::NeverFits { .. })), "{:?}", r.err());
    }
}
