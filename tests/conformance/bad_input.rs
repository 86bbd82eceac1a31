//! Bad input is an error, never a crash: every case below feeds one public call an invalid
//! argument and asserts the exact `Error` variant, the values it carries, and that its message
//! names the offending values. Where memory was involved, the area ends by checking that nothing
//! leaked (everything dropped, `trim`, then no active, reserved or wrapped bytes).
//!
//! Cases per area, on the CPU backend (the counts are asserted by each area's test):
//!
//! | area | cases |
//! |---|---|
//! | views (slice, rows, reshape, cast) | 15 |
//! | dtype and length of transfers | 11 |
//! | fills | 5 |
//! | copies | 5 |
//! | host access (guards, conflicts with device work) | 13 |
//! | external wrapping | 15 |
//! | kernels (registry, compile, launch checks) | 23 |
//! | device and builder options, waits | 11 |
//! | budgets and out of memory | 10 |
//! | cross-device misuse | 12 |
//! | faults (sticky, reset, panics) | 10 |
//! | a fault nobody waited for (`Device::fault` must still report it) | 2 |
//! | **total** | **132** |
//!
//! The launch checks run where the test kernel has a source (CPU and CUDA); the fault cases run
//! on the CPU only, where a kernel can return an error or panic and the device recovers with
//! `reset`. Each area's expected count says so. Caller memory wrapped here is page-aligned
//! (`PageBuffer`, file mappings) wherever it must register on a GPU, since CUDA registers whole
//! pages and refuses a page twice.

use std::ops::Range;
use std::sync::Arc;
use unibuf::{
    Budget, CpuKernelArgs, DType, Device, Error, FaultKind, Fence, FillPattern, HostMemory,
    KernelArg, KernelSource, LaunchDims, PageBuffer, Param, QueueId, ScalarType, StorageMode,
};
use unibuf_conformance::{backend_name, buffer, builder, device, Rng, MODES};

// ---- the case machinery -----------------------------------------------------------------------

/// The distinct cases one area checked. A case run once per storage mode counts once: its name
/// may carry a suffix after " @ " (the mode) that is not part of its identity.
struct Cases {
    area: &'static str,
    names: Vec<String>,
}

impl Cases {
    fn new(area: &'static str) -> Cases {
        Cases {
            area,
            names: Vec::new(),
        }
    }

    fn hit(&mut self, name: &str) {
        let key = name.split(" @ ").next().unwrap_or(name).to_owned();
        if !self.names.contains(&key) {
            self.names.push(key);
        }
    }

    fn finish(self, expected: usize) {
        assert_eq!(
            self.names.len(),
            expected,
            "area '{}' ran {} distinct cases, expected {expected}: {:#?}",
            self.area,
            self.names.len(),
            self.names
        );
    }
}

/// `case!(cases, name, call, Pattern [if guard], [needles...])`: `call` must fail with an error
/// matching the pattern (variant and values), whose message contains every needle. Evaluates to
/// the error.
macro_rules! case {
    ($cases:expr, $name:expr, $call:expr, $pat:pat $(if $guard:expr)?, [$($needle:expr),* $(,)?]) => {{
        let name: String = ($name).to_string();
        match $call {
            Ok(_) => panic!("{name}: expected an error, got Ok"),
            Err(e) => {
                assert!(
                    matches!(&e, $pat $(if $guard)?),
                    "{name}: wrong error: {e:?}"
                );
                let msg = e.to_string();
                $({
                    let needle: String = ($needle).to_string();
                    assert!(
                        msg.contains(&needle),
                        "{name}: message {msg:?} does not name {needle:?}"
                    );
                })*
                $cases.hit(&name);
                e
            }
        }
    }};
}

/// Drains, trims, and checks that the device holds no memory: no live or cached allocation, no
/// wrapped region, no staging chunk.
fn assert_no_leak(dev: &Device) {
    dev.drain().expect("drain");
    dev.trim();
    let s = dev.memory_stats();
    assert!(
        s.active_bytes == 0 && s.reserved_bytes == 0 && s.external_count == 0,
        "memory leaked after bad input:\n{s}"
    );
    assert_eq!(s.active_count, 0, "{s}");
    assert_eq!(s.staging_bytes, 0, "{s}");
}

fn on_cpu() -> bool {
    backend_name() == "cpu"
}

/// Whether the test kernel `SCALE` has a source for the backend under test.
fn can_launch() -> bool {
    matches!(backend_name().as_str(), "cpu" | "cuda" | "metal")
}

/// Page-aligned memory holding `values`.
fn page_memory(values: &[f32]) -> PageBuffer {
    PageBuffer::from_slice(bytemuck::cast_slice(values)).expect("host memory")
}

/// A temporary file of random bytes, removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(tag: &str, bytes: &[u8]) -> TempFile {
        let mut rng = Rng::new(tag);
        let path = std::env::temp_dir().join(format!(
            "unibuf-bad-input-{tag}-{}-{}.bin",
            std::process::id(),
            rng.next_u64()
        ));
        std::fs::write(&path, bytes).expect("write temp file");
        TempFile(path)
    }

    fn open(&self) -> std::fs::File {
        std::fs::File::open(&self.0).expect("open temp file")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const VIEWS: usize = 15;
const TRANSFERS: usize = 11;
const FILLS: usize = 5;
const COPIES: usize = 5;
const HOST: usize = 13;
const EXTERNAL: usize = 15;
const KERNELS_LAUNCH: usize = 23;
const KERNELS_NO_LAUNCH: usize = 7;
const DEVICE: usize = 11;
const BUDGETS: usize = 10;
const CROSS_DEVICE: usize = 12;
const FAULTS_CPU: usize = 10;
const UNOBSERVED_FAULT_CPU: usize = 2;
/// The total in the module documentation (CPU backend).
const TOTAL: usize = 132;

/// The per-area counts add up to the documented total, which is at least 45.
#[test]
fn bad_input_case_count() {
    let sum = VIEWS
        + TRANSFERS
        + FILLS
        + COPIES
        + HOST
        + EXTERNAL
        + KERNELS_LAUNCH
        + DEVICE
        + BUDGETS
        + CROSS_DEVICE
        + FAULTS_CPU
        + UNOBSERVED_FAULT_CPU;
    assert_eq!(sum, TOTAL);
    const { assert!(TOTAL >= 45) };
}

// ---- views ------------------------------------------------------------------------------------

#[test]
fn bad_input_views() {
    let dev = device();
    let mut c = Cases::new("views");
    {
        let v = dev
            .alloc_labelled("v", DType::F32, &[10], StorageMode::Shared)
            .unwrap();
        let m = dev
            .alloc_labelled("m", DType::F32, &[4, 8], StorageMode::Private)
            .unwrap();

        // Ranges out of bounds, as a table: (name, call, what, start, end, len).
        type View<'a> = Box<dyn Fn() -> unibuf::Result<unibuf::Buffer> + 'a>;
        let table: Vec<(&str, View<'_>, &str, usize, usize, usize)> = vec![
            (
                "slice past the end",
                Box::new(|| v.slice(3..12)),
                "slice",
                3,
                12,
                10,
            ),
            (
                "slice reversed",
                Box::new(|| v.slice(Range { start: 7, end: 3 })),
                "slice",
                7,
                3,
                10,
            ),
            (
                "empty slice past the end",
                Box::new(|| v.slice(11..11)),
                "slice",
                11,
                11,
                10,
            ),
            (
                "slice near usize::MAX",
                Box::new(|| v.slice(usize::MAX - 1..usize::MAX)),
                "slice",
                usize::MAX - 1,
                usize::MAX,
                10,
            ),
            (
                "rows past the end",
                Box::new(|| m.rows(2..5)),
                "rows",
                2,
                5,
                4,
            ),
            (
                "rows reversed",
                Box::new(|| m.rows(Range { start: 3, end: 1 })),
                "rows",
                3,
                1,
                4,
            ),
            (
                "rows to usize::MAX",
                Box::new(|| m.rows(1..usize::MAX)),
                "rows",
                1,
                usize::MAX,
                4,
            ),
        ];
        for (name, call, w, s, e, l) in &table {
            case!(
                c,
                name,
                call(),
                Error::OutOfBounds { what, start, end, len }
                    if what == w && start == s && end == e && len == l,
                [format!("{s}..{e}"), format!("length {l}")]
            );
        }

        let scalar = dev
            .alloc_labelled("scalar", DType::F32, &[], StorageMode::Shared)
            .unwrap();
        assert_eq!(scalar.len(), 1, "a 0-d buffer holds one element");
        case!(
            c,
            "rows of a 0-d buffer",
            scalar.rows(0..1),
            Error::InvalidArgument { what: "rows", detail } if detail.contains("0-dimensional"),
            ["rows", "0-dimensional"]
        );

        case!(
            c,
            "reshape to another element count",
            m.reshape(&[5, 7]),
            Error::ShapeMismatch { what: "reshape", expected, got }
                if expected == "32 elements (shape [4, 8])" && got == "35 elements (shape [5, 7])",
            ["32", "35", "[5, 7]"]
        );
        case!(
            c,
            "reshape whose element count overflows usize",
            m.reshape(&[usize::MAX, 2]),
            Error::InvalidArgument { what: "shape", detail } if detail.contains("overflows"),
            [usize::MAX.to_string(), "overflows"]
        );
        case!(
            c,
            "reshape whose byte size overflows usize",
            m.reshape(&[usize::MAX / 2, 1]),
            Error::InvalidArgument { what: "shape", detail } if detail.contains("F32"),
            [(usize::MAX / 2).to_string(), "overflows"]
        );

        let bytes = dev
            .alloc_labelled("bytes", DType::U8, &[2, 6], StorageMode::Shared)
            .unwrap();
        case!(
            c,
            "cast whose last dimension does not divide",
            bytes.cast(DType::F32),
            Error::ShapeMismatch { what: "cast: last dimension in bytes", expected, got }
                if expected == "a multiple of 4 (F32)" && got == "6 (6 x U8)",
            ["6 (6 x U8)", "a multiple of 4"]
        );
        let odd = bytes.slice(1..9).unwrap();
        assert_eq!(odd.byte_offset(), 1);
        case!(
            c,
            "cast of a u8 view at offset 1 to f32",
            odd.cast(DType::F32),
            Error::Misaligned {
                what: "cast: view offset for the new dtype",
                value: 1,
                align: 4
            },
            ["1 is not a multiple of 4"]
        );
        let halves = dev
            .alloc_labelled("halves", DType::F16, &[8], StorageMode::Private)
            .unwrap();
        case!(
            c,
            "cast of an f16 view at offset 2 to f64",
            halves.slice(1..5).unwrap().cast(DType::F64),
            Error::Misaligned {
                value: 2,
                align: 8,
                ..
            },
            ["2 is not a multiple of 8"]
        );
        // The same views are fine where the input is valid.
        assert_eq!(bytes.cast(DType::U16).unwrap().shape(), &[2, 3]);
        assert_eq!(
            halves.slice(4..8).unwrap().cast(DType::F64).unwrap().len(),
            1
        );
    }
    let empty = dev
        .alloc(DType::F64, &[0, usize::MAX / 4], StorageMode::Shared)
        .unwrap();
    case!(
        c,
        "cast of a zero-element buffer whose last dimension overflows in bytes",
        empty.cast(DType::U8),
        Error::InvalidArgument { what: "cast", detail } if detail.contains("overflows"),
        ["overflows"]
    );
    drop(empty);
    c.finish(VIEWS);
    assert_no_leak(&dev);
}

// ---- dtype and length of transfers ------------------------------------------------------------

#[test]
fn bad_input_transfer_dtype_and_length() {
    let dev = device();
    let q = dev.queue();
    let mut c = Cases::new("transfers");
    for mode in MODES {
        let b = buffer(&dev, mode, DType::F32, &[2, 4], "t");
        let tag = format!("@ {mode:?}");
        case!(
            c,
            format!("upload with the wrong dtype {tag}"),
            q.upload(&b, &[1u32; 8]),
            Error::DTypeMismatch {
                what: "upload",
                expected: DType::F32,
                got: DType::U32
            },
            ["expected dtype F32, got U32"]
        );
        case!(
            c,
            format!("upload too short {tag}"),
            q.upload(&b, &[1.0f32; 7]),
            Error::ShapeMismatch { what: "upload: elements", expected, got }
                if expected == "8 (shape [2, 4])" && got == "7",
            ["expected 8 (shape [2, 4]), got 7"]
        );
        case!(
            c,
            format!("upload too long {tag}"),
            q.upload(&b, &[1.0f32; 9]),
            Error::ShapeMismatch { what: "upload: elements", got, .. } if got == "9",
            ["got 9"]
        );
        case!(
            c,
            format!("upload of nothing {tag}"),
            q.upload::<f32>(&b, &[]),
            Error::ShapeMismatch { what: "upload: elements", got, .. } if got == "0",
            ["expected 8", "got 0"]
        );
        case!(
            c,
            format!("upload_async too short {tag}"),
            q.upload_async(&b, &[1.0f32; 3]),
            Error::ShapeMismatch { what: "upload: elements", got, .. } if got == "3",
            ["got 3"]
        );
        case!(
            c,
            format!("upload_async with the wrong dtype {tag}"),
            q.upload_async(&b, &[1.0f64; 8]),
            Error::DTypeMismatch {
                what: "upload",
                expected: DType::F32,
                got: DType::F64
            },
            ["F32", "F64"]
        );
        let mut short = [0.0f32; 5];
        case!(
            c,
            format!("download_into a short slice {tag}"),
            q.download_into(&b, &mut short),
            Error::ShapeMismatch { what: "download: elements", expected, got }
                if expected == "8 (shape [2, 4])" && got == "5",
            ["8", "got 5"]
        );
        let mut wrong = [0i32; 8];
        case!(
            c,
            format!("download_into the wrong dtype {tag}"),
            q.download_into(&b, &mut wrong),
            Error::DTypeMismatch {
                what: "download",
                expected: DType::F32,
                got: DType::I32
            },
            ["expected dtype F32, got I32"]
        );
        case!(
            c,
            format!("download as the wrong dtype {tag}"),
            q.download::<half::f16>(&b),
            Error::DTypeMismatch {
                what: "download",
                expected: DType::F32,
                got: DType::F16
            },
            ["F32", "F16"]
        );
        case!(
            c,
            format!("download_async as the wrong dtype {tag}"),
            q.download_async::<u16>(&b),
            Error::DTypeMismatch {
                what: "download",
                expected: DType::F32,
                got: DType::U16
            },
            ["F32", "U16"]
        );
        case!(
            c,
            format!("to_vec as the wrong dtype {tag}"),
            b.rows(1..2).unwrap().to_vec::<i64>(),
            Error::DTypeMismatch {
                what: "download",
                expected: DType::F32,
                got: DType::I64
            },
            ["F32", "I64"]
        );
        // Nothing was written by the refused calls; a valid round trip still works.
        let data: Vec<f32> = (0..8).map(|i| i as f32).collect();
        q.upload(&b, &data).unwrap();
        assert_eq!(q.download::<f32>(&b).unwrap(), data, "{mode:?}");
    }
    assert_eq!(dev.ledger().total().count as usize, 2 * MODES.len());
    c.finish(TRANSFERS);
    assert_no_leak(&dev);
}

// ---- fills ------------------------------------------------------------------------------------

#[test]
fn bad_input_fills() {
    let dev = device();
    let q = dev.queue();
    let mut c = Cases::new("fills");
    for mode in MODES {
        let u8s = buffer(&dev, mode, DType::U8, &[10], "bytes");
        let f16s = buffer(&dev, mode, DType::F16, &[8], "halves");
        // (name, view, pattern, what, value, align). Offsets are within the allocation: an
        // External buffer starts where the caller's memory lies in its first page.
        let (o8, o16) = (u8s.byte_offset(), f16s.byte_offset());
        assert!(o8 % 8 == 0 && o16 % 8 == 0);
        let table = [
            (
                "u32 pattern over 10 bytes",
                u8s.clone(),
                FillPattern::u32(7),
                "fill: view byte length for the pattern width",
                10,
                4,
            ),
            (
                "u32 pattern at byte offset 1",
                u8s.slice(1..9).unwrap(),
                FillPattern::u32(7),
                "fill: view byte offset for the pattern width",
                o8 + 1,
                4,
            ),
            (
                "u16 pattern over 3 bytes",
                u8s.slice(0..3).unwrap(),
                FillPattern::u16(7),
                "fill: view byte length for the pattern width",
                3,
                2,
            ),
            (
                "u64 pattern at byte offset 2",
                f16s.slice(1..5).unwrap(),
                FillPattern::of(1.0f64),
                "fill: view byte offset for the pattern width",
                o16 + 2,
                8,
            ),
        ];
        for (name, view, pattern, w, v, a) in &table {
            case!(
                c,
                format!("fill: {name} @ {mode:?}"),
                q.fill(view, *pattern),
                Error::Misaligned { what, value, align } if what == w && value == v && align == a,
                [format!("{v} is not a multiple of {a}")]
            );
        }
        case!(
            c,
            format!("fill_async: u64 pattern over 6 bytes @ {mode:?}"),
            q.fill_async(&u8s.slice(0..6).unwrap(), FillPattern::u64(1)),
            Error::Misaligned {
                what: "fill: view byte length for the pattern width",
                value: 6,
                align: 8
            },
            ["6 is not a multiple of 8"]
        );
        // Aligned fills of the same views succeed, and the refused ones wrote nothing.
        q.fill(&u8s, FillPattern::u8(3)).unwrap();
        q.fill(&u8s.slice(4..8).unwrap(), FillPattern::u32(0x0909_0909))
            .unwrap();
        assert_eq!(
            u8s.to_vec::<u8>().unwrap(),
            [3, 3, 3, 3, 9, 9, 9, 9, 3, 3],
            "{mode:?}"
        );
    }
    c.finish(FILLS);
    assert_no_leak(&dev);
}

// ---- copies -----------------------------------------------------------------------------------

#[test]
fn bad_input_copies() {
    let dev = device();
    let q = dev.queue();
    let mut c = Cases::new("copies");
    for mode in MODES {
        let src = buffer(&dev, mode, DType::F32, &[8], "src");
        let ints = buffer(&dev, mode, DType::I32, &[8], "ints");
        let six = buffer(&dev, mode, DType::F32, &[6], "six");
        let big = buffer(&dev, mode, DType::F32, &[16], "big");
        let tag = format!("@ {mode:?}");
        // Byte ranges are within the allocation (External: from the start of the first page).
        let o = big.byte_offset();
        case!(
            c,
            format!("copy between dtypes {tag}"),
            q.copy(&src, &ints),
            Error::DTypeMismatch {
                what: "copy destination",
                expected: DType::I32,
                got: DType::F32
            },
            ["expected dtype I32, got F32"]
        );
        case!(
            c,
            format!("copy between lengths {tag}"),
            q.copy(&src, &six),
            Error::ShapeMismatch { what: "copy: elements", expected, got }
                if expected == "8 (source shape [8])" && got == "6 (destination shape [6])",
            ["8 (source shape [8])", "6 (destination shape [6])"]
        );
        case!(
            c,
            format!("copy_async between lengths {tag}"),
            q.copy_async(&six, &src),
            Error::ShapeMismatch { what: "copy: elements", expected, got }
                if expected == "6 (source shape [6])" && got == "8 (destination shape [8])",
            ["6", "8"]
        );
        case!(
            c,
            format!("copy between overlapping views {tag}"),
            q.copy(&big.slice(0..8).unwrap(), &big.slice(4..12).unwrap()),
            Error::InvalidArgument { what: "copy", detail }
                if detail.contains(&format!("bytes {}..{} and destination bytes {}..{}", o, o + 32, o + 16, o + 48)),
            [format!("{}..{}", o, o + 32), format!("{}..{}", o + 16, o + 48), "overlap".to_owned(), "'big'".to_owned()]
        );
        case!(
            c,
            format!("copy of a view onto itself {tag}"),
            q.copy_async(&big, &big.reshape(&[4, 4]).unwrap()),
            Error::InvalidArgument { what: "copy", detail } if detail.contains(&format!("{}..{}", o, o + 64)),
            [format!("{}..{}", o, o + 64), "overlap".to_owned()]
        );
        // Disjoint halves of one allocation copy fine.
        let data: Vec<f32> = (0..16).map(|i| i as f32).collect();
        q.upload(&big, &data).unwrap();
        q.copy(&big.slice(0..8).unwrap(), &big.slice(8..16).unwrap())
            .unwrap();
        let back = big.to_vec::<f32>().unwrap();
        assert_eq!(&back[8..], &data[..8], "{mode:?}");
    }
    c.finish(COPIES);
    assert_no_leak(&dev);
}

// ---- host access ------------------------------------------------------------------------------

#[test]
fn bad_input_host_access() {
    let dev = device();
    let q = dev.queue();
    let mut c = Cases::new("host access");
    {
        let private = dev
            .alloc_labelled("private", DType::F32, &[4], StorageMode::Private)
            .unwrap();
        case!(
            c,
            "host read of a Private buffer",
            private.read::<f32>(),
            Error::NotHostAccessible {
                what: "host read",
                mode: StorageMode::Private
            },
            ["host read", "Private"]
        );
        case!(
            c,
            "host write of a Private buffer",
            private.write::<f32>(),
            Error::NotHostAccessible {
                what: "host write",
                mode: StorageMode::Private
            },
            ["host write", "Private"]
        );
        // A Private buffer is reached through transfers instead.
        q.upload(&private, &[1.0f32, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(private.to_vec::<f32>().unwrap(), [1.0, 2.0, 3.0, 4.0]);

        let b = dev
            .alloc_labelled("guarded", DType::F32, &[24], StorageMode::Shared)
            .unwrap();
        q.fill(&b, FillPattern::of(1.0f32)).unwrap();
        case!(
            c,
            "host read with the wrong element type",
            b.read::<u32>(),
            Error::DTypeMismatch {
                what: "host read",
                expected: DType::F32,
                got: DType::U32
            },
            ["expected dtype F32, got U32"]
        );
        case!(
            c,
            "host write with the wrong element type",
            b.write::<f64>(),
            Error::DTypeMismatch {
                what: "host write",
                expected: DType::F32,
                got: DType::F64
            },
            ["F32", "F64"]
        );

        let first = b.slice(0..8).unwrap(); // bytes 0..32
        let second = b.slice(8..16).unwrap(); // bytes 32..64
        let third = b.slice(16..24).unwrap(); // bytes 64..96, never guarded
        let other = dev
            .alloc_labelled("other", DType::F32, &[4], StorageMode::Shared)
            .unwrap();

        let reader = first.read::<f32>().unwrap();
        let writer = second.write::<f32>().unwrap();
        let straddle = b.slice(4..12).unwrap(); // bytes 16..48: under both guards

        case!(
            c,
            "host write under a read guard",
            straddle.write::<f32>(),
            Error::HostAccessConflict { what: "host write", label, start: 0, end: 32, held: "read-locked" }
                if label == "guarded",
            ["0..32", "'guarded'", "read-locked"]
        );
        case!(
            c,
            "host read under a write guard",
            b.slice(10..11).unwrap().read::<f32>(),
            Error::HostAccessConflict {
                what: "host read",
                start: 32,
                end: 64,
                held: "write-locked",
                ..
            },
            ["32..64", "write-locked"]
        );
        case!(
            c,
            "host write under a write guard",
            b.slice(15..17).unwrap().write::<f32>(),
            Error::HostAccessConflict {
                what: "host write",
                start: 32,
                end: 64,
                held: "write-locked",
                ..
            },
            ["32..64", "write-locked"]
        );
        let e = case!(
            c,
            "device fill under a read guard",
            q.fill(&b.slice(6..7).unwrap(), FillPattern::of(2.0f32)),
            Error::HostAccessConflict {
                what: "fill",
                start: 0,
                end: 32,
                held: "read-locked",
                ..
            },
            ["fill", "0..32", "read-locked"]
        );
        assert!(e.is_retryable(), "dropping the guard resolves it");
        case!(
            c,
            "device copy out of a write-guarded range",
            q.copy(&b.slice(10..14).unwrap(), &other),
            Error::HostAccessConflict {
                what: "copy",
                start: 32,
                end: 64,
                held: "write-locked",
                ..
            },
            ["copy", "32..64", "write-locked"]
        );
        case!(
            c,
            "device copy into a read-guarded range",
            q.copy(&other, &b.slice(0..4).unwrap()),
            Error::HostAccessConflict {
                what: "copy",
                start: 0,
                end: 32,
                held: "read-locked",
                ..
            },
            ["copy", "0..32"]
        );
        case!(
            c,
            "upload_async into a read-guarded range",
            q.upload_async(&b.slice(2..6).unwrap(), &[5.0f32; 4]),
            Error::HostAccessConflict {
                what: "upload",
                start: 0,
                end: 32,
                held: "read-locked",
                ..
            },
            ["upload", "0..32"]
        );
        case!(
            c,
            "upload into a write-guarded range",
            q.upload(&straddle, &[5.0f32; 8]),
            Error::HostAccessConflict { what: "upload", .. },
            ["upload", "'guarded'"]
        );
        case!(
            c,
            "download of a write-guarded range",
            q.download::<f32>(&b.slice(8..9).unwrap()),
            Error::HostAccessConflict {
                what: "download",
                start: 32,
                end: 64,
                held: "write-locked",
                ..
            },
            ["download", "32..64", "write-locked"]
        );

        // A range of the same allocation outside every guard is fine, as is a second reader.
        q.fill(&third, FillPattern::of(3.0f32)).unwrap();
        q.upload(&third.slice(0..2).unwrap(), &[4.0f32, 5.0])
            .unwrap();
        q.copy(&third.slice(0..4).unwrap(), &other).unwrap();
        assert_eq!(other.to_vec::<f32>().unwrap(), [4.0, 5.0, 3.0, 3.0]);
        let second_reader = first.read::<f32>().unwrap();
        assert_eq!(&*second_reader, &*reader);
        drop(second_reader);
        drop(writer);
        drop(reader);

        // With the guards gone, the refused calls succeed.
        q.fill(&b.slice(6..7).unwrap(), FillPattern::of(2.0f32))
            .unwrap();
        q.upload(&straddle, &[5.0f32; 8]).unwrap();
        let all = b.read::<f32>().unwrap();
        assert_eq!(&all[..4], &[1.0; 4]);
        assert_eq!(&all[4..12], &[5.0; 8]);
        assert_eq!(&all[12..16], &[1.0; 4]);
        assert_eq!(&all[16..], &[4.0, 5.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]);
    }
    c.finish(HOST);
    assert_no_leak(&dev);
}

// ---- external wrapping ------------------------------------------------------------------------

/// Caller memory that starts `shift` bytes into a page: legal host memory whose address is
/// deliberately misaligned for wider dtypes.
struct Shifted {
    page: PageBuffer,
    shift: usize,
}

// SAFETY: the page buffer stays at its address while the value lives and is owned by it (so no
// one else writes it); the range `shift..len` lies inside it. Exposed read-only.
unsafe impl HostMemory for Shifted {
    fn as_bytes_ptr(&self) -> *const u8 {
        self.page.as_bytes_ptr().wrapping_add(self.shift)
    }
    fn byte_len(&self) -> usize {
        self.page.byte_len() - self.shift
    }
    fn writable(&self) -> bool {
        false
    }
}

#[test]
fn bad_input_external() {
    let dev = device();
    let q = dev.queue();
    let mut c = Cases::new("external");
    let mut rng = Rng::new("bad_input_external");
    let file_bytes = rng.bytes(4096 + 100);
    let file = TempFile::new("external", &file_bytes);
    {
        // Read-only memory: an Arc (other owners may read it) and a read-only file mapping.
        let values: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let shared = Arc::new(page_memory(&values));
        let ro = dev
            .wrap_external("arc weights", shared.clone(), DType::F32, &[8])
            .unwrap();
        assert!(!ro.is_writable());
        case!(
            c,
            "fill of read-only memory",
            q.fill(&ro, FillPattern::of(0.0f32)),
            Error::ReadOnly { what: "fill", label } if label == "arc weights",
            ["fill", "'arc weights'", "read-only"]
        );
        case!(
            c,
            "upload into read-only memory",
            q.upload(&ro, &[9.0f32; 8]),
            Error::ReadOnly { what: "upload", label } if label == "arc weights",
            ["upload", "'arc weights'"]
        );
        case!(
            c,
            "upload_async into part of read-only memory",
            q.upload_async(&ro.slice(2..4).unwrap(), &[9.0f32; 2]),
            Error::ReadOnly { what: "upload", .. },
            ["upload", "'arc weights'"]
        );
        case!(
            c,
            "host write of read-only memory",
            ro.write::<f32>(),
            Error::ReadOnly { what: "host write", label } if label == "arc weights",
            ["host write", "'arc weights'"]
        );
        let src = dev.alloc(DType::F32, &[8], StorageMode::Private).unwrap();
        q.fill(&src, FillPattern::of(7.0f32)).unwrap();
        case!(
            c,
            "copy into read-only memory",
            q.copy(&src, &ro),
            Error::ReadOnly { what: "copy", .. },
            ["copy", "'arc weights'"]
        );
        // Reading it, and copying out of it, are fine; nothing above wrote it.
        assert_eq!(&*ro.read::<f32>().unwrap(), &values[..]);
        q.copy(&ro, &src).unwrap();
        assert_eq!(src.to_vec::<f32>().unwrap(), values);
        assert_eq!(&shared[..], bytemuck::cast_slice::<f32, u8>(&values));

        // SAFETY: the test owns the file and does not modify it while mapped.
        let map = unsafe { memmap2::Mmap::map(&file.open()) }.unwrap();
        let mapped = dev
            .wrap_external("mapped file", map, DType::U8, &[file_bytes.len()])
            .unwrap();
        case!(
            c,
            "fill_async of a read-only mapping",
            q.fill_async(&mapped.slice(4000..4100).unwrap(), FillPattern::u8(0)),
            Error::ReadOnly { what: "fill", label } if label == "mapped file",
            ["fill", "'mapped file'"]
        );
        case!(
            c,
            "host write of a read-only mapping",
            mapped.slice(0..1).unwrap().write::<u8>(),
            Error::ReadOnly { what: "host write", label } if label == "mapped file",
            ["host write", "'mapped file'"]
        );
        let bytes_src = dev.alloc(DType::U8, &[100], StorageMode::Shared).unwrap();
        case!(
            c,
            "copy_async into a read-only mapping",
            q.copy_async(&bytes_src, &mapped.slice(0..100).unwrap()),
            Error::ReadOnly { what: "copy", label } if label == "mapped file",
            ["copy", "'mapped file'"]
        );
        drop(bytes_src);
        assert_eq!(&*mapped.read::<u8>().unwrap(), &file_bytes[..]);

        // Shapes larger than the memory.
        case!(
            c,
            "wrap a Vec with a shape larger than it",
            dev.wrap_external("short vec", vec![0.0f32; 10], DType::F32, &[11]),
            Error::OutOfBounds {
                what: "wrap_external: the shape in bytes",
                start: 0,
                end: 44,
                len: 40
            },
            ["0..44", "length 40"]
        );
        // SAFETY: as above.
        let map = unsafe { memmap2::Mmap::map(&file.open()) }.unwrap();
        case!(
            c,
            "wrap a mapping with a shape larger than it",
            dev.wrap_external("short map", map, DType::U32, &[1050]),
            Error::OutOfBounds {
                what: "wrap_external: the shape in bytes",
                start: 0,
                end: 4200,
                len: 4196
            },
            ["0..4200", "length 4196"]
        );
        case!(
            c,
            "wrap with a shape whose size overflows",
            dev.wrap_external("huge", vec![0u8; 16], DType::U16, &[usize::MAX / 2 + 1]),
            Error::InvalidArgument { what: "shape", detail } if detail.contains("overflows"),
            [(usize::MAX / 2 + 1).to_string()]
        );

        // Misaligned addresses: a mapping at file offset 1, and memory shifted by 2 bytes.
        // SAFETY: as above.
        let map = unsafe { memmap2::MmapOptions::new().offset(1).map(&file.open()) }.unwrap();
        let addr = map.as_ptr() as usize;
        assert_eq!(addr % 4, 1, "memmap2 maps an offset inside its page");
        case!(
            c,
            "wrap a mapping at file offset 1 as u32",
            dev.wrap_external("offset map", map, DType::U32, &[16]),
            Error::Misaligned { what: "wrap_external: memory address for the dtype", value, align: 4 }
                if *value == addr,
            [format!("{addr} is not a multiple of 4")]
        );
        let shifted = Shifted {
            page: PageBuffer::new(64).unwrap(),
            shift: 2,
        };
        let addr = shifted.as_bytes_ptr() as usize;
        case!(
            c,
            "wrap memory 2 bytes into a word as f32",
            dev.wrap_external("shifted", shifted, DType::F32, &[4]),
            Error::Misaligned { value, align: 4, .. } if *value == addr,
            [addr.to_string(), "multiple of 4".to_owned()]
        );
        // At its own alignment the same kind of memory wraps fine.
        let ok = Shifted {
            page: PageBuffer::from_slice(&[0xFF; 64]).unwrap(),
            shift: 2,
        };
        let halves = dev
            .wrap_external("shifted u16", ok, DType::U16, &[4])
            .unwrap();
        assert_eq!(&*halves.read::<u16>().unwrap(), &[u16::MAX; 4]);

        case!(
            c,
            "alloc with StorageMode::External",
            dev.alloc(DType::F32, &[4], StorageMode::External),
            Error::InvalidArgument { what: "mode", detail } if detail.contains("wrap_external"),
            ["mode", "wrap_external"]
        );
        drop((ro, mapped, src, halves));
        dev.drain().unwrap();
        assert_eq!(
            Arc::strong_count(&shared),
            1,
            "the wrapped Arc was released, also after the refused calls"
        );
    }
    case!(
        c,
        "wrap empty memory",
        dev.wrap_external("empty", Vec::<f32>::new(), DType::F32, &[0]),
        Error::InvalidArgument { what: "wrap_external", detail } if detail.contains("empty"),
        ["0 bytes", "nothing to wrap"]
    );
    c.finish(EXTERNAL);
    assert_no_leak(&dev);
}

// ---- kernels ----------------------------------------------------------------------------------

fn scale_cpu(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    let x = args.input::<f32>(0)?;
    let factor = args.f32(2)?;
    let y = args.output::<f32>(1)?;
    for (y, x) in y.iter_mut().zip(x) {
        *y = x * factor;
    }
    Ok(())
}

const SCALE_PARAMS: &[Param] = &[
    Param::input("x", DType::F32),
    Param::output("y", DType::F32),
    Param::scalar("factor", ScalarType::F32),
];

/// Two parameters named alike.
const TWICE_PARAMS: &[Param] = &[
    Param::input("x", DType::F32),
    Param::output("x", DType::F32),
];

/// `y = x * factor`, CPU only.
const SCALE: KernelSource = KernelSource {
    name: "bad_input_scale",
    params: SCALE_PARAMS,
    cuda: Some(SCALE_CUDA),
    msl: Some(
        r#"#include <metal_stdlib>
using namespace metal;
kernel void bad_input_scale(const device float* x [[buffer(0)]], device float* y [[buffer(1)]],
                            constant float& factor [[buffer(2)]], uint i [[thread_position_in_grid]]) {
    y[i] = x[i] * factor;
}"#,
    ),
    cpu: Some(scale_cpu),
};

/// One thread per element: launch exactly as many threads as elements.
const SCALE_CUDA: &str = r#"
extern "C" __global__ void bad_input_scale(const float* x, float* y, float factor) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = x[i] * factor;
}
"#;

/// A kernel with no source for any backend.
const NO_SOURCE: KernelSource = KernelSource {
    name: "bad_input_no_source",
    params: SCALE_PARAMS,
    cuda: None,
    msl: None,
    cpu: None,
};

fn scale_args<'a>(x: &'a unibuf::Buffer, y: &'a unibuf::Buffer, f: f32) -> [KernelArg<'a>; 3] {
    [x.into(), y.into(), f.into()]
}

#[test]
fn bad_input_kernels() {
    let dev = device();
    let mut c = Cases::new("kernels");
    // Registration: checked on every backend.
    dev.register_kernel(SCALE).unwrap();
    dev.register_kernel(NO_SOURCE).unwrap();
    case!(
        c,
        "register a duplicate name",
        dev.register_kernel(SCALE),
        Error::InvalidArgument { what: "kernel", detail } if detail.contains("already registered"),
        ["'bad_input_scale'", "already registered"]
    );
    case!(
        c,
        "register duplicate parameter names",
        dev.register_kernel(KernelSource {
            name: "bad_input_twice",
            params: TWICE_PARAMS,
            ..SCALE
        }),
        Error::InvalidArgument { what: "kernel", detail } if detail.contains("twice"),
        ["'bad_input_twice'", "parameter 'x' twice"]
    );
    case!(
        c,
        "register an empty name",
        dev.register_kernel(KernelSource { name: "", ..SCALE }),
        Error::InvalidArgument { what: "kernel", detail } if detail.contains("empty"),
        ["name is empty"]
    );
    let many: Vec<Param> = (0..65)
        .map(|i| Param::input(Box::leak(format!("p{i}").into_boxed_str()), DType::U8))
        .collect();
    case!(
        c,
        "register 65 parameters",
        dev.register_kernel(KernelSource {
            name: "bad_input_many",
            params: Box::leak(many.into_boxed_slice()),
            ..SCALE
        }),
        Error::InvalidArgument { what: "kernel", detail } if detail.contains("65 parameters"),
        ["'bad_input_many'", "65 parameters", "at most 64"]
    );
    case!(
        c,
        "look up an unknown kernel",
        dev.kernel("bad_input_nosuch"),
        Error::InvalidArgument { what: "kernel", detail }
            if detail.contains("known: bad_input_no_source, bad_input_scale"),
        ["'bad_input_nosuch'", "known: bad_input_no_source, bad_input_scale"]
    );
    let user_kernels: Vec<&str> = dev
        .kernel_names()
        .into_iter()
        .filter(|n| !n.starts_with("unibuf_"))
        .collect();
    assert_eq!(
        user_kernels,
        ["bad_input_no_source", "bad_input_scale"],
        "refused registrations left nothing behind (besides the built-in ops' kernels)"
    );
    // The log names what is missing for this backend.
    let missing = match backend_name().as_str() {
        "cpu" => "no CPU implementation",
        "cuda" => "no CUDA source",
        _ => "",
    };
    case!(
        c,
        "compile a kernel without a source for this backend",
        dev.kernel("bad_input_no_source"),
        Error::Compile { kernel, log } if kernel == "bad_input_no_source" && log.contains(missing),
        ["'bad_input_no_source'", missing]
    );
    case!(
        c,
        "warm_all with a kernel without a source for this backend",
        dev.warm_all(),
        Error::Compile { kernel, .. } if kernel == "bad_input_no_source",
        ["'bad_input_no_source'"]
    );
    if !can_launch() {
        c.finish(KERNELS_NO_LAUNCH);
        return;
    }

    let dev_b = device();
    dev_b.register_kernel(SCALE).unwrap();
    {
        let q = dev.queue();
        let k = dev.kernel("bad_input_scale").unwrap();
        let k_b = dev_b.kernel("bad_input_scale").unwrap();
        let x = dev
            .alloc_labelled("x", DType::F32, &[8], StorageMode::Private)
            .unwrap();
        let y = dev
            .alloc_labelled("y", DType::F32, &[8], StorageMode::Shared)
            .unwrap();
        let ints = dev.alloc(DType::I32, &[8], StorageMode::Shared).unwrap();
        let both = dev
            .alloc_labelled("both", DType::F32, &[16], StorageMode::Shared)
            .unwrap();
        let x_b = dev_b.alloc(DType::F32, &[8], StorageMode::Shared).unwrap();
        let ro = dev
            .wrap_external("ro out", Arc::new(page_memory(&[0.0; 8])), DType::F32, &[8])
            .unwrap();
        let dims = LaunchDims::linear(1, 64);
        q.upload(&x, &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
            .unwrap();

        case!(
            c,
            "launch with too few arguments",
            q.launch(&k, dims, &[(&x).into(), (&y).into()]),
            Error::ShapeMismatch { what: "kernel arguments", expected, got }
                if expected == "3 for 'bad_input_scale'" && got == "2",
            ["expected 3 for 'bad_input_scale', got 2"]
        );
        case!(
            c,
            "launch with too many arguments",
            q.launch(&k, dims, &[(&x).into(), (&y).into(), 2.0f32.into(), 1u32.into()]),
            Error::ShapeMismatch { what: "kernel arguments", got, .. } if got == "4",
            ["got 4"]
        );
        case!(
            c,
            "launch with a buffer of the wrong dtype",
            q.launch(&k, dims, &scale_args(&ints, &y, 2.0)),
            Error::DTypeMismatch {
                what: "kernel argument",
                expected: DType::F32,
                got: DType::I32
            },
            ["expected dtype F32, got I32"]
        );
        case!(
            c,
            "launch with a scalar where a buffer is expected",
            q.launch(&k, dims, &[1.0f32.into(), (&y).into(), 2.0f32.into()]),
            Error::InvalidArgument { what: "kernel argument", detail }
                if detail.contains("argument 0 ('x')"),
            ["argument 0 ('x')", "'bad_input_scale'", "Scalar(F32(1.0))"]
        );
        case!(
            c,
            "launch with a buffer where a scalar is expected",
            q.launch(&k, dims, &[(&x).into(), (&y).into(), (&x).into()]),
            Error::InvalidArgument { what: "kernel argument", detail }
                if detail.contains("argument 2 ('factor')"),
            ["argument 2 ('factor')", "Scalar(F32)"]
        );
        case!(
            c,
            "launch with a scalar of the wrong type",
            q.launch(&k, dims, &[(&x).into(), (&y).into(), 2u32.into()]),
            Error::InvalidArgument { what: "kernel argument", detail }
                if detail.contains("U32(2)"),
            ["argument 2 ('factor')", "U32(2)"]
        );
        case!(
            c,
            "launch with a zero grid dimension",
            q.launch(
                &k,
                LaunchDims { grid: [4, 0, 1], block: [64, 1, 1] },
                &scale_args(&x, &y, 2.0)
            ),
            Error::InvalidArgument { what: "launch dims", detail } if detail.contains("[4, 0, 1]"),
            ["grid [4, 0, 1]", "zero dimension"]
        );
        case!(
            c,
            "launch with a zero block dimension",
            q.launch(&k, LaunchDims::linear(1, 0), &scale_args(&x, &y, 2.0)),
            Error::InvalidArgument { what: "launch dims", detail } if detail.contains("block [0, 1, 1]"),
            ["block [0, 1, 1]"]
        );
        case!(
            c,
            "launch with more than 1024 threads per block",
            q.launch(
                &k,
                LaunchDims { grid: [1, 1, 1], block: [64, 32, 1] },
                &scale_args(&x, &y, 2.0)
            ),
            Error::InvalidArgument { what: "launch dims", detail } if detail.contains("2048 threads"),
            ["block [64, 32, 1]", "2048 threads", "at most 1024"]
        );
        case!(
            c,
            "launch with a grid past the limits",
            q.launch(
                &k,
                LaunchDims { grid: [1, 70_000, 1], block: [64, 1, 1] },
                &scale_args(&x, &y, 2.0)
            ),
            Error::InvalidArgument { what: "launch dims", detail } if detail.contains("70000"),
            ["grid [1, 70000, 1]", "65535"]
        );
        case!(
            c,
            "launch whose output overlaps an input",
            q.launch(
                &k,
                dims,
                &scale_args(&both.slice(0..8).unwrap(), &both.slice(4..12).unwrap(), 2.0)
            ),
            Error::InvalidArgument { what: "kernel arguments", detail }
                if detail.contains("bytes 0..32 and 16..48"),
            ["overlaps", "bytes 0..32 and 16..48", "'both'"]
        );
        case!(
            c,
            "launch in place (output is the input)",
            q.launch(&k, dims, &scale_args(&y, &y, 2.0)),
            Error::InvalidArgument { what: "kernel arguments", detail }
                if detail.contains("bytes 0..32 and 0..32"),
            ["bytes 0..32 and 0..32", "'y'"]
        );
        case!(
            c,
            "launch a kernel of another device",
            q.launch(&k_b, dims, &scale_args(&x, &y, 2.0)),
            Error::WrongDevice { what: "kernel", expected, got }
                if *expected == dev.id() && *got == dev_b.id(),
            [format!("device #{}", dev_b.id()), format!("device #{}", dev.id())]
        );
        case!(
            c,
            "launch with a buffer of another device",
            q.launch(&k, dims, &scale_args(&x_b, &y, 2.0)),
            Error::WrongDevice { what: "kernel argument", expected, got }
                if *expected == dev.id() && *got == dev_b.id(),
            [format!("device #{}", dev_b.id())]
        );
        case!(
            c,
            "launch writing read-only memory",
            q.launch(&k, dims, &scale_args(&x, &ro, 2.0)),
            Error::ReadOnly { what: "launch", label } if label == "ro out",
            ["launch", "'ro out'"]
        );
        {
            let guard = y.slice(6..8).unwrap();
            let _held = guard.read::<f32>().unwrap();
            case!(
                c,
                "launch writing under a host read guard",
                q.launch(&k, dims, &scale_args(&x, &y, 2.0)),
                Error::HostAccessConflict { what: "launch", label, start: 24, end: 32, held: "read-locked" }
                    if label == "y",
                ["launch", "24..32", "'y'"]
            );
        }
        // Nothing was recorded by the refused launches; a valid one works.
        assert_eq!(
            dev.memory_stats().active_count,
            4,
            "x, y, ints and both; the wrapped one counts apart"
        );
        let f = q
            .launch(&k, LaunchDims::linear(1, 8), &scale_args(&x, &y, 2.0))
            .unwrap();
        dev.wait(f).unwrap();
        assert_eq!(
            &*y.read::<f32>().unwrap(),
            &[2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0]
        );
        assert!(dev.fault().is_none() && dev_b.fault().is_none());
    }
    c.finish(KERNELS_LAUNCH);
    assert_no_leak(&dev);
    assert_no_leak(&dev_b);
}

// ---- device and builder options, waits --------------------------------------------------------

#[test]
fn bad_input_device_options() {
    let mut c = Cases::new("device options");
    case!(
        c,
        "open an unknown backend",
        Device::open("nosuch"),
        Error::BackendUnavailable { name, reason } if name == "nosuch" && reason.contains("unknown"),
        ["'nosuch'", "not available"]
    );
    case!(
        c,
        "builder with an unknown backend",
        Device::builder().backend("Cpu ").open(),
        Error::BackendUnavailable { name, .. } if name == "Cpu ",
        ["'Cpu '"]
    );
    case!(
        c,
        "staging chunks below 4096 bytes",
        builder().staging(1024, 4).open(),
        Error::InvalidArgument { what: "staging", detail } if detail.contains("1024 bytes x 4"),
        ["staging", "1024 bytes x 4", "4096"]
    );
    case!(
        c,
        "staging with no chunks",
        builder().staging(1 << 20, 0).open(),
        Error::InvalidArgument { what: "staging", detail } if detail.contains("1048576 bytes x 0"),
        ["1048576 bytes x 0"]
    );
    case!(
        c,
        "ledger capacity 0",
        builder().ledger_capacity(0).open(),
        Error::InvalidArgument {
            what: "ledger_capacity",
            ..
        },
        ["ledger_capacity", "at least 1"]
    );

    let dev = device();
    let q = dev.queue();
    {
        let b = dev.alloc(DType::U8, &[64], StorageMode::Shared).unwrap();
        let done = q.fill_async(&b, FillPattern::u8(1)).unwrap();
        dev.wait(done).unwrap();
        let submitted = q.last_fence().epoch;
        assert!(submitted >= 1);
        // Waits that could never complete are refused at once, never a hang.
        case!(
            c,
            "wait for an epoch never submitted",
            dev.wait(Fence { device: dev.id(), queue: q.id(), epoch: 1_000_000 }),
            Error::InvalidArgument { what: "epoch", detail }
                if detail.contains("1000000") && detail.contains(&format!("submitted {submitted} epochs")),
            ["1000000", format!("{}", q.id())]
        );
        let q2 = dev.new_queue("second").unwrap();
        case!(
            c,
            "queue wait for the next epoch of an idle queue",
            q2.wait(Fence { device: dev.id(), queue: q2.id(), epoch: 1 }),
            Error::InvalidArgument { what: "epoch", detail } if detail.contains("cannot wait for 1"),
            ["submitted 0 epochs", "cannot wait for 1"]
        );
        case!(
            c,
            "wait on a queue that does not exist",
            dev.wait(Fence { device: dev.id(), queue: QueueId(999), epoch: 1 }),
            Error::InvalidArgument { what: "queue", detail } if detail.contains("queue 999"),
            ["queue 999 does not exist"]
        );
        case!(
            c,
            "is_complete on a queue that does not exist",
            dev.is_complete(Fence { device: dev.id(), queue: QueueId(77), epoch: 3 }),
            Error::InvalidArgument { what: "queue", detail } if detail.contains("queue 77"),
            ["queue 77 does not exist"]
        );
        case!(
            c,
            "is_complete on an epoch never submitted",
            dev.is_complete(Fence { epoch: done.epoch + 1_000_000, ..done }),
            Error::InvalidArgument { what: "fence", detail } if detail.contains("never will complete"),
            ["never will complete"]
        );
        assert!(dev.fault().is_none(), "refused waits are not faults");
        assert!(dev.is_complete(done).unwrap());
    }
    case!(
        c,
        "a constant name that is not an identifier",
        dev.kernel_with("anything", &unibuf::Constants::new().with("N=1 -DX", 2)),
        Error::InvalidArgument { what: "constants", detail } if detail.contains("not an identifier"),
        ["N=1 -DX", "not an identifier"]
    );
    c.finish(DEVICE);
    assert_no_leak(&dev);
}

// ---- budgets and out of memory ----------------------------------------------------------------

#[test]
fn bad_input_budgets() {
    let mut c = Cases::new("budgets");
    let dev = builder().memory_limit(4 << 20).open().unwrap();
    let max_len = dev.info().max_buffer_len;
    {
        case!(
            c,
            "6 MiB under a 4 MiB budget never fits",
            dev.alloc(DType::U8, &[6 << 20], StorageMode::Shared),
            Error::NeverFits {
                requested: 6291456,
                limit: 4194304,
                limit_name: "memory budget"
            },
            ["6291456", "4194304", "memory budget"]
        );
        let first = dev
            .alloc_labelled("first", DType::U8, &[3 << 20], StorageMode::Private)
            .unwrap();
        let e = case!(
            c,
            "second 3 MiB under a 4 MiB budget",
            dev.alloc(DType::U8, &[3 << 20], StorageMode::Private),
            Error::BudgetExceeded {
                which: "memory",
                budget: 4194304,
                ..
            },
            ["memory budget exceeded", "4194304"]
        );
        assert!(e.is_retryable(), "freeing memory can make it fit");
        assert!(dev.memory_stats().ooms >= 1);
        drop(first);
        let second = dev
            .alloc(DType::U8, &[3 << 20], StorageMode::Private)
            .expect("fits once the first is freed");
        dev.queue().fill(&second, FillPattern::u8(1)).unwrap();
        drop(second);

        let e = case!(
            c,
            "usize::MAX / 2 bytes never fit",
            dev.alloc(DType::U8, &[usize::MAX / 2], StorageMode::Shared),
            Error::NeverFits { requested, limit, limit_name: "maximum buffer length" }
                if *requested == 1 << 63 && *limit == max_len,
            [(1usize << 63).to_string(), max_len.to_string()]
        );
        assert!(!e.is_retryable());
        case!(
            c,
            "usize::MAX bytes never fit",
            dev.alloc(DType::U8, &[usize::MAX], StorageMode::Private),
            Error::NeverFits { requested: usize::MAX, limit, limit_name: "maximum buffer length" }
                if *limit == max_len,
            [usize::MAX.to_string()]
        );
        case!(
            c,
            "alloc whose element count overflows",
            dev.alloc(DType::F32, &[1 << 40, 1 << 40], StorageMode::Shared),
            Error::InvalidArgument { what: "shape", detail } if detail.contains("overflows"),
            ["[1099511627776, 1099511627776]", "overflows"]
        );
        case!(
            c,
            "alloc whose byte size overflows",
            dev.alloc(DType::F64, &[usize::MAX / 4], StorageMode::Private),
            Error::InvalidArgument { what: "shape", detail } if detail.contains("F64"),
            [(usize::MAX / 4).to_string(), "F64"]
        );

        dev.set_budget(Budget {
            memory_limit: Some(4096),
            cache_limit: None,
        });
        case!(
            c,
            "alloc past a budget set at run time",
            dev.alloc(DType::U8, &[8192], StorageMode::Shared),
            Error::NeverFits {
                requested: 8192,
                limit: 4096,
                limit_name: "memory budget"
            },
            ["8192", "4096"]
        );
        dev.set_budget(Budget::default());
    }
    assert_no_leak(&dev);

    let zero = builder().memory_limit(0).open().unwrap();
    case!(
        c,
        "one byte under a zero budget",
        zero.alloc(DType::U8, &[1], StorageMode::Shared),
        Error::NeverFits {
            requested: 256,
            limit: 0,
            limit_name: "memory budget"
        },
        ["256", "the memory budget is 0 bytes"]
    );
    assert_no_leak(&zero);

    // Residency budget.
    let dev = device();
    {
        let b = dev.alloc(DType::U8, &[4096], StorageMode::Shared).unwrap();
        dev.set_residency_budget(Some(1000));
        let e = case!(
            c,
            "make resident past the residency budget",
            dev.make_resident(&b),
            Error::BudgetExceeded {
                which: "residency",
                requested: 4096,
                in_use: 0,
                budget: 1000
            },
            ["residency budget", "4096", "1000"]
        );
        assert!(e.is_retryable());
        assert!(!dev.is_resident(&b));
        dev.set_residency_budget(Some(8192));
        dev.make_resident(&b).unwrap();
        let b2 = dev.alloc(DType::U8, &[8192], StorageMode::Private).unwrap();
        case!(
            c,
            "make resident past the residency budget with one resident",
            dev.make_resident(&b2),
            Error::BudgetExceeded {
                which: "residency",
                requested: 8192,
                in_use: 4096,
                budget: 8192
            },
            ["8192", "4096 bytes in use"]
        );
        assert_eq!(dev.residency_stats().resident_bytes, 4096);
        assert!(dev.evict(&b).unwrap());
        dev.make_resident(&b2).unwrap();
        drop((b, b2));
    }
    assert_no_leak(&dev);
    assert_eq!(dev.residency_stats().resident_bytes, 0);
    c.finish(BUDGETS);
}

// ---- cross-device misuse ----------------------------------------------------------------------

#[test]
fn bad_input_cross_device() {
    let mut c = Cases::new("cross-device");
    let (dev_a, dev_b) = (device(), device());
    let (a_id, b_id) = (dev_a.id(), dev_b.id());
    assert_ne!(a_id, b_id);
    {
        let q_b = dev_b.queue();
        let a = dev_a
            .alloc_labelled("a", DType::F32, &[8], StorageMode::Shared)
            .unwrap();
        let b = dev_b
            .alloc_labelled("b", DType::F32, &[8], StorageMode::Private)
            .unwrap();
        let names = [format!("device #{a_id}"), format!("device #{b_id}")];
        macro_rules! wrong {
            ($name:expr, $call:expr, $what:expr) => {
                case!(
                    c,
                    $name,
                    $call,
                    Error::WrongDevice { what, expected, got }
                        if *what == $what && *expected == b_id && *got == a_id,
                    [$what, &names[0], &names[1]]
                )
            };
        }
        wrong!(
            "upload through another device's queue",
            q_b.upload(&a, &[1.0f32; 8]),
            "upload destination"
        );
        wrong!(
            "upload_async through another device's queue",
            q_b.upload_async(&a, &[1.0f32; 8]),
            "upload destination"
        );
        wrong!(
            "download through another device's queue",
            q_b.download::<f32>(&a),
            "download source"
        );
        wrong!(
            "download_async through another device's queue",
            q_b.download_async::<f32>(&a),
            "download source"
        );
        wrong!(
            "copy from another device's buffer",
            q_b.copy(&a, &b),
            "copy source"
        );
        wrong!(
            "copy into another device's buffer",
            q_b.copy_async(&b, &a),
            "copy destination"
        );
        wrong!(
            "fill another device's buffer",
            q_b.fill(&a, FillPattern::of(0.0f32)),
            "fill destination"
        );
        wrong!(
            "make another device's buffer resident",
            dev_b.make_resident(&a),
            "buffer"
        );
        wrong!("evict another device's buffer", dev_b.evict(&a), "buffer");
        let fence_a = dev_a
            .queue()
            .fill_async(&a, FillPattern::of(1.0f32))
            .unwrap();
        wrong!(
            "wait for another device's fence",
            dev_b.wait(fence_a),
            "fence"
        );
        wrong!(
            "queue wait for another device's fence",
            q_b.wait(fence_a),
            "fence"
        );
        wrong!(
            "is_complete of another device's fence",
            dev_b.is_complete(fence_a),
            "fence"
        );
        dev_a.wait(fence_a).unwrap();
        // Each device still works with its own buffers.
        dev_a.queue().upload(&a, &[2.0f32; 8]).unwrap();
        q_b.upload(&b, &[3.0f32; 8]).unwrap();
        assert_eq!(a.to_vec::<f32>().unwrap(), [2.0; 8]);
        assert_eq!(b.to_vec::<f32>().unwrap(), [3.0; 8]);
    }
    c.finish(CROSS_DEVICE);
    assert_no_leak(&dev_a);
    assert_no_leak(&dev_b);
}

// ---- faults -----------------------------------------------------------------------------------

fn boom_cpu(_: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    Err("boom".to_owned())
}

fn panic_cpu(_: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    panic!("kaboom")
}

const BOOM: KernelSource = KernelSource {
    name: "bad_input_boom",
    params: &[Param::output("y", DType::F32)],
    cuda: None,
    msl: None,
    cpu: Some(boom_cpu),
};

const PANICKY: KernelSource = KernelSource {
    name: "bad_input_panicky",
    cpu: Some(panic_cpu),
    ..BOOM
};

#[test]
fn bad_input_faults() {
    if !on_cpu() {
        // The faulting kernels are Rust CPU functions; other backends would need GPU sources.
        return;
    }
    let mut c = Cases::new("faults");
    let dev = device();
    for k in [SCALE, BOOM, PANICKY] {
        dev.register_kernel(k).unwrap();
    }
    let (scale, boom, panicky) = (
        dev.kernel("bad_input_scale").unwrap(),
        dev.kernel("bad_input_boom").unwrap(),
        dev.kernel("bad_input_panicky").unwrap(),
    );
    let dims = LaunchDims::linear(1, 1);
    {
        let x = dev
            .alloc_labelled("x", DType::F32, &[4], StorageMode::Private)
            .unwrap();
        let y = dev
            .alloc_labelled("y", DType::F32, &[4], StorageMode::Shared)
            .unwrap();
        dev.queue().upload(&x, &[1.0f32, 2.0, 3.0, 4.0]).unwrap();

        let faulty = dev.queue().labelled("faulty step");
        let f = faulty.launch(&boom, dims, &[(&y).into()]).unwrap();
        let fault = case!(
            c,
            "a kernel returning Err faults at its fence",
            dev.wait(f),
            Error::DeviceFault { kind: FaultKind::Trap, label, detail }
                if label == "faulty step" && detail == "boom",
            ["kernel trap", "'faulty step'", "boom"]
        );
        assert!(fault.is_device_fault() && !fault.is_retryable());
        assert!(
            matches!(dev.fault(), Some(Error::DeviceFault { kind: FaultKind::Trap, label, .. }) if label == "faulty step")
        );

        // Sticky: every later call returns the same fault.
        macro_rules! sticky {
            ($name:expr, $call:expr) => {
                case!(
                    c,
                    $name,
                    $call,
                    Error::DeviceFault { kind: FaultKind::Trap, label, detail }
                        if label == "faulty step" && detail == "boom",
                    ["'faulty step'", "boom"]
                )
            };
        }
        let q = dev.queue();
        sticky!(
            "sticky: alloc",
            dev.alloc(DType::F32, &[4], StorageMode::Shared)
        );
        sticky!("sticky: upload", q.upload(&y, &[0.0f32; 4]));
        sticky!(
            "sticky: launch",
            q.launch(&scale, dims, &scale_args(&x, &y, 2.0))
        );
        sticky!("sticky: host read", y.read::<f32>());
        sticky!("sticky: copy", q.copy(&x, &y));
        sticky!("sticky: new queue", dev.new_queue("after the fault"));
        sticky!("sticky: drain", dev.drain());
        sticky!("sticky: fence of the faulted queue", faulty.wait(f));

        // Reset clears it; work succeeds again with correct results.
        dev.reset().unwrap();
        assert!(dev.fault().is_none());
        let z = dev.alloc(DType::F32, &[4], StorageMode::Private).unwrap();
        q.upload(&z, &[10.0f32, 20.0, 30.0, 40.0]).unwrap();
        let f = q.launch(&scale, dims, &scale_args(&z, &y, 0.5)).unwrap();
        dev.wait(f).unwrap();
        assert_eq!(&*y.read::<f32>().unwrap(), &[5.0, 10.0, 15.0, 20.0]);
        q.launch(&scale, dims, &scale_args(&x, &y, 3.0)).unwrap();
        assert_eq!(q.download::<f32>(&y).unwrap(), [3.0, 6.0, 9.0, 12.0]);

        // A panicking kernel is a fault too, named by the kernel when the queue has no label.
        let f = q.launch(&panicky, dims, &[(&y).into()]).unwrap();
        case!(
            c,
            "a panicking kernel faults at its fence",
            q.wait(f),
            Error::DeviceFault { kind: FaultKind::Trap, label, detail }
                if label == "bad_input_panicky" && detail.contains("panicked") && detail.contains("kaboom"),
            ["'bad_input_panicky'", "panicked", "kaboom"]
        );
        assert!(dev.fault().is_some());
        dev.reset().unwrap();
        q.upload(&y, &[1.0f32; 4]).unwrap();
        let f = q.launch(&scale, dims, &scale_args(&x, &y, -1.0)).unwrap();
        dev.wait(f).unwrap();
        assert_eq!(y.to_vec::<f32>().unwrap(), [-1.0, -2.0, -3.0, -4.0]);
    }
    c.finish(FAULTS_CPU);
    assert_no_leak(&dev);
}

/// A fault nobody has waited for yet is still the device's state: `Device::fault` reports it
/// and new work is refused with it, whichever queue faulted.
#[test]
fn bad_input_unobserved_fault() {
    if !on_cpu() {
        return;
    }
    let mut c = Cases::new("unobserved fault");
    let dev = device();
    dev.register_kernel(BOOM).unwrap();
    let boom = dev.kernel("bad_input_boom").unwrap();
    {
        let y = dev
            .alloc_labelled("y", DType::F32, &[4], StorageMode::Shared)
            .unwrap();
        let side = dev.new_queue("side").unwrap().labelled("unobserved step");
        side.launch(&boom, LaunchDims::linear(1, 1), &[(&y).into()])
            .unwrap();
        // Nobody waits for the launch: poll the device's own report of its state, bounded.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let mut seen = dev.fault();
        while seen.is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            seen = dev.fault();
        }
        assert!(
            seen.is_some(),
            "Device::fault() is still None 3 s after a kernel on queue 'side' failed: the \
             device records a fault only when some call happens to observe it"
        );
        case!(
            c,
            "Device::fault reports a fault nobody waited for",
            seen.map_or(Ok(()), Err),
            Error::DeviceFault { kind: FaultKind::Trap, label, detail }
                if label == "unobserved step" && detail == "boom",
            ["'unobserved step'", "boom"]
        );
        case!(
            c,
            "alloc after a fault nobody waited for",
            dev.alloc(DType::F32, &[4], StorageMode::Shared),
            Error::DeviceFault { kind: FaultKind::Trap, label, .. } if label == "unobserved step",
            ["'unobserved step'"]
        );
        // Clean up whatever the state: observe the fault, then reset.
        let _ = dev.drain();
        dev.reset().unwrap();
    }
    c.finish(UNOBSERVED_FAULT_CPU);
    assert_no_leak(&dev);
}
