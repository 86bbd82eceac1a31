//! Placement identity: every decision the allocator makes on the shared llama decode trace and
//! on seeded random traces, folded into digests that are checked against recorded values. A
//! change meant to keep the policy (a restructuring, a faster data structure) keeps these
//! digests; a change of policy records new ones and says why, with the llama trace's
//! reserved/live before and after.
//!
//! Folded in, per event: for an allocation its address and handle (an arena's base plus the
//! offset, or a whole block's address), length, memory kind and the fences it inherits, or the
//! error and its figures; for a free nothing but what follows; then, after every event, the
//! bytes reserved from the backend. Along the random traces, cache releases (their result)
//! and snapshots (every segment's ranges and mapped granules, every cached block). At the end,
//! every statistic but the time spent in backend calls, before and after releasing the cache.
//!
//! The expected values were recorded on commit d0e55d4 (the allocator with one block cache
//! for every kind, an arena list and a kind-without-arena list beside it), by running
//! `cargo test -p unibuf --lib alloc::placement_tests -- --nocapture`, which prints the table
//! it computed when it differs from the one below.

use super::replay::{replay_simulated, SimulatedMemory};
use super::trace::{Trace, TraceEvent};
use super::{Allocator, Block, Budget, MemorySnapshot, MemoryStats, RangeState};
use crate::epoch::{Fence, FenceSet, QueueId};
use crate::error::Error;
use crate::storage::MemoryKind;
use std::path::Path;
use std::sync::atomic::Ordering;

/// FNV-1a over 64-bit words: stable across Rust versions and platforms, which the standard
/// library's hashers do not promise.
struct Digest(u64);

impl Digest {
    fn new() -> Digest {
        Digest(0xcbf2_9ce4_8422_2325)
    }

    fn word(&mut self, w: u64) {
        for b in w.to_le_bytes() {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn usize(&mut self, w: usize) {
        self.word(w as u64);
    }
}

/// What one replay decided, in brief: the digest of every decision and the figures a reader
/// checks first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Outcome {
    digest: u64,
    peak_live: usize,
    peak_reserved: usize,
    device_allocs: u64,
    device_frees: u64,
    cache_hits: u64,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Outcome {{ digest: {:#018x}, peak_live: {}, peak_reserved: {}, device_allocs: {}, \
             device_frees: {}, cache_hits: {} }}",
            self.digest,
            self.peak_live,
            self.peak_reserved,
            self.device_allocs,
            self.device_frees,
            self.cache_hits
        )
    }
}

fn kind_code(kind: MemoryKind) -> u64 {
    match kind {
        MemoryKind::Device => 0,
        MemoryKind::HostShared => 1,
        MemoryKind::HostRegistered => 2,
        MemoryKind::Foreign => 3,
    }
}

/// An allocator over simulated memory with the digest of what it decided so far.
struct Run<'a> {
    backend: &'a SimulatedMemory,
    alloc: Allocator,
    digest: Digest,
    live_bytes: usize,
    peak_live: usize,
}

impl<'a> Run<'a> {
    fn new(backend: &'a SimulatedMemory, budget: Budget) -> Run<'a> {
        Run {
            backend,
            alloc: Allocator::new(budget),
            digest: Digest::new(),
            live_bytes: 0,
            peak_live: 0,
        }
    }

    fn reserved(&mut self) {
        let reserved = self.alloc.stats_mut().reserved_bytes;
        self.digest.usize(reserved);
    }

    fn allocate(&mut self, kind: MemoryKind, size: usize) -> Option<Block> {
        let result = self.alloc.allocate(self.backend, kind, size);
        let d = &mut self.digest;
        let block = match result {
            Ok(b) => {
                d.word(0);
                d.word(b.raw.addr);
                d.word(b.raw.handle);
                d.usize(b.raw.bytes);
                d.word(kind_code(b.raw.kind));
                let mut fences: Vec<(u32, u64)> =
                    b.fences.iter().map(|f| (f.queue.0, f.epoch)).collect();
                fences.sort_unstable();
                d.usize(fences.len());
                for (queue, epoch) in fences {
                    d.word(u64::from(queue));
                    d.word(epoch);
                }
                self.live_bytes += size;
                self.peak_live = self.peak_live.max(self.live_bytes);
                Some(b)
            }
            Err(e) => {
                d.word(1);
                match e {
                    Error::NeverFits {
                        requested, limit, ..
                    } => {
                        d.word(2);
                        d.usize(requested);
                        d.usize(limit);
                    }
                    Error::OutOfMemory {
                        requested,
                        reserved,
                        free,
                        largest_free,
                    } => {
                        d.word(3);
                        d.usize(requested);
                        d.usize(reserved);
                        d.usize(free);
                        d.usize(largest_free);
                    }
                    Error::BudgetExceeded {
                        requested,
                        in_use,
                        budget,
                        ..
                    } => {
                        d.word(4);
                        d.usize(requested);
                        d.usize(in_use);
                        d.usize(budget);
                    }
                    other => panic!("unexpected allocation error: {other}"),
                }
                None
            }
        };
        self.reserved();
        block
    }

    fn free(&mut self, mut block: Block, size: usize, fences: FenceSet) {
        block.fences = fences;
        self.alloc.free(self.backend, block, size);
        self.live_bytes -= size;
        self.reserved();
    }

    fn release_cached(&mut self, bytes: usize, wait: bool) {
        let released = self.alloc.release_cached(self.backend, bytes, wait);
        self.digest.word(5);
        self.digest.usize(released);
        self.reserved();
    }

    fn snapshot(&mut self) {
        let MemorySnapshot {
            segments,
            cached_blocks,
        } = self.alloc.snapshot();
        let d = &mut self.digest;
        d.word(6);
        for s in segments {
            d.word(kind_code(s.kind));
            d.word(s.base);
            d.word(s.address_space);
            d.word(s.granule);
            for r in s.mapped {
                d.word(r.start);
                d.word(r.end);
            }
            for r in s.ranges {
                d.word(r.offset);
                d.word(r.bytes);
                d.word(match r.state {
                    RangeState::Used => 0,
                    RangeState::Kept => 1,
                    RangeState::Free => 2,
                });
            }
        }
        for c in cached_blocks {
            d.word(kind_code(c.kind));
            d.word(c.addr);
            d.usize(c.bytes);
        }
    }

    fn stats(&mut self) -> MemoryStats {
        let s = self.alloc.stats();
        let d = &mut self.digest;
        for w in [
            s.active_bytes,
            s.active_count,
            s.requested_bytes,
            s.peak_active_bytes,
            s.reserved_bytes,
            s.peak_reserved_bytes,
            s.cached_bytes,
            s.cached_count,
            usize::from(s.virtual_memory),
        ] {
            d.usize(w);
        }
        for w in [
            s.cache_hits,
            s.device_allocs,
            s.device_frees,
            s.oom_retries,
            s.ooms,
        ] {
            d.word(w);
        }
        s
    }

    /// Folds in the final statistics, frees what is live, releases everything and checks that
    /// nothing stays held.
    fn finish(mut self, live: impl IntoIterator<Item = (Block, usize)>) -> Outcome {
        let s = self.stats();
        for (block, size) in live {
            self.free(block, size, FenceSet::new());
        }
        self.release_cached(usize::MAX, true);
        let end = self.stats();
        assert_eq!(
            (end.active_bytes, end.reserved_bytes, end.cached_bytes),
            (0, 0, 0)
        );
        self.alloc.shutdown(self.backend);
        Outcome {
            digest: self.digest.0,
            peak_live: self.peak_live,
            peak_reserved: s.peak_reserved_bytes,
            device_allocs: s.device_allocs,
            device_frees: s.device_frees,
            cache_hits: s.cache_hits,
        }
    }
}

/// The llama trace through the allocator as `unibuf replay --simulate` runs it.
fn llama_outcome(trace: &Trace) -> Outcome {
    let backend = SimulatedMemory::new();
    let mut run = Run::new(&backend, Budget::default());
    let mut live: Vec<Option<(Block, usize)>> = (0..trace.slots).map(|_| None).collect();
    for ev in &trace.events {
        match *ev {
            TraceEvent::Alloc { id, size, .. } => {
                let block = run
                    .allocate(MemoryKind::Device, size)
                    .expect("simulated memory holds the trace");
                live[id as usize] = Some((block, size));
            }
            TraceEvent::Free { id } => {
                let (block, size) = live[id as usize].take().expect("a valid trace");
                run.free(block, size, FenceSet::new());
            }
        }
    }
    run.finish(live.into_iter().flatten())
}

/// A seeded random workload and the memory it runs on.
struct RandomTrace {
    name: &'static str,
    seed: u64,
    events: u64,
    /// Events between a block's free and the completion of the work that last used it.
    lag: u64,
    budget: Budget,
    /// Bytes the simulated device can map (arenas), or `u64::MAX`.
    map_limit: u64,
    /// The largest address range the simulated device reserves (0: none, so every kind
    /// caches whole blocks).
    reserve_limit: u64,
    /// A kind the simulated device offers no virtual memory for.
    without_virtual_memory: Option<MemoryKind>,
}

const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;

/// Sizes log-uniform from 256 B to 64 MiB.
fn random_size(next: &mut impl FnMut() -> u64) -> usize {
    let low = 1usize << (8 + next() % 19);
    (low + (next() as usize % low)).min(64 * MIB)
}

/// Up to 200 blocks live, of Device (three in four) and HostShared memory, half of them of 16
/// recurring sizes (as a decode loop's activations recur), on three streams; freed blocks carry
/// the fence of their stream at the event of the free, and one in four a second stream's. The
/// work behind a fence completes `lag` events later. Now and then the cache is released
/// (partly, or all, waiting or not) and a snapshot taken.
fn random_outcome(t: &RandomTrace) -> Outcome {
    let mut backend = SimulatedMemory::new();
    backend.map_limit = t.map_limit;
    backend.reserve_limit = t.reserve_limit;
    backend.without_virtual_memory = t.without_virtual_memory;
    let mut rng = t.seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let palette: Vec<usize> = (0..16).map(|_| random_size(&mut next)).collect();
    let mut run = Run::new(&backend, t.budget);
    let mut live: Vec<(Block, usize, u32)> = Vec::new();
    for now in 1..=t.events {
        backend
            .completed
            .store(now.saturating_sub(t.lag), Ordering::Relaxed);
        match next() % 8192 {
            0 => run.release_cached(next() as usize % GIB, next() % 2 == 0),
            1 => run.snapshot(),
            _ => {}
        }
        if live.is_empty() || (live.len() < 200 && next() % 100 < 52) {
            let kind = if next() % 4 == 0 {
                MemoryKind::HostShared
            } else {
                MemoryKind::Device
            };
            let stream = (next() % 3) as u32;
            let size = if next() % 2 == 0 {
                palette[next() as usize % palette.len()]
            } else {
                random_size(&mut next)
            };
            if let Some(block) = run.allocate(kind, size) {
                live.push((block, size, stream));
            }
        } else {
            let (block, size, stream) = live.swap_remove(next() as usize % live.len());
            let mut fences = FenceSet::new();
            let fence = |queue: u32, epoch: u64| Fence {
                device: 0,
                queue: QueueId(1 + queue),
                epoch,
            };
            fences.insert(fence(stream, now));
            if next() % 4 == 0 {
                fences.insert(fence((stream + 1) % 3, now - 1));
            }
            run.free(block, size, fences);
        }
    }
    run.finish(live.into_iter().map(|(block, size, _)| (block, size)))
}

const RANDOM_TRACES: [RandomTrace; 6] = [
    RandomTrace {
        name: "arenas, work done at once",
        seed: 0x5eed_0001,
        events: 30_000,
        lag: 0,
        budget: Budget {
            memory_limit: None,
            cache_limit: None,
        },
        map_limit: u64::MAX,
        reserve_limit: u64::MAX,
        without_virtual_memory: None,
    },
    RandomTrace {
        name: "arenas, work pending, cache limit",
        seed: 0x5eed_0002,
        events: 30_000,
        lag: 200,
        budget: Budget {
            memory_limit: None,
            cache_limit: Some(128 * MIB),
        },
        map_limit: u64::MAX,
        reserve_limit: u64::MAX,
        without_virtual_memory: None,
    },
    RandomTrace {
        name: "host memory in whole blocks, memory budget",
        seed: 0x5eed_0003,
        events: 30_000,
        lag: 50,
        budget: Budget {
            memory_limit: Some(GIB),
            cache_limit: None,
        },
        map_limit: u64::MAX,
        reserve_limit: u64::MAX,
        without_virtual_memory: Some(MemoryKind::HostShared),
    },
    RandomTrace {
        name: "device out of memory",
        seed: 0x5eed_0004,
        events: 30_000,
        lag: 20,
        budget: Budget {
            memory_limit: None,
            cache_limit: None,
        },
        map_limit: 3 * GIB as u64 / 2,
        reserve_limit: u64::MAX,
        without_virtual_memory: None,
    },
    RandomTrace {
        name: "no address space: whole blocks, cache limit",
        seed: 0x5eed_0005,
        events: 30_000,
        lag: 30,
        budget: Budget {
            memory_limit: None,
            cache_limit: Some(512 * MIB),
        },
        map_limit: u64::MAX,
        reserve_limit: 0,
        without_virtual_memory: None,
    },
    RandomTrace {
        name: "arenas, memory budget, work pending",
        seed: 0x5eed_0006,
        events: 30_000,
        lag: 100,
        budget: Budget {
            memory_limit: Some(GIB),
            cache_limit: None,
        },
        map_limit: u64::MAX,
        reserve_limit: u64::MAX,
        without_virtual_memory: None,
    },
];

/// Checks outcomes against the recorded ones; on a difference, prints the whole table as
/// found, to be compared (or, for an intended change of policy, pasted).
fn check(found: &[(&str, Outcome)], expected: &[(&str, Outcome)]) {
    if found != expected {
        for (name, o) in found {
            println!("(\"{name}\", {o}),");
        }
        for ((name, f), (_, e)) in found.iter().zip(expected) {
            if f != e {
                println!("differs: {name}\n  found    {f}\n  expected {e}");
            }
        }
        panic!("placement differs from the recorded decisions (printed above)");
    }
}

#[test]
fn placement_on_the_llama_trace_is_unchanged() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../data/alloc-traces/llama_varbatch_decode.csv.gz");
    let trace = Trace::read(&path).expect("the trace ships in the repository");
    assert_eq!(trace.events.len(), 406_527);
    let found = llama_outcome(&trace);
    check(
        &[("llama_varbatch_decode", found)],
        &[("llama_varbatch_decode", LLAMA)],
    );
    // The figures `unibuf replay --simulate` prints come from the same decisions.
    let report = replay_simulated(&trace, Budget::default()).unwrap();
    assert_eq!(
        (report.peak_live_bytes, report.peak_reserved_bytes),
        (found.peak_live, found.peak_reserved)
    );
    assert_eq!(format!("{:.3}", report.fragmentation()), "1.032");
}

#[test]
fn placement_on_random_traces_is_unchanged() {
    let found: Vec<(&str, Outcome)> = RANDOM_TRACES
        .iter()
        .map(|t| (t.name, random_outcome(t)))
        .collect();
    check(&found, &RANDOM);
}

/// Peak live 286.79 MiB, peak reserved 296.00 MiB: reserved/live 1.032.
const LLAMA: Outcome = Outcome {
    digest: 0x67cd_5526_50ba_4633,
    peak_live: 300_716_097,
    peak_reserved: 310_378_496,
    device_allocs: 326,
    device_frees: 410,
    cache_hits: 202_946,
};

/// In the order of `RANDOM_TRACES`.
const RANDOM: [(&str, Outcome); 6] = [
    (
        "arenas, work done at once",
        Outcome {
            digest: 0x7014_fbf5_edbe_8497,
            peak_live: 2_373_105_950,
            peak_reserved: 2_441_084_928,
            device_allocs: 1226,
            device_frees: 1861,
            cache_hits: 13_903,
        },
    ),
    (
        "arenas, work pending, cache limit",
        Outcome {
            digest: 0x9155_c42e_aa7b_2f28,
            peak_live: 3_476_172_001,
            peak_reserved: 4_248_829_952,
            device_allocs: 1539,
            device_frees: 1032,
            cache_hits: 13_561,
        },
    ),
    (
        "host memory in whole blocks, memory budget",
        Outcome {
            digest: 0x756e_888c_1f21_4e93,
            peak_live: 1_052_507_709,
            peak_reserved: 1_073_724_160,
            device_allocs: 6308,
            device_frees: 6629,
            cache_hits: 8187,
        },
    ),
    (
        "device out of memory",
        Outcome {
            digest: 0xc0ef_1b29_2963_2d54,
            peak_live: 1_564_449_685,
            peak_reserved: 1_610_612_736,
            device_allocs: 2949,
            device_frees: 4064,
            cache_hits: 12_082,
        },
    ),
    (
        "no address space: whole blocks, cache limit",
        Outcome {
            digest: 0x48ee_2a27_a1c0_fbe6,
            peak_live: 2_148_321_862,
            peak_reserved: 2_705_532_672,
            device_allocs: 8189,
            device_frees: 7921,
            cache_hits: 6910,
        },
    ),
    (
        "arenas, memory budget, work pending",
        Outcome {
            digest: 0x0e35_c40d_389f_6e86,
            peak_live: 1_038_617_807,
            peak_reserved: 1_073_741_824,
            device_allocs: 3317,
            device_frees: 3273,
            cache_hits: 11_423,
        },
    ),
];
