//! Interop: native handles, external work under the epochs, foreign streams and foreign memory.
//!
//! The "foreign library" here is plain code of the platform (host memcpy on the CPU, the CUDA
//! driver's own copies and memsets on CUDA) run through the native handles, as another
//! framework's code would be.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use unibuf::interop::{
    ExternalError, ForeignAccess, ForeignMemory, HostSignal, NativeBuffer, NativeDevice,
    NativeEncoder, NativeHandle, NativeQueue, NativeWaiter,
};
use unibuf::{DType, Direction, Error, FillPattern, StorageMode};
use unibuf_conformance::{backend_name, buffer, device, poison, Rng, MODES};

/// Copies `src` to `dst` (same length) on the encoder external work is given: after a pause on
/// the CPU, so that work ordered wrongly would be seen; a driver copy on the stream on CUDA.
fn foreign_copy(
    encoder: NativeEncoder,
    src: NativeBuffer,
    dst: NativeBuffer,
) -> Result<(), ExternalError> {
    match (encoder, src, dst) {
        (
            NativeEncoder::Cpu,
            NativeBuffer::Host { ptr: s, bytes },
            NativeBuffer::Host { ptr: d, bytes: n },
        ) => {
            assert_eq!(bytes, n);
            std::thread::sleep(Duration::from_millis(20));
            // SAFETY: external work's contract: both buffers are alive until the fence
            // completes, hold `bytes` bytes, and the epochs order this after their earlier
            // work; they do not overlap (checked by `external`).
            unsafe {
                std::ptr::copy_nonoverlapping(s.as_ptr() as *const u8, d.as_ptr().cast(), bytes)
            };
            Ok(())
        }
        #[cfg(feature = "cuda")]
        (
            NativeEncoder::Cuda { stream, .. },
            NativeBuffer::Cuda {
                device_ptr: s,
                bytes,
            },
            NativeBuffer::Cuda { device_ptr: d, .. },
        ) => cuda::check(
            // SAFETY: as above, on the queue's stream with the context current.
            unsafe {
                cudarc::driver::sys::cuMemcpyDtoDAsync_v2(d, s, bytes, stream.as_ptr().cast())
            },
            "cuMemcpyDtoDAsync",
        ),
        other => Err(format!("no foreign copy for {other:?}").into()),
    }
}

/// The handles name the memory of the view, the queue and the device of the backend.
#[test]
fn native_handles_name_the_memory() {
    let dev = device();
    for mode in MODES {
        let b = buffer(&dev, mode, DType::F32, &[8, 16], "native");
        let row = b.rows(3..5).unwrap();
        let (addr, bytes) = match row.native().unwrap() {
            NativeBuffer::Host { ptr, bytes } => (ptr.addr() as u64, bytes),
            NativeBuffer::Cuda { device_ptr, bytes } => (device_ptr, bytes),
            other => panic!("{mode:?}: unexpected {other:?} on {}", backend_name()),
        };
        assert_eq!(
            (addr, bytes),
            (b.device_address() + 3 * 64, 128),
            "{mode:?}"
        );
    }
    let q = dev.new_queue("second").unwrap();
    match (backend_name().as_str(), dev.native(), q.native().unwrap()) {
        ("cpu", NativeDevice::Cpu, NativeQueue::Cpu { queue }) => assert_eq!(queue, q.id()),
        ("cuda", NativeDevice::Cuda { context, .. }, NativeQueue::Cuda { stream }) => {
            assert!(!context.is_null() && !stream.is_null());
            assert_ne!(dev.queue().native().unwrap(), q.native().unwrap());
        }
        (b, d, n) => panic!("{b}: unexpected {d:?} / {n:?}"),
    }
}

/// External work waits for the buffers' earlier work on other queues, and later work (host
/// reads, other queues) waits for it: its fence is recorded on them.
#[test]
fn external_work_is_ordered_by_the_epochs() {
    let dev = device();
    let mut rng = Rng::new("external_work_is_ordered_by_the_epochs");
    let producer = dev.new_queue("producer").unwrap();
    let foreign = dev.new_queue("foreign").unwrap();
    for mode in MODES {
        let n = rng.range(1000, 300_000);
        let data: Vec<f32> = rng.elements(n);
        let x = buffer(&dev, mode, DType::F32, &[n], "x");
        let y = buffer(&dev, mode, DType::F32, &[n], "y");
        poison(&dev, &y);
        dev.drain().unwrap();
        producer.upload_async(&x, &data).unwrap();
        let (src, dst) = (x.native().unwrap(), y.native().unwrap());
        let fence = foreign
            .external(&[&x], &[&y], move |enc| foreign_copy(enc, src, dst))
            .unwrap();
        assert_eq!(fence.queue, foreign.id());
        // The default queue reads y: it must wait for the foreign queue's write.
        assert_eq!(dev.queue().download::<f32>(&y).unwrap(), data, "{mode:?}");
        // A write to x on the producer must wait for the external read: the copy saw `data`.
        producer.fill_async(&x, FillPattern::of(0.5f32)).unwrap();
        assert_eq!(dev.queue().download::<f32>(&y).unwrap(), data, "{mode:?}");
    }
}

/// A buffer dropped while external work uses it stays alive until the work completes; the
/// closure runs exactly once.
#[test]
fn external_work_keeps_dropped_buffers_alive() {
    let dev = device();
    let mut rng = Rng::new("external_work_keeps_dropped_buffers_alive");
    let n = rng.range(10_000, 100_000);
    let data: Vec<u32> = rng.elements(n);
    let x = dev.from_slice("x", &data, &[n]).unwrap();
    let y = dev.alloc(DType::U32, &[n], StorageMode::Private).unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (src, dst, r) = (x.native().unwrap(), y.native().unwrap(), runs.clone());
    let q = dev.queue();
    q.external(&[&x], &[&y], move |enc| {
        r.fetch_add(1, Ordering::SeqCst);
        foreign_copy(enc, src, dst)
    })
    .unwrap();
    drop(x);
    // Memory the allocator hands out now must not be x's while the copy reads it.
    let z = dev.from_slice("z", &vec![7u32; n], &[n]).unwrap();
    assert_eq!(q.download::<u32>(&y).unwrap(), data);
    assert_eq!(q.download::<u32>(&z).unwrap(), vec![7u32; n]);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A closure's error (or panic) is `Error::External` at the call on GPUs, and the queue's
/// sticky fault on the CPU, where the closure runs later on the worker.
#[test]
fn external_errors_are_reported() {
    for panics in [false, true] {
        let dev = device();
        let q = dev.queue().labelled("failing library");
        let b = dev.alloc(DType::F32, &[64], StorageMode::Shared).unwrap();
        let r = q.external(&[], &[&b], move |_| {
            if panics {
                panic!("library bug");
            }
            Err("CUBLAS_STATUS_INVALID_VALUE".into())
        });
        let expect = if panics {
            "library bug"
        } else {
            "CUBLAS_STATUS_INVALID_VALUE"
        };
        match backend_name().as_str() {
            "cpu" => {
                let fence = r.unwrap();
                match dev.wait(fence) {
                    Err(Error::DeviceFault { label, detail, .. }) => {
                        assert_eq!(label, "failing library");
                        assert!(detail.contains(expect), "{detail}");
                    }
                    other => panic!("expected a fault, got {other:?}"),
                }
                dev.reset().unwrap();
                q.fill(&b, FillPattern::of(1.0f32)).unwrap();
                assert_eq!(b.read::<f32>().unwrap()[63], 1.0);
            }
            _ => match r {
                Err(Error::External { label, detail }) => {
                    assert_eq!(label, "failing library");
                    assert!(detail.contains(expect), "{detail}");
                    q.fill(&b, FillPattern::of(1.0f32)).unwrap();
                    assert_eq!(b.read::<f32>().unwrap()[63], 1.0);
                }
                other => panic!("expected Error::External, got {other:?}"),
            },
        }
    }
}

/// External work refuses a written buffer that overlaps another, another device's buffer, and
/// writes to read-only memory, before anything runs.
#[test]
fn external_work_refuses_bad_buffers() {
    let dev = device();
    let other = device();
    let b = dev.alloc(DType::F32, &[64], StorageMode::Shared).unwrap();
    let theirs = other.alloc(DType::F32, &[64], StorageMode::Shared).unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    let q = dev.queue();
    let attempt = |reads: &[&unibuf::Buffer], writes: &[&unibuf::Buffer]| {
        let r = ran.clone();
        q.external(reads, writes, move |_| {
            r.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    };
    let e = attempt(&[&b.slice(0..32).unwrap()], &[&b.slice(16..48).unwrap()]).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument { detail, .. } if detail.contains("64..192")),
        "{e}"
    );
    let e = attempt(&[], &[&theirs]).unwrap_err();
    assert!(matches!(e, Error::WrongDevice { .. }), "{e}");
    let ro = dev
        .wrap_external("weights", Arc::new(vec![1.0f32; 64]), DType::F32, &[64])
        .unwrap();
    let e = attempt(&[], &[&ro]).unwrap_err();
    assert!(
        matches!(&e, Error::ReadOnly { label, .. } if label == "weights"),
        "{e}"
    );
    // Disjoint views of one allocation are fine, and reads may overlap.
    let f = attempt(
        &[&b.slice(0..32).unwrap(), &b.slice(0..16).unwrap()],
        &[&b.slice(32..64).unwrap()],
    )
    .unwrap();
    dev.wait(f).unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 1);
}

/// A queue waits for a host signal (the CPU backend's foreign stream); one never set but
/// dropped faults the queue instead of hanging it. GPU backends refuse host signals.
#[test]
fn queues_wait_for_host_signals() {
    let dev = device();
    let q = dev.new_queue("waits").unwrap();
    let b = dev.alloc(DType::U32, &[1024], StorageMode::Shared).unwrap();
    let signal = HostSignal::new();
    if backend_name() != "cpu" {
        let e = q.wait_host_signal(&signal).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        return;
    }
    q.wait_host_signal(&signal).unwrap();
    let fence = q.fill_async(&b, FillPattern::u32(9)).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    assert!(!dev.is_complete(fence).unwrap(), "ran before the signal");
    assert!(!signal.is_set());
    signal.set();
    dev.wait(fence).unwrap();
    assert!(b.read::<u32>().unwrap().iter().all(|&v| v == 9));

    let abandoned = HostSignal::new();
    let f = q.wait_host_signal(&abandoned).unwrap();
    drop(abandoned);
    match dev.wait(f) {
        Err(Error::DeviceFault { detail, .. }) => assert!(detail.contains("dropped"), "{detail}"),
        other => panic!("expected a fault, got {other:?}"),
    }
    dev.reset().unwrap();
}

/// A fence handed to the host waits for it; foreign streams the backend lacks are refused, as
/// are fences of other devices or never submitted.
#[test]
fn fences_order_native_waiters() {
    let dev = device();
    let b = dev
        .alloc(DType::U8, &[1 << 20], StorageMode::Shared)
        .unwrap();
    let fence = dev.queue().fill_async(&b, FillPattern::u8(3)).unwrap();
    // SAFETY: the host waiter holds no handle.
    unsafe { dev.order_native(fence, NativeWaiter::Host) }.unwrap();
    assert!(dev.is_complete(fence).unwrap());
    let other = device();
    // SAFETY: refused before any handle is used.
    let e = unsafe { other.order_native(fence, NativeWaiter::Host) }.unwrap_err();
    assert!(matches!(e, Error::WrongDevice { .. }), "{e}");
    let future = unibuf::Fence {
        epoch: fence.epoch + 100,
        ..fence
    };
    // SAFETY: refused before the null handle is used.
    let e =
        unsafe { dev.order_native(future, NativeWaiter::CudaStream(NativeHandle::from_addr(1))) }
            .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    // SAFETY: refused: a null handle.
    let e =
        unsafe { dev.order_native(fence, NativeWaiter::CudaStream(NativeHandle::from_addr(0))) }
            .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    if backend_name() == "cpu" {
        // SAFETY: refused by the backend before the handle is used.
        let e = unsafe {
            dev.order_native(fence, NativeWaiter::CudaStream(NativeHandle::from_addr(64)))
        }
        .unwrap_err();
        assert!(
            matches!(e, Error::Unsupported { backend: "cpu", .. }),
            "{e}"
        );
    }
}

/// Counts its drops: the owner of foreign memory in these tests.
struct Owner<T> {
    _memory: T,
    drops: Arc<AtomicUsize>,
}

impl<T> Drop for Owner<T> {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

/// Foreign memory of the backend's own kind: host memory on the CPU, cuMemAlloc memory on CUDA.
/// Returns the memory description and an owner that frees it (counting the drop).
fn foreign_memory(
    n_bytes: usize,
    drops: &Arc<AtomicUsize>,
) -> (ForeignMemory, Box<dyn Send + Sync>) {
    #[cfg(feature = "cuda")]
    if backend_name() == "cuda" {
        let ptr = cuda::alloc(n_bytes);
        let owner = Owner {
            _memory: cuda::DeviceMemory(ptr),
            drops: drops.clone(),
        };
        return (ForeignMemory::CudaDevice { ptr }, Box::new(owner));
    }
    let mut v = vec![0u8; n_bytes];
    let ptr = NativeHandle::from_ptr(v.as_mut_ptr().cast());
    (
        ForeignMemory::Host { ptr },
        Box::new(Owner {
            _memory: v,
            drops: drops.clone(),
        }),
    )
}

/// Foreign memory is the buffer (no copy), counted apart, in the ledger as a shared record,
/// and its owner is dropped once, after the last view and the last fence.
#[test]
fn foreign_memory_is_wrapped_and_released_after_its_work() {
    let dev = device();
    let mut rng = Rng::new("foreign_memory_is_wrapped_and_released_after_its_work");
    let n = rng.range(1 << 16, 1 << 20);
    let data: Vec<f32> = rng.elements(n);
    let drops = Arc::new(AtomicUsize::new(0));
    let (memory, owner) = foreign_memory(n * 4, &drops);
    let before = dev.memory_stats();
    // SAFETY: the owner keeps the memory (n f32s) alive; only unibuf uses it meanwhile.
    let b = unsafe {
        dev.wrap_foreign(
            "theirs",
            memory,
            owner,
            ForeignAccess::ReadWrite,
            DType::F32,
            &[n],
        )
    }
    .unwrap();
    assert_eq!(b.mode(), StorageMode::Foreign);
    let s = dev.memory_stats();
    assert_eq!((s.foreign_bytes, s.foreign_count), (n * 4, 1));
    assert_eq!(s.active_bytes, before.active_bytes, "not unibuf's memory");
    let shared = dev.ledger().totals()[&Direction::Shared];
    assert_eq!((shared.count, shared.bytes), (1, 0));
    let q = dev.queue();
    q.upload(&b, &data).unwrap();
    match (memory, b.native().unwrap()) {
        (ForeignMemory::Host { ptr }, NativeBuffer::Host { ptr: p, .. }) => assert_eq!(ptr, p),
        (ForeignMemory::CudaDevice { ptr }, NativeBuffer::Cuda { device_ptr, .. }) => {
            assert_eq!(ptr, device_ptr)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        q.download::<f32>(&b.slice(1..n).unwrap()).unwrap(),
        &data[1..]
    );
    // Slow work on a view, then every view dropped: the owner waits for the work.
    let slow = dev.new_queue("slow").unwrap();
    let y = dev.alloc(DType::F32, &[n], StorageMode::Private).unwrap();
    let (src, dst) = (b.native().unwrap(), y.native().unwrap());
    slow.external(&[&b], &[&y], move |enc| {
        std::thread::sleep(Duration::from_millis(50));
        foreign_copy(enc, src, dst)
    })
    .unwrap();
    let view = b.slice(0..n / 2).unwrap();
    drop(b);
    assert_eq!(drops.load(Ordering::SeqCst), 0, "a view is alive");
    drop(view);
    assert_eq!(q.download::<f32>(&y).unwrap(), data);
    dev.drain().unwrap();
    assert_eq!(
        drops.load(Ordering::SeqCst),
        1,
        "dropped once, after its work"
    );
    let s = dev.memory_stats();
    assert_eq!((s.foreign_bytes, s.foreign_count), (0, 0));
}

/// Read-only foreign memory refuses every write; bad pointers are typed errors, and nothing
/// refused keeps or leaks the owner.
#[test]
fn foreign_memory_refuses_bad_input() {
    let dev = device();
    let drops = Arc::new(AtomicUsize::new(0));
    let (memory, owner) = foreign_memory(4096, &drops);
    // SAFETY: as above.
    let ro = unsafe {
        dev.wrap_foreign(
            "read only",
            memory,
            owner,
            ForeignAccess::ReadOnly,
            DType::F32,
            &[1024],
        )
    }
    .unwrap();
    assert!(!ro.is_writable());
    let e = dev.queue().fill(&ro, FillPattern::of(1.0f32)).unwrap_err();
    assert!(
        matches!(&e, Error::ReadOnly { label, .. } if label == "read only"),
        "{e}"
    );
    let e = dev.queue().upload(&ro, &[0.0f32; 1024]).unwrap_err();
    assert!(matches!(e, Error::ReadOnly { .. }), "{e}");
    if ro.is_host_accessible() {
        assert!(matches!(ro.write::<f32>(), Err(Error::ReadOnly { .. })));
    }
    drop(ro);
    dev.drain().unwrap();
    assert_eq!(drops.load(Ordering::SeqCst), 1);

    let wrap = |memory: ForeignMemory, dtype: DType, shape: &[usize]| {
        let owner = Owner {
            _memory: (),
            drops: drops.clone(),
        };
        // SAFETY: every call here is refused before the memory is used.
        unsafe { dev.wrap_foreign("bad", memory, owner, ForeignAccess::ReadWrite, dtype, shape) }
    };
    let null = ForeignMemory::Host {
        ptr: NativeHandle::from_addr(0),
    };
    let e = wrap(null, DType::F32, &[4]).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument { detail, .. } if detail.contains("null")),
        "{e}"
    );
    let e = wrap(ForeignMemory::CudaDevice { ptr: 0x1002 }, DType::F32, &[4]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Misaligned {
                value: 0x1002,
                align: 4,
                ..
            }
        ),
        "{e}"
    );
    let e = wrap(
        ForeignMemory::CudaDevice { ptr: 0x1000 },
        DType::F32,
        &[usize::MAX / 2],
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    match backend_name().as_str() {
        "cpu" => {
            let e = wrap(ForeignMemory::CudaDevice { ptr: 0x1000 }, DType::F32, &[4]).unwrap_err();
            assert!(
                matches!(e, Error::Unsupported { backend: "cpu", .. }),
                "{e}"
            );
        }
        "cuda" => {
            // An address the driver does not know.
            let e = wrap(ForeignMemory::CudaDevice { ptr: 0x1000 }, DType::F32, &[4]).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
            #[cfg(feature = "cuda")]
            {
                // A range past the end of the foreign allocation.
                let ptr = cuda::alloc(4096);
                let e = wrap(ForeignMemory::CudaDevice { ptr }, DType::F32, &[1025]).unwrap_err();
                assert!(matches!(e, Error::OutOfBounds { end: 4100, .. }), "{e}");
                drop(cuda::DeviceMemory(ptr));
                let e = wrap(
                    ForeignMemory::Host {
                        ptr: NativeHandle::from_addr(4096),
                    },
                    DType::F32,
                    &[4],
                )
                .unwrap_err();
                assert!(
                    matches!(
                        e,
                        Error::Unsupported {
                            backend: "cuda",
                            ..
                        }
                    ),
                    "{e}"
                );
            }
        }
        _ => {}
    }
    assert_eq!(
        drops.load(Ordering::SeqCst),
        1 + 4 + 2 * usize::from(backend_name() == "cuda"),
        "every refused owner is dropped at once"
    );
}

/// CUDA: foreign streams, their writes seen in order both ways.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use cudarc::driver::sys;
    use unibuf::interop::ForeignSignal;
    use unibuf::Device;

    pub fn check(r: sys::CUresult, call: &str) -> Result<(), ExternalError> {
        if r == sys::CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            Err(format!("{call} returned {r:?}").into())
        }
    }

    /// Makes the device's primary context current on this thread (as another framework using
    /// the runtime API would have it).
    pub fn bind(dev: &Device) {
        let NativeDevice::Cuda { context, .. } = dev.native() else {
            panic!("not a CUDA device");
        };
        // SAFETY: the device's live primary context.
        check(
            unsafe { sys::cuCtxSetCurrent(context.as_ptr().cast()) },
            "cuCtxSetCurrent",
        )
        .unwrap();
    }

    pub fn alloc(bytes: usize) -> u64 {
        bind(&device());
        let mut p = 0;
        // SAFETY: a valid out-pointer; the primary context is current.
        check(unsafe { sys::cuMemAlloc_v2(&mut p, bytes) }, "cuMemAlloc").unwrap();
        p
    }

    /// Memory from cuMemAlloc, freed on drop.
    pub struct DeviceMemory(pub u64);
    impl Drop for DeviceMemory {
        fn drop(&mut self) {
            // SAFETY: our allocation; its users have finished (the owner is dropped after the
            // last fence).
            unsafe { sys::cuMemFree_v2(self.0) };
        }
    }

    /// A stream of the primary context, as another framework owns one.
    pub struct Stream(pub sys::CUstream);
    impl Stream {
        pub fn new(dev: &Device) -> Stream {
            bind(dev);
            let mut s = std::ptr::null_mut();
            // SAFETY: a valid out-pointer; the context is current.
            check(
                unsafe {
                    sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
                },
                "cuStreamCreate",
            )
            .unwrap();
            Stream(s)
        }
        pub fn handle(&self) -> NativeHandle {
            NativeHandle::from_ptr(self.0.cast())
        }
    }
    impl Drop for Stream {
        fn drop(&mut self) {
            // SAFETY: ours; synchronised first.
            unsafe {
                sys::cuStreamSynchronize(self.0);
                sys::cuStreamDestroy_v2(self.0);
            }
        }
    }

    /// Keeps `stream` busy for a while (large copies), so that work ordered wrongly after it is
    /// seen.
    fn busy(stream: &Stream, scratch: &DeviceMemory, bytes: usize) {
        for _ in 0..8 {
            // SAFETY: both halves of our scratch allocation, on our stream.
            check(
                unsafe {
                    sys::cuMemcpyDtoDAsync_v2(scratch.0 + bytes as u64, scratch.0, bytes, stream.0)
                },
                "cuMemcpyDtoDAsync",
            )
            .unwrap();
        }
    }

    /// A unibuf queue waits for a foreign stream's writes (by stream and by event), and a
    /// foreign stream waits for a unibuf fence, with no device-wide sync.
    #[test]
    fn foreign_streams_are_joined_in_order() {
        let dev = device();
        let mut rng = Rng::new("foreign_streams_are_joined_in_order");
        let q = dev.queue();
        let theirs = Stream::new(&dev);
        const BIG: usize = 256 << 20;
        let scratch = DeviceMemory(alloc(2 * BIG));
        let n = rng.range(1 << 18, 1 << 20);
        let b = dev.alloc(DType::U32, &[n], StorageMode::Private).unwrap();
        for by_event in [false, true] {
            let value = rng.next_u64() as u32 | 1;
            poison(&dev, &b);
            dev.drain().unwrap();
            let NativeBuffer::Cuda { device_ptr, .. } = b.native().unwrap() else {
                panic!()
            };
            busy(&theirs, &scratch, BIG);
            // SAFETY: b is alive and idle (drained); the stream is ours.
            check(
                unsafe { sys::cuMemsetD32Async(device_ptr, value, n, theirs.0) },
                "cuMemsetD32Async",
            )
            .unwrap();
            let signal = if by_event {
                let mut ev = std::ptr::null_mut();
                // SAFETY: valid out-pointer; then a record on our live stream.
                unsafe {
                    check(sys::cuEventCreate(&mut ev, 0), "cuEventCreate").unwrap();
                    check(sys::cuEventRecord(ev, theirs.0), "cuEventRecord").unwrap();
                }
                ForeignSignal::CudaEvent(NativeHandle::from_ptr(ev.cast()))
            } else {
                ForeignSignal::CudaStream(theirs.handle())
            };
            // SAFETY: live objects of this context.
            unsafe { q.wait_foreign(signal.clone()) }.unwrap();
            assert!(
                q.download::<u32>(&b).unwrap().iter().all(|&v| v == value),
                "event: {by_event}"
            );
            if let ForeignSignal::CudaEvent(ev) = signal {
                // SAFETY: ours; the wait captured it already.
                unsafe { sys::cuEventDestroy_v2(ev.as_ptr().cast()) };
            }
        }
        // The other way: a unibuf fill, then the foreign stream reads b after waiting.
        let value = rng.next_u64() as u32 | 1;
        let slow = dev.new_queue("slow").unwrap();
        let big = dev.alloc(DType::U8, &[BIG], StorageMode::Private).unwrap();
        for _ in 0..8 {
            slow.fill_async(&big, FillPattern::u8(1)).unwrap();
        }
        let fence = slow.fill_async(&b, FillPattern::u32(value)).unwrap();
        // SAFETY: our live stream.
        unsafe { dev.order_native(fence, NativeWaiter::CudaStream(theirs.handle())) }.unwrap();
        let mut host = vec![0u32; n];
        let NativeBuffer::Cuda { device_ptr, .. } = b.native().unwrap() else {
            panic!()
        };
        // SAFETY: pageable host memory of n u32s; synchronous on our stream after the wait.
        unsafe {
            check(
                sys::cuMemcpyDtoHAsync_v2(host.as_mut_ptr().cast(), device_ptr, n * 4, theirs.0),
                "cuMemcpyDtoHAsync",
            )
            .unwrap();
            check(sys::cuStreamSynchronize(theirs.0), "cuStreamSynchronize").unwrap();
        }
        assert!(host.iter().all(|&v| v == value));
    }

    /// A dropped foreign stream or event handle is the caller's; a null one is refused.
    #[test]
    fn null_foreign_signals_are_refused() {
        let dev = device();
        // SAFETY: refused before use.
        let e = unsafe {
            dev.queue()
                .wait_foreign(ForeignSignal::CudaStream(NativeHandle::from_addr(0)))
        }
        .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    }
}
