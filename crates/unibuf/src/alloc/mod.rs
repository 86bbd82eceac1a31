//! The caching allocator: policy over the backend's raw memory.
//!
//! Freed blocks go to a cache keyed by (memory kind, size class) together with the fences of
//! the work that last touched them. Reuse needs no wait here: the new owner inherits those fences
//! as pending writes (see [`UseState::inherited`](crate::epoch::UseState)), so the hazard
//! tracker orders its first use after them — for free on the same queue, by a device-side wait
//! on another, by a blocking wait for host access. Memory goes back to the backend only once its
//! fences have completed.
//!
//! When the backend refuses an allocation, recovery is staged: release cached blocks that are
//! idle, then wait for the rest and release them too, then fail with the figures.

mod size_class;
mod stats;

pub use size_class::size_class;
pub use stats::MemoryStats;

use crate::backend::{Backend, RawAlloc};
use crate::epoch::FenceSet;
use crate::error::{Error, Result};
use crate::storage::MemoryKind;
use std::collections::BTreeMap;

/// Limits the allocator enforces. The staging ring of the transfer engine is not counted: it is
/// a fixed, configured amount of host memory (see `MemoryStats::staging_bytes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// Reserved bytes (live plus cached) never exceed this.
    pub memory_limit: Option<usize>,
    /// Cached bytes above this are released as soon as their work completes.
    pub cache_limit: Option<usize>,
}

/// A block handed out to a live allocation.
pub(crate) struct Block {
    pub raw: RawAlloc,
    /// Fences of the previous owner's work, to be inherited by the new owner.
    pub fences: FenceSet,
}

struct Cached {
    raw: RawAlloc,
    fences: FenceSet,
    /// Order of freeing, so that cache trimming releases the oldest first.
    freed_at: u64,
}

/// The allocator's state; lives behind the device's mutex.
pub(crate) struct Allocator {
    cache: BTreeMap<(MemoryKind, usize), Vec<Cached>>,
    stats: MemoryStats,
    budget: Budget,
    free_counter: u64,
}

fn all_complete(backend: &dyn Backend, fences: &FenceSet) -> bool {
    fences
        .iter()
        .all(|f| crate::backend::fence_retired(backend, f))
}

fn wait_all(backend: &dyn Backend, fences: &FenceSet) {
    for f in fences.iter() {
        // A faulted queue never runs the work again: the memory is no longer in use.
        let _ = backend.wait(f.queue, f.epoch);
    }
}

impl Allocator {
    pub fn new(budget: Budget) -> Allocator {
        Allocator {
            cache: BTreeMap::new(),
            stats: MemoryStats::default(),
            budget,
            free_counter: 0,
        }
    }

    pub fn stats(&self) -> MemoryStats {
        self.stats
    }

    pub fn stats_mut(&mut self) -> &mut MemoryStats {
        &mut self.stats
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    pub fn set_budget(&mut self, budget: Budget) {
        self.budget = budget;
    }

    /// Allocates a block of at least `requested` bytes of `kind` memory.
    pub fn allocate(
        &mut self,
        backend: &dyn Backend,
        kind: MemoryKind,
        requested: usize,
    ) -> Result<Block> {
        let info = backend.info();
        let class = size_class(requested).ok_or(Error::NeverFits {
            requested,
            limit: info.max_buffer_len,
            limit_name: "maximum buffer length",
        })?;
        for (limit, limit_name) in [
            (info.max_buffer_len, "maximum buffer length"),
            (info.total_memory, "device memory"),
            (
                self.budget.memory_limit.unwrap_or(usize::MAX),
                "memory budget",
            ),
        ] {
            if class > limit {
                return Err(Error::NeverFits {
                    requested: class,
                    limit,
                    limit_name,
                });
            }
        }
        let block = match self.take_cached(kind, class) {
            Some(b) => {
                self.stats.cache_hits += 1;
                b
            }
            None => self.allocate_new(backend, kind, class)?,
        };
        let s = &mut self.stats;
        s.active_bytes += class;
        s.active_count += 1;
        s.requested_bytes += requested;
        s.peak_active_bytes = s.peak_active_bytes.max(s.active_bytes);
        Ok(block)
    }

    fn take_cached(&mut self, kind: MemoryKind, class: usize) -> Option<Block> {
        let list = self.cache.get_mut(&(kind, class))?;
        let c = list.pop()?;
        if list.is_empty() {
            self.cache.remove(&(kind, class));
        }
        self.stats.cached_bytes -= class;
        self.stats.cached_count -= 1;
        Some(Block {
            raw: c.raw,
            fences: c.fences,
        })
    }

    fn allocate_new(
        &mut self,
        backend: &dyn Backend,
        kind: MemoryKind,
        class: usize,
    ) -> Result<Block> {
        if let Some(limit) = self.budget.memory_limit {
            if self.stats.reserved_bytes + class > limit {
                self.stats.oom_retries += 1;
                let need = self.stats.reserved_bytes + class - limit;
                self.release_cached(backend, need, true);
                if self.stats.reserved_bytes + class > limit {
                    self.stats.ooms += 1;
                    return Err(Error::BudgetExceeded {
                        which: "memory",
                        requested: class,
                        in_use: self.stats.reserved_bytes,
                        budget: limit,
                    });
                }
            }
        }
        // Staged recovery: plain attempt, then release idle cache, then wait for and release
        // everything cached.
        let mut attempt = 0;
        loop {
            // SAFETY: kind is Device or HostShared (External memory never comes from here), and
            // the block is released only through `release_raw` once its fences completed.
            match unsafe { backend.allocate(kind, class) } {
                Ok(raw) => {
                    let s = &mut self.stats;
                    s.device_allocs += 1;
                    s.reserved_bytes += class;
                    s.peak_reserved_bytes = s.peak_reserved_bytes.max(s.reserved_bytes);
                    return Ok(Block {
                        raw,
                        fences: FenceSet::new(),
                    });
                }
                Err(Error::OutOfMemory { .. }) if attempt < 2 && self.stats.cached_bytes > 0 => {
                    self.stats.oom_retries += 1;
                    self.release_cached(backend, usize::MAX, attempt == 1);
                    attempt += 1;
                }
                Err(Error::OutOfMemory { .. }) => {
                    self.stats.ooms += 1;
                    return Err(Error::OutOfMemory {
                        requested: class,
                        reserved: self.stats.reserved_bytes,
                        free: backend.free_memory().unwrap_or(0),
                        largest_free: self.largest_cached(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn largest_cached(&self) -> usize {
        self.cache.keys().next_back().map_or(0, |(_, c)| *c)
    }

    /// Returns a block to the cache; its memory is reused later under its fences.
    pub fn free(&mut self, backend: &dyn Backend, block: Block, requested: usize) {
        let class = block.raw.bytes;
        let s = &mut self.stats;
        s.active_bytes -= class;
        s.active_count -= 1;
        s.requested_bytes -= requested;
        s.cached_bytes += class;
        s.cached_count += 1;
        self.free_counter += 1;
        self.cache
            .entry((block.raw.kind, class))
            .or_default()
            .push(Cached {
                raw: block.raw,
                fences: block.fences,
                freed_at: self.free_counter,
            });
        if let Some(limit) = self.budget.cache_limit {
            if self.stats.cached_bytes > limit {
                let excess = self.stats.cached_bytes - limit;
                self.release_cached(backend, excess, false);
            }
        }
    }

    /// Releases cached blocks, oldest first, until `bytes` have been released. Blocks whose work
    /// is still pending are released only if `wait` is set, after waiting for that work.
    pub fn release_cached(&mut self, backend: &dyn Backend, bytes: usize, wait: bool) -> usize {
        let mut order: Vec<(u64, MemoryKind, usize, usize)> = Vec::new();
        for ((kind, class), list) in &self.cache {
            for (i, c) in list.iter().enumerate() {
                order.push((c.freed_at, *kind, *class, i));
            }
        }
        order.sort_unstable();
        let mut chosen: Vec<(MemoryKind, usize, u64)> = Vec::new();
        let mut released = 0;
        for (freed_at, kind, class, i) in order {
            if released >= bytes {
                break;
            }
            let c = &self.cache[&(kind, class)][i];
            if wait || all_complete(backend, &c.fences) {
                chosen.push((kind, class, freed_at));
                released += class;
            }
        }
        for (kind, class, freed_at) in chosen {
            let list = self.cache.get_mut(&(kind, class)).expect("listed above");
            let pos = list
                .iter()
                .position(|c| c.freed_at == freed_at)
                .expect("listed above");
            let c = list.swap_remove(pos);
            if list.is_empty() {
                self.cache.remove(&(kind, class));
            }
            wait_all(backend, &c.fences);
            self.stats.cached_bytes -= class;
            self.stats.cached_count -= 1;
            self.release_raw(backend, c.raw);
        }
        released
    }

    fn release_raw(&mut self, backend: &dyn Backend, raw: RawAlloc) {
        self.stats.reserved_bytes -= raw.bytes;
        self.stats.device_frees += 1;
        // SAFETY: the block came from `backend.allocate`, and every fence that touched it has
        // completed (checked or waited for by the caller).
        unsafe { backend.release(raw) };
    }
}
