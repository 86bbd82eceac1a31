//! The device's memory entry points: allocations from the caching allocator, wrapped host and
//! foreign memory, growable regions, and their accounting (stats, budget, per-label figures,
//! allocation traces). Releases of memory the allocator does not own wait for their work
//! (`deferred`).

use super::deferred::DeferredRelease;
use super::inner::DeviceInner;
use super::regions::GrowableRegion;
use crate::alloc::{Block, Budget, MemoryStats};
use crate::allocation::{Allocation, Owner};
use crate::backend::{fences_retired, RawAlloc};
use crate::buffer::HostMemory;
use crate::epoch::FenceSet;
use crate::error::{Error, Result};
use crate::storage::{MemoryAccess, MemoryKind, StorageMode};
use std::any::Any;
use std::ptr::NonNull;
use std::sync::Arc;

/// Memory that did not come from the allocator, as a block: it brings no fences of earlier
/// owners and lies in no arena.
fn unpooled(raw: RawAlloc) -> Block {
    Block {
        raw,
        fences: FenceSet::new(),
        in_arena: false,
    }
}

impl DeviceInner {
    /// An allocation of `bytes` bytes of `mode` memory from the caching allocator.
    pub fn allocate(
        self: &Arc<Self>,
        mode: StorageMode,
        bytes: usize,
        label: String,
    ) -> Result<Allocation> {
        self.check_fault()?;
        self.poll_deferred();
        let mode = mode.resolve(self.info.unified_memory);
        if mode == StorageMode::External {
            return Err(Error::invalid(
                "mode",
                "External buffers wrap caller memory: use Device::wrap_external",
            ));
        }
        let block = {
            let mut a = self.alloc.lock();
            let block = a.allocate(&*self.backend, mode.memory_kind(), bytes)?;
            if let Some(r) = a.recorder() {
                r.alloc(block.raw.addr, bytes);
            }
            block
        };
        Ok(Allocation::new(
            self.clone(),
            block,
            bytes,
            mode,
            label,
            MemoryAccess::ReadWrite,
            None,
        ))
    }

    /// Wraps the pages `base..base + bytes` of host memory kept alive by `memory`. On failure
    /// the memory comes back with the error, so that the caller can still copy it when the
    /// backend refuses to wrap it.
    pub fn wrap(
        self: &Arc<Self>,
        memory: Box<dyn HostMemory>,
        base: NonNull<u8>,
        bytes: usize,
        access: MemoryAccess,
        label: String,
    ) -> std::result::Result<Allocation, (Error, Box<dyn HostMemory>)> {
        if let Err(e) = self.check_fault() {
            return Err((e, memory));
        }
        self.poll_deferred();
        // SAFETY: the caller (wrap_external) passes a page-rounded region inside pages that
        // `memory` keeps mapped, writable if `access` says so; `memory` is stored in the
        // allocation and dropped only after `release`, once all work using the region
        // completed.
        let raw = match unsafe { self.backend.wrap_host(base, bytes, access) } {
            Ok(raw) => raw,
            Err(e) => return Err((e, memory)),
        };
        let mut a = self.alloc.lock();
        let s = a.stats_mut();
        s.external_bytes += raw.bytes;
        s.external_count += 1;
        drop(a);
        Ok(Allocation::new(
            self.clone(),
            unpooled(raw),
            bytes,
            StorageMode::External,
            label,
            access,
            Some(Owner::HostMemory(memory)),
        ))
    }

    /// An allocation over foreign memory the backend wrapped (`Backend::wrap_foreign`), keeping
    /// `keep_alive` until its release, which waits for every fence that used it.
    pub fn adopt_foreign(
        self: &Arc<Self>,
        raw: RawAlloc,
        requested: usize,
        access: MemoryAccess,
        label: String,
        keep_alive: Box<dyn Any + Send + Sync>,
    ) -> Allocation {
        debug_assert_eq!(raw.kind, MemoryKind::Foreign);
        {
            let mut a = self.alloc.lock();
            let s = a.stats_mut();
            s.foreign_bytes += raw.bytes;
            s.foreign_count += 1;
        }
        Allocation::new(
            self.clone(),
            unpooled(raw),
            requested,
            StorageMode::Foreign,
            label,
            access,
            Some(Owner::Foreign(keep_alive)),
        )
    }

    /// Reserves address space for a growable buffer of up to `capacity` bytes and maps its
    /// first `initial` bytes; `None` where the backend has no virtual memory for `mode`.
    pub fn reserve_region(
        self: &Arc<Self>,
        mode: StorageMode,
        capacity: usize,
        initial: usize,
        label: &str,
    ) -> Result<Option<(Allocation, Arc<GrowableRegion>)>> {
        self.check_fault()?;
        let Some(region) = GrowableRegion::reserve(
            &*self.backend,
            &self.alloc,
            mode.memory_kind(),
            capacity,
            initial,
            self.info.max_buffer_len,
        )?
        else {
            return Ok(None);
        };
        let region = Arc::new(region);
        let alloc = Allocation::new(
            self.clone(),
            unpooled(region.raw()),
            initial,
            mode,
            label.to_owned(),
            MemoryAccess::ReadWrite,
            Some(Owner::GrowableRegion(region.clone())),
        );
        Ok(Some((alloc, region)))
    }

    /// Maps more of a growable region so that its first `bytes` are backed, counting them
    /// for `label`.
    pub fn grow_region(&self, region: &GrowableRegion, bytes: usize, label: &str) -> Result<()> {
        self.check_fault()?;
        let added = region.grow(&*self.backend, &self.alloc, bytes)?;
        if added > 0 {
            self.own_bytes(label, added);
        }
        Ok(())
    }

    /// Counts an allocation's bytes for its label.
    pub fn own(&self, label: &str, bytes: usize) {
        self.owners.lock().own(label, bytes);
    }

    /// Adds bytes to a label's count (a growable buffer that grew).
    pub fn own_bytes(&self, label: &str, bytes: usize) {
        self.owners.lock().add_bytes(label, bytes);
    }

    /// Stops counting an allocation's bytes for its label.
    pub fn disown(&self, label: &str, bytes: usize) {
        self.owners.lock().disown(label, bytes);
    }

    /// Live bytes and allocations per label, most bytes first.
    pub fn owners(&self) -> Vec<(String, usize, usize)> {
        self.owners.lock().live()
    }

    /// Hands a block back to the allocator, tagged with the fences of its last work.
    pub fn free_block(&self, block: Block, requested: usize) {
        self.residency.forget(block.raw.handle, &block.fences);
        let mut a = self.alloc.lock();
        if let Some(r) = a.recorder() {
            r.free(block.raw.addr);
        }
        a.free(&*self.backend, block, requested);
    }

    /// Releases memory the allocator does not own once the work that used it completes.
    pub fn defer_release(&self, block: Block, owner: Owner) {
        self.residency.forget(block.raw.handle, &block.fences);
        self.deferred.defer(DeferredRelease {
            raw: block.raw,
            owner,
            fences: block.fences,
        });
        self.poll_deferred();
    }

    /// Applies the deferred releases whose work has completed, and the residency removals
    /// whose work has completed.
    pub fn poll_deferred(&self) {
        let retired = |fences: &FenceSet| fences_retired(&*self.backend, fences);
        for r in self.deferred.take_retired(retired) {
            // SAFETY: every fence of the release has retired; it came from this backend.
            unsafe { r.release(&*self.backend, &self.alloc) };
        }
        self.residency.apply_removals(&*self.backend, retired);
    }

    /// Starts recording the allocator's allocations and frees to `path`.
    pub fn record_alloc_trace(&self, path: &std::path::Path) -> Result<()> {
        // Under the lock: a second start must be refused before it truncates any file (the
        // running recording's own, say).
        let mut a = self.alloc.lock();
        if let Some(running) = a.recorder() {
            return Err(Error::invalid(
                "allocation trace",
                format!(
                    "already recording to {} (finish it first); {} not started",
                    running.path().display(),
                    path.display()
                ),
            ));
        }
        a.start_recording(crate::alloc::TraceRecorder::create(path)?);
        Ok(())
    }

    /// Stops the recording and finishes its file.
    pub fn finish_alloc_trace(&self) -> Result<crate::alloc::TraceSummary> {
        let recorder = self.alloc.lock().stop_recording().ok_or_else(|| {
            Error::invalid(
                "allocation trace",
                "no recording is running (start one with Device::record_alloc_trace)",
            )
        })?;
        recorder.finish()
    }

    pub fn memory_stats(&self) -> MemoryStats {
        let mut s = self.alloc.lock().stats();
        s.staging_bytes = self.staging.bytes();
        s
    }

    pub fn budget(&self) -> Budget {
        self.alloc.lock().budget()
    }

    pub fn set_budget(&self, budget: Budget) {
        self.alloc.lock().set_budget(budget);
    }

    /// The allocator's segments and cached blocks, after deferred releases are applied.
    pub fn memory_snapshot(&self) -> crate::alloc::MemorySnapshot {
        self.poll_deferred();
        self.alloc.lock().snapshot()
    }

    /// Releases every cached block and idle staging chunk back to the backend.
    pub fn trim(&self) -> usize {
        self.poll_deferred();
        let released = self
            .alloc
            .lock()
            .release_cached(&*self.backend, usize::MAX, true);
        released + self.staging.trim(&*self.backend)
    }
}
