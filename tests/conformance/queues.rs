//! Queues and completion epochs: ordering across queues without device-wide syncs, host access
//! after device writes, and reuse of freed memory across queues.

use unibuf::{DType, FillPattern, StorageMode};
use unibuf_conformance::{device, Rng};

/// Big enough that a copy takes long compared with submitting the next command, so a missing
/// wait would be seen as stale data.
const BIG: usize = 16 << 20;

/// Read after write across queues: the reader's queue waits for the writer's fence.
#[test]
fn cross_queue_read_after_write_is_ordered() {
    let dev = device();
    let (q1, q2) = (dev.queue(), dev.new_queue("second").unwrap());
    let mut rng = Rng::new("cross_queue_read_after_write_is_ordered");
    for round in 0..4u32 {
        let a = dev
            .alloc(DType::U32, &[BIG / 4], StorageMode::Private)
            .unwrap();
        let b = dev
            .alloc(DType::U32, &[BIG / 4], StorageMode::Private)
            .unwrap();
        let value = rng.next_u64() as u32 | 1;
        q1.fill(&a, FillPattern::u32(value ^ 0xFFFF)).unwrap();
        let src = dev
            .alloc(DType::U32, &[BIG / 4], StorageMode::Private)
            .unwrap();
        q1.fill(&src, FillPattern::u32(value)).unwrap();
        // q1 writes `a` (a long copy), then q2 reads it right away: q2 must wait on q1.
        let w = q1.copy_async(&src, &a).unwrap();
        let r = q2.copy_async(&a, &b).unwrap();
        dev.wait(r).unwrap();
        assert!(
            dev.is_complete(w).unwrap(),
            "the reader finished before the writer (round {round})"
        );
        let got: Vec<u32> = q2.download(&b).unwrap();
        assert!(
            got.iter().all(|x| *x == value),
            "round {round}: stale data crossed queues"
        );
    }
}

/// Write after read across queues: a later write on another queue waits for the read.
#[test]
fn cross_queue_write_after_read_is_ordered() {
    let dev = device();
    let (q1, q2) = (dev.queue(), dev.new_queue("second").unwrap());
    let a = dev.alloc(DType::U8, &[BIG], StorageMode::Private).unwrap();
    let b = dev.alloc(DType::U8, &[BIG], StorageMode::Private).unwrap();
    q1.fill(&a, FillPattern::u8(1)).unwrap();
    let read = q1.copy_async(&a, &b).unwrap();
    let write = q2.fill_async(&a, FillPattern::u8(2)).unwrap();
    dev.wait(write).unwrap();
    assert!(dev.is_complete(read).unwrap());
    let got: Vec<u8> = q1.download(&b).unwrap();
    assert!(
        got.iter().all(|x| *x == 1),
        "the fill overtook the read it must follow"
    );
    assert!(q2.download::<u8>(&a).unwrap().iter().all(|x| *x == 2));
}

/// Independent work on two queues needs no waits and both complete.
#[test]
fn independent_queues_run_without_waiting_on_each_other() {
    let dev = device();
    let qs = [
        dev.queue(),
        dev.new_queue("a").unwrap(),
        dev.new_queue("b").unwrap(),
    ];
    let bufs: Vec<_> = (0..3)
        .map(|_| {
            dev.alloc(DType::U32, &[1 << 16], StorageMode::Private)
                .unwrap()
        })
        .collect();
    let fences: Vec<_> = qs
        .iter()
        .zip(&bufs)
        .enumerate()
        .map(|(i, (q, b))| q.fill_async(b, FillPattern::u32(i as u32 + 10)).unwrap())
        .collect();
    for f in &fences {
        dev.wait(*f).unwrap();
    }
    for (i, b) in bufs.iter().enumerate() {
        assert!(b
            .to_vec::<u32>()
            .unwrap()
            .iter()
            .all(|x| *x == i as u32 + 10));
    }
    assert_eq!(
        fences.iter().map(|f| f.queue).collect::<Vec<_>>(),
        qs.iter().map(|q| q.id()).collect::<Vec<_>>()
    );
}

/// Host reads wait for device writes; host writes wait for device reads.
#[test]
fn host_access_waits_for_device_work() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("host_access_waits_for_device_work");
    for _ in 0..4 {
        let value = rng.next_u64() as u32;
        let shared = dev
            .alloc(DType::U32, &[BIG / 4], StorageMode::Shared)
            .unwrap();
        let src = dev
            .alloc(DType::U32, &[BIG / 4], StorageMode::Private)
            .unwrap();
        q.fill(&src, FillPattern::u32(value)).unwrap();
        let f = q.copy_async(&src, &shared).unwrap();
        {
            let r = shared.read::<u32>().unwrap();
            assert!(dev.is_complete(f).unwrap());
            assert!(
                r.iter().all(|x| *x == value),
                "host read saw the buffer before the device wrote it"
            );
        }
        // Device reads `shared`; a host write must wait for it.
        let copy = dev
            .alloc(DType::U32, &[BIG / 4], StorageMode::Private)
            .unwrap();
        let read = q.copy_async(&shared, &copy).unwrap();
        shared.write::<u32>().unwrap().fill(!value);
        assert!(dev.is_complete(read).unwrap());
        assert!(
            q.download::<u32>(&copy)
                .unwrap()
                .iter()
                .all(|x| *x == value),
            "host write overtook a device read"
        );
    }
}

/// Fences: a queue's epochs increase by one per submission; waiting on another queue's fence
/// works; completed fences stay complete.
#[test]
fn fences_count_submissions_per_queue() {
    let dev = device();
    let q2 = dev.new_queue("count").unwrap();
    let b = dev.alloc(DType::U8, &[4096], StorageMode::Private).unwrap();
    let f1 = q2.fill_async(&b, FillPattern::u8(1)).unwrap();
    let f2 = q2.fill_async(&b, FillPattern::u8(2)).unwrap();
    assert_eq!(f1.queue, q2.id());
    assert_eq!(f2.epoch, f1.epoch + 1);
    dev.queue().wait(f2).unwrap();
    assert!(dev.is_complete(f1).unwrap() && dev.is_complete(f2).unwrap());
    assert_eq!(q2.last_fence(), f2);
    q2.drain().unwrap();
    dev.drain().unwrap();
}

/// Memory freed while another queue still uses it is reused safely: the new owner's first
/// use waits for the old owner's work.
#[test]
fn freed_memory_is_reused_only_after_its_work() {
    let dev = device();
    let (q1, q2) = (dev.queue(), dev.new_queue("reuse").unwrap());
    for round in 0..4u8 {
        let src = dev.alloc(DType::U8, &[BIG], StorageMode::Private).unwrap();
        q1.fill(&src, FillPattern::u8(round + 1)).unwrap();
        let out = dev.alloc(DType::U8, &[BIG], StorageMode::Shared).unwrap();
        let old = dev.alloc(DType::U8, &[BIG], StorageMode::Private).unwrap();
        q1.fill(&old, FillPattern::u8(0x77)).unwrap();
        let read = q1.copy_async(&old, &out).unwrap();
        drop(old); // freed while the copy may still read it
        let reused = dev.alloc(DType::U8, &[BIG], StorageMode::Private).unwrap();
        assert!(
            dev.memory_stats().cache_hits > 0,
            "the same size class comes from the cache"
        );
        q2.copy(&src, &reused).unwrap();
        assert!(
            dev.is_complete(read).unwrap(),
            "reuse on another queue ran before the old read"
        );
        assert!(
            out.read::<u8>().unwrap().iter().all(|x| *x == 0x77),
            "round {round}: the old read saw the new owner's data"
        );
    }
}

/// A single-queue program inserts no waits; a second queue inserts one only where memory is
/// shared with pending work.
#[test]
fn only_cross_queue_hazards_insert_waits() {
    let dev = device();
    let q = dev.queue();
    let a = dev.alloc(DType::U8, &[BIG], StorageMode::Private).unwrap();
    let b = dev.alloc(DType::U8, &[BIG], StorageMode::Private).unwrap();
    for i in 0..10u8 {
        q.fill_async(&a, FillPattern::u8(i)).unwrap();
        q.copy_async(&a, &b).unwrap();
        q.upload_async(&b.slice(0..3).unwrap(), &[i; 3]).unwrap();
    }
    dev.drain().unwrap();
    assert!(
        dev.ledger().submissions().iter().all(|s| s.waits == 0),
        "one queue needs no waits"
    );
    dev.ledger().clear();

    let q2 = dev.new_queue("second").unwrap();
    let unrelated = dev.alloc(DType::U8, &[4096], StorageMode::Private).unwrap();
    q.fill_async(&a, FillPattern::u8(9)).unwrap();
    q2.fill_async(&unrelated, FillPattern::u8(1)).unwrap(); // no shared memory: no wait
    q2.copy_async(&a, &b).unwrap(); // reads what q wrote: a wait unless already complete
    dev.drain().unwrap();
    let subs = dev.ledger().submissions();
    assert_eq!(subs.len(), 3);
    assert_eq!((subs[0].waits, subs[1].waits), (0, 0));
    assert!(subs[2].waits <= 1);
    assert!(b.to_vec::<u8>().unwrap().iter().all(|x| *x == 9));
}
