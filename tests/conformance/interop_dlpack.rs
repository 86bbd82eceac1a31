//! DLPack exchange, both ways.
//!
//! Exports are imported back (unibuf is its own consumer); imports also take tensors built by
//! hand the way a C producer builds them: a `DLManagedTensor[Versioned]` at the head of a boxed
//! struct that owns the shape, the strides and the memory, with an `extern "C"` deleter that
//! counts its calls. On the CPU backend that memory is a `Vec`; on a GPU backend it is a
//! Private allocation standing in for another framework's.

use std::ffi::c_void;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use unibuf::interop::dlpack::ffi::{
    DLDataType, DLDataTypeCode, DLDevice, DLDeviceType, DLManagedTensor, DLManagedTensorVersioned,
    DLPackVersion, DLTensor,
};
use unibuf::interop::dlpack::{
    CopyPolicy, DlpackFlags, DlpackLegacyTensor, DlpackStream, DlpackTensor, ImportOptions,
    MAX_GATHER_COPIES,
};
use unibuf::interop::{ForeignSignal, HostSignal, NativeBuffer, NativeDevice, NativeHandle};
use unibuf::{
    Buffer, CopyRecord, DType, Device, Direction, Element, Error, FillPattern, StorageMode,
};
use unibuf_conformance::{backend_name, buffer, device, poison, Rng, MODES};

// ---- a hand-built producer -------------------------------------------------------------------

/// The producer's memory: a `Vec` on the CPU, another allocation on a GPU. Only held, never
/// read: dropping it is what the deleter frees.
#[allow(dead_code)]
enum Memory {
    Host(Vec<u64>),
    Device(Buffer),
}

/// What a C producer allocates per tensor: the managed header first (so the header pointer is
/// the struct's), then what the header points to.
#[repr(C)]
struct Produced<H> {
    header: H,
    _shape: Vec<i64>,
    _strides: Option<Vec<i64>>,
    _memory: Memory,
    deleted: Arc<AtomicUsize>,
}

unsafe extern "C" fn delete_versioned(p: *mut DLManagedTensorVersioned) {
    // SAFETY: `p` is the header of a Produced<DLManagedTensorVersioned> made by `produce`.
    let produced = unsafe { Box::from_raw(p.cast::<Produced<DLManagedTensorVersioned>>()) };
    produced.deleted.fetch_add(1, Ordering::SeqCst);
}

unsafe extern "C" fn delete_legacy(p: *mut DLManagedTensor) {
    // SAFETY: as above, for the legacy header.
    let produced = unsafe { Box::from_raw(p.cast::<Produced<DLManagedTensor>>()) };
    produced.deleted.fetch_add(1, Ordering::SeqCst);
}

/// A tensor to build. `Spec::new` is a valid, writable, contiguous tensor with explicit
/// strides on this device; the fields spoil it.
#[derive(Clone)]
struct Spec {
    dtype: DLDataType,
    shape: Vec<i64>,
    strides: Option<Vec<i64>>,
    /// Added to the memory's own offset.
    byte_offset: u64,
    device: Option<DLDevice>,
    null_data: bool,
    flags: DlpackFlags,
    major: u32,
}

fn compact(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![0; shape.len()];
    let mut s = 1;
    for i in (0..shape.len()).rev() {
        strides[i] = s;
        s *= shape[i];
    }
    strides
}

impl Spec {
    fn new(dtype: DLDataType, shape: &[i64]) -> Spec {
        Spec {
            dtype,
            shape: shape.to_vec(),
            strides: Some(compact(shape)),
            byte_offset: 0,
            device: None,
            null_data: false,
            flags: DlpackFlags::empty(),
            major: 1,
        }
    }
    fn strides(mut self, strides: Option<&[i64]>) -> Spec {
        self.strides = strides.map(<[i64]>::to_vec);
        self
    }
}

/// The producer's side of a built tensor: its deleter count, and a way to look at its memory.
struct Made {
    deleted: Arc<AtomicUsize>,
    /// The host address of the memory on the CPU backend (valid until the deleter runs).
    host: Option<usize>,
    /// The stand-in allocation on a GPU backend (a clone: readable after the deleter too).
    device: Option<Buffer>,
}

impl Made {
    fn deletes(&self) -> usize {
        self.deleted.load(Ordering::SeqCst)
    }
    /// The first `n` bytes of the producer's memory (before the deleter runs on the CPU).
    fn bytes(&self, dev: &Device, n: usize) -> Vec<u8> {
        match (&self.host, &self.device) {
            // SAFETY: the Vec lives until the deleter runs; the callers check it has not.
            (Some(addr), _) => {
                unsafe { std::slice::from_raw_parts(*addr as *const u8, n) }.to_vec()
            }
            (_, Some(b)) => dev.queue().download::<u8>(&b.slice(0..n).unwrap()).unwrap(),
            _ => unreachable!(),
        }
    }
}

/// The memory of a tensor holding `bytes`: its `data`, the offset within it and its device.
fn memory(dev: &Device, bytes: &[u8]) -> (Memory, *mut c_void, u64, DLDevice, Made) {
    let deleted = Arc::new(AtomicUsize::new(0));
    match dev.native() {
        NativeDevice::Cpu => {
            let mut v = vec![0u64; bytes.len().div_ceil(8) + 1];
            bytemuck::cast_slice_mut::<u64, u8>(&mut v)[..bytes.len()].copy_from_slice(bytes);
            let data = v.as_mut_ptr().cast::<c_void>();
            let made = Made {
                deleted,
                host: Some(data as usize),
                device: None,
            };
            (Memory::Host(v), data, 0, DLDevice::CPU, made)
        }
        native => {
            let b = dev
                .alloc_labelled(
                    "producer",
                    DType::U8,
                    &[bytes.len() + 8],
                    StorageMode::Private,
                )
                .unwrap();
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len() + 8, 0);
            dev.queue().upload(&b, &padded).unwrap();
            let (data, offset, device) = match (b.native().unwrap(), native) {
                (NativeBuffer::Cuda { device_ptr, .. }, NativeDevice::Cuda { device, .. }) => (
                    device_ptr as usize as *mut c_void,
                    0,
                    DLDevice::cuda(device),
                ),
                (NativeBuffer::Metal { buffer, offset, .. }, _) => {
                    (buffer.as_ptr(), offset as u64, DLDevice::metal(0))
                }
                other => panic!("unexpected native memory {other:?}"),
            };
            let made = Made {
                deleted,
                host: None,
                device: Some(b.clone()),
            };
            (Memory::Device(b), data, offset, device, made)
        }
    }
}

/// Builds a tensor over memory holding `bytes`, its header made by `header`.
fn produce<H>(
    dev: &Device,
    spec: &Spec,
    bytes: &[u8],
    header: impl FnOnce(DLTensor) -> H,
) -> (*mut H, Made) {
    let (memory, data, offset, device, made) = memory(dev, bytes);
    let mut shape = spec.shape.clone();
    let mut strides = spec.strides.clone();
    let tensor = DLTensor {
        data: if spec.null_data { null_mut() } else { data },
        device: spec.device.unwrap_or(device),
        ndim: shape.len() as i32,
        dtype: spec.dtype,
        // The vectors' heap storage does not move with them into the box.
        shape: shape.as_mut_ptr(),
        strides: strides.as_mut().map_or(null_mut(), |s| s.as_mut_ptr()),
        byte_offset: offset + spec.byte_offset,
    };
    let produced = Box::new(Produced {
        header: header(tensor),
        _shape: shape,
        _strides: strides,
        _memory: memory,
        deleted: made.deleted.clone(),
    });
    (Box::into_raw(produced).cast::<H>(), made)
}

fn produce_versioned(
    dev: &Device,
    spec: &Spec,
    bytes: &[u8],
) -> (*mut DLManagedTensorVersioned, Made) {
    produce(dev, spec, bytes, |dl_tensor| DLManagedTensorVersioned {
        version: DLPackVersion {
            major: spec.major,
            minor: 3,
        },
        manager_ctx: null_mut(),
        deleter: Some(delete_versioned),
        flags: spec.flags,
        dl_tensor,
    })
}

fn produce_legacy(dev: &Device, spec: &Spec, bytes: &[u8]) -> (*mut DLManagedTensor, Made) {
    produce(dev, spec, bytes, |dl_tensor| DLManagedTensor {
        dl_tensor,
        manager_ctx: null_mut(),
        deleter: Some(delete_legacy),
    })
}

/// Builds and imports a versioned tensor.
fn import_versioned(
    dev: &Device,
    spec: &Spec,
    bytes: &[u8],
    opts: &ImportOptions,
) -> (Result<Buffer, Error>, Made) {
    let (ptr, made) = produce_versioned(dev, spec, bytes);
    // SAFETY: `ptr` is a live tensor we own, its memory as described (or spoilt on purpose,
    // which the import must refuse before touching it).
    let r =
        unsafe { DlpackTensor::from_raw(ptr) }.and_then(|t| unsafe { dev.from_dlpack(t, opts) });
    (r, made)
}

/// Builds and imports a legacy tensor.
fn import_legacy(
    dev: &Device,
    spec: &Spec,
    bytes: &[u8],
    opts: &ImportOptions,
) -> (Result<Buffer, Error>, Made) {
    let (ptr, made) = produce_legacy(dev, spec, bytes);
    // SAFETY: as above.
    let r = unsafe { DlpackLegacyTensor::from_raw(ptr) }
        .and_then(|t| unsafe { dev.from_dlpack_legacy(t, opts) });
    (r, made)
}

// ---- expectations ----------------------------------------------------------------------------

/// DLPack's name of a dtype, written out independently of the library's mapping.
fn dl_dtype(d: DType) -> DLDataType {
    let (code, bits) = match d {
        DType::F16 => (2, 16),
        DType::BF16 => (4, 16),
        DType::F32 => (2, 32),
        DType::F64 => (2, 64),
        DType::I8 => (0, 8),
        DType::I16 => (0, 16),
        DType::I32 => (0, 32),
        DType::I64 => (0, 64),
        DType::U8 => (1, 8),
        DType::U16 => (1, 16),
        DType::U32 => (1, 32),
        DType::U64 => (1, 64),
        other => panic!("no DLPack dtype written for {other}"),
    };
    DLDataType {
        code: DLDataTypeCode(code),
        bits,
        lanes: 1,
    }
}

/// The DLPack device an export of `b` must name, by backend.
fn expected_device(dev: &Device, b: &Buffer) -> DLDevice {
    match dev.native() {
        NativeDevice::Cpu => DLDevice::CPU,
        NativeDevice::Cuda { device, .. } if !b.is_host_accessible() => DLDevice::cuda(device),
        NativeDevice::Cuda { .. } => DLDevice {
            device_type: DLDeviceType::CUDAHOST,
            device_id: 0,
        },
        NativeDevice::Metal { .. } => DLDevice::metal(0),
        other => panic!("unexpected device {other:?}"),
    }
}

/// A device type this backend does not address, and this backend's own type with another id.
fn foreign_devices(dev: &Device) -> (DLDevice, DLDevice) {
    match dev.native() {
        NativeDevice::Cpu => (
            DLDevice::cuda(0),
            DLDevice {
                device_type: DLDeviceType::CPU,
                device_id: 3,
            },
        ),
        NativeDevice::Cuda { device, .. } => (
            DLDevice {
                device_type: DLDeviceType::VULKAN,
                device_id: 0,
            },
            DLDevice::cuda(device + 1),
        ),
        _ => (DLDevice::CPU, DLDevice::metal(1)),
    }
}

fn shared_records(dev: &Device) -> Vec<CopyRecord> {
    dev.ledger()
        .records()
        .into_iter()
        .filter(|r| r.direction == Direction::Shared)
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

// ---- round trips -----------------------------------------------------------------------------

/// Exports `x`, checks the descriptor, imports it back and checks the address and the values;
/// `x` is dropped before the values are read, so only the export keeps the memory.
fn round_trip<T: Element + PartialEq + std::fmt::Debug>(
    dev: &Device,
    rng: &mut Rng,
    mode: StorageMode,
    legacy: bool,
) {
    let rank = rng.range(1, 4);
    let mut shape: Vec<usize> = (0..rank).map(|_| rng.range(1, 7)).collect();
    shape[0] += 1;
    let whole = buffer(dev, mode, T::DTYPE, &shape, "exported");
    poison(dev, &whole);
    let data: Vec<T> = rng.elements(whole.len());
    dev.queue().upload(&whole, &data).unwrap();
    // Half the time a view with a byte offset: rows 1.. of the buffer.
    let (x, expected) = if rng.range(0, 2) == 0 {
        let row = whole.len() / shape[0];
        (whole.rows(1..shape[0]).unwrap(), data[row..].to_vec())
    } else {
        (whole.clone(), data.clone())
    };
    let address = x.native().unwrap();
    let what = format!("{mode:?} {} {:?} legacy={legacy}", T::DTYPE, x.shape());

    let check = |t: &DLTensor, view: dlpark_view::View| {
        assert_eq!(t.device, expected_device(dev, &x), "{what}");
        assert_eq!(t.dtype, dl_dtype(T::DTYPE), "{what}");
        let dims: Vec<i64> = x.shape().iter().map(|&d| d as i64).collect();
        assert_eq!(view.shape, dims, "{what}");
        assert_eq!(
            view.strides,
            Some(compact(&dims)),
            "{what}: explicit row-major strides"
        );
        if let NativeBuffer::Host { ptr, .. } = address {
            assert_eq!(
                t.data as usize + t.byte_offset as usize,
                ptr.addr(),
                "{what}"
            );
        }
    };
    let opts = ImportOptions::new().label("imported");
    let y = if legacy {
        let t = x.to_dlpack_legacy(DlpackStream::None).unwrap();
        check(t.tensor(), dlpark_view::of(t.view().unwrap()));
        drop((x, whole));
        // SAFETY: our own export, valid until its deleter runs.
        unsafe { dev.from_dlpack_legacy(t, &opts) }.unwrap()
    } else {
        let t = x.to_dlpack(DlpackStream::None).unwrap();
        assert_eq!(t.version().major, 1, "{what}");
        assert!(
            t.version().minor >= 2,
            "{what}: explicit strides are 1.2's rule"
        );
        assert_eq!(t.flags(), DlpackFlags::empty(), "{what}: writable");
        check(t.tensor(), dlpark_view::of(t.view().unwrap()));
        drop((x, whole));
        // SAFETY: as above.
        unsafe { dev.from_dlpack(t, &opts) }.unwrap()
    };
    assert_eq!(y.mode(), StorageMode::Foreign, "{what}");
    assert_eq!(y.label(), "imported");
    assert!(y.is_writable(), "{what}");
    assert_eq!(y.native().unwrap(), address, "{what}: the same memory");
    assert_eq!(dev.memory_stats().foreign_count, 1, "{what}");
    let back: Vec<T> = dev.queue().download(&y).unwrap();
    assert_eq!(back, expected, "{what}");
    drop(y);
    dev.drain().unwrap();
    assert_eq!(dev.memory_stats().foreign_count, 0, "{what}");
}

/// dlpark's view, copied out so that it outlives the tensor's borrow.
mod dlpark_view {
    pub struct View {
        pub shape: Vec<i64>,
        pub strides: Option<Vec<i64>>,
    }
    pub fn of(v: unibuf::interop::dlpack::dlpark::tensor::TensorRef<'_>) -> View {
        View {
            shape: v.shape().to_vec(),
            strides: v.strides().map(<[i64]>::to_vec),
        }
    }
}

/// Export then import keeps the memory (the same native address) and the values, for every
/// storage mode, several dtypes, whole buffers and views, and both ABIs.
#[test]
fn export_then_import_is_the_same_memory() {
    let dev = device();
    let mut rng = Rng::new("dlpack_export_then_import_is_the_same_memory");
    for legacy in [false, true] {
        for mode in MODES {
            round_trip::<f32>(&dev, &mut rng, mode, legacy);
            round_trip::<half::bf16>(&dev, &mut rng, mode, legacy);
            round_trip::<i64>(&dev, &mut rng, mode, legacy);
            round_trip::<u8>(&dev, &mut rng, mode, legacy);
            round_trip::<u16>(&dev, &mut rng, mode, legacy);
        }
    }
}

/// An exported tensor keeps the buffer's memory alive and out of reuse until its deleter runs,
/// whichever thread runs it.
#[test]
fn an_export_keeps_the_memory_until_its_deleter() {
    let dev = device();
    let x = dev
        .alloc_labelled("kept", DType::U32, &[1024], StorageMode::Shared)
        .unwrap();
    dev.queue().fill(&x, FillPattern::u32(7)).unwrap();
    let address = x.native().unwrap();
    let raw = x.to_dlpack(DlpackStream::None).unwrap().into_raw();
    drop(x);
    // Allocations of the same size must not get the exported memory while it is held.
    let others: Vec<Buffer> = (0..4)
        .map(|_| dev.alloc(DType::U32, &[1024], StorageMode::Shared).unwrap())
        .collect();
    for o in &others {
        assert_ne!(o.native().unwrap(), address);
    }
    let held = dev.memory_stats().active_count;
    let raw = raw as usize;
    std::thread::spawn(move || {
        // SAFETY: the pointer is our export's, handed to this thread, released once.
        unsafe { DlpackTensor::from_raw(raw as *mut DLManagedTensorVersioned) }.unwrap();
    })
    .join()
    .unwrap();
    assert_eq!(
        dev.memory_stats().active_count,
        held - 1,
        "freed by the deleter"
    );
}

// ---- hand-built tensors ----------------------------------------------------------------------

/// A tensor built by hand over the producer's memory is wrapped without a copy; its deleter
/// runs exactly once, after the last view drops and the work that used it completes. Legacy
/// tensors with NULL strides (row-major before DLPack 1.2) too.
#[test]
fn hand_built_tensors_are_wrapped_and_released_once() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("dlpack_hand_built_tensors_are_wrapped_and_released_once");
    for legacy in [false, true] {
        let (rows, cols) = (rng.range(2, 9), rng.range(1, 9));
        let values: Vec<f32> = rng.elements(rows * cols);
        let row_major = [cols as i64, 1];
        let spec = Spec::new(dl_dtype(DType::F32), &[rows as i64, cols as i64])
            .strides(if legacy { None } else { Some(&row_major) });
        let opts = ImportOptions::new().label("theirs");
        let (b, made) = if legacy {
            import_legacy(&dev, &spec, &f32_bytes(&values), &opts)
        } else {
            import_versioned(&dev, &spec, &f32_bytes(&values), &opts)
        };
        let b = b.unwrap();
        assert_eq!(made.deletes(), 0);
        assert_eq!(
            (b.mode(), b.dtype(), b.shape()),
            (StorageMode::Foreign, DType::F32, &[rows, cols][..])
        );
        let stats = dev.memory_stats();
        assert_eq!(
            (stats.foreign_count, stats.foreign_bytes),
            (1, rows * cols * 4)
        );
        assert_eq!(q.download::<f32>(&b).unwrap(), values, "legacy={legacy}");
        // Writes through unibuf land in the producer's memory.
        q.fill(&b.rows(0..1).unwrap(), FillPattern::of(0.5f32))
            .unwrap();
        let theirs: Vec<f32> = bytemuck::pod_collect_to_vec(&made.bytes(&dev, rows * cols * 4));
        assert_eq!(&theirs[..cols], &vec![0.5f32; cols][..]);
        assert_eq!(&theirs[cols..], &values[cols..]);

        let view = b.rows(1..rows).unwrap();
        drop(b);
        dev.drain().unwrap();
        assert_eq!(made.deletes(), 0, "a view still holds the memory");
        if backend_name() == "cpu" {
            // Pending work holds it too: a fill held back behind a host signal.
            let gate = HostSignal::new();
            q.wait_host_signal(&gate).unwrap();
            let fence = q.fill_async(&view, FillPattern::of(1.0f32)).unwrap();
            drop(view);
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(!dev.is_complete(fence).unwrap());
            assert_eq!(made.deletes(), 0, "the fill has not run yet");
            gate.set();
            dev.wait(fence).unwrap();
        } else {
            drop(view);
        }
        dev.drain().unwrap();
        assert_eq!(
            made.deletes(),
            1,
            "released after the last view and the last fence"
        );
        assert_eq!(dev.memory_stats().foreign_count, 0);
        dev.drain().unwrap();
        assert_eq!(made.deletes(), 1, "exactly once");
    }
}

/// Size-1 dimensions take any stride (PyTorch writes them freely): still zero-copy.
#[test]
fn unit_dimensions_with_any_stride_are_contiguous() {
    let dev = device();
    let mut rng = Rng::new("dlpack_unit_dimensions_with_any_stride_are_contiguous");
    let values: Vec<f32> = rng.elements(6);
    let spec = Spec::new(dl_dtype(DType::F32), &[1, 6, 1]).strides(Some(&[1000, 1, -5]));
    let (b, made) = import_versioned(&dev, &spec, &f32_bytes(&values), &ImportOptions::new());
    let b = b.unwrap();
    assert_eq!(b.mode(), StorageMode::Foreign);
    assert_eq!(dev.queue().download::<f32>(&b).unwrap(), values);
    assert!(
        dev.ledger()
            .records()
            .iter()
            .all(|r| r.direction != Direction::DeviceToDevice),
        "no copy out of the tensor"
    );
    drop(b);
    dev.drain().unwrap();
    assert_eq!(made.deletes(), 1);
}

/// READ_ONLY tensors (and read-only imports of legacy ones) refuse every write with
/// `Error::ReadOnly`, read fine, and export again as READ_ONLY.
#[test]
fn read_only_imports_refuse_writes() {
    let dev = device();
    let q = dev.queue();
    let values: Vec<u32> = (0..16).collect();
    let bytes: Vec<u8> = bytemuck::cast_slice(&values).to_vec();
    let mut spec = Spec::new(dl_dtype(DType::U32), &[4, 4]);
    spec.flags = DlpackFlags::READ_ONLY;
    let (b, made_v) = import_versioned(&dev, &spec, &bytes, &ImportOptions::new().label("ro"));
    let (c, made_l) = import_legacy(
        &dev,
        &Spec::new(dl_dtype(DType::U32), &[4, 4]),
        &bytes,
        &ImportOptions::new().label("ro legacy").read_only(true),
    );
    for b in [b.unwrap(), c.unwrap()] {
        assert!(!b.is_writable());
        let refused = |r: Result<(), Error>, what: &str| match r {
            Err(Error::ReadOnly { label, .. }) => assert_eq!(label, b.label(), "{what}"),
            other => panic!("{what} of a read-only import: {other:?}"),
        };
        refused(q.fill(&b, FillPattern::u32(1)), "fill");
        refused(q.upload(&b.rows(1..2).unwrap(), &[9u32; 4]), "upload");
        let other = dev
            .alloc(DType::U32, &[4, 4], StorageMode::Private)
            .unwrap();
        refused(q.copy(&other, &b), "copy into");
        if b.is_host_accessible() {
            refused(b.write::<u32>().map(drop), "host write");
        }
        assert_eq!(q.download::<u32>(&b).unwrap(), values, "reads work");
        q.copy(&b, &other).unwrap();
        let again = b.to_dlpack(DlpackStream::None).unwrap();
        assert_eq!(
            again.flags(),
            DlpackFlags::READ_ONLY,
            "re-exported read-only"
        );
    }
    dev.drain().unwrap();
    assert_eq!((made_v.deletes(), made_l.deletes()), (1, 1));
}

// ---- bad input -------------------------------------------------------------------------------

/// Every input unibuf cannot take is refused with its typed error, in both ABIs, and the
/// tensor's deleter has run exactly once when the error comes back.
#[test]
fn bad_tensors_are_refused_and_released_once() {
    let dev = device();
    let bytes = vec![0u8; 4096];
    let f32_spec = || Spec::new(dl_dtype(DType::F32), &[4, 8]);
    let (other_type, other_id) = foreign_devices(&dev);
    type Check = fn(&Error) -> bool;
    let cases: Vec<(&str, Spec, CopyPolicy, Check)> = vec![
        (
            "bool",
            Spec::new(
                DLDataType {
                    code: DLDataTypeCode::BOOL,
                    bits: 8,
                    lanes: 1,
                },
                &[4, 8],
            ),
            CopyPolicy::IfNeeded,
            |e| matches!(e, Error::Unsupported { what, .. } if what.contains("bool") && what.contains("code 6, bits 8, lanes 1")),
        ),
        (
            "complex64",
            Spec::new(
                DLDataType {
                    code: DLDataTypeCode::COMPLEX,
                    bits: 64,
                    lanes: 1,
                },
                &[4, 8],
            ),
            CopyPolicy::IfNeeded,
            |e| matches!(e, Error::Unsupported { what, .. } if what.contains("complex") && what.contains("code 5, bits 64")),
        ),
        (
            "float32x2",
            Spec::new(
                DLDataType {
                    code: DLDataTypeCode::FLOAT,
                    bits: 32,
                    lanes: 2,
                },
                &[4, 8],
            ),
            CopyPolicy::IfNeeded,
            |e| matches!(e, Error::Unsupported { what, .. } if what.contains("lanes 2")),
        ),
        (
            "float24",
            Spec::new(
                DLDataType {
                    code: DLDataTypeCode::FLOAT,
                    bits: 24,
                    lanes: 1,
                },
                &[4, 8],
            ),
            CopyPolicy::IfNeeded,
            |e| matches!(e, Error::Unsupported { what, .. } if what.contains("bits 24")),
        ),
        (
            "float8",
            Spec::new(
                DLDataType {
                    code: DLDataTypeCode::FLOAT8_E4M3FN,
                    bits: 8,
                    lanes: 1,
                },
                &[4, 8],
            ),
            CopyPolicy::IfNeeded,
            |e| matches!(e, Error::Unsupported { what, .. } if what.contains("float8")),
        ),
        (
            "unknown device type",
            Spec {
                device: Some(DLDevice {
                    device_type: DLDeviceType(99),
                    device_id: 0,
                }),
                ..f32_spec()
            },
            CopyPolicy::IfNeeded,
            |e| matches!(e, Error::Unsupported { what, .. } if what.contains("unknown device type") && what.contains("device type 99")),
        ),
        (
            "another device type",
            Spec {
                device: Some(other_type),
                ..f32_spec()
            },
            CopyPolicy::IfNeeded,
            |e| matches!(e, Error::Unsupported { what, .. } if what.contains("DLPack tensors on kDL")),
        ),
        (
            "another device id",
            Spec {
                device: Some(other_id),
                ..f32_spec()
            },
            CopyPolicy::IfNeeded,
            |e| matches!(e, Error::WrongDevice { what, .. } if what.contains("device id")),
        ),
        (
            "null data",
            Spec {
                null_data: true,
                ..f32_spec()
            },
            CopyPolicy::IfNeeded,
            |e| matches!(e, Error::InvalidArgument { what: "DLPack data", detail } if detail.contains("NULL")),
        ),
        (
            "misaligned",
            Spec {
                byte_offset: 2,
                ..f32_spec()
            },
            CopyPolicy::IfNeeded,
            |e| matches!(e, Error::Misaligned { align: 4, .. }),
        ),
        (
            "strided with Never",
            f32_spec().strides(Some(&[1, 4])),
            CopyPolicy::Never,
            |e| matches!(e, Error::InvalidArgument { what: "DLPack strides", detail } if detail.contains("shape [4, 8] with strides Some([1, 4])")),
        ),
        (
            "negative stride",
            Spec {
                byte_offset: 28 * 4,
                ..f32_spec().strides(Some(&[-8, 1]))
            },
            CopyPolicy::IfNeeded,
            |e| matches!(e, Error::Unsupported { what, .. } if what.contains("negative") && what.contains("[-8, 1]")),
        ),
        (
            "too many runs to gather",
            Spec::new(dl_dtype(DType::U8), &[300, 300]).strides(Some(&[1, 300])),
            CopyPolicy::IfNeeded,
            |e| matches!(e, Error::Unsupported { what, .. } if what.contains(&MAX_GATHER_COPIES.to_string())),
        ),
    ];
    let big = vec![0u8; 300 * 300];
    for (name, spec, copy, check) in cases {
        let opts = ImportOptions::new().label(name).copy(copy);
        let memory = if name.starts_with("too many") {
            &big
        } else {
            &bytes
        };
        for legacy in [false, true] {
            let (r, made) = if legacy {
                import_legacy(&dev, &spec, memory, &opts)
            } else {
                import_versioned(&dev, &spec, memory, &opts)
            };
            match r {
                Err(e) => assert!(check(&e), "{name} (legacy={legacy}): the wrong error: {e}"),
                Ok(b) => panic!("{name} (legacy={legacy}) was imported: {b:?}"),
            }
            assert_eq!(
                made.deletes(),
                1,
                "{name} (legacy={legacy}): the deleter ran once"
            );
        }
    }
    assert_eq!(dev.memory_stats().foreign_count, 0);

    // A versioned tensor of another major version is refused when it is taken, after its
    // deleter (whose place every version keeps) has run.
    let spec = Spec {
        major: 2,
        ..f32_spec()
    };
    let (ptr, made) = produce_versioned(&dev, &spec, &bytes);
    // SAFETY: a live tensor we own.
    match unsafe { DlpackTensor::from_raw(ptr) } {
        Err(Error::Unsupported { what, .. }) => assert!(what.contains("major version 2"), "{what}"),
        other => panic!("a DLPack 2.0 tensor was taken: {other:?}"),
    }
    assert_eq!(made.deletes(), 1);
    // SAFETY: null is accepted and refused.
    assert!(matches!(
        unsafe { DlpackTensor::from_raw(null_mut()) },
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        unsafe { DlpackLegacyTensor::from_raw(null_mut()) },
        Err(Error::InvalidArgument { .. })
    ));

    // Malformed metadata: a negative dimension.
    let (r, made) = import_versioned(
        &dev,
        &Spec::new(dl_dtype(DType::F32), &[4, -8]),
        &bytes,
        &ImportOptions::new(),
    );
    assert!(
        matches!(
            &r,
            Err(Error::InvalidArgument {
                what: "DLPack tensor",
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(made.deletes(), 1);
}

// ---- copies ----------------------------------------------------------------------------------

/// Strided tensors are gathered into a fresh buffer when the policy allows it: a recorded
/// device copy, after which the producer's deleter runs. `Always` copies contiguous ones too.
#[test]
fn strided_imports_copy_when_allowed() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("dlpack_strided_imports_copy_when_allowed");
    let source: Vec<f32> = rng.elements(64);
    let bytes = f32_bytes(&source);
    let at = |off: usize| source[off];
    let transposed: Vec<f32> = (0..4)
        .flat_map(|i| (0..3).map(move |j| (i, j)))
        .map(|(i, j)| at(i + 4 * j))
        .collect();
    let window: Vec<f32> = (0..3)
        .flat_map(|i| (0..5).map(move |j| (i, j)))
        .map(|(i, j)| at(2 + 8 * i + j))
        .collect();
    let broadcast: Vec<f32> = (0..3).flat_map(|_| (0..4).map(at)).collect();
    let every_other: Vec<f32> = (0..2)
        .flat_map(|i| (0..3).flat_map(move |j| (0..2).map(move |k| (i, j, k))))
        .map(|(i, j, k)| at(24 * i + 8 * j + 2 * k))
        .collect();
    /// A name, shape, strides, the first element's offset and the gathered values.
    type Case = (&'static str, Vec<i64>, Vec<i64>, u64, Vec<f32>);
    let cases: Vec<Case> = vec![
        ("transposed", vec![4, 3], vec![1, 4], 0, transposed),
        ("window", vec![3, 5], vec![8, 1], 2, window),
        ("broadcast", vec![3, 4], vec![0, 1], 0, broadcast),
        ("every other", vec![2, 3, 2], vec![24, 8, 2], 0, every_other),
    ];
    for legacy in [false, true] {
        for (name, shape, strides, first, expected) in &cases {
            dev.ledger().clear();
            let spec = Spec {
                byte_offset: first * 4,
                ..Spec::new(dl_dtype(DType::F32), shape).strides(Some(strides))
            };
            let opts = ImportOptions::new()
                .label(name)
                .copy(CopyPolicy::IfNeeded)
                .copy_mode(StorageMode::Private);
            let (b, made) = if legacy {
                import_legacy(&dev, &spec, &bytes, &opts)
            } else {
                import_versioned(&dev, &spec, &bytes, &opts)
            };
            let b = b.unwrap();
            assert_eq!(b.mode(), StorageMode::Private, "{name}: a fresh buffer");
            assert!(b.is_writable());
            let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            assert_eq!(b.shape(), &dims[..]);
            assert_eq!(
                &q.download::<f32>(&b).unwrap(),
                expected,
                "{name} legacy={legacy}"
            );
            let records = dev.ledger().records();
            let copy = records
                .iter()
                .find(|r| r.direction == Direction::DeviceToDevice)
                .unwrap_or_else(|| panic!("{name}: no copy recorded in {records:?}"));
            assert_eq!(
                (copy.src, copy.dst, copy.bytes, copy.label.as_str()),
                (
                    Some(StorageMode::Foreign),
                    Some(StorageMode::Private),
                    expected.len() as u64 * 4,
                    *name
                )
            );
            assert!(
                copy.site.file().ends_with("interop_dlpack.rs"),
                "{}",
                copy.site
            );
            assert!(copy.fence.is_some());
            assert_eq!(shared_records(&dev).len(), 1, "{name}: the import itself");
            dev.drain().unwrap();
            assert_eq!(made.deletes(), 1, "{name}: released once the copy is done");
            assert_eq!(
                &q.download::<f32>(&b).unwrap(),
                expected,
                "{name}: the copy stays"
            );
        }
    }

    // Always: a contiguous tensor copied, so writes to the copy leave the producer's memory.
    let spec = Spec::new(dl_dtype(DType::F32), &[8, 8]);
    let (b, made) = import_versioned(
        &dev,
        &spec,
        &bytes,
        &ImportOptions::new().copy(CopyPolicy::Always),
    );
    let b = b.unwrap();
    assert_ne!(b.mode(), StorageMode::Foreign);
    assert_eq!(q.download::<f32>(&b).unwrap(), source);
    q.fill(&b, FillPattern::of(0.0f32)).unwrap();
    if let Some(producer) = &made.device {
        assert_eq!(
            bytemuck::pod_collect_to_vec::<u8, f32>(
                &q.download::<u8>(&producer.slice(0..256).unwrap()).unwrap()
            ),
            source
        );
    }
    dev.drain().unwrap();
    assert_eq!(made.deletes(), 1);
}

// ---- empty tensors ---------------------------------------------------------------------------

/// An empty buffer exports with NULL data; an empty tensor (NULL data and all) imports as an
/// empty buffer of unibuf's own, and its deleter runs at once.
#[test]
fn empty_tensors() {
    let dev = device();
    let e = dev.alloc(DType::F32, &[0, 4], StorageMode::Shared).unwrap();
    let t = e.to_dlpack(DlpackStream::None).unwrap();
    assert!(t.tensor().data.is_null());
    assert_eq!(t.view().unwrap().shape(), &[0, 4]);
    // SAFETY: our own export.
    let back = unsafe { dev.from_dlpack(t, &ImportOptions::new()) }.unwrap();
    assert_eq!(back.shape(), &[0, 4]);
    let spec = Spec {
        null_data: true,
        ..Spec::new(dl_dtype(DType::I32), &[3, 0])
    };
    let (b, made) = import_versioned(&dev, &spec, &[], &ImportOptions::new());
    assert_eq!(b.unwrap().shape(), &[3, 0]);
    assert_eq!(made.deletes(), 1);
}

// ---- streams ---------------------------------------------------------------------------------

/// The export orders unibuf's pending work before the consumer: with no stream it waits on the
/// host, so the consumer reads what the work wrote; `NoSync` does not wait. A stream this
/// device cannot wait for is refused whether or not work is pending.
#[test]
fn exports_order_pending_work_before_the_consumer() {
    let dev = device();
    let q = dev.queue();
    let b = dev
        .alloc_labelled("ordered", DType::U32, &[256], StorageMode::Shared)
        .unwrap();
    q.fill(&b, FillPattern::u32(1)).unwrap();
    // A stream kind this device does not have.
    let alien = match dev.native() {
        NativeDevice::Cuda { .. } => {
            // SAFETY: refused before the handle could be used.
            unsafe { DlpackStream::metal_command_buffer(NativeHandle::from_addr(0x1000)) }
        }
        _ => DlpackStream::CudaLegacy,
    };
    assert!(matches!(b.to_dlpack(alien), Err(Error::Unsupported { .. })));
    // SAFETY: refused for its null handle.
    let null = unsafe { DlpackStream::cuda(NativeHandle::from_addr(0)) };
    assert!(matches!(
        b.to_dlpack(null),
        Err(Error::InvalidArgument { .. })
    ));

    if backend_name() == "cpu" {
        for (stream, waits) in [(DlpackStream::None, true), (DlpackStream::NoSync, false)] {
            let gate = HostSignal::new();
            q.wait_host_signal(&gate).unwrap();
            let fence = q.fill_async(&b, FillPattern::u32(0xBEEF)).unwrap();
            let setter = {
                let gate = gate.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    gate.set();
                })
            };
            let t = b.to_dlpack(stream).unwrap();
            if waits {
                assert!(
                    dev.is_complete(fence).unwrap(),
                    "the export waited for the fill"
                );
                let v = t.view().unwrap();
                // SAFETY: host memory of 256 u32s that the export keeps alive; the fill that
                // wrote it has completed.
                let seen = unsafe { std::slice::from_raw_parts(v.data_ptr().cast::<u32>(), 256) };
                assert!(seen.iter().all(|&x| x == 0xBEEF));
            } else {
                assert!(!dev.is_complete(fence).unwrap(), "NoSync does not wait");
            }
            setter.join().unwrap();
            dev.wait(fence).unwrap();
            drop(gate);
        }
        // A host read guard is no conflict; a host write guard is.
        {
            let _r = b.read::<u32>().unwrap();
            b.to_dlpack(DlpackStream::None).unwrap();
        }
        let w = b.write::<u32>().unwrap();
        assert!(matches!(
            b.to_dlpack(DlpackStream::None),
            Err(Error::HostAccessConflict { .. })
        ));
        drop(w);
    } else if matches!(dev.native(), NativeDevice::Cuda { .. }) {
        // The legacy and per-thread default streams are in every context.
        q.fill_async(&b, FillPattern::u32(5)).unwrap();
        b.to_dlpack(DlpackStream::CudaLegacy).unwrap();
        q.fill_async(&b, FillPattern::u32(6)).unwrap();
        b.to_dlpack(DlpackStream::CudaPerThread).unwrap();
    }
}

/// The Array API's stream numbers, CUDA's numbering.
#[test]
fn array_api_stream_numbers() {
    // SAFETY: the one handle made is never used.
    unsafe {
        assert_eq!(
            DlpackStream::from_array_api(None).unwrap(),
            DlpackStream::None
        );
        assert_eq!(
            DlpackStream::from_array_api(Some(-1)).unwrap(),
            DlpackStream::NoSync
        );
        assert_eq!(
            DlpackStream::from_array_api(Some(1)).unwrap(),
            DlpackStream::CudaLegacy
        );
        assert_eq!(
            DlpackStream::from_array_api(Some(2)).unwrap(),
            DlpackStream::CudaPerThread
        );
        assert_eq!(
            DlpackStream::from_array_api(Some(0x7f00)).unwrap(),
            DlpackStream::cuda(NativeHandle::from_addr(0x7f00))
        );
        for bad in [0, -2] {
            assert!(matches!(
                DlpackStream::from_array_api(Some(bad)),
                Err(Error::InvalidArgument { .. })
            ));
        }
    }
}

/// A producer that still has work in flight is waited for: every later use of the import,
/// on any queue, comes after its signal.
#[test]
fn imports_wait_for_the_producer() {
    let dev = device();
    if backend_name() != "cpu" {
        return; // host signals are the CPU backend's foreign streams
    }
    let done = HostSignal::new();
    let spec = Spec::new(dl_dtype(DType::U32), &[4]);
    let (ptr, made) = produce_versioned(&dev, &spec, bytemuck::cast_slice(&[1u32, 2, 3, 4]));
    // SAFETY: a live tensor we own; the producer's pending write is named in wait_for.
    let b = unsafe {
        dev.from_dlpack(
            DlpackTensor::from_raw(ptr).unwrap(),
            &ImportOptions::new().wait_for(ForeignSignal::Host(done.clone())),
        )
    }
    .unwrap();
    let other = dev.new_queue("other").unwrap();
    let out = dev.alloc(DType::U32, &[4], StorageMode::Shared).unwrap();
    let copied = other.copy_async(&b, &out).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(
        !dev.is_complete(copied).unwrap(),
        "another queue waits for the producer too"
    );
    let addr = made.host.unwrap();
    let producer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(30));
        // SAFETY: the producer's own memory, which the import keeps alive; unibuf waits for
        // `done` before it touches it.
        unsafe { std::slice::from_raw_parts_mut(addr as *mut u32, 4) }.copy_from_slice(&[9; 4]);
        done.set();
    });
    assert_eq!(&*b.read::<u32>().unwrap(), &[9; 4], "the host read waited");
    producer.join().unwrap();
    dev.wait(copied).unwrap();
    assert_eq!(&*out.read::<u32>().unwrap(), &[9; 4]);
    drop(b);
    dev.drain().unwrap();
    assert_eq!(made.deletes(), 1);
}

// ---- the ledger ------------------------------------------------------------------------------

/// Every exchange is a zero-byte `Direction::Shared` record at the caller's line: exports name
/// the buffer's mode as the source, imports `Foreign` as the destination.
#[test]
fn every_exchange_is_a_shared_record() {
    let dev = device();
    let x = dev
        .alloc_labelled("x", DType::F32, &[8], StorageMode::Private)
        .unwrap();
    dev.ledger().clear();
    let export_line = line!() + 1;
    let t = x.to_dlpack(DlpackStream::None).unwrap();
    let legacy_line = line!() + 1;
    let l = x.to_dlpack_legacy(DlpackStream::None).unwrap();
    let import_line = line!() + 2;
    // SAFETY: our own exports.
    let y = unsafe { dev.from_dlpack(t, &ImportOptions::new().label("y")) }.unwrap();
    let legacy_import_line = line!() + 1;
    let z = unsafe { dev.from_dlpack_legacy(l, &ImportOptions::new().label("z")) }.unwrap();
    let records = shared_records(&dev);
    let seen: Vec<_> = records
        .iter()
        .map(|r| (r.label.as_str(), r.src, r.dst, r.bytes, r.site.line()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("x", Some(StorageMode::Private), None, 0, export_line),
            ("x", Some(StorageMode::Private), None, 0, legacy_line),
            ("y", None, Some(StorageMode::Foreign), 0, import_line),
            ("z", None, Some(StorageMode::Foreign), 0, legacy_import_line),
        ]
    );
    assert!(records
        .iter()
        .all(|r| r.site.file().ends_with("interop_dlpack.rs") && r.fence.is_none()));
    assert_eq!(dev.ledger().total().count, 4, "nothing else: no copy");
    drop((y, z));
}
