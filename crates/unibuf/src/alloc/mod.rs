//! The caching allocator: policy over the backend's raw memory.
//!
//! Where the backend has virtual memory (`Backend::virtual_memory`), blocks are placed in one
//! reserved address range per memory kind and physical memory is mapped in granules under the
//! live blocks (see `arena.rs`): fragmentation stays near zero whatever sizes come and go.
//! Elsewhere, freed blocks go to a cache keyed by (memory kind, size class) and the stats say
//! so (`MemoryStats::virtual_memory` is false).
//!
//! Either way, freed memory carries the fences of the work that last touched it. Reuse needs no
//! wait here: the new owner inherits those fences as pending writes (`UseState::inherited` in
//! `epoch.rs`), so the hazard tracker orders its first use after them — for free on the same
//! queue, by a device-side wait on another, by a blocking wait for host access. Memory goes back
//! to the backend only once its fences have completed.
//!
//! When mapping new granules would pass the bound on memory held, idle cached granules are
//! unmapped first and their physical memory moves to the new ones
//! (`VirtualMemory::unmap_for_reuse`): on CUDA a move costs an unmap and a map, where releasing
//! and creating the memory again would add about 20 µs per 2 MiB granule.
//!
//! When the backend refuses an allocation, recovery is staged: release cached blocks that are
//! idle, then wait for the rest and release them too, then fail with the figures.

pub(crate) mod arena;
#[cfg(test)]
mod placement_tests;
mod record;
pub(crate) mod replay;
mod size_class;
mod snapshot;
mod stats;
mod trace;

pub(crate) use record::TraceRecorder;
pub use record::TraceSummary;
pub use replay::{replay_simulated, ReplayReport};
pub use size_class::size_class;
pub use snapshot::{
    CachedBlockSnapshot, MemorySnapshot, RangeSnapshot, RangeState, SegmentSnapshot,
};
pub use stats::MemoryStats;
pub use trace::{Trace, TraceEvent};

use crate::backend::{fence_retired, Backend, RawAlloc, VirtualMemory};
use crate::epoch::FenceSet;
use crate::error::{Error, Result};
use crate::storage::MemoryKind;
use arena::Arena;
use std::collections::BTreeMap;
use std::time::Instant;

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
    /// Whether the block lies in an arena (else it came whole from `Backend::allocate`).
    pub in_arena: bool,
}

/// Mapped memory may exceed the largest live total seen by this fraction (1/50) plus
/// `FLOOR_GRANULES` granules before cached granules are unmapped: enough to absorb the swings
/// of a decode loop without remapping (and to keep a small program's alloc/free pairs from
/// mapping and unmapping every time), little enough to keep peak reserved within a few percent
/// of peak live. On the shared llama decode trace: 1.032, with about one map per 480 events.
const SLACK_DIVISOR: usize = 50;

const FLOOR_GRANULES: usize = 2;
const QUICK_DIVISOR: usize = 128;
const QUICK_MIN: usize = 2 << 20;

/// One memory kind's arena and the address range it places blocks in.
struct ArenaPool {
    kind: MemoryKind,
    base: u64,
    arena: Arena,
}

impl ArenaPool {
    /// The block handed out for `bytes` placed at `offset` (its address is its handle).
    #[inline]
    fn block(&self, offset: u64, bytes: usize, fences: FenceSet) -> Block {
        let addr = self.base + offset;
        Block {
            raw: RawAlloc {
                addr,
                handle: addr,
                bytes,
                kind: self.kind,
            },
            fences,
            in_arena: true,
        }
    }
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
    arenas: Vec<ArenaPool>,
    /// Kinds whose address range could not be reserved: they cache whole blocks instead.
    no_arena: Vec<MemoryKind>,
    stats: MemoryStats,
    budget: Budget,
    free_counter: u64,
    /// The largest total of requested live bytes seen: the basis of the unmapping bound.
    peak_requested: usize,
    /// The largest arena granule: the unmapping bound's floor is counted in it.
    granule: usize,
    /// Bytes and count of the whole blocks in `cache` (the arenas' cached granules are counted
    /// when the stats are read: keeping them current would cost every allocation a pass over
    /// the arenas).
    block_cache_bytes: usize,
    block_cache_count: usize,
    /// The last arena block freed that its arena would put in the quick list, kept here whole
    /// with its granule references and its room in that list taken (`Arena::reserve_quick`):
    /// a hot alloc/free pair of one size then touches neither the arena's lists nor its
    /// granule counts (the pair ran 40% faster on the development machine). It counts as
    /// cached, and goes to its arena's quick list (`flush_front`) before a placement that
    /// would map memory, before any unmapping, and for snapshots.
    front: Option<Block>,
    /// Where allocations and frees are being recorded, if anywhere. Kept under the allocator's
    /// lock so that the file's order is the allocator's: an address freed on one thread and
    /// handed out again on another is written free first.
    recorder: Option<TraceRecorder>,
}

/// Nanoseconds since `started`, for `MemoryStats::device_call_ns`.
fn elapsed_ns(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
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
            arenas: Vec::new(),
            no_arena: Vec::new(),
            stats: MemoryStats::default(),
            budget,
            free_counter: 0,
            peak_requested: 0,
            granule: 0,
            block_cache_bytes: 0,
            block_cache_count: 0,
            front: None,
            recorder: None,
        }
    }

    /// Starts writing allocations and frees to `recorder`, replacing none: the caller checks
    /// that no recording runs (`recorder`).
    pub fn start_recording(&mut self, recorder: TraceRecorder) {
        debug_assert!(self.recorder.is_none(), "a recording is already running");
        self.recorder = Some(recorder);
    }

    /// Stops recording and hands the recorder back to be finished.
    pub fn stop_recording(&mut self) -> Option<TraceRecorder> {
        self.recorder.take()
    }

    /// The running recording, to write an allocation or a free to (see `recorder`).
    pub fn recorder(&mut self) -> Option<&mut TraceRecorder> {
        self.recorder.as_mut()
    }

    /// Segments and cached blocks as they are now.
    pub fn snapshot(&mut self) -> MemorySnapshot {
        // The front block is shown where the arena keeps freed blocks (as kept).
        self.flush_front();
        MemorySnapshot {
            segments: self
                .arenas
                .iter()
                .map(|a| SegmentSnapshot {
                    kind: a.kind,
                    base: a.base,
                    address_space: a.arena.len(),
                    granule: a.arena.granule(),
                    mapped: a.arena.mapped_ranges(),
                    ranges: a.arena.ranges(),
                })
                .collect(),
            cached_blocks: self
                .cache
                .iter()
                .flat_map(|((kind, class), list)| {
                    list.iter().map(|c| CachedBlockSnapshot {
                        kind: *kind,
                        addr: c.raw.addr,
                        bytes: *class,
                    })
                })
                .collect(),
        }
    }

    pub fn stats(&self) -> MemoryStats {
        let granules: usize = self
            .arenas
            .iter()
            .map(|a| a.arena.cached_granules() as usize)
            .sum();
        MemoryStats {
            cached_bytes: self.cached_total(),
            cached_count: granules + self.block_cache_count + self.front_granules().0 as usize,
            ..self.stats
        }
    }

    /// The counters for the device to update (external, staging, growable figures). Its
    /// `cached_bytes` and `cached_count` are not kept current: `stats` computes them.
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
        // Not `ok_or`: building (and dropping) the error on every allocation shows in profiles.
        let Some(class) = size_class(requested) else {
            return Err(Error::NeverFits {
                requested,
                limit: info.max_buffer_len,
                limit_name: "maximum buffer length",
            });
        };
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
        let arena_vm = backend
            .virtual_memory(kind)
            .filter(|_| !self.no_arena.contains(&kind));
        if let Some(vm) = arena_vm {
            // Returned as it is: unpacking the block and building the result again would move
            // it right after it was written, which stalls on store forwarding (a fifth of a hot
            // alloc/free pair).
            return self.allocate_in_arena_or_blocks(backend, vm, kind, requested, class);
        }
        let block = match self.take_cached(kind, class) {
            Some(b) => {
                self.stats.cache_hits += 1;
                b
            }
            None => self.allocate_new(backend, kind, class)?,
        };
        self.count_active(block.raw.bytes, requested);
        Ok(block)
    }

    /// Counts a block handed out for `requested` bytes.
    fn count_active(&mut self, bytes: usize, requested: usize) {
        let s = &mut self.stats;
        s.active_bytes += bytes;
        s.active_count += 1;
        s.requested_bytes += requested;
        s.peak_active_bytes = s.peak_active_bytes.max(s.active_bytes);
        self.peak_requested = self.peak_requested.max(s.requested_bytes);
    }

    fn arena_index(
        &mut self,
        backend: &dyn Backend,
        vm: &dyn VirtualMemory,
        kind: MemoryKind,
    ) -> Result<usize> {
        if let Some(i) = self.arenas.iter().position(|a| a.kind == kind) {
            return Ok(i);
        }
        // Twice the device's memory of address space (capped at 64 TiB): address space is
        // cheap, and room to spare keeps placement from running out before memory does. Where
        // the process may not reserve that much (an address-space limit), smaller ranges are
        // tried down to the device's memory; below that the caller falls back to caching whole
        // blocks for this kind.
        let granule = vm.granularity() as u64;
        let total = (backend.info().total_memory as u64)
            .clamp(granule, 1 << 45)
            .next_multiple_of(granule);
        let mut len = total * 2;
        let base = loop {
            // SAFETY: released by `shutdown` once nothing is mapped.
            match unsafe { vm.reserve(kind, len as usize) } {
                Ok(base) => break base,
                Err(e) if len <= total => {
                    tracing::warn!(
                        ?kind,
                        bytes = len,
                        "address space for the allocator could not be reserved ({e}); caching whole blocks"
                    );
                    self.no_arena.push(kind);
                    return Err(e);
                }
                // Halve towards the device's memory; both are granule multiples, so this ends.
                Err(_) => len = (len / 2).next_multiple_of(granule).max(total),
            }
        };
        self.arenas.push(ArenaPool {
            kind,
            base,
            arena: Arena::new(len, granule),
        });
        self.granule = self.granule.max(granule as usize);
        self.stats.virtual_memory = true;
        Ok(self.arenas.len() - 1)
    }

    /// Allocates in the arena of `kind` memory, or, where its address range could not be
    /// reserved, a whole block of `class` bytes.
    fn allocate_in_arena_or_blocks(
        &mut self,
        backend: &dyn Backend,
        vm: &dyn VirtualMemory,
        kind: MemoryKind,
        requested: usize,
        class: usize,
    ) -> Result<Block> {
        let i = match self.arena_index(backend, vm, kind) {
            Ok(i) => i,
            Err(_) if self.no_arena.contains(&kind) => {
                // The address range could not be reserved: whole blocks for this kind.
                let block = self.allocate_new(backend, kind, class)?;
                self.count_active(block.raw.bytes, requested);
                return Ok(block);
            }
            Err(e) => return Err(e),
        };
        // The quick list may hold 1/128 of the largest live total (at least 2 MiB): enough for
        // the working sizes of a decode step, too little to matter for fragmentation. Set on
        // every allocation, a reuse of the front block included, so that what the arena keeps
        // whole does not depend on whether the front block was reused.
        let quick_limit = (self.peak_requested / QUICK_DIVISOR).max(QUICK_MIN);
        self.arenas[i].arena.set_quick_limit(quick_limit as u64);
        let rounded = requested
            .max(1)
            .next_multiple_of(arena::BLOCK_ALIGN as usize);
        // The front block is what `place` would hand out first from the quick list, unless
        // the large slot holds this size. A request for another size of its bucket reorders
        // the bucket (`swap_remove`) with the block in it: flush it first, so that placement
        // stays exactly what the quick list alone would give.
        let arena = &self.arenas[i].arena;
        let front_fits = self.front.as_ref().map(|f| {
            (
                f.raw.kind == kind && f.raw.bytes == rounded && !arena.large_holds(rounded as u64),
                f.raw.kind == kind
                    && Arena::quick_bucket(f.raw.bytes as u64)
                        == Arena::quick_bucket(rounded as u64),
            )
        });
        if let Some((false, true)) = front_fits {
            self.flush_front();
        }
        if let Some((true, _)) = front_fits {
            let block = self.front.take().expect("checked above");
            self.arenas[i].arena.unreserve_quick(block.raw.bytes as u64);
            self.stats.cache_hits += 1;
            self.count_active(block.raw.bytes, requested);
            return Ok(block);
        }
        // Next what `place` would hand out first, the large slot's block, without building a
        // placement: a hot pair of a large size.
        if let Some((offset, fences)) = self.arenas[i].arena.take_large(rounded as u64) {
            self.stats.cache_hits += 1;
            self.count_active(rounded, requested);
            return Ok(self.arenas[i].block(offset, rounded, fences));
        }
        let granule = self.arenas[i].arena.granule() as usize;
        let mut attempt = 0;
        let mut quick_flushed = false;
        loop {
            let Some(p) = self.arenas[i]
                .arena
                .place(requested as u64, &mut |f| fence_retired(backend, f))
            else {
                if !quick_flushed && self.arenas[i].arena.quick_bytes() > 0 {
                    // The quick list and the front block (whose room it counts) hold blocks out
                    // of the free space: return them and retry.
                    self.flush_front();
                    self.arenas[i]
                        .arena
                        .flush_quick(&mut |f| fence_retired(backend, f));
                    quick_flushed = true;
                    continue;
                }
                self.stats.ooms += 1;
                return Err(self.out_of_memory(backend, requested));
            };
            if !quick_flushed && !p.to_map.is_empty() && self.arenas[i].arena.quick_bytes() > 0 {
                // Kept-whole blocks must never make a request map fresh memory: return them to
                // the free space (where the request may fit in their granules) and place again.
                self.arenas[i].arena.unplace(p);
                self.flush_front();
                self.arenas[i]
                    .arena
                    .flush_quick(&mut |f| fence_retired(backend, f));
                quick_flushed = true;
                continue;
            }
            let new_bytes: usize = p
                .to_map
                .iter()
                .map(|r| (r.end - r.start) as usize * granule)
                .sum();
            let over_budget = self
                .budget
                .memory_limit
                .is_some_and(|limit| self.stats.reserved_bytes + new_bytes > limit);
            if !over_budget && new_bytes > 0 {
                // Unmap cached granules elsewhere first if the new ones would pass the bound,
                // so that memory held never peaks above what is needed.
                // The bound counts this request, but the high-water mark only rises once the
                // allocation succeeds (a failed probe must not inflate it for good).
                let peak = self
                    .peak_requested
                    .max(self.stats.requested_bytes + requested);
                // Physical memory unmapped here is kept for the map below (a move).
                self.enforce_bound_for(backend, new_bytes, peak, Some(kind));
            }
            let mapped = if over_budget {
                Ok(())
            } else {
                self.map_ranges(vm, i, &p.to_map)
            };
            if new_bytes > 0 {
                let started = Instant::now();
                vm.release_kept(kind);
                self.stats.device_call_ns += elapsed_ns(started);
            }
            if !over_budget && mapped.is_ok() {
                let s = &mut self.stats;
                if new_bytes == 0 {
                    s.cache_hits += 1;
                } else {
                    s.reserved_bytes += new_bytes;
                    s.peak_reserved_bytes = s.peak_reserved_bytes.max(s.reserved_bytes);
                }
                self.count_active(p.bytes as usize, requested);
                return Ok(self.arenas[i].block(p.offset, p.bytes as usize, p.fences));
            }
            self.arenas[i].arena.unplace(p);
            // Staged recovery: unmap idle cached granules, then wait for busy ones, then fail.
            if attempt < 2 && self.cached_total() > 0 {
                self.stats.oom_retries += 1;
                // First the shortfall from idle cache; then everything, waiting for busy work.
                let shortfall = match (over_budget, self.budget.memory_limit) {
                    (true, Some(limit)) => {
                        (self.stats.reserved_bytes + new_bytes).saturating_sub(limit)
                    }
                    _ => usize::MAX,
                };
                let want = if attempt == 0 { shortfall } else { usize::MAX };
                tracing::debug!(
                    requested,
                    attempt,
                    want,
                    "allocation failed; releasing cached memory and retrying"
                );
                self.release_cached(backend, want, attempt == 1);
                attempt += 1;
                continue;
            }
            self.stats.ooms += 1;
            return Err(match (over_budget, self.budget.memory_limit) {
                (true, Some(budget)) => Error::BudgetExceeded {
                    which: "memory",
                    requested: new_bytes,
                    in_use: self.stats.reserved_bytes,
                    budget,
                },
                _ => mapped
                    .err()
                    .unwrap_or_else(|| self.out_of_memory(backend, requested)),
            });
        }
    }

    /// Maps granule ranges of arena `i`; on failure, unmaps what this call mapped.
    fn map_ranges(
        &mut self,
        vm: &dyn VirtualMemory,
        i: usize,
        ranges: &[std::ops::Range<u64>],
    ) -> Result<()> {
        let pool = &self.arenas[i];
        let g = pool.arena.granule();
        for (n, r) in ranges.iter().enumerate() {
            let started = Instant::now();
            // SAFETY: the arena reports these granules unmapped and inside its reservation.
            let mapped = unsafe {
                vm.map(
                    pool.kind,
                    pool.base + r.start * g,
                    ((r.end - r.start) * g) as usize,
                )
            };
            self.stats.device_call_ns += elapsed_ns(started);
            if let Err(e) = mapped {
                for done in &ranges[..n] {
                    // SAFETY: mapped just above by this call, used by nothing.
                    unsafe {
                        vm.unmap(
                            pool.kind,
                            pool.base + done.start * g,
                            ((done.end - done.start) * g) as usize,
                        )
                    };
                }
                return Err(match e {
                    Error::OutOfMemory {
                        requested,
                        reserved,
                        free,
                        largest_free,
                    } => Error::OutOfMemory {
                        requested: requested.max(((r.end - r.start) * g) as usize),
                        reserved: reserved.max(self.stats.reserved_bytes),
                        free,
                        largest_free,
                    },
                    other => other,
                });
            }
            self.stats.device_allocs += 1;
        }
        Ok(())
    }

    fn out_of_memory(&self, backend: &dyn Backend, requested: usize) -> Error {
        Error::OutOfMemory {
            requested,
            reserved: self.stats.reserved_bytes,
            free: backend.free_memory().unwrap_or(0),
            largest_free: self.largest_cached(),
        }
    }

    /// Bytes held in arenas but used by no live block: cached granules, those of blocks kept
    /// whole in the quick list and the large slot included (`Arena::cached_granules`).
    fn cached_granule_bytes(&self) -> usize {
        self.arenas
            .iter()
            .map(|a| (a.arena.cached_granules() * a.arena.granule()) as usize)
            .sum()
    }

    /// Unmaps up to `budget_bytes` of cached granules (rounded up to whole granules) of every
    /// arena, skipping those whose work is still running unless `wait`. Returns bytes unmapped.
    ///
    /// Granules of `reuse_for` memory are unmapped with `unmap_for_reuse`: the caller maps new
    /// granules next and then calls `release_kept`.
    fn unmap_cached(
        &mut self,
        backend: &dyn Backend,
        mut budget_bytes: usize,
        wait: bool,
        reuse_for: Option<MemoryKind>,
    ) -> usize {
        // The front block holds granule references: release it so its granules can go too.
        self.flush_front();
        let mut unmapped = 0;
        for pool in &mut self.arenas {
            let Some(vm) = backend.virtual_memory(pool.kind) else {
                continue;
            };
            pool.arena.flush_quick(&mut |f| fence_retired(backend, f));
            let g = pool.arena.granule();
            while budget_bytes > 0 && pool.arena.cached_granules() > 0 {
                let want = (budget_bytes as u64).div_ceil(g);
                let taken = pool
                    .arena
                    .take_cached(want, &mut |f| fence_retired(backend, f));
                if taken.is_empty() {
                    break;
                }
                let mut progressed = false;
                for (r, fences) in taken {
                    let bytes = ((r.end - r.start) * g) as usize;
                    if !fences.iter().all(|f| fence_retired(backend, f)) {
                        if !wait {
                            pool.arena.recache(r);
                            continue;
                        }
                        wait_all(backend, &fences);
                    }
                    let started = Instant::now();
                    // SAFETY: no live block overlaps these granules (they were cached) and the
                    // work that last used them has completed (checked or waited above).
                    unsafe {
                        let addr = pool.base + r.start * g;
                        if reuse_for == Some(pool.kind) {
                            vm.unmap_for_reuse(pool.kind, addr, bytes);
                        } else {
                            vm.unmap(pool.kind, addr, bytes);
                        }
                    }
                    self.stats.device_call_ns += elapsed_ns(started);
                    self.stats.device_frees += 1;
                    self.stats.reserved_bytes -= bytes;
                    unmapped += bytes;
                    budget_bytes = budget_bytes.saturating_sub(bytes);
                    progressed = true;
                }
                if !progressed {
                    break;
                }
            }
        }
        unmapped
    }

    /// Unmaps cached granules past the bound: (1 + 1/50) x the largest live total seen plus two
    /// granules, and the cache limit. Only idle granules go; busy ones are retried later.
    fn enforce_bound(&mut self, backend: &dyn Backend) {
        self.enforce_bound_for(backend, 0, self.peak_requested, None);
    }

    /// As `enforce_bound`, counting `incoming` bytes about to be mapped and computing the bound
    /// from `peak` live bytes rather than the recorded high-water mark; memory unmapped from
    /// `reuse_for`'s arena is kept for the caller's map (see `unmap_cached`).
    fn enforce_bound_for(
        &mut self,
        backend: &dyn Backend,
        incoming: usize,
        peak: usize,
        reuse_for: Option<MemoryKind>,
    ) {
        // Every free comes through here: the common case (within the bound, no cache limit)
        // must cost a few instructions.
        let bound = peak + peak / SLACK_DIVISOR + FLOOR_GRANULES * self.granule;
        let mut excess = (self.stats.reserved_bytes + incoming).saturating_sub(bound);
        if excess == 0 && self.budget.cache_limit.is_none() {
            return;
        }
        // The front block's granules are cached once it is flushed (`unmap_cached` does).
        let cached = self.cached_granule_bytes() + self.front_bytes();
        if cached == 0 {
            return;
        }
        if let Some(limit) = self.budget.cache_limit {
            excess = excess.max((cached + self.block_cache_bytes).saturating_sub(limit));
        }
        if excess > 0 {
            self.unmap_cached(backend, excess, false, reuse_for);
        }
    }

    /// Releases every arena's reservation. Only valid when no block is live.
    pub fn shutdown(&mut self, backend: &dyn Backend) {
        self.unmap_cached(backend, usize::MAX, true, None);
        for pool in self.arenas.drain(..) {
            if let Some(vm) = backend.virtual_memory(pool.kind) {
                // SAFETY: nothing is live (the caller's contract) and every cached granule was
                // unmapped above, so nothing in the reservation is mapped.
                unsafe { vm.unreserve(pool.kind, pool.base, pool.arena.len() as usize) };
            }
        }
    }

    fn take_cached(&mut self, kind: MemoryKind, class: usize) -> Option<Block> {
        let list = self.cache.get_mut(&(kind, class))?;
        let c = list.pop()?;
        if list.is_empty() {
            self.cache.remove(&(kind, class));
        }
        self.block_cache_bytes -= class;
        self.block_cache_count -= 1;
        Some(Block {
            raw: c.raw,
            fences: c.fences,
            in_arena: false,
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
            let started = Instant::now();
            // SAFETY: kind is Device or HostShared (External memory never comes from here), and
            // the block is released only through `release_raw` once its fences completed.
            let allocated = unsafe { backend.allocate(kind, class) };
            self.stats.device_call_ns += elapsed_ns(started);
            match allocated {
                Ok(raw) => {
                    let s = &mut self.stats;
                    s.device_allocs += 1;
                    s.reserved_bytes += class;
                    s.peak_reserved_bytes = s.peak_reserved_bytes.max(s.reserved_bytes);
                    return Ok(Block {
                        raw,
                        fences: FenceSet::new(),
                        in_arena: false,
                    });
                }
                Err(Error::OutOfMemory { .. }) if attempt < 2 && self.cached_total() > 0 => {
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

    /// Bytes held but not in use: cached granules, cached whole blocks and the front block.
    fn cached_total(&self) -> usize {
        self.cached_granule_bytes() + self.block_cache_bytes + self.front_bytes()
    }

    /// Bytes the front block alone keeps mapped: its granules no live block shares (0 without
    /// one). They become cached granules when it is flushed.
    fn front_bytes(&self) -> usize {
        let (granules, granule) = self.front_granules();
        (granules * granule) as usize
    }

    /// The granules counted by `front_bytes`, and their size.
    fn front_granules(&self) -> (u64, u64) {
        let Some(b) = &self.front else {
            return (0, 0);
        };
        self.arenas
            .iter()
            .find(|a| a.kind == b.raw.kind)
            .map_or((0, 0), |a| {
                let offset = b.raw.addr - a.base;
                (
                    a.arena.sole_granules(offset, b.raw.bytes as u64),
                    a.arena.granule(),
                )
            })
    }

    /// Returns the front block, if any, to its arena's quick list. Before anything flushes
    /// that list: the block's room there is already counted.
    fn flush_front(&mut self) {
        if let Some(block) = self.front.take() {
            self.push_front_to_arena(block);
        }
    }

    /// The arena of a block placed in one.
    fn arena_of(&mut self, block: &Block) -> &mut ArenaPool {
        self.arenas
            .iter_mut()
            .find(|a| a.kind == block.raw.kind)
            .expect("arena blocks come from an arena of their kind")
    }

    /// Puts a block that was in front into its arena's quick list (its room taken already).
    fn push_front_to_arena(&mut self, block: Block) {
        let pool = self.arena_of(&block);
        pool.arena.push_reserved_quick(
            block.raw.addr - pool.base,
            block.raw.bytes as u64,
            block.fences,
        );
    }

    /// Returns a freed arena block to the arena it was placed in.
    fn release_to_arena(&mut self, backend: &dyn Backend, block: Block) {
        let pool = self.arena_of(&block);
        pool.arena.release(
            block.raw.addr - pool.base,
            block.raw.bytes as u64,
            block.fences,
            &mut |f| fence_retired(backend, f),
        );
    }

    fn largest_cached(&self) -> usize {
        let granules = self
            .arenas
            .iter()
            .map(|a| (a.arena.cached_granules() * a.arena.granule()) as usize)
            .max()
            .unwrap_or(0);
        self.cache
            .keys()
            .next_back()
            .map_or(0, |(_, c)| *c)
            .max(granules)
            .max(self.front_bytes())
    }

    /// Returns a block to the cache; its memory is reused later under its fences.
    pub fn free(&mut self, backend: &dyn Backend, block: Block, requested: usize) {
        let class = block.raw.bytes;
        let s = &mut self.stats;
        s.active_bytes -= class;
        s.active_count -= 1;
        s.requested_bytes -= requested;
        if block.in_arena {
            // The newest freed block waits in front when its arena would put it in the quick
            // list anyway (its room taken there); the block it displaces goes into that list.
            if self.arena_of(&block).arena.reserve_quick(class as u64) {
                if let Some(old) = self.front.replace(block) {
                    self.push_front_to_arena(old);
                }
            } else {
                self.release_to_arena(backend, block);
            }
            self.enforce_bound(backend);
            return;
        }
        self.block_cache_bytes += class;
        self.block_cache_count += 1;
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
            let cached = self.cached_total();
            if cached > limit {
                let excess = cached - limit;
                self.release_cached(backend, excess, false);
            }
        }
    }

    /// Releases cached blocks, oldest first, until `bytes` have been released. Blocks whose work
    /// is still pending are released only if `wait` is set, after waiting for that work.
    pub fn release_cached(&mut self, backend: &dyn Backend, bytes: usize, wait: bool) -> usize {
        let unmapped = self.unmap_cached(backend, bytes, wait, None);
        unmapped + self.release_cached_blocks(backend, bytes.saturating_sub(unmapped), wait)
    }

    fn release_cached_blocks(&mut self, backend: &dyn Backend, bytes: usize, wait: bool) -> usize {
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
            if wait || crate::backend::fences_retired(backend, &c.fences) {
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
            self.block_cache_bytes -= class;
            self.block_cache_count -= 1;
            self.release_raw(backend, c.raw);
        }
        released
    }

    fn release_raw(&mut self, backend: &dyn Backend, raw: RawAlloc) {
        self.stats.reserved_bytes -= raw.bytes;
        self.stats.device_frees += 1;
        let started = Instant::now();
        // SAFETY: the block came from `backend.allocate`, and every fence that touched it has
        // completed (checked or waited for by the caller).
        unsafe { backend.release(raw) };
        self.stats.device_call_ns += elapsed_ns(started);
    }
}
