//! The conformance harness: one suite, written against the public API, run on the backend
//! named by `UNIBUF_BACKEND` (default `cpu`). Naming a backend that is absent fails the run; it
//! never skips.
//!
//! Inputs are random and fresh on every run; the seed is printed and `UNIBUF_SEED` replays it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use unibuf::{Buffer, DType, Device, DeviceBuilder, Element, Error, FillPattern, StorageMode};

/// The backend under test.
pub fn backend_name() -> String {
    std::env::var(unibuf::BACKEND_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "cpu".to_owned())
}

/// A builder for the backend under test.
pub fn builder() -> DeviceBuilder {
    Device::builder().backend(&backend_name())
}

/// Opens the backend under test; fails (never skips) if it is absent.
pub fn device() -> Device {
    match builder().open() {
        Ok(d) => d,
        Err(e) => panic!(
            "backend '{}' under test is not available: {e}",
            backend_name()
        ),
    }
}

/// The storage modes a buffer can be created in (Auto resolves to one of the first two).
pub const MODES: [StorageMode; 3] = [
    StorageMode::Shared,
    StorageMode::Private,
    StorageMode::External,
];

/// Creates a buffer in `mode`; External buffers wrap fresh page-aligned host memory.
pub fn buffer(
    dev: &Device,
    mode: StorageMode,
    dtype: DType,
    shape: &[usize],
    label: &str,
) -> Buffer {
    match mode {
        StorageMode::External => {
            let bytes = shape.iter().product::<usize>() * dtype.size();
            let memory = unibuf::PageBuffer::new(bytes).expect("host memory");
            dev.wrap_external(label, memory, dtype, shape)
                .expect("wrap_external")
        }
        m => dev.alloc_labelled(label, dtype, shape, m).expect("alloc"),
    }
}

/// Poisons a whole buffer with a recognisable byte pattern (0xA5), so that unwritten elements
/// show up in comparisons.
pub fn poison(dev: &Device, b: &Buffer) {
    let bytes = b.cast(DType::U8).expect("every view casts to bytes");
    dev.queue()
        .fill(&bytes, FillPattern::u8(0xA5))
        .expect("poison fill");
}

/// The byte [`poison_nan`] fills with: 0xFF bytes are a NaN in f32, f16 and bf16 alike.
pub const NAN_POISON: u8 = 0xFF;

/// Poisons a whole buffer with NaN (for float outputs): an element the kernel leaves unwritten
/// then fails every tolerance check, however small the expected value (0xA5 bytes, as f32 or
/// bf16, are -2.9e-16, which a small absolute tolerance would accept).
pub fn poison_nan(dev: &Device, b: &Buffer) {
    let bytes = b.cast(DType::U8).expect("every view casts to bytes");
    dev.queue()
        .fill(&bytes, FillPattern::u8(NAN_POISON))
        .expect("poison fill");
}

static SEED: AtomicU64 = AtomicU64::new(0);

/// A small seeded generator (SplitMix64). Written here rather than pulling in a random-number
/// crate: the suite needs one reproducible stream per test, seeded from `UNIBUF_SEED`, and
/// nothing statistical.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `UNIBUF_SEED` or the clock, mixed with `stream` so that tests
    /// draw independent inputs. The seed is printed for replay.
    pub fn new(stream: &str) -> Rng {
        let mut seed = SEED.load(Ordering::Relaxed);
        if seed == 0 {
            seed = std::env::var("UNIBUF_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(1, |d| d.as_nanos() as u64)
                        | 1
                });
            SEED.store(seed, Ordering::Relaxed);
        }
        eprintln!("[{stream}] UNIBUF_SEED={seed}");
        let mut h = seed;
        for b in stream.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        Rng(h)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform integer in `lo..hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo) as u64) as usize
    }

    /// A uniform f32 in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// `n` random bytes, never all zero.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v: Vec<u8> = (0..n).map(|_| self.next_u64() as u8).collect();
        if let Some(first) = v.first_mut() {
            *first |= 1;
        }
        v
    }

    /// `n` random elements of `T` (random bit patterns; floats are finite values in [-1, 1)).
    pub fn elements<T: Element>(&mut self, n: usize) -> Vec<T> {
        let size = std::mem::size_of::<T>();
        match T::DTYPE {
            DType::F32 => bytemuck_vec((0..n).map(|_| self.f32()).collect::<Vec<f32>>()),
            DType::F64 => bytemuck_vec((0..n).map(|_| f64::from(self.f32())).collect::<Vec<f64>>()),
            DType::F16 => bytemuck_vec(
                (0..n)
                    .map(|_| half::f16::from_f32(self.f32()))
                    .collect::<Vec<_>>(),
            ),
            DType::BF16 => bytemuck_vec(
                (0..n)
                    .map(|_| half::bf16::from_f32(self.f32()))
                    .collect::<Vec<_>>(),
            ),
            _ => {
                let bytes = self.bytes(n * size);
                let mut out = vec![T::zeroed(); n];
                bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&bytes);
                out
            }
        }
    }
}

/// A file in the temp directory, removed on drop (also when the test fails). Its name carries
/// the process id and a random draw, so that tests running side by side never share one.
pub struct TempFile(PathBuf);

impl TempFile {
    /// The path `unibuf-{tag}-{pid}-{draw}.{extension}`; nothing is created until the test
    /// writes it.
    pub fn new(rng: &mut Rng, tag: &str, extension: &str) -> TempFile {
        TempFile(std::env::temp_dir().join(format!(
            "unibuf-{tag}-{}-{:x}.{extension}",
            std::process::id(),
            rng.next_u64()
        )))
    }

    /// A file holding `bytes`.
    pub fn with_bytes(rng: &mut Rng, tag: &str, extension: &str, bytes: &[u8]) -> TempFile {
        let file = TempFile::new(rng, tag, extension);
        std::fs::write(file.path(), bytes).expect("write temp file");
        file
    }

    /// Where the file is (or will be).
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The file, opened for reading.
    pub fn open(&self) -> std::fs::File {
        std::fs::File::open(&self.0).expect("open temp file")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // The file may never have been written (a test that failed before writing it).
        let _ = std::fs::remove_file(&self.0);
    }
}

fn bytemuck_vec<A: Element, B: Element>(v: Vec<A>) -> Vec<B> {
    bytemuck::cast_slice(&v).to_vec()
}

/// A float buffer (F32, F16 or BF16) of `shape` holding `v` rounded to `dtype`, uploaded.
pub fn upload_f64(dev: &Device, label: &str, dtype: DType, shape: &[usize], v: &[f64]) -> Buffer {
    let b = match dtype {
        DType::F32 => {
            let h: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            dev.from_slice(label, &h, shape)
        }
        DType::F16 => {
            let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f64(x)).collect();
            dev.from_slice(label, &h, shape)
        }
        DType::BF16 => {
            let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f64(x)).collect();
            dev.from_slice(label, &h, shape)
        }
        other => panic!("upload_f64: {other} is not a float dtype"),
    };
    b.expect("upload")
}

/// A float buffer's (F32, F16 or BF16) values, as f64.
pub fn download_f64(q: &unibuf::Queue, b: &Buffer) -> Vec<f64> {
    match b.dtype() {
        DType::F32 => q
            .download::<f32>(b)
            .expect("download")
            .into_iter()
            .map(f64::from)
            .collect(),
        DType::F16 => q
            .download::<half::f16>(b)
            .expect("download")
            .into_iter()
            .map(half::f16::to_f64)
            .collect(),
        DType::BF16 => q
            .download::<half::bf16>(b)
            .expect("download")
            .into_iter()
            .map(half::bf16::to_f64)
            .collect(),
        other => panic!("download_f64: {other} is not a float dtype"),
    }
}

/// A NaN-poisoned output buffer of `dtype` x `shape` (Auto storage), labelled "out".
pub fn poisoned(dev: &Device, dtype: DType, shape: &[usize]) -> Buffer {
    let b = dev
        .alloc_labelled("out", dtype, shape, StorageMode::Auto)
        .expect("alloc");
    poison_nan(dev, &b);
    b
}

/// The unit roundoff of f32 arithmetic.
pub const F32_ROUNDOFF: f64 = 1.0 / (1u64 << 24) as f64;

/// The unit roundoff (half an ulp, relative) of a storage dtype (f32, f16, else bf16).
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => F32_ROUNDOFF,
        DType::F16 => 1.0 / 2048.0,
        _ => 1.0 / 256.0,
    }
}

/// An absolute floor for a value rounded to `dtype`: half the smallest f16 subnormal (f32 and
/// bf16 subnormals are far below every tolerance of the suite).
pub fn subnormal_floor(dtype: DType) -> f64 {
    if dtype == DType::F16 {
        1.0 / (1u64 << 25) as f64
    } else {
        0.0
    }
}

/// Every element of `got` within `err[i]` (the bound of the f32 computation) plus one rounding
/// to `dtype` of the reference `want`; NaN fails.
pub fn assert_within(what: &str, dtype: DType, got: &[f64], want: &[f64], err: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let u = unit_roundoff(dtype);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = err[i] * 1.01 + u * (w.abs() + err[i]) + subnormal_floor(dtype);
        assert!(
            (g - w).abs() <= tol,
            "{what}: element {i} of {}: got {g}, want {w} (tolerance {tol:e})",
            got.len()
        );
    }
}

/// `n` distinct positions below `capacity`, in random order.
pub fn distinct_positions(rng: &mut Rng, n: usize, capacity: usize) -> Vec<u32> {
    let mut all: Vec<u32> = (0..capacity as u32).collect();
    for i in 0..n {
        let j = rng.range(i, capacity);
        all.swap(i, j);
    }
    all.truncate(n);
    all
}

/// An unlabelled buffer of Auto storage.
pub fn alloc(dev: &Device, dtype: DType, shape: &[usize]) -> Buffer {
    dev.alloc(dtype, shape, StorageMode::Auto).expect("alloc")
}

/// Asserts that an op was refused with a dtype mismatch.
#[track_caller]
pub fn assert_dtype_mismatch<T: std::fmt::Debug>(r: unibuf::Result<T>) {
    match r {
        Err(Error::DTypeMismatch { .. }) => {}
        other => panic!("expected a dtype mismatch, got {other:?}"),
    }
}

/// Asserts that an op was refused with a shape mismatch.
#[track_caller]
pub fn assert_shape_mismatch<T: std::fmt::Debug>(r: unibuf::Result<T>) {
    match r {
        Err(Error::ShapeMismatch { .. }) => {}
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
}

/// Asserts that an op was refused as an invalid argument whose message mentions `mentions`.
#[track_caller]
pub fn assert_invalid<T: std::fmt::Debug>(r: unibuf::Result<T>, mentions: &str) {
    match r {
        Err(e @ Error::InvalidArgument { .. }) => assert!(
            e.to_string().contains(mentions),
            "'{e}' should mention '{mentions}'"
        ),
        other => panic!("expected an invalid argument mentioning '{mentions}', got {other:?}"),
    }
}
