//! Trace replay: an allocation trace through the allocator policy, on a device's memory or on
//! simulated memory (no device needed), reporting fragmentation and speed.

use super::trace::{Trace, TraceEvent};
use super::{Allocator, Block, Budget, MemoryStats};
use crate::backend::{
    Backend, DeviceInfo, GpuSpan, PipelineId, RawAlloc, Submission, VirtualMemory,
};
use crate::epoch::Fence;
use crate::epoch::{Epoch, QueueId};
use crate::error::{Error, Result};
use crate::interop::{ForeignMemory, NativeBuffer, NativeDevice, NativeQueue, NativeWaiter};
use crate::kernel::{Constants, KernelSource};
use crate::storage::{MemoryAccess, MemoryKind};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// What a replay measured.
#[derive(Clone, Debug)]
pub struct ReplayReport {
    /// Where the memory came from: a device's name, or "simulated".
    pub memory: String,
    /// Events replayed.
    pub events: usize,
    /// The most bytes live at once, as the trace requested them.
    pub peak_live_bytes: usize,
    /// The most bytes the allocator held from the backend at once.
    pub peak_reserved_bytes: usize,
    /// Host nanoseconds per event (allocator time, backend calls included).
    pub ns_per_event: f64,
    /// The allocator's statistics at the end, before its cache was released.
    pub stats: MemoryStats,
}

impl ReplayReport {
    /// Peak reserved over peak live: 1.0 is no fragmentation and no rounding at the peak.
    pub fn fragmentation(&self) -> f64 {
        self.peak_reserved_bytes as f64 / self.peak_live_bytes.max(1) as f64
    }

    /// The part of `ns_per_event` spent in the backend's memory calls: the rest is the
    /// allocator's policy (and the replay loop).
    pub fn device_call_ns_per_event(&self) -> f64 {
        self.stats.device_call_ns as f64 / self.events.max(1) as f64
    }
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::ledger::fmt_bytes;
        writeln!(
            f,
            "replayed {} events on {} memory",
            self.events, self.memory
        )?;
        writeln!(
            f,
            "peak live {}  peak reserved {}  reserved/live {:.3}",
            fmt_bytes(self.peak_live_bytes as u64),
            fmt_bytes(self.peak_reserved_bytes as u64),
            self.fragmentation()
        )?;
        writeln!(
            f,
            "{:.1} ns per event, {:.1} of them in the backend's map/unmap (or allocate/release) calls",
            self.ns_per_event,
            self.device_call_ns_per_event()
        )?;
        write!(
            f,
            "{} device allocs, {} device frees, {} cache hits",
            self.stats.device_allocs, self.stats.device_frees, self.stats.cache_hits
        )
    }
}

/// Replays `trace` through a fresh allocator over `backend`'s `kind` memory, then releases all.
pub(crate) fn replay(
    backend: &dyn Backend,
    kind: MemoryKind,
    trace: &Trace,
    budget: Budget,
) -> Result<ReplayReport> {
    let mut alloc = Allocator::new(budget);
    let mut live: Vec<Option<(Block, usize)>> = (0..trace.slots).map(|_| None).collect();
    let (mut live_bytes, mut peak_live) = (0usize, 0usize);
    let started = Instant::now();
    let mut result = Ok(());
    for ev in &trace.events {
        match *ev {
            TraceEvent::Alloc { id, size, .. } => {
                // Traces built by hand (the fields are public) are checked as parsing would.
                if live.get(id as usize).is_none_or(Option::is_some) {
                    result = Err(bad_slot(
                        id,
                        trace.slots,
                        "allocated while live or out of range",
                    ));
                    break;
                }
                match alloc.allocate(backend, kind, size) {
                    Ok(block) => {
                        live[id as usize] = Some((block, size));
                        live_bytes += size;
                        peak_live = peak_live.max(live_bytes);
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            TraceEvent::Free { id } => match live.get_mut(id as usize).and_then(Option::take) {
                Some((block, size)) => {
                    alloc.free(backend, block, size);
                    live_bytes -= size;
                }
                None => {
                    result = Err(bad_slot(id, trace.slots, "freed but not live"));
                    break;
                }
            },
        }
    }
    let elapsed = started.elapsed();
    let stats = alloc.stats();
    for (block, size) in live.into_iter().flatten() {
        alloc.free(backend, block, size);
    }
    alloc.release_cached(backend, usize::MAX, true);
    alloc.shutdown(backend);
    result?;
    Ok(ReplayReport {
        memory: backend.info().name.clone(),
        events: trace.events.len(),
        peak_live_bytes: peak_live,
        peak_reserved_bytes: stats.peak_reserved_bytes,
        ns_per_event: elapsed.as_nanos() as f64 / trace.events.len().max(1) as f64,
        stats,
    })
}

fn bad_slot(id: u64, slots: usize, what: &str) -> Error {
    Error::Format {
        what: "trace".to_owned(),
        detail: format!("slot {id} (of {slots}) is {what}"),
    }
}

/// Replays `trace` on simulated memory: the allocator's policy alone, no device, no bytes.
///
/// ```
/// use unibuf::alloc::{replay_simulated, Trace};
/// let t = Trace::parse("action,addr,size,stream\nalloc,1,1000,0\nfree,1,1000,0\n".as_bytes(), "t")?;
/// let r = replay_simulated(&t, Default::default())?;
/// assert_eq!(r.peak_live_bytes, 1000);
/// # Ok::<(), unibuf::Error>(())
/// ```
pub fn replay_simulated(trace: &Trace, budget: Budget) -> Result<ReplayReport> {
    replay(&SimulatedMemory::new(), MemoryKind::Device, trace, budget)
}

/// Memory that exists only as addresses: the allocator's policy runs over it without a device.
/// It hands out fresh address ranges and counts them; nothing can be read, written or run.
pub(super) struct SimulatedMemory {
    info: DeviceInfo,
    next: AtomicU64,
    /// Bytes unmapped by `unmap_for_reuse` that no map took and `release_kept` did not return:
    /// the allocator must leave none behind (the tests check).
    kept: AtomicU64,
    /// Bytes ever unmapped by `unmap_for_reuse`.
    moved: AtomicU64,
    /// Set by `unmap_for_reuse`, cleared only by `release_kept`: the allocator must call the
    /// latter before it returns whenever it called the former (the tests check).
    release_owed: std::sync::atomic::AtomicBool,
    /// Bytes mapped now (kept memory not counted), and the most that may be: maps past it fail
    /// with `OutOfMemory`, for tests of the failure paths.
    mapped: AtomicU64,
    pub(super) map_limit: u64,
    /// Reservations larger than this fail (an address-space limit), for tests.
    pub(super) reserve_limit: u64,
    /// The completed epoch of every queue: work up to it has finished. Nothing is ever
    /// submitted here, so 0 unless a test moves it to model work completing.
    pub(super) completed: AtomicU64,
    /// A kind offered no virtual memory (its blocks come whole from `allocate`), for tests.
    pub(super) without_virtual_memory: Option<MemoryKind>,
}

impl SimulatedMemory {
    pub(super) fn new() -> SimulatedMemory {
        SimulatedMemory {
            info: DeviceInfo {
                name: "simulated".to_owned(),
                backend: "simulated",
                unified_memory: false,
                total_memory: 1 << 40,
                page_size: 4096,
                max_buffer_len: 1 << 40,
                alloc_alignment: 256,
                timestamps: false,
            },
            next: AtomicU64::new(1 << 20),
            kept: AtomicU64::new(0),
            moved: AtomicU64::new(0),
            release_owed: std::sync::atomic::AtomicBool::new(false),
            mapped: AtomicU64::new(0),
            map_limit: u64::MAX,
            reserve_limit: u64::MAX,
            completed: AtomicU64::new(0),
            without_virtual_memory: None,
        }
    }

    fn refuse<T>(&self, what: &str) -> Result<T> {
        Err(Error::Unsupported {
            backend: "simulated",
            what: what.to_owned(),
        })
    }
}

impl Backend for SimulatedMemory {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    unsafe fn allocate(&self, kind: MemoryKind, bytes: usize) -> Result<RawAlloc> {
        let addr = self
            .next
            .fetch_add(bytes.next_multiple_of(256) as u64, Ordering::Relaxed);
        Ok(RawAlloc {
            addr,
            handle: addr,
            bytes,
            kind,
        })
    }
    unsafe fn release(&self, _raw: RawAlloc) {}
    unsafe fn wrap_host(
        &self,
        _ptr: NonNull<u8>,
        _bytes: usize,
        _access: MemoryAccess,
    ) -> Result<RawAlloc> {
        self.refuse("wrapping host memory")
    }
    fn host_ptr(&self, _raw: &RawAlloc) -> Option<NonNull<u8>> {
        None
    }
    fn create_queue(&self) -> Result<QueueId> {
        self.refuse("queues")
    }
    unsafe fn submit(&self, _queue: QueueId, _submission: Submission<'_>) -> Result<Epoch> {
        self.refuse("submissions")
    }
    fn completed(&self, _queue: QueueId) -> Result<Epoch> {
        Ok(self.completed.load(Ordering::Relaxed))
    }
    fn wait(&self, _queue: QueueId, _epoch: Epoch) -> Result<()> {
        Ok(())
    }
    fn gpu_span(&self, _queue: QueueId, _epoch: Epoch) -> Option<GpuSpan> {
        None
    }
    fn compile(&self, _kernel: &KernelSource, _constants: &Constants) -> Result<PipelineId> {
        self.refuse("kernels")
    }
    fn reset(&self) -> Result<()> {
        Ok(())
    }
    fn virtual_memory(&self, kind: MemoryKind) -> Option<&dyn VirtualMemory> {
        (self.without_virtual_memory != Some(kind)).then_some(self as &dyn VirtualMemory)
    }
    fn native_buffer(&self, _range: &crate::backend::RawRange) -> Result<NativeBuffer> {
        self.refuse("native handles (its memory is only addresses)")
    }
    fn native_queue(&self, _queue: QueueId) -> Result<NativeQueue> {
        self.refuse("queues")
    }
    fn native_device(&self) -> NativeDevice {
        NativeDevice::Cpu
    }
    unsafe fn wrap_foreign(&self, _memory: &ForeignMemory, _bytes: usize) -> Result<RawAlloc> {
        self.refuse("foreign memory")
    }
    unsafe fn order_native(&self, _fence: Fence, _waiter: NativeWaiter) -> Result<()> {
        self.refuse("queues")
    }
}

/// Simulated virtual memory: reservations are fresh address ranges; mapping is bookkeeping the
/// allocator already does, so it only counts.
impl VirtualMemory for SimulatedMemory {
    fn granularity(&self) -> usize {
        2 << 20
    }
    unsafe fn reserve(&self, _kind: MemoryKind, bytes: usize) -> Result<u64> {
        if bytes as u64 > self.reserve_limit {
            return Err(Error::OutOfMemory {
                requested: bytes,
                reserved: 0,
                free: 0,
                largest_free: 0,
            });
        }
        Ok(self
            .next
            .fetch_add(bytes as u64, Ordering::Relaxed)
            .next_multiple_of(2 << 20))
    }
    unsafe fn map(&self, _kind: MemoryKind, _addr: u64, bytes: usize) -> Result<()> {
        let mapped = self.mapped.load(Ordering::Relaxed);
        if mapped + bytes as u64 > self.map_limit {
            return Err(Error::OutOfMemory {
                requested: bytes,
                reserved: mapped as usize,
                free: self.map_limit.saturating_sub(mapped) as usize,
                largest_free: 0,
            });
        }
        self.mapped.fetch_add(bytes as u64, Ordering::Relaxed);
        // Kept memory is taken first, as the CUDA backend does.
        let _ = self
            .kept
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |k| {
                Some(k.saturating_sub(bytes as u64))
            });
        Ok(())
    }
    unsafe fn unmap(&self, _kind: MemoryKind, _addr: u64, bytes: usize) {
        self.mapped.fetch_sub(bytes as u64, Ordering::Relaxed);
    }
    unsafe fn unmap_for_reuse(&self, _kind: MemoryKind, _addr: u64, bytes: usize) {
        self.mapped.fetch_sub(bytes as u64, Ordering::Relaxed);
        self.kept.fetch_add(bytes as u64, Ordering::Relaxed);
        self.moved.fetch_add(bytes as u64, Ordering::Relaxed);
        self.release_owed.store(true, Ordering::Relaxed);
    }
    fn release_kept(&self, _kind: MemoryKind) {
        self.kept.store(0, Ordering::Relaxed);
        self.release_owed.store(false, Ordering::Relaxed);
    }
    unsafe fn unreserve(&self, _kind: MemoryKind, _base: u64, _bytes: usize) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    proptest! {
        // 8 sequences of 125,000 operations: a million allocator operations per run.
        #![proptest_config(ProptestConfig::with_cases(8))]

        /// Random allocation sequences through the allocator over simulated virtual memory:
        /// live blocks never overlap, blocks are aligned and large enough, the accounting
        /// matches the live set at every step, and everything returns to zero at the end.
        #[test]
        fn a_million_random_operations_keep_the_invariants(seed in any::<u64>(), budget_mib in prop_oneof![Just(0usize), Just(512usize)]) {
            let backend = SimulatedMemory::new();
            let budget = Budget {
                memory_limit: (budget_mib > 0).then_some(budget_mib << 20),
                cache_limit: None,
            };
            let mut alloc = Allocator::new(budget);
            let mut rng = seed | 1;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut live: Vec<(Block, usize)> = Vec::new();
            let mut spans: BTreeMap<u64, u64> = BTreeMap::new();
            let (mut live_bytes, mut live_requested) = (0usize, 0usize);
            for _ in 0..125_000 {
                if live.is_empty() || (live.len() < 300 && next() % 2 == 0) {
                    // Sizes log-uniform from 1 B to 16 MiB.
                    let size = (1usize << (next() % 24)) + (next() % 4096) as usize;
                    match alloc.allocate(&backend, MemoryKind::Device, size) {
                        Ok(b) => {
                            let (addr, bytes) = (b.raw.addr, b.raw.bytes as u64);
                            prop_assert!(b.raw.bytes >= size);
                            prop_assert_eq!(addr % super::super::arena::BLOCK_ALIGN, 0);
                            if let Some((&a, &l)) = spans.range(..addr).next_back() {
                                prop_assert!(a + l <= addr, "overlaps the block below");
                            }
                            if let Some((&a, _)) = spans.range(addr..).next() {
                                prop_assert!(addr + bytes <= a, "overlaps the block above");
                            }
                            spans.insert(addr, bytes);
                            live_bytes += b.raw.bytes;
                            live_requested += size;
                            live.push((b, size));
                        }
                        Err(Error::BudgetExceeded { .. }) | Err(Error::NeverFits { .. }) => {
                            prop_assert!(budget_mib > 0, "only a budget refuses");
                        }
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                } else {
                    let k = (next() % live.len() as u64) as usize;
                    let (b, size) = live.swap_remove(k);
                    spans.remove(&b.raw.addr);
                    live_bytes -= b.raw.bytes;
                    live_requested -= size;
                    alloc.free(&backend, b, size);
                }
                let s = alloc.stats();
                prop_assert_eq!((s.active_bytes, s.requested_bytes, s.active_count), (live_bytes, live_requested, live.len()));
                prop_assert_eq!(backend.kept.load(Ordering::Relaxed), 0, "memory kept for reuse past an allocation");
                prop_assert!(!backend.release_owed.load(Ordering::Relaxed), "release_kept not called after a move");
                prop_assert!(s.cached_bytes <= s.reserved_bytes, "{} cached of {} held", s.cached_bytes, s.reserved_bytes);
                if live.is_empty() {
                    prop_assert_eq!(s.cached_bytes, s.reserved_bytes, "with nothing live, everything held is cached");
                }
                if let Some(limit) = budget.memory_limit {
                    prop_assert!(s.reserved_bytes <= limit, "{} over the budget", s.reserved_bytes);
                }
            }
            for (b, size) in live.drain(..) {
                alloc.free(&backend, b, size);
            }
            alloc.release_cached(&backend, usize::MAX, true);
            let s = alloc.stats();
            prop_assert_eq!((s.active_bytes, s.requested_bytes, s.reserved_bytes, s.cached_bytes), (0, 0, 0, 0));
            alloc.shutdown(&backend);
        }
    }
}

#[cfg(test)]
mod validation_tests {
    use super::*;

    #[test]
    fn without_address_space_the_allocator_caches_whole_blocks() {
        for limit in [0u64, 1 << 40] {
            let mem = SimulatedMemory {
                reserve_limit: limit,
                ..SimulatedMemory::new()
            };
            let mut a = Allocator::new(Budget::default());
            let b = a
                .allocate(&mem, MemoryKind::Device, 3000)
                .expect("falls back, does not fail");
            assert_eq!(a.stats().virtual_memory, limit > 0, "limit {limit}");
            a.free(&mem, b, 3000);
            a.release_cached(&mem, usize::MAX, true);
            a.shutdown(&mem);
            assert_eq!(a.stats().reserved_bytes, 0);
        }
    }

    /// At the unmapping bound, mapping new granules first unmaps idle ones "for reuse" (on CUDA
    /// their physical memory moves instead of being released and created again), and nothing
    /// stays kept once the allocation returns.
    #[test]
    fn memory_moves_at_the_bound_and_none_stays_kept() {
        const MIB: usize = 1 << 20;
        let mem = SimulatedMemory::new();
        let mut a = Allocator::new(Budget::default());
        let low = a.allocate(&mem, MemoryKind::Device, 20 * MIB).unwrap();
        let high = a.allocate(&mem, MemoryKind::Device, 20 * MIB).unwrap();
        a.free(&mem, low, 20 * MIB);
        assert_eq!(
            mem.moved.load(Ordering::Relaxed),
            0,
            "within the bound nothing moves"
        );
        let reserved = a.stats().reserved_bytes;
        // 30 MiB does not fit the 20 MiB hole: it is placed above and needs 15 new granules,
        // but the bound (50 MiB live at most, plus 1/50 and two granules) allows 55 MiB held.
        let big = a.allocate(&mem, MemoryKind::Device, 30 * MIB).unwrap();
        let s = a.stats();
        assert!(
            s.reserved_bytes <= 55 * MIB + MIB,
            "{} held",
            s.reserved_bytes
        );
        let moved = mem.moved.load(Ordering::Relaxed) as usize;
        assert_eq!(
            moved,
            reserved + 30 * MIB - s.reserved_bytes,
            "moved what was unmapped"
        );
        assert!(moved > 0, "the hole's granules moved");
        assert_eq!(mem.kept.load(Ordering::Relaxed), 0);
        assert!(
            !mem.release_owed.load(Ordering::Relaxed),
            "release_kept was called"
        );
        a.free(&mem, high, 20 * MIB);
        a.free(&mem, big, 30 * MIB);
        a.release_cached(&mem, usize::MAX, true);
        a.shutdown(&mem);
        assert_eq!(a.stats().reserved_bytes, 0);
    }

    /// A map that fails after idle granules were unmapped for reuse: the allocator returns
    /// the kept memory, retries after releasing its cache, fails with `OutOfMemory`, and
    /// allocates again once memory is freed.
    #[test]
    fn a_failed_map_after_a_move_releases_the_kept_memory_and_recovers() {
        const MIB: usize = 1 << 20;
        let mem = SimulatedMemory {
            map_limit: 40 * MIB as u64,
            ..SimulatedMemory::new()
        };
        let mut a = Allocator::new(Budget::default());
        let low = a.allocate(&mem, MemoryKind::Device, 20 * MIB).unwrap();
        let high = a.allocate(&mem, MemoryKind::Device, 20 * MIB).unwrap();
        a.free(&mem, low, 20 * MIB);
        // 30 MiB above `high`: the bound moves part of the hole's granules, then the map
        // passes the 40 MiB the memory holds.
        let Err(e) = a.allocate(&mem, MemoryKind::Device, 30 * MIB) else {
            panic!("30 MiB fit in memory holding 40 MiB with 20 MiB live");
        };
        assert!(matches!(e, Error::OutOfMemory { .. }), "{e}");
        assert!(mem.moved.load(Ordering::Relaxed) > 0, "a move was tried");
        assert!(
            !mem.release_owed.load(Ordering::Relaxed),
            "kept memory returned"
        );
        let s = a.stats();
        assert_eq!((s.active_bytes, s.ooms), (20 * MIB, 1));
        assert_eq!(s.reserved_bytes as u64, mem.mapped.load(Ordering::Relaxed));
        a.free(&mem, high, 20 * MIB);
        let again = a.allocate(&mem, MemoryKind::Device, 30 * MIB).unwrap();
        assert_eq!(
            a.stats().reserved_bytes as u64,
            mem.mapped.load(Ordering::Relaxed)
        );
        a.free(&mem, again, 30 * MIB);
        a.release_cached(&mem, usize::MAX, true);
        a.shutdown(&mem);
        assert_eq!(mem.mapped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn hand_built_traces_are_checked() {
        for (events, slots, needle) in [
            (
                vec![TraceEvent::Free { id: 3 }],
                0usize,
                "freed but not live",
            ),
            (
                vec![
                    TraceEvent::Alloc {
                        id: 0,
                        size: 8,
                        stream: 0,
                    },
                    TraceEvent::Alloc {
                        id: 0,
                        size: 8,
                        stream: 0,
                    },
                ],
                1,
                "allocated while live",
            ),
            (
                vec![TraceEvent::Alloc {
                    id: 9,
                    size: 8,
                    stream: 0,
                }],
                1,
                "out of range",
            ),
        ] {
            let e = replay_simulated(&Trace { events, slots }, Budget::default()).unwrap_err();
            assert!(
                matches!(e, Error::Format { .. }) && e.to_string().contains(needle),
                "{e}"
            );
        }
    }
}

#[cfg(test)]
mod front_tests {
    use super::*;
    use crate::epoch::{Fence, FenceSet};

    const G: usize = 2 << 20;

    fn pending(epoch: u64) -> FenceSet {
        let mut f = FenceSet::new();
        f.insert(Fence {
            device: 0,
            queue: QueueId(1),
            epoch,
        });
        f
    }

    fn epochs(f: &FenceSet) -> Vec<u64> {
        f.iter().map(|f| f.epoch).collect()
    }

    /// The front block's granules count as cached only where no live block shares them, and
    /// the stats are the same once it is flushed into the quick list (as a snapshot does).
    #[test]
    fn front_block_accounting_matches_the_quick_list() {
        let m = SimulatedMemory::new();
        let mut a = Allocator::new(Budget::default());
        let x = a.allocate(&m, MemoryKind::Device, 1000).unwrap();
        let y = a.allocate(&m, MemoryKind::Device, 1000).unwrap();
        a.free(&m, x, 1000);
        assert!(a.front.is_some(), "the freed block waits in front");
        let s = a.stats();
        assert_eq!(
            (s.cached_bytes, s.cached_count),
            (0, 0),
            "its granule is shared with a live block"
        );
        a.free(&m, y, 1000); // displaces x into the quick list
        let s = a.stats();
        assert_eq!((s.cached_bytes, s.cached_count), (G, 1));
        assert_eq!(
            a.arenas[0].arena.quick_bytes(),
            2048,
            "both blocks' room, counted once"
        );
        let _ = a.snapshot();
        assert!(a.front.is_none());
        let t = a.stats();
        assert_eq!(
            (t.cached_bytes, t.cached_count),
            (s.cached_bytes, s.cached_count)
        );
        assert_eq!(a.arenas[0].arena.quick_bytes(), 2048);
        let z = a.allocate(&m, MemoryKind::Device, 1000).unwrap();
        a.free(&m, z, 1000);
        let z = a.allocate(&m, MemoryKind::Device, 1000).unwrap();
        assert_eq!(
            a.arenas[0].arena.quick_bytes(),
            1024,
            "a front hit gives its room back"
        );
        a.free(&m, z, 1000);
        a.release_cached(&m, usize::MAX, true);
        a.shutdown(&m);
    }

    /// A block reused from the front, or from the quick list after a displacement, carries the
    /// fences of its last use.
    #[test]
    fn reuse_from_the_front_and_the_quick_list_inherits_fences() {
        let m = SimulatedMemory::new();
        let mut a = Allocator::new(Budget::default());
        let mut x = a.allocate(&m, MemoryKind::Device, 4096).unwrap();
        let mut y = a.allocate(&m, MemoryKind::Device, 8192).unwrap();
        x.fences = pending(7);
        y.fences = pending(9);
        let (xa, ya) = (x.raw.addr, y.raw.addr);
        a.free(&m, x, 4096);
        a.free(&m, y, 8192); // x goes to the quick list, y waits in front
        let y2 = a.allocate(&m, MemoryKind::Device, 8192).unwrap();
        assert_eq!((y2.raw.addr, epochs(&y2.fences)), (ya, vec![9]));
        let x2 = a.allocate(&m, MemoryKind::Device, 4096).unwrap();
        assert_eq!((x2.raw.addr, epochs(&x2.fences)), (xa, vec![7]));
        a.free(&m, x2, 4096);
        a.free(&m, y2, 8192);
        a.release_cached(&m, usize::MAX, true);
        a.shutdown(&m);
    }

    /// When the address space is full, the front block is flushed with the quick list before
    /// the retry: a request that fits only in its range succeeds.
    #[test]
    fn a_full_address_space_flushes_the_front_before_retrying() {
        const TIB: usize = 1 << 40;
        let m = SimulatedMemory::new(); // 1 TiB of memory: 2 TiB of address space
        let mut a = Allocator::new(Budget::default());
        let big: Vec<_> = (0..2)
            .map(|_| a.allocate(&m, MemoryKind::Device, 3 * TIB / 4).unwrap())
            .collect();
        let c = a.allocate(&m, MemoryKind::Device, 1024).unwrap();
        a.free(&m, c, 1024);
        assert!(a.front.is_some());
        let Ok(d) = a.allocate(&m, MemoryKind::Device, TIB / 2 - 512) else {
            panic!("fits once the front block is free space");
        };
        a.free(&m, d, TIB / 2 - 512);
        for b in big {
            a.free(&m, b, 3 * TIB / 4);
        }
        a.release_cached(&m, usize::MAX, true);
        a.shutdown(&m);
        assert_eq!(a.stats().reserved_bytes, 0);
    }

    /// Placement is what the quick list alone would give: a request for another size of the
    /// front block's bucket reorders that bucket with the block in it (the list takes blocks
    /// with `swap_remove`), so the next request for the block's size gets an older block.
    #[test]
    fn the_front_block_keeps_the_quick_list_order() {
        let m = SimulatedMemory::new();
        let mut a = Allocator::new(Budget::default());
        let y = a.allocate(&m, MemoryKind::Device, 1536).unwrap();
        let z = a.allocate(&m, MemoryKind::Device, 1024).unwrap();
        let f = a.allocate(&m, MemoryKind::Device, 1024).unwrap();
        let (ya, za) = (y.raw.addr, z.raw.addr);
        a.free(&m, y, 1536);
        a.free(&m, z, 1024);
        a.free(&m, f, 1024);
        let y2 = a.allocate(&m, MemoryKind::Device, 1536).unwrap();
        let z2 = a.allocate(&m, MemoryKind::Device, 1024).unwrap();
        assert_eq!((y2.raw.addr, z2.raw.addr), (ya, za));
        a.free(&m, y2, 1536);
        a.free(&m, z2, 1024);
        a.release_cached(&m, usize::MAX, true);
        a.shutdown(&m);
    }
}
