//! Memory statistics in the spirit of PyTorch's `memory_stats`.

/// A snapshot of a device's memory accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes of live buffers, after size-class rounding.
    pub active_bytes: usize,
    /// Live allocations (a view does not count; its allocation does).
    pub active_count: usize,
    /// Bytes the live buffers asked for; `active_bytes - requested_bytes` is rounding waste.
    pub requested_bytes: usize,
    /// High-water mark of `active_bytes`.
    pub peak_active_bytes: usize,
    /// Bytes held from the backend: active plus cached.
    pub reserved_bytes: usize,
    /// High-water mark of `reserved_bytes`.
    pub peak_reserved_bytes: usize,
    /// Bytes held but not in use: freed blocks kept for reuse, or mapped granules no live
    /// block uses.
    pub cached_bytes: usize,
    /// Freed blocks, or mapped granules, kept for reuse.
    pub cached_count: usize,
    /// Whether blocks are placed in virtual memory mapped in granules (false: the backend has
    /// no such API and whole blocks are cached by size class instead).
    pub virtual_memory: bool,
    /// Allocations served from the cache.
    pub cache_hits: u64,
    /// Calls to the backend's allocate, or granule ranges mapped.
    pub device_allocs: u64,
    /// Calls to the backend's release, or granule ranges unmapped.
    pub device_frees: u64,
    /// Nanoseconds spent in those backend calls (allocate and release, map and unmap): the
    /// driver's share of the allocator's time.
    pub device_call_ns: u64,
    /// Times an allocation released the cache or waited for pending work and tried again.
    pub oom_retries: u64,
    /// Allocations that failed with `OutOfMemory` or `BudgetExceeded`.
    pub ooms: u64,
    /// Bytes of wrapped caller memory (External buffers), page-rounded.
    pub external_bytes: usize,
    /// Wrapped caller regions alive.
    pub external_count: usize,
    /// Bytes of memory other frameworks own, wrapped by `Device::wrap_foreign` (and DLPack
    /// imports): never allocated or freed by unibuf.
    pub foreign_bytes: usize,
    /// Foreign regions alive.
    pub foreign_count: usize,
    /// Bytes of pinned staging chunks held by the transfer engine.
    pub staging_bytes: usize,
    /// Bytes mapped for growable buffers (reserved address space is not counted).
    pub growable_bytes: usize,
    /// Growable buffers alive.
    pub growable_count: usize,
}

impl MemoryStats {
    /// Bytes lost to size-class rounding in live allocations.
    pub fn rounding_waste(&self) -> usize {
        self.active_bytes - self.requested_bytes
    }
}

impl std::fmt::Display for MemoryStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::ledger::fmt_bytes;
        writeln!(
            f,
            "active    {:>12} in {} allocations (peak {}, rounding waste {})",
            fmt_bytes(self.active_bytes as u64),
            self.active_count,
            fmt_bytes(self.peak_active_bytes as u64),
            fmt_bytes(self.rounding_waste() as u64)
        )?;
        writeln!(
            f,
            "reserved  {:>12} (peak {}), cached {} in {} blocks",
            fmt_bytes(self.reserved_bytes as u64),
            fmt_bytes(self.peak_reserved_bytes as u64),
            fmt_bytes(self.cached_bytes as u64),
            self.cached_count
        )?;
        writeln!(
            f,
            "external  {:>12} in {} regions; foreign {} in {}; staging {}; growable {} in {} buffers",
            fmt_bytes(self.external_bytes as u64),
            self.external_count,
            fmt_bytes(self.foreign_bytes as u64),
            self.foreign_count,
            fmt_bytes(self.staging_bytes as u64),
            fmt_bytes(self.growable_bytes as u64),
            self.growable_count
        )?;
        write!(
            f,
            "calls     {} device allocs, {} device frees, {} cache hits, {} retries, {} OOMs ({})",
            self.device_allocs,
            self.device_frees,
            self.cache_hits,
            self.oom_retries,
            self.ooms,
            if self.virtual_memory {
                "virtual memory, mapped in granules"
            } else {
                "whole blocks cached"
            }
        )
    }
}
