//! ops::matmul and ops::matmul_bt (the product through the platform's BLAS, run as external
//! work) against an f64 reference computed here from the host copies of the inputs, in every
//! storage dtype, at odd sizes, in both layouts of `b`, on views, and with every bad input
//! refused with its typed error before anything is submitted. Outputs of the `_into` forms are
//! poisoned with NaN first, so an element the product never writes shows up.
//!
//! Tolerances, per element of `a @ b` with exact value `want` and magnitude
//! `mag = sum |a_ik * b_kj|`:
//! - the one rounding to the storage dtype: half an ulp, at most `|want| * 2^-24` (f32),
//!   `2^-11` (f16) or `2^-8` (bf16), plus a quarter of f16's smallest subnormal step;
//! - f32 accumulation over `k` terms: `8 * sqrt(k) * 2^-24 * mag`, the probabilistic bound
//!   `lambda * sqrt(k) * u * sum |a||b|` (Higham and Mary) with room for tensor cores, whose f32
//!   accumulators truncate.
//!
//! Beside it, an exact test: small integers, whose products and f32 partial sums are exact, so
//! that the result must be the exact sum rounded once, bit for bit; a product that rounds its
//! partial sums to f16 or bf16 (as a reduced-precision split-k reduction, or an f16 kernel
//! accumulating in f16, would) fails it.
//!
//! Metal has no BLAS wired up yet: there every product must be refused with `Unsupported`
//! (the bad-input checks, which come first, run on every backend).

use half::{bf16, f16};
use unibuf::ops;
use unibuf::{Buffer, DType, Device, Error, Fence, Queue, StorageMode};
use unibuf_conformance::{device, download_f64, poisoned, upload_f64, Rng, NAN_POISON};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// How `b` is stored: `[k, n]` (ops::matmul) or `[n, k]` (ops::matmul_bt).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    KxN,
    NxK,
}

const LAYOUTS: [Layout; 2] = [Layout::KxN, Layout::NxK];

impl Layout {
    /// `b`'s shape for `k` x `n`.
    fn b_shape(self, k: usize, n: usize) -> [usize; 2] {
        match self {
            Layout::KxN => [k, n],
            Layout::NxK => [n, k],
        }
    }
    /// Element (kk, j) of the `[k, n]` operand in `b`'s storage.
    fn at(self, b: &[f64], k: usize, n: usize, kk: usize, j: usize) -> f64 {
        match self {
            Layout::KxN => b[kk * n + j],
            Layout::NxK => b[j * k + kk],
        }
    }
}

fn product(q: &Queue, a: &Buffer, b: &Buffer, layout: Layout) -> unibuf::Result<Buffer> {
    match layout {
        Layout::KxN => ops::matmul(q, a, b),
        Layout::NxK => ops::matmul_bt(q, a, b),
    }
}

fn product_into(
    q: &Queue,
    a: &Buffer,
    b: &Buffer,
    layout: Layout,
    out: &Buffer,
) -> unibuf::Result<Fence> {
    match layout {
        Layout::KxN => ops::matmul_into(q, a, b, out),
        Layout::NxK => ops::matmul_bt_into(q, a, b, out),
    }
}

/// Whether the device has a BLAS for matmul; on Metal, checks that a product is refused as
/// documented (`Unsupported` naming Metal) and returns false.
fn has_blas(dev: &Device) -> bool {
    if dev.info().backend != "metal" {
        return true;
    }
    let a = dev.from_slice("a", &[1.0f32; 4], &[2, 2]).expect("upload");
    match ops::matmul(&dev.queue(), &a, &a) {
        Err(Error::Unsupported { backend, what }) => {
            assert_eq!(backend, "metal");
            assert!(what.contains("matmul"), "{what}");
        }
        other => panic!("matmul on Metal: expected Unsupported, got {other:?}"),
    }
    false
}

/// `v` as stored in `dtype`, widened to f64.
fn stored(v: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F32 => f64::from(v as f32),
        DType::F16 => f16::from_f64(v).to_f64(),
        _ => bf16::from_f64(v).to_f64(),
    }
}

/// `n` random values in [-1, 1), each exactly representable in `dtype`.
fn values(rng: &mut Rng, n: usize, dtype: DType) -> Vec<f64> {
    (0..n)
        .map(|_| stored(f64::from(rng.f32()), dtype))
        .collect()
}

/// The exact product `[m, n]` and, per element, its magnitude `sum |a_ik b_kj|`.
fn reference(
    a: &[f64],
    b: &[f64],
    (m, n, k): (usize, usize, usize),
    layout: Layout,
) -> (Vec<f64>, Vec<f64>) {
    let mut want = vec![0.0; m * n];
    let mut mag = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut t) = (0.0, 0.0);
            for kk in 0..k {
                let p = a[i * k + kk] * layout.at(b, k, n, kk, j);
                s += p;
                t += p.abs();
            }
            want[i * n + j] = s;
            mag[i * n + j] = t;
        }
    }
    (want, mag)
}

/// Half an ulp of `dtype`, relative.
fn half_ulp(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2f64.powi(-24),
        DType::F16 => 2f64.powi(-11),
        _ => 2f64.powi(-8),
    }
}

/// Every element within the tolerance of the module's notes (NaN fails).
fn assert_close(what: &str, dtype: DType, k: usize, got: &[f64], want: &[f64], mag: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let accumulation = 8.0 * (k as f64).sqrt() * 2f64.powi(-24);
    let floor = if dtype == DType::F16 {
        2f64.powi(-26)
    } else {
        0.0
    };
    for (i, ((&g, &w), &t)) in got.iter().zip(want).zip(mag).enumerate() {
        let acc = accumulation * t;
        let tol = half_ulp(dtype) * (w.abs() + acc) + acc + floor;
        assert!(
            (g - w).abs() <= tol,
            "{what} ({dtype}): element {i} of {}: got {g}, want {w} (tolerance {tol:e})",
            got.len()
        );
    }
}

/// (m, n, k): ones, odd sizes around the kernels' tile edges, a decode-like row, and a depth
/// the CPU path widens in two slabs.
const SIZES: [(usize, usize, usize); 9] = [
    (1, 1, 1),
    (1, 3, 17),
    (3, 17, 33),
    (17, 33, 127),
    (33, 127, 3),
    (127, 5, 64),
    (4, 65, 515),
    (1, 1000, 257),
    (2, 4200, 1500),
];

#[test]
fn matmul_matches_f64_reference() {
    let dev = device();
    if !has_blas(&dev) {
        return;
    }
    let q = dev.queue();
    let mut rng = Rng::new("ops_matmul");
    for dtype in DTYPES {
        for (m, n, k) in SIZES {
            for layout in LAYOUTS {
                let av = values(&mut rng, m * k, dtype);
                let bv = values(&mut rng, k * n, dtype);
                let a = upload_f64(&dev, "a", dtype, &[m, k], &av);
                let b = upload_f64(&dev, "b", dtype, &layout.b_shape(k, n), &bv);
                let (want, mag) = reference(&av, &bv, (m, n, k), layout);
                let what = format!("{layout:?} m={m} n={n} k={k}");
                let c = product(&q, &a, &b, layout).expect(&what);
                assert_eq!((c.dtype(), c.shape()), (dtype, &[m, n][..]), "{what}");
                assert_close(&what, dtype, k, &download_f64(&q, &c), &want, &mag);
                let out = poisoned(&dev, dtype, &[m, n]);
                let fence = product_into(&q, &a, &b, layout, &out).expect(&what);
                q.wait(fence).expect("wait");
                assert_close(&what, dtype, k, &download_f64(&q, &out), &want, &mag);
            }
        }
    }
}

#[test]
fn matmul_of_small_integers_is_the_exact_sum_rounded_once() {
    let dev = device();
    if !has_blas(&dev) {
        return;
    }
    let q = dev.queue();
    let mut rng = Rng::new("ops_matmul_exact");
    // Entries in 0..=3: products and f32 partial sums are exact integers (below 2^24), and the
    // sums grow past 2048 (f16) and 256 (bf16), above which those dtypes round integers, so
    // partial sums kept in the storage dtype would be rounded (up to 36873, below f16's max).
    for dtype in DTYPES {
        for (m, n, k) in [(1, 512, 1200), (64, 64, 2000), (5, 33, 4097)] {
            for layout in LAYOUTS {
                let mut ints =
                    |len: usize| -> Vec<f64> { (0..len).map(|_| rng.range(0, 4) as f64).collect() };
                let (av, bv) = (ints(m * k), ints(k * n));
                let a = upload_f64(&dev, "a", dtype, &[m, k], &av);
                let b = upload_f64(&dev, "b", dtype, &layout.b_shape(k, n), &bv);
                let (want, _) = reference(&av, &bv, (m, n, k), layout);
                let out = poisoned(&dev, dtype, &[m, n]);
                q.wait(product_into(&q, &a, &b, layout, &out).expect("matmul"))
                    .expect("wait");
                let got = download_f64(&q, &out);
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g,
                        stored(w, dtype),
                        "{layout:?} {dtype} m={m} n={n} k={k}: element {i} is {g}; the exact \
                         sum {w} rounds to {}",
                        stored(w, dtype)
                    );
                }
            }
        }
    }
}

#[test]
fn matmul_of_one_row_gives_one_row() {
    let dev = device();
    if !has_blas(&dev) {
        return;
    }
    let q = dev.queue();
    let mut rng = Rng::new("ops_matmul_row");
    for dtype in DTYPES {
        for layout in LAYOUTS {
            let (n, k) = (37, 129);
            let av = values(&mut rng, k, dtype);
            let bv = values(&mut rng, k * n, dtype);
            let a = upload_f64(&dev, "x", dtype, &[k], &av);
            let b = upload_f64(&dev, "w", dtype, &layout.b_shape(k, n), &bv);
            let (want, mag) = reference(&av, &bv, (1, n, k), layout);
            let what = format!("1-D a, {layout:?}");
            let y = product(&q, &a, &b, layout).expect(&what);
            assert_eq!(y.shape(), &[n], "{what}");
            assert_close(&what, dtype, k, &download_f64(&q, &y), &want, &mag);
            let out = poisoned(&dev, dtype, &[n]);
            q.wait(product_into(&q, &a, &b, layout, &out).expect(&what))
                .expect("wait");
            assert_close(&what, dtype, k, &download_f64(&q, &out), &want, &mag);
            // A [1, n] output is the wrong shape for a 1-D a.
            let wrong = poisoned(&dev, dtype, &[1, n]);
            assert!(
                matches!(
                    product_into(&q, &a, &b, layout, &wrong),
                    Err(Error::ShapeMismatch {
                        what: "matmul: out",
                        ..
                    })
                ),
                "{what}: a [1, n] output"
            );
        }
    }
}

/// Bytes of `big` outside the rows `range` (of `rows` rows) are still the poison.
fn assert_untouched(q: &Queue, big: &Buffer, rows: usize, range: std::ops::Range<usize>) {
    let bytes = q
        .download::<u8>(&big.cast(DType::U8).expect("cast"))
        .expect("download");
    let row_bytes = bytes.len() / rows;
    for (i, b) in bytes.iter().enumerate() {
        if !range.contains(&(i / row_bytes)) {
            assert_eq!(
                *b, NAN_POISON,
                "byte {i} outside the output view was written"
            );
        }
    }
}

#[test]
fn matmul_reads_and_writes_views() {
    let dev = device();
    if !has_blas(&dev) {
        return;
    }
    let q = dev.queue();
    let mut rng = Rng::new("ops_matmul_views");
    // Views starting at odd element offsets (rows of 7, 5 and 3 elements): 14-, 10- or 6-byte
    // multiples in f16 and bf16, not 16-byte aligned.
    let (m, n, k) = (3, 5, 7);
    for dtype in DTYPES {
        for layout in LAYOUTS {
            let a_rows = 1..1 + m;
            let av_big = values(&mut rng, (m + 2) * k, dtype);
            let a_big = upload_f64(&dev, "a big", dtype, &[m + 2, k], &av_big);
            let a = a_big.rows(a_rows.clone()).expect("rows");
            let av = &av_big[a_rows.start * k..a_rows.end * k];
            // b's rows: k of [k + 3, n] (KxN), or n of [n + 3, k] (NxK: a subset of outputs).
            let b_rows = 2..2 + layout.b_shape(k, n)[0];
            let b_cols = layout.b_shape(k, n)[1];
            let bv_big = values(&mut rng, (b_rows.end + 1) * b_cols, dtype);
            let b_big = upload_f64(&dev, "b big", dtype, &[b_rows.end + 1, b_cols], &bv_big);
            let b = b_big.rows(b_rows.clone()).expect("rows");
            let bv = &bv_big[b_rows.start * b_cols..b_rows.end * b_cols];
            let (want, mag) = reference(av, bv, (m, n, k), layout);
            let what = format!("views, {layout:?} {dtype}");
            let c = product(&q, &a, &b, layout).expect(&what);
            assert_close(&what, dtype, k, &download_f64(&q, &c), &want, &mag);
            let out_rows = 3..3 + m;
            let out_big = poisoned(&dev, dtype, &[m + 4, n]);
            let out = out_big.rows(out_rows.clone()).expect("rows");
            q.wait(product_into(&q, &a, &b, layout, &out).expect(&what))
                .expect("wait");
            assert_close(&what, dtype, k, &download_f64(&q, &out), &want, &mag);
            assert_untouched(&q, &out_big, m + 4, out_rows);
        }
    }
}

#[test]
fn empty_products_are_zeros_or_empty() {
    let dev = device();
    if !has_blas(&dev) {
        return;
    }
    let q = dev.queue();
    for dtype in DTYPES {
        for layout in LAYOUTS {
            let what = format!("{layout:?} {dtype}");
            // k = 0: a sum of no terms is 0 in every element.
            let a = dev.alloc(dtype, &[3, 0], StorageMode::Auto).expect("alloc");
            let b = dev
                .alloc(dtype, &layout.b_shape(0, 5), StorageMode::Auto)
                .expect("alloc");
            let c = product(&q, &a, &b, layout).expect(&what);
            assert_eq!(c.shape(), &[3, 5]);
            assert_eq!(download_f64(&q, &c), vec![0.0; 15], "{what}: k = 0");
            let out = poisoned(&dev, dtype, &[3, 5]);
            q.wait(product_into(&q, &a, &b, layout, &out).expect(&what))
                .expect("wait");
            assert_eq!(download_f64(&q, &out), vec![0.0; 15], "{what}: k = 0, into");
            let row = dev.alloc(dtype, &[0], StorageMode::Auto).expect("alloc");
            let y = product(&q, &row, &b, layout).expect(&what);
            assert_eq!(y.shape(), &[5]);
            assert_eq!(download_f64(&q, &y), vec![0.0; 5], "{what}: 1-D a, k = 0");
            // m = 0 and n = 0: empty results.
            let a = dev.alloc(dtype, &[0, 4], StorageMode::Auto).expect("alloc");
            let b = dev
                .alloc(dtype, &layout.b_shape(4, 5), StorageMode::Auto)
                .expect("alloc");
            let c = product(&q, &a, &b, layout).expect(&what);
            assert_eq!((c.shape(), c.len()), (&[0, 5][..], 0), "{what}: m = 0");
            let a = dev.alloc(dtype, &[3, 4], StorageMode::Auto).expect("alloc");
            let b = dev
                .alloc(dtype, &layout.b_shape(4, 0), StorageMode::Auto)
                .expect("alloc");
            let c = product(&q, &a, &b, layout).expect(&what);
            assert_eq!((c.shape(), c.len()), (&[3, 0][..], 0), "{what}: n = 0");
        }
    }
    q.drain().expect("no fault");
}

#[test]
fn bad_inputs_get_typed_errors_before_anything_runs() {
    let dev = device();
    let q = dev.queue();
    let f32s = |label: &str, shape: &[usize]| {
        let n = shape.iter().product();
        dev.from_slice(label, &vec![1.0f32; n], shape)
            .expect("upload")
    };
    let a = f32s("a", &[3, 4]);
    let b = f32s("b", &[4, 5]);
    let out = poisoned(&dev, DType::F32, &[3, 5]);
    let err = |r: unibuf::Result<Fence>| r.expect_err("expected an error");

    // Dtypes.
    let b16 = dev
        .from_slice("b16", &[f16::ONE; 20], &[4, 5])
        .expect("upload");
    match err(ops::matmul_into(&q, &a, &b16, &out)) {
        Error::DTypeMismatch {
            what,
            expected,
            got,
        } => assert_eq!((what, expected, got), ("matmul: b", DType::F32, DType::F16)),
        e => panic!("a f32, b f16: {e:?}"),
    }
    let out16 = poisoned(&dev, DType::F16, &[3, 5]);
    assert!(matches!(
        err(ops::matmul_into(&q, &a, &b, &out16)),
        Error::DTypeMismatch {
            what: "matmul: out",
            expected: DType::F32,
            got: DType::F16
        }
    ));
    let ints = dev
        .from_slice("ints", &[1u32; 12], &[3, 4])
        .expect("upload");
    match ops::matmul(&q, &ints, &ints) {
        Err(Error::InvalidArgument { detail, .. }) => {
            assert!(
                detail.contains("'ints'") && detail.contains("U32"),
                "{detail}"
            )
        }
        e => panic!("u32 operands: {e:?}"),
    }

    // Shapes: the inner dimension in both layouts, ranks, the output.
    let b_short = f32s("b short", &[3, 5]);
    match err(ops::matmul_into(&q, &a, &b_short, &out)) {
        Error::ShapeMismatch {
            what,
            expected,
            got,
        } => {
            assert!(what.starts_with("matmul: b"), "{what}");
            assert_eq!((expected.as_str(), got.as_str()), ("[4, n]", "[3, 5]"));
        }
        e => panic!("inner dimension: {e:?}"),
    }
    match err(ops::matmul_bt_into(&q, &a, &b, &out)) {
        Error::ShapeMismatch { expected, got, .. } => {
            assert_eq!((expected.as_str(), got.as_str()), ("[n, 4]", "[4, 5]"))
        }
        e => panic!("inner dimension, b as [n, k]: {e:?}"),
    }
    let cube = f32s("cube", &[2, 3, 4]);
    assert!(matches!(
        ops::matmul(&q, &cube, &b),
        Err(Error::InvalidArgument {
            what: "matmul: a",
            ..
        })
    ));
    let flat = f32s("flat", &[4]);
    assert!(matches!(
        ops::matmul(&q, &a, &flat),
        Err(Error::InvalidArgument {
            what: "matmul: b",
            ..
        })
    ));
    for shape in [&[5, 3][..], &[3, 5, 1], &[15], &[3, 6]] {
        let wrong = poisoned(&dev, DType::F32, shape);
        match err(ops::matmul_into(&q, &a, &b, &wrong)) {
            Error::ShapeMismatch {
                what: "matmul: out",
                expected,
                got,
            } => assert_eq!((expected, got), ("[3, 5]".to_owned(), format!("{shape:?}"))),
            e => panic!("output {shape:?}: {e:?}"),
        }
    }

    // The output aliasing an input: in place, and a view overlapping part of one.
    let square = f32s("square", &[4, 4]);
    match err(ops::matmul_into(&q, &square, &square, &square)) {
        Error::InvalidArgument {
            what: "matmul: out",
            detail,
        } => assert!(
            detail.contains("overlaps") && detail.contains("'square'"),
            "{detail}"
        ),
        e => panic!("in place: {e:?}"),
    }
    let both = f32s("both", &[7, 5]);
    let (b_part, out_part) = (
        both.rows(0..4).expect("rows"),
        both.rows(2..5).expect("rows"),
    );
    assert!(matches!(
        err(ops::matmul_into(&q, &a, &b_part, &out_part)),
        Error::InvalidArgument {
            what: "matmul: out",
            ..
        }
    ));
    let flat40 = f32s("flat", &[40]);
    let w_part = flat40
        .slice(0..20)
        .and_then(|v| v.reshape(&[5, 4]))
        .expect("view");
    let out_part = flat40
        .slice(15..30)
        .and_then(|v| v.reshape(&[3, 5]))
        .expect("view");
    match err(ops::matmul_bt_into(&q, &a, &w_part, &out_part)) {
        Error::InvalidArgument {
            what: "matmul: out",
            detail,
        } => assert!(
            detail.contains("bytes 60..120") && detail.contains("input b"),
            "{detail}"
        ),
        e => panic!("output overlapping the weight: {e:?}"),
    }
    // Disjoint views of one allocation are fine.
    let (b_rows, out_rows) = (
        both.rows(0..4).expect("rows"),
        both.rows(4..7).expect("rows"),
    );
    if has_blas(&dev) {
        q.wait(ops::matmul_into(&q, &a, &b_rows, &out_rows).expect("disjoint views"))
            .expect("wait");
    }

    // Buffers of another device.
    let other = device();
    let a_other = other
        .from_slice("a", &[1.0f32; 12], &[3, 4])
        .expect("upload");
    let out_other = poisoned(&other, DType::F32, &[3, 5]);
    for (name, r) in [
        ("a", ops::matmul_into(&q, &a_other, &b, &out)),
        (
            "b",
            ops::matmul_bt_into(
                &q,
                &a,
                &other
                    .from_slice("w", &[1.0f32; 20], &[5, 4])
                    .expect("upload"),
                &out,
            ),
        ),
        ("out", ops::matmul_into(&q, &a, &b, &out_other)),
    ] {
        match err(r) {
            Error::WrongDevice {
                what,
                expected,
                got,
            } => {
                assert_eq!(what, format!("matmul: {name}"));
                assert_eq!((expected, got), (dev.id(), other.id()), "{name}");
            }
            e => panic!("{name} of another device: {e:?}"),
        }
    }
    assert!(matches!(
        ops::matmul(&q, &a_other, &b),
        Err(Error::WrongDevice { .. })
    ));

    // A read-only output: a read-only memory map.
    let path = std::env::temp_dir().join(format!(
        "unibuf-conf-matmul-{}-{}.bin",
        std::process::id(),
        dev.id()
    ));
    std::fs::write(&path, vec![0u8; 60]).expect("write");
    let file = std::fs::File::open(&path).expect("open");
    // SAFETY: the test owns the file and does not modify it while mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.expect("map");
    let ro = dev
        .wrap_external("ro out", map, DType::F32, &[3, 5])
        .expect("wrap");
    assert!(!ro.is_writable());
    match err(ops::matmul_into(&q, &a, &b, &ro)) {
        Error::ReadOnly { what, label } => assert_eq!((what, label.as_str()), ("matmul", "ro out")),
        e => panic!("read-only output: {e:?}"),
    }
    drop(ro);
    std::fs::remove_file(&path).ok();

    // Nothing refused above was submitted: the output still holds its poison, and nothing
    // faulted.
    let bytes = q
        .download::<u8>(&out.cast(DType::U8).expect("cast"))
        .expect("download");
    assert!(
        bytes.iter().all(|&b| b == NAN_POISON),
        "a refused call wrote the output"
    );
    q.drain().expect("no fault");
    other.queue().drain().expect("no fault");
}

#[test]
fn products_are_ordered_by_the_epochs_without_waits() {
    let dev = device();
    if !has_blas(&dev) {
        return;
    }
    let mut rng = Rng::new("ops_matmul_order");
    let (q1, q2, q3) = (
        dev.queue(),
        dev.new_queue("matmul").expect("queue"),
        dev.new_queue("reader").expect("queue"),
    );
    let (m, n, k) = (96, 160, 224);
    let dtype = DType::F32;
    for layout in LAYOUTS {
        let av = values(&mut rng, m * k, dtype);
        let bv = values(&mut rng, k * n, dtype);
        let cv = values(&mut rng, n * 64, dtype);
        let a = dev
            .alloc_labelled("a", dtype, &[m, k], StorageMode::Auto)
            .expect("alloc");
        let b = dev
            .alloc_labelled("b", dtype, &layout.b_shape(k, n), StorageMode::Auto)
            .expect("alloc");
        let c = dev
            .alloc_labelled("c", dtype, &[n, 64], StorageMode::Auto)
            .expect("alloc");
        let to32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        // Uploads on one queue, queued and not waited for.
        q1.upload_async(&a, &to32(&av)).expect("upload");
        q1.upload_async(&b, &to32(&bv)).expect("upload");
        q1.upload_async(&c, &to32(&cv)).expect("upload");
        // The product on another queue, its result fed at once to a second product on a third,
        // read back at once on the first.
        let ab = poisoned(&dev, dtype, &[m, n]);
        product_into(&q2, &a, &b, layout, &ab).expect("a @ b");
        let abc = ops::matmul(&q3, &ab, &c).expect("(a @ b) @ c");
        // Overwriting an input right after: the upload must wait for the product's read.
        q1.upload_async(&a, &vec![f32::NAN; m * k])
            .expect("overwrite a");
        let (want, mag) = reference(&av, &bv, (m, n, k), layout);
        let what = format!("ordering, {layout:?}");
        assert_close(&what, dtype, k, &download_f64(&q1, &ab), &want, &mag);
        let (want2, mag2) = reference(&want, &cv, (m, 64, n), Layout::KxN);
        // The second product's inputs carry the first's error; its magnitude bounds it.
        let mag2: Vec<f64> = mag2.iter().map(|t| t * 2.0).collect();
        assert_close(&what, dtype, n + k, &download_f64(&q1, &abc), &want2, &mag2);
        dev.drain().expect("drain");
    }
}

#[test]
fn products_are_labelled_in_the_stats() {
    let dev = device();
    if !has_blas(&dev) {
        return;
    }
    let q = dev.queue();
    let a = dev
        .from_slice("a", &[f16::ONE; 12], &[3, 4])
        .expect("upload");
    let b = dev
        .from_slice("b", &[f16::ONE; 20], &[4, 5])
        .expect("upload");
    dev.drain().expect("drain");
    dev.reset_submission_stats();
    ops::matmul(&q, &a, &b).expect("matmul");
    ops::matmul_bt(
        &q.labelled("proj"),
        &a,
        &b.reshape(&[5, 4]).expect("reshape"),
    )
    .expect("matmul_bt");
    dev.drain().expect("drain");
    let stats = dev.submission_stats();
    assert_eq!(
        stats.get("unibuf_matmul_f16").map(|s| s.count),
        Some(1),
        "{stats}"
    );
    assert_eq!(stats.get("proj").map(|s| s.count), Some(1), "{stats}");
}

#[test]
fn products_run_on_a_device_opened_after_another_was_dropped() {
    // On CUDA each device has its own cuBLAS handle, created on its first product; a dropped
    // device's handle is destroyed later, which must not disturb the devices that remain.
    let mut rng = Rng::new("ops_matmul_devices");
    for round in 0..3 {
        let dev = device();
        if !has_blas(&dev) {
            return;
        }
        let q = dev.queue();
        let (m, n, k) = (5, 9, 33);
        let av = values(&mut rng, m * k, DType::BF16);
        let bv = values(&mut rng, n * k, DType::BF16);
        let a = upload_f64(&dev, "a", DType::BF16, &[m, k], &av);
        let b = upload_f64(&dev, "w", DType::BF16, &[n, k], &bv);
        let (want, mag) = reference(&av, &bv, (m, n, k), Layout::NxK);
        let c = ops::matmul_bt(&q, &a, &b).expect("matmul_bt");
        assert_close(
            &format!("round {round}"),
            DType::BF16,
            k,
            &download_f64(&q, &c),
            &want,
            &mag,
        );
        drop((a, b, c, q));
        drop(dev);
    }
}
