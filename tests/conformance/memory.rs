//! Memory accounting: the allocator's stats return to zero, caches are reused and trimmed,
//! budgets hold and recovery frees the cache before failing.

use unibuf::{Buffer, DType, Error, FillPattern, StorageMode};
use unibuf_conformance::{buffer, builder, device, Rng, MODES};

/// After random work in every mode, dropping everything and trimming leaves nothing behind.
#[test]
fn stats_return_to_zero_after_random_work() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("stats_return_to_zero_after_random_work");
    let mut live = Vec::new();
    for i in 0..200 {
        let mode = MODES[rng.range(0, 3)];
        let n = rng.range(1, 20_000);
        let b = buffer(&dev, mode, DType::U8, &[n], "random");
        q.fill_async(&b, FillPattern::u8(i as u8)).unwrap();
        live.push(b);
        if rng.range(0, 3) == 0 {
            let k = rng.range(0, live.len());
            live.swap_remove(k);
        }
    }
    let s = dev.memory_stats();
    assert!(s.active_count > 0 && s.active_bytes >= s.requested_bytes);
    assert!(s.peak_active_bytes >= s.active_bytes && s.peak_reserved_bytes >= s.reserved_bytes);
    drop(live);
    dev.drain().unwrap();
    let s = dev.memory_stats();
    assert_eq!(
        (s.active_bytes, s.active_count, s.requested_bytes),
        (0, 0, 0),
        "{s}"
    );
    assert_eq!(
        s.cached_bytes, s.reserved_bytes,
        "everything reserved is cached"
    );
    assert_eq!(s.external_count, 0);
    dev.trim();
    let s = dev.memory_stats();
    assert_eq!(
        (
            s.reserved_bytes,
            s.cached_bytes,
            s.cached_count,
            s.staging_bytes
        ),
        (0, 0, 0, 0),
        "{s}"
    );
    assert_eq!(
        s.device_allocs, s.device_frees,
        "every backend allocation was released"
    );
}

/// Freed memory serves later requests of about the same size without new device memory; the
/// cache limit bounds what is kept. (With virtual memory the cache holds 2 MiB granules, so the
/// limit is a whole number of them.)
#[test]
fn the_cache_serves_similar_requests_within_its_limit() {
    let dev = builder().cache_limit(4 << 20).open().unwrap();
    let a = dev
        .alloc(DType::U8, &[300_000], StorageMode::Private)
        .unwrap();
    drop(a);
    let before = dev.memory_stats();
    let b = dev
        .alloc(DType::U8, &[299_000], StorageMode::Private)
        .unwrap();
    let after = dev.memory_stats();
    assert_eq!(after.cache_hits, before.cache_hits + 1, "{after}");
    assert_eq!(after.device_allocs, before.device_allocs);
    assert!(after.rounding_waste() < 300_000 / 8);
    drop(b);
    let bigs: Vec<_> = (0..8)
        .map(|_| {
            dev.alloc(DType::U8, &[600_000], StorageMode::Private)
                .unwrap()
        })
        .collect();
    drop(bigs);
    dev.drain().unwrap();
    dev.alloc(DType::U8, &[1], StorageMode::Private).unwrap(); // frees past the limit are trimmed lazily
    let s = dev.memory_stats();
    assert!(s.cached_bytes <= 4 << 20, "{s}");
}

/// Under a memory limit, the allocator releases what it caches before reporting
/// BudgetExceeded, and succeeds again once memory is freed.
#[test]
fn budget_recovery_releases_cache_first() {
    const MIB: usize = 1 << 20;
    let dev = builder().memory_limit(8 * MIB).open().unwrap();
    let mut held: Vec<_> = (0..3)
        .map(|_| {
            dev.alloc(DType::U8, &[2 * MIB], StorageMode::Private)
                .unwrap()
        })
        .collect();
    // Free the first and the last: 4 MiB cached around a live block in the middle.
    held.swap_remove(0);
    held.pop();
    // 5 MiB fits only once the cached memory is released.
    let big = dev
        .alloc(DType::U8, &[5 * MIB], StorageMode::Private)
        .unwrap();
    assert!(
        dev.memory_stats().oom_retries >= 1,
        "{}",
        dev.memory_stats()
    );
    assert!(dev.memory_stats().reserved_bytes <= 8 * MIB);
    let err = dev
        .alloc(DType::U8, &[2 * MIB], StorageMode::Private)
        .unwrap_err();
    assert!(
        matches!(err, Error::BudgetExceeded { budget, .. } if budget == 8 * MIB),
        "{err}"
    );
    assert!(err.is_retryable());
    drop(big);
    dev.alloc(DType::U8, &[2 * MIB], StorageMode::Private)
        .unwrap();
}

/// Residency: additions commit with the next submission, removals wait for the work.
#[test]
fn residency_follows_the_epoch_rule() {
    let dev = device();
    let b = dev
        .alloc(DType::U8, &[1 << 20], StorageMode::Private)
        .unwrap();
    dev.make_resident(&b).unwrap();
    assert!(dev.is_resident(&b));
    assert_eq!(dev.residency_stats().pending_additions, 1);
    let f = dev.queue().fill_async(&b, FillPattern::u8(3)).unwrap();
    assert_eq!(
        dev.residency_stats().pending_additions,
        0,
        "committed with the submission"
    );
    assert!(dev.evict(&b).unwrap());
    dev.wait(f).unwrap();
    let s = dev.residency_stats();
    assert_eq!(
        (s.resident_count, s.pending_removals),
        (0, 0),
        "removed once its work completed"
    );
    assert!(!dev.evict(&b).unwrap(), "no longer resident");
}

/// Memory is attributed to the labels given at allocation, and the attribution ends with the
/// allocation (not with a view).
#[test]
fn memory_is_owned_by_label() {
    let dev = device();
    let w = dev
        .alloc_labelled("weights", DType::F32, &[1 << 20], StorageMode::Private)
        .unwrap();
    let kv: Vec<_> = (0..3)
        .map(|_| {
            dev.alloc_labelled("kv", DType::F16, &[1000], StorageMode::Private)
                .unwrap()
        })
        .collect();
    let ext = buffer(
        &dev,
        StorageMode::External,
        DType::U8,
        &[10_000],
        "mapped file",
    );
    let owners = dev.memory_by_label();
    assert_eq!(owners[0].0, "weights");
    assert!(owners[0].1 >= 4 << 20 && owners[0].2 == 1);
    let kv_row = owners.iter().find(|o| o.0 == "kv").unwrap();
    assert_eq!(kv_row.2, 3);
    assert!(kv_row.1 >= 6000);
    assert!(owners.iter().any(|o| o.0 == "mapped file" && o.1 >= 10_000));
    let view = w.slice(0..10).unwrap();
    drop(w);
    assert!(
        dev.memory_by_label().iter().any(|o| o.0 == "weights"),
        "the view keeps it"
    );
    drop((view, kv, ext));
    dev.drain().unwrap();
    assert!(
        dev.memory_by_label().is_empty(),
        "{:?}",
        dev.memory_by_label()
    );
}

/// Many labels coming and going (the table of figures by label sweeps the ones left at zero):
/// the figures by label always list exactly the live buffers, by count and bytes.
#[test]
fn figures_by_label_follow_many_labels() {
    let dev = device();
    let mut rng = Rng::new("figures_by_label_follow_many_labels");
    let mut live: Vec<(String, Buffer, usize)> = Vec::new();
    for i in 0..1500 {
        // Labels reused now and then: a few shared names among many unique ones.
        let label = if rng.range(0, 4) == 0 {
            format!("shared {}", rng.range(0, 5))
        } else {
            format!("unique {i}")
        };
        let n = rng.range(1, 3000) | 1;
        let b = dev
            .alloc_labelled(&label, DType::U8, &[n], StorageMode::Private)
            .unwrap();
        live.push((label, b, n));
        while live.len() > 40 || (!live.is_empty() && rng.range(0, 3) == 0) {
            live.swap_remove(rng.range(0, live.len()));
        }
        if i % 100 == 99 {
            let mut expected: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
            for (l, _, n) in &live {
                let e = expected.entry(l).or_default();
                e.0 += n;
                e.1 += 1;
            }
            let got = dev.memory_by_label();
            assert_eq!(got.len(), expected.len(), "{got:?}");
            for (l, bytes, count) in &got {
                let (min_bytes, n) = expected[l.as_str()];
                assert_eq!(*count, n, "{l}");
                assert!(
                    *bytes >= min_bytes,
                    "{l}: {bytes} bytes for {min_bytes} requested"
                );
            }
        }
    }
    drop(live);
    assert!(dev.memory_by_label().is_empty());
}

/// Growable buffers keep their contents (and, with virtual memory, their address and earlier
/// views) as they grow; growing past the capacity or shrinking is refused; everything is
/// released with the last view.
#[test]
fn growable_buffers_grow_in_place_or_by_copy() {
    let dev = device();
    let mut rng = Rng::new("growable_buffers_grow_in_place_or_by_copy");
    for mode in [StorageMode::Private, StorageMode::Shared] {
        let mut g = dev
            .alloc_growable("kv", DType::U32, 1000, 3 << 20, mode)
            .unwrap();
        let head: Vec<u32> = rng.elements(1000);
        dev.queue().upload(g.buffer(), &head).unwrap();
        let early = g.buffer().clone();
        g.grow((5 << 20) / 4).unwrap(); // past two 2 MiB granules
        assert_eq!(g.len(), (5 << 20) / 4);
        let tail: Vec<u32> = rng.elements(g.len() - 1000);
        dev.queue()
            .upload(&g.buffer().slice(1000..g.len()).unwrap(), &tail)
            .unwrap();
        let all: Vec<u32> = g.buffer().to_vec().unwrap();
        assert!(
            all[..1000] == head[..] && all[1000..] == tail[..],
            "{mode:?}"
        );
        if g.address_stable() {
            assert_eq!(g.buffer().device_address(), early.device_address());
            assert!(early.shares_memory_with(g.buffer()));
            assert_eq!(g.reallocations(), 0);
        } else {
            assert_eq!(g.reallocations(), 1);
        }
        assert_eq!(
            early.to_vec::<u32>().unwrap(),
            head,
            "{mode:?}: an earlier view keeps its bytes"
        );
        let err = g.grow((3 << 20) + 1).unwrap_err();
        assert!(matches!(err, unibuf::Error::OutOfBounds { .. }), "{err}");
        let err = g.grow(10).unwrap_err();
        assert!(
            matches!(err, unibuf::Error::OutOfBounds { .. }),
            "shrinking: {err}"
        );
        let s = dev.memory_stats();
        assert!(
            !g.address_stable() || (s.growable_count == 1 && s.growable_bytes >= 5 << 20),
            "{s}"
        );
        assert!(dev
            .memory_by_label()
            .iter()
            .any(|o| o.0 == "kv" && o.1 >= 5 << 20));
        drop((g, early));
        dev.drain().unwrap();
        let s = dev.memory_stats();
        assert_eq!((s.growable_bytes, s.growable_count), (0, 0), "{s}");
    }
    dev.trim();
    assert_eq!(dev.memory_stats().reserved_bytes, 0);
}

/// The snapshot shows live memory as used ranges, freed blocks as kept or free, and tiles each
/// segment's address space.
#[test]
fn the_snapshot_accounts_for_every_byte() {
    let dev = device();
    let mut rng = Rng::new("the_snapshot_accounts_for_every_byte");
    let mut live = Vec::new();
    for _ in 0..40 {
        let n = rng.range(1, 3 << 20);
        live.push(dev.alloc(DType::U8, &[n], StorageMode::Private).unwrap());
    }
    for i in (0..live.len()).rev().step_by(3) {
        live.swap_remove(i);
    }
    let stats = dev.memory_stats();
    let snap = dev.memory_snapshot();
    if stats.virtual_memory {
        assert!(!snap.segments.is_empty());
        let mut used = 0;
        for s in &snap.segments {
            let mut at = 0;
            for r in &s.ranges {
                assert_eq!(r.offset, at, "ranges tile the segment:\n{snap}");
                at += r.bytes;
            }
            assert_eq!(at, s.address_space);
            used += s.bytes_in(unibuf::alloc::RangeState::Used);
            assert_eq!(s.mapped_bytes() % s.granule, 0);
        }
        assert_eq!(used as usize, stats.active_bytes, "{snap}");
        let mapped: u64 = snap.segments.iter().map(|s| s.mapped_bytes()).sum();
        assert!(mapped as usize <= stats.reserved_bytes);
    } else {
        let cached: usize = snap.cached_blocks.iter().map(|b| b.bytes).sum();
        assert_eq!(cached, stats.cached_bytes, "{snap}");
    }
    let listing = snap.to_string();
    assert_eq!(
        listing.matches("segment ").count(),
        snap.segments.len(),
        "{listing}"
    );
}

/// Memory whose granules were unmapped (by `trim` or by the bound on cached memory) and mapped
/// again, often at the same addresses, holds exactly what is written to it: blocks of several granules, uploaded, checked, some kept alive across
/// trims so that neighbours of unmapped ranges stay mapped.
#[test]
fn remapped_memory_holds_what_is_written() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("remapped_memory_holds_what_is_written");
    let mut live: Vec<(unibuf::Buffer, Vec<u32>)> = Vec::new();
    for round in 0..40 {
        // 1 KiB to 12 MiB: up to six 2 MiB granules, odd sizes included.
        let n = rng.range(256, 3 << 20) | 1;
        let data: Vec<u32> = rng.elements(n);
        let b = dev
            .from_slice("remapped", &data, &[n])
            .expect("allocation after unmapping");
        assert_eq!(q.download::<u32>(&b).unwrap(), data, "round {round}");
        live.push((b, data));
        if rng.range(0, 2) == 0 {
            let k = rng.range(0, live.len());
            live.swap_remove(k);
        }
        if round % 3 == 2 {
            dev.drain().unwrap();
            dev.trim();
        }
    }
    for (i, (b, data)) in live.iter().enumerate() {
        assert_eq!(
            &q.download::<u32>(b).unwrap(),
            data,
            "buffer {i} kept across trims"
        );
    }
    drop(live);
    dev.drain().unwrap();
    dev.trim();
    let s = dev.memory_stats();
    assert_eq!((s.active_bytes, s.reserved_bytes), (0, 0), "{s}");
}

/// A trace replayed on the device's own memory: the figures match the trace, and the time
/// spent in the backend's memory calls is measured and is part of the total.
#[test]
fn device_replay_reports_live_reserved_and_call_time() {
    use unibuf::alloc::{Trace, TraceEvent};
    let dev = device();
    let mut rng = Rng::new("device_replay_reports_live_reserved_and_call_time");
    // Blocks of 1–9 MiB (odd sizes), up to 6 live: the arena maps and unmaps granules.
    let mut events = Vec::new();
    let mut live: Vec<(u64, usize)> = Vec::new();
    let (mut live_bytes, mut peak_live) = (0usize, 0usize);
    for id in 0..400u64 {
        if live.len() == 6 || (!live.is_empty() && rng.range(0, 3) == 0) {
            let (slot, size) = live.swap_remove(rng.range(0, live.len()));
            events.push(TraceEvent::Free { id: slot });
            live_bytes -= size;
        }
        let size = rng.range(1 << 20, 9 << 20) | 1;
        events.push(TraceEvent::Alloc {
            id,
            size,
            stream: 0,
        });
        live.push((id, size));
        live_bytes += size;
        peak_live = peak_live.max(live_bytes);
    }
    let trace = Trace { events, slots: 400 };
    let r = dev.replay(&trace).unwrap();
    assert_eq!(r.events, trace.events.len());
    assert_eq!(r.peak_live_bytes, peak_live);
    assert!(
        r.peak_reserved_bytes >= peak_live,
        "reserved {} for {peak_live} live",
        r.peak_reserved_bytes
    );
    // Placement in mapped granules bounds what is held; caching whole blocks by size class
    // (backends without virtual memory) does not.
    if r.stats.virtual_memory {
        assert!(
            r.fragmentation() < 1.5,
            "reserved/live {}",
            r.fragmentation()
        );
    }
    assert!(r.stats.device_allocs > 0, "{:?}", r.stats);
    let calls = r.device_call_ns_per_event();
    assert!(
        calls > 0.0 && calls <= r.ns_per_event,
        "{calls} ns of {} per event in calls",
        r.ns_per_event
    );
}

/// A unique path in the temp directory for this process and test.
fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("unibuf-conf-{}-{name}", std::process::id()))
}

/// Random allocations and frees in both allocator-served modes, recorded to a trace (plain
/// and gzip): the file reads back as the same sequence, each free naming the block its buffer
/// had, and its replay sees the recorded peak. A buffer allocated before the recording and
/// freed during it, and External buffers (not the allocator's), stay out of it.
#[test]
fn allocation_traces_record_what_the_allocator_served() {
    use unibuf::alloc::{replay_simulated, Trace, TraceEvent};
    let dev = device();
    for name in ["alloc-trace.csv", "alloc-trace.csv.gz"] {
        let mut rng = Rng::new("allocation_traces_record_what_the_allocator_served");
        let before = buffer(&dev, StorageMode::Private, DType::U8, &[4097], "before");
        let path = temp_path(name);
        dev.record_alloc_trace(&path).unwrap();
        drop(before);
        // (buffer, its requested bytes, the index of its alloc among the recorded allocs)
        let mut live = Vec::new();
        let mut expected = Vec::new(); // (is_alloc, bytes, alloc index)
        let (mut allocs, mut live_bytes, mut peak) = (0usize, 0usize, 0usize);
        for _ in 0..300 {
            if !live.is_empty() && (live.len() == 24 || rng.range(0, 2) == 0) {
                let (b, bytes, index) = live.swap_remove(rng.range(0, live.len()));
                drop(b);
                expected.push((false, bytes, index));
                live_bytes -= bytes;
                continue;
            }
            let mode = MODES[rng.range(0, 3)];
            let (dtype, n) = match rng.range(0, 3) {
                0 => (DType::U8, rng.range(1, 5000) | 1),
                1 => (DType::F32, rng.range(1, 300_000)),
                _ => (DType::F16, rng.range(1 << 20, 3 << 20) | 1),
            };
            let b = buffer(&dev, mode, dtype, &[n], "traced");
            if mode == StorageMode::External {
                continue; // dropped at once: wrapped memory is not the allocator's
            }
            let bytes = n * dtype.size();
            expected.push((true, bytes, allocs));
            live.push((b, bytes, allocs));
            allocs += 1;
            live_bytes += bytes;
            peak = peak.max(live_bytes);
        }
        let summary = dev.finish_alloc_trace().unwrap();
        let frees = expected.iter().filter(|e| !e.0).count();
        assert_eq!(summary.path, path);
        assert_eq!(
            (summary.allocs, summary.frees),
            (allocs as u64, frees as u64)
        );
        assert_eq!(summary.peak_live_bytes, peak);
        assert_eq!(summary.live_at_end, live.len());
        // Allocated after the recording stopped: not in the file.
        drop(buffer(
            &dev,
            StorageMode::Private,
            DType::U8,
            &[99],
            "after",
        ));
        drop(live);

        let trace = Trace::read(&path).unwrap();
        assert_eq!(trace.events.len(), expected.len(), "{name}");
        // The slot each recorded alloc got when the file was read: its free must name it.
        let mut slot_of = vec![u64::MAX; allocs];
        for (event, &(is_alloc, bytes, index)) in trace.events.iter().zip(&expected) {
            match (*event, is_alloc) {
                (TraceEvent::Alloc { id, size, stream }, true) => {
                    assert_eq!((size, stream), (bytes, 0), "{name}: alloc {index}");
                    slot_of[index] = id;
                }
                (TraceEvent::Free { id }, false) => {
                    assert_eq!(id, slot_of[index], "{name}: free of alloc {index}")
                }
                (e, _) => panic!("{name}: {e:?} where {expected:?} was expected"),
            }
        }
        let replay = replay_simulated(&trace, Default::default()).unwrap();
        assert_eq!(replay.peak_live_bytes, peak);
        std::fs::remove_file(&path).unwrap();
    }
}

/// A second recording is refused while one runs, without touching the running one's file; a
/// finish with none running and a file that cannot be created are errors naming the problem.
#[test]
fn allocation_trace_misuse_is_refused() {
    let dev = device();
    let path = temp_path("misuse.csv");
    match dev.finish_alloc_trace() {
        Err(Error::InvalidArgument {
            what,
            detail: reason,
        }) => {
            assert_eq!(what, "allocation trace");
            assert!(reason.contains("no recording"), "{reason}");
        }
        other => panic!("finish without a recording: {other:?}"),
    }
    let missing = std::env::temp_dir()
        .join(format!("unibuf-no-such-dir-{}", std::process::id()))
        .join("t.csv");
    match dev.record_alloc_trace(&missing) {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("t.csv"), "{e}"),
        other => panic!("a file in a missing directory: {other:?}"),
    }
    dev.record_alloc_trace(&path).unwrap();
    let a = buffer(&dev, StorageMode::Shared, DType::U32, &[777], "kept");
    match dev.record_alloc_trace(&path) {
        Err(Error::InvalidArgument { detail: reason, .. }) => {
            assert!(reason.contains("already recording"), "{reason}")
        }
        other => panic!("a second recording: {other:?}"),
    }
    drop(a);
    let summary = dev.finish_alloc_trace().unwrap();
    assert_eq!((summary.allocs, summary.frees), (1, 1));
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 3, "header, alloc, free: {text}");
    assert!(
        text.starts_with("action,addr,size,stream\nalloc,"),
        "{text}"
    );
    std::fs::remove_file(&path).unwrap();
}

/// A recording whose file cannot take the writes ends in an I/O error naming the file, and the
/// allocations it recorded are unaffected.
#[cfg(target_os = "linux")]
#[test]
fn an_allocation_trace_that_cannot_be_written_is_an_error_at_finish() {
    let dev = device();
    dev.record_alloc_trace("/dev/full").unwrap();
    // Enough lines to pass the writer's 64 KiB buffer while recording.
    for n in 0..4000usize {
        let b = buffer(&dev, StorageMode::Private, DType::U8, &[n % 97 + 1], "full");
        drop(b);
    }
    match dev.finish_alloc_trace() {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("/dev/full"), "{e}"),
        other => panic!("writing to /dev/full: {other:?}"),
    }
    // The device goes on, and a new recording can start.
    let path = temp_path("after-full.csv");
    dev.record_alloc_trace(&path).unwrap();
    drop(buffer(&dev, StorageMode::Shared, DType::U8, &[5], "after"));
    assert_eq!(dev.finish_alloc_trace().unwrap().allocs, 1);
    std::fs::remove_file(&path).unwrap();
}
