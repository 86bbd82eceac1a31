//! `unibuf bench alloc`: the allocator on synthetic workloads, on the device and simulated.
//!
//! Workloads are traces built here and replayed through the allocator (so the numbers are the
//! allocator's, not a harness's): hot alloc+free pairs of one size, and random sizes with random
//! lifetimes (RMM's benchmark shape). The driver's stream-ordered allocator (cuMemAllocAsync on a
//! pool that keeps its memory) is measured beside them where CUDA is present.

use std::time::Instant;
use unibuf::alloc::{replay_simulated, ReplayReport, Trace, TraceEvent};
use unibuf::{DType, Device, Result, StorageMode};

/// One workload's figures.
pub struct AllocRow {
    /// The workload.
    pub name: String,
    /// On the device's memory.
    pub device: ReplayReport,
    /// On simulated memory (the policy alone).
    pub simulated: ReplayReport,
    /// The driver's cuMemAllocAsync+cuMemFreeAsync pair in ns, for hot pairs.
    pub driver_pair_ns: Option<f64>,
    /// `Device::alloc_labelled` + drop of a buffer of the pair's size in ns, for hot pairs: the
    /// whole path a program takes around the allocator (checks, figures by label, the handle),
    /// with a label already in use, as in a loop.
    pub buffer_pair_ns: Option<f64>,
}

/// Nanoseconds per `Device::alloc_labelled` + drop of a Private buffer of `size` bytes, over
/// `pairs` pairs after one to warm up.
pub fn buffer_pair_ns(dev: &Device, size: usize, pairs: usize) -> Result<f64> {
    let pair = || {
        dev.alloc_labelled("bench alloc", DType::U8, &[size], StorageMode::Private)
            .map(drop)
    };
    pair()?;
    let started = Instant::now();
    for _ in 0..pairs {
        pair()?;
    }
    Ok(started.elapsed().as_nanos() as f64 / pairs.max(1) as f64)
}

/// `pairs` alloc+free pairs of `size` bytes.
pub fn hot_pairs(size: usize, pairs: usize) -> Trace {
    let mut events = Vec::with_capacity(pairs * 2);
    for _ in 0..pairs {
        events.push(TraceEvent::Alloc {
            id: 0,
            size,
            stream: 0,
        });
        events.push(TraceEvent::Free { id: 0 });
    }
    Trace { events, slots: 1 }
}

/// `events` random events: sizes log-uniform from 256 B to `max`, up to `live` blocks alive,
/// each freed at a random later point (a SplitMix64 stream seeded with `seed`).
pub fn random(events: usize, live: usize, max: usize, seed: u64) -> Trace {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut out = Vec::with_capacity(events);
    let mut alive: Vec<u64> = Vec::new();
    let mut free_slots: Vec<u64> = (0..live as u64).rev().collect();
    let (lo, hi) = (8.0f64, (max as f64).log2());
    while out.len() < events {
        let grow = alive.is_empty() || (alive.len() < live && next() % 2 == 0);
        if grow {
            let slot = free_slots.pop().expect("fewer than `live` alive");
            let bits = lo + (next() >> 11) as f64 / (1u64 << 53) as f64 * (hi - lo);
            out.push(TraceEvent::Alloc {
                id: slot,
                size: 2f64.powf(bits) as usize,
                stream: 0,
            });
            alive.push(slot);
        } else {
            let k = (next() % alive.len() as u64) as usize;
            let slot = alive.swap_remove(k);
            out.push(TraceEvent::Free { id: slot });
            free_slots.push(slot);
        }
    }
    for slot in alive {
        out.push(TraceEvent::Free { id: slot });
    }
    Trace {
        events: out,
        slots: live,
    }
}

/// Runs the workloads.
pub fn run(
    dev: &Device,
    driver_pair_ns: &mut dyn FnMut(usize) -> Option<f64>,
) -> Result<Vec<AllocRow>> {
    let mut rows = Vec::new();
    let mut workloads: Vec<(String, Trace, Option<usize>)> = Vec::new();
    for size in [4 << 10, 1 << 20, 64 << 20] {
        let name = format!(
            "hot alloc+free pair, {}",
            unibuf::ledger::fmt_bytes(size as u64)
        );
        workloads.push((name, hot_pairs(size, 100_000), Some(size)));
    }
    workloads.push((
        "random sizes 256 B..64 MiB, 64 live".to_owned(),
        random(200_000, 64, 64 << 20, 7),
        None,
    ));
    for (name, trace, pair_size) in workloads {
        let device = dev.replay(&trace)?;
        let simulated = replay_simulated(&trace, Default::default())?;
        rows.push(AllocRow {
            name,
            device,
            simulated,
            driver_pair_ns: pair_size.and_then(&mut *driver_pair_ns),
            buffer_pair_ns: pair_size
                .map(|size| buffer_pair_ns(dev, size, 100_000))
                .transpose()?,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_pairs_are_timed_and_leave_nothing() {
        let dev = Device::open("cpu").unwrap();
        let ns = buffer_pair_ns(&dev, 4097, 50).unwrap();
        assert!(ns > 0.0 && ns.is_finite(), "{ns}");
        assert_eq!(dev.memory_stats().active_bytes, 0);
        assert!(dev.memory_by_label().is_empty());
    }

    #[test]
    fn random_traces_are_valid_and_balanced() {
        let t = random(10_000, 16, 1 << 20, 3);
        let (mut allocs, mut frees) = (0, 0);
        let mut live = vec![false; t.slots];
        for e in &t.events {
            match *e {
                TraceEvent::Alloc { id, size, .. } => {
                    assert!(!live[id as usize] && (256..=1 << 20).contains(&size));
                    live[id as usize] = true;
                    allocs += 1;
                }
                TraceEvent::Free { id } => {
                    assert!(live[id as usize]);
                    live[id as usize] = false;
                    frees += 1;
                }
            }
        }
        assert_eq!(allocs, frees);
    }
}
