//! The C ABI called from Rust as a C program would call it, on the CPU backend: values against
//! references computed here (or written by an independent library), and bad inputs against
//! their statuses and messages.

use std::ffi::{c_void, CStr};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicUsize, Ordering};
use unibuf_capi::ub_status::*;
use unibuf_capi::*;

/// The last error's message.
fn message() -> String {
    // SAFETY: the library returns a valid NUL-terminated string, valid until the next call.
    unsafe { CStr::from_ptr(ub_last_error_message()) }
        .to_str()
        .expect("messages are UTF-8")
        .to_owned()
}

#[track_caller]
fn ok(s: ub_status) {
    assert_eq!(s, UB_STATUS_OK, "{}", message());
}

/// Checks a failure: its status, the last error agreeing, and a message naming `part`.
#[track_caller]
fn fails(s: ub_status, want: ub_status, part: &str) {
    let m = message();
    assert_eq!(s, want, "{m}");
    assert_eq!(ub_last_error_status(), want);
    assert!(m.contains(part), "{m:?} should mention {part:?}");
}

/// A small deterministic generator (SplitMix64), seeded per test.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (self.next() >> 40) as f32 / 16_777_216.0 * 4.0 - 2.0)
            .collect()
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next() >> 56) as u8).collect()
    }
}

struct Dev {
    dev: *mut ub_device,
    q: *mut ub_queue,
}

impl Dev {
    fn open() -> Dev {
        let mut dev = null_mut();
        // SAFETY: a NUL-terminated name and a valid out-pointer.
        ok(unsafe { ub_device_open(c"cpu".as_ptr(), &mut dev) });
        let mut q = null_mut();
        // SAFETY: NULL label, valid out-pointer.
        ok(unsafe { ub_device_queue(dev, null(), &mut q) });
        Dev { dev, q }
    }

    fn alloc(&self, dtype: ub_dtype, shape: &[usize], mode: ub_storage_mode) -> *mut ub_buffer {
        let mut b = null_mut();
        // SAFETY: `shape` is a live slice; valid out-pointer.
        ok(unsafe {
            ub_device_alloc(
                self.dev,
                dtype,
                shape.as_ptr(),
                shape.len(),
                mode,
                c"test".as_ptr(),
                &mut b,
            )
        });
        b
    }

    fn upload<T: Copy>(&self, b: *mut ub_buffer, data: &[T]) {
        // SAFETY: `data` is a live slice of that many bytes.
        ok(unsafe {
            ub_queue_upload(self.q, b, data.as_ptr().cast(), std::mem::size_of_val(data))
        });
    }

    fn download_f32(&self, b: *mut ub_buffer, n: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; n];
        // SAFETY: `out` has n * 4 writable bytes.
        ok(unsafe { ub_queue_download(self.q, b, out.as_mut_ptr().cast(), n * 4) });
        out
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        ok(ub_queue_release(self.q));
        ok(ub_device_release(self.dev));
    }
}

#[test]
fn transfers_round_trip_in_every_mode_and_bad_lengths_are_refused() {
    let d = Dev::open();
    let mut rng = Rng(0x5eed_0001);
    for mode in [UB_STORAGE_SHARED, UB_STORAGE_PRIVATE, UB_STORAGE_AUTO] {
        let b = d.alloc(UB_DTYPE_U8, &[1031], mode);
        let data = rng.bytes(1031);
        d.upload(b, &data);
        let mut back = vec![0xA5u8; 1031];
        // SAFETY: `back` has 1031 writable bytes.
        ok(unsafe { ub_queue_download(d.q, b, back.as_mut_ptr().cast(), 1031) });
        assert_eq!(back, data, "mode {mode}");
        // SAFETY: one byte short: refused before anything is read.
        let s = unsafe { ub_queue_upload(d.q, b, data.as_ptr().cast(), 1030) };
        fails(s, UB_STATUS_SHAPE_MISMATCH, "1031 bytes");
        // SAFETY: a NULL source with a length: refused.
        let s = unsafe { ub_queue_upload(d.q, b, null(), 4) };
        fails(s, UB_STATUS_NULL_POINTER, "src is NULL");
        ok(ub_buffer_release(b));
        fails(
            ub_buffer_release(b),
            UB_STATUS_INVALID_HANDLE,
            "already released",
        );
    }
}

#[test]
fn views_address_the_bytes_they_name() {
    let d = Dev::open();
    let mut rng = Rng(0x5eed_0002);
    let v = rng.f32s(6 * 7);
    let b = d.alloc(UB_DTYPE_F32, &[6, 7], UB_STORAGE_PRIVATE);
    d.upload(b, &v);
    let mut rows = null_mut();
    // SAFETY: valid out-pointer.
    ok(unsafe { ub_buffer_rows(b, 1, 4, &mut rows) });
    assert_eq!(d.download_f32(rows, 21), v[7..28]);
    let mut info = std::mem::MaybeUninit::<ub_buffer_info>::uninit();
    // SAFETY: valid out-pointer; read after the library wrote it.
    let info = unsafe {
        ok(ub_buffer_get_info(rows, info.as_mut_ptr()));
        info.assume_init()
    };
    assert_eq!((info.byte_offset, info.byte_len, info.rank), (28, 84, 2));
    let mut bad = null_mut();
    // SAFETY: valid out-pointer.
    let s = unsafe { ub_buffer_rows(b, 4, 7, &mut bad) };
    fails(s, UB_STATUS_OUT_OF_RANGE, "4..7");
    assert!(bad.is_null());
    // SAFETY: valid out-pointer.
    let s = unsafe { ub_buffer_byte_view(b, usize::MAX, 2, &mut bad) };
    fails(s, UB_STATUS_OUT_OF_RANGE, "out of bounds for length 168");
    ok(ub_buffer_release(rows));
    ok(ub_buffer_release(b));
}

static RELEASED: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn count_release(user_data: *mut c_void) {
    RELEASED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the tests pass a `Box<Vec<f32>>` turned into a raw pointer, or NULL.
    if !user_data.is_null() {
        drop(unsafe { Box::from_raw(user_data.cast::<Vec<f32>>()) });
    }
}

#[test]
fn wrapped_host_memory_is_zero_copy_and_released_once() {
    let d = Dev::open();
    let mut rng = Rng(0x5eed_0003);
    let mut memory = Box::new(rng.f32s(777));
    let ptr = memory.as_mut_ptr();
    let expected = (*memory).clone();
    let owner = Box::into_raw(memory);
    let before = RELEASED.load(Ordering::SeqCst);
    let mut b = null_mut();
    let shape = [777usize];
    // SAFETY: `ptr` addresses 777 f32s owned by `owner`, freed only by `count_release`.
    ok(unsafe {
        ub_device_wrap_host(
            d.dev,
            c"wrapped".as_ptr(),
            ptr.cast(),
            777 * 4,
            true,
            UB_DTYPE_F32,
            shape.as_ptr(),
            1,
            Some(count_release),
            owner.cast(),
            &mut b,
        )
    });
    let mut map = null_mut();
    let mut data = null_mut();
    let mut len = 0;
    // SAFETY: valid out-pointers.
    ok(unsafe { ub_buffer_map(b, UB_MAP_READ, &mut map, &mut data, &mut len) });
    assert_eq!(
        data.cast::<f32>(),
        ptr,
        "the mapping is the caller's memory"
    );
    assert_eq!(len, 777 * 4);
    ok(ub_mapping_release(map));
    assert_eq!(d.download_f32(b, 777), expected);
    assert_eq!(RELEASED.load(Ordering::SeqCst), before);
    ok(ub_buffer_release(b));
    ok(ub_device_drain(d.dev));
    assert_eq!(RELEASED.load(Ordering::SeqCst), before + 1);

    // A misaligned address fails, and the memory is still released exactly once.
    let before = RELEASED.load(Ordering::SeqCst);
    let raw = [0u8; 64];
    // SAFETY: `raw` outlives the call; the failure happens before it is used.
    let s = unsafe {
        ub_device_wrap_host(
            d.dev,
            null(),
            raw.as_ptr().wrapping_add(1).cast_mut().cast(),
            32,
            false,
            UB_DTYPE_F32,
            [4usize].as_ptr(),
            1,
            Some(count_release),
            null_mut(),
            &mut b,
        )
    };
    fails(s, UB_STATUS_MISALIGNED, "memory address for the dtype");
    assert_eq!(RELEASED.load(Ordering::SeqCst), before + 1);
}

#[test]
fn private_buffers_cannot_be_mapped_and_mappings_block_conflicting_work() {
    let d = Dev::open();
    let p = d.alloc(UB_DTYPE_F32, &[9], UB_STORAGE_PRIVATE);
    let (mut map, mut data, mut len) = (null_mut(), null_mut(), 0);
    // SAFETY: valid out-pointers.
    let s = unsafe { ub_buffer_map(p, UB_MAP_READ, &mut map, &mut data, &mut len) };
    fails(s, UB_STATUS_NOT_HOST_ACCESSIBLE, "Private");
    assert!(!ub_last_error_retryable());
    let b = d.alloc(UB_DTYPE_F32, &[9], UB_STORAGE_SHARED);
    // SAFETY: valid out-pointers.
    ok(unsafe { ub_buffer_map(b, UB_MAP_WRITE, &mut map, &mut data, &mut len) });
    let zero = 0u32;
    // SAFETY: a 4-byte pattern.
    let s = unsafe { ub_queue_fill(d.q, b, (&raw const zero).cast(), 4) };
    fails(s, UB_STATUS_HOST_ACCESS_CONFLICT, "host access guard");
    assert!(ub_last_error_retryable());
    ok(ub_mapping_release(map));
    // SAFETY: as above.
    ok(unsafe { ub_queue_fill(d.q, b, (&raw const zero).cast(), 4) });
    ok(ub_buffer_release(p));
    ok(ub_buffer_release(b));
}

#[test]
fn matmul_and_softmax_match_references() {
    let d = Dev::open();
    let mut rng = Rng(0x5eed_0004);
    let (m, k, n) = (5, 11, 3);
    let a = rng.f32s(m * k);
    let b = rng.f32s(k * n);
    let want: Vec<f32> = (0..m * n)
        .map(|ij| {
            let (i, j) = (ij / n, ij % n);
            (0..k)
                .map(|p| f64::from(a[i * k + p]) * f64::from(b[p * n + j]))
                .sum::<f64>() as f32
        })
        .collect();
    let ab = d.alloc(UB_DTYPE_F32, &[m, k], UB_STORAGE_AUTO);
    let bb = d.alloc(UB_DTYPE_F32, &[k, n], UB_STORAGE_AUTO);
    d.upload(ab, &a);
    d.upload(bb, &b);
    let mut c = null_mut();
    // SAFETY: valid out-pointer.
    ok(unsafe { ub_op_matmul(d.q, ab, bb, &mut c) });
    let got = d.download_f32(c, m * n);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
    }
    // SAFETY: valid out-pointer; the inputs have mismatched inner dimensions.
    let s = unsafe { ub_op_matmul(d.q, ab, ab, &mut c) };
    assert_eq!(s, UB_STATUS_SHAPE_MISMATCH, "{}", message());
    let mut sm = null_mut();
    // SAFETY: valid out-pointer.
    ok(unsafe { ub_op_softmax(d.q, ab, &mut sm) });
    let got = d.download_f32(sm, m * k);
    for r in 0..m {
        let row = &a[r * k..(r + 1) * k];
        let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = row.iter().map(|x| f64::from(x - mx).exp()).sum();
        for (i, x) in row.iter().enumerate() {
            let w = (f64::from(x - mx).exp() / z) as f32;
            assert!((got[r * k + i] - w).abs() <= 1e-6, "softmax[{r}, {i}]");
        }
    }
    for h in [ab, bb, c, sm] {
        ok(ub_buffer_release(h));
    }
}

#[test]
fn safetensors_written_by_the_reference_serializer_load_byte_for_byte() {
    let d = Dev::open();
    let mut rng = Rng(0x5eed_0005);
    let w = rng.f32s(4 * 3);
    let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 3], &bytes)
        .expect("a valid view");
    let path = std::env::temp_dir().join(format!("unibuf-capi-{}.safetensors", std::process::id()));
    safetensors::serialize_to_file([("layer.w", view)], None, &path).expect("write the file");
    let cpath = std::ffi::CString::new(path.to_str().expect("UTF-8 path")).expect("no NUL");
    let mut wf = null_mut();
    // SAFETY: a NUL-terminated path, valid out-pointer.
    ok(unsafe { ub_weights_open(cpath.as_ptr(), &mut wf) });
    let mut info = std::mem::MaybeUninit::<ub_tensor_info>::uninit();
    // SAFETY: valid out-pointer; the pointers inside live while `wf` does.
    let info = unsafe {
        ok(ub_weights_tensor_info(wf, 0, info.as_mut_ptr()));
        info.assume_init()
    };
    // SAFETY: the name and shape point into the live weights handle.
    unsafe {
        assert_eq!(CStr::from_ptr(info.name).to_str().unwrap(), "layer.w");
        assert_eq!(std::slice::from_raw_parts(info.shape, info.rank), &[4, 3]);
    }
    let mut b = null_mut();
    // SAFETY: a NUL-terminated name, valid out-pointer.
    ok(unsafe { ub_weights_get_tensor(wf, d.dev, c"layer.w".as_ptr(), &mut b) });
    assert_eq!(d.download_f32(b, 12), w);
    // SAFETY: as above.
    let s = unsafe { ub_weights_get_tensor(wf, d.dev, c"layer.x".as_ptr(), &mut b) };
    fails(s, UB_STATUS_INVALID_ARGUMENT, "layer.x");
    assert!(b.is_null());
    ok(ub_weights_release(wf));
    std::fs::remove_file(&path).ok();
}

#[test]
fn the_copy_report_counts_what_moved() {
    let d = Dev::open();
    ok(ub_device_clear_copy_ledger(d.dev));
    let b = d.alloc(UB_DTYPE_U8, &[333], UB_STORAGE_PRIVATE);
    d.upload(b, &[7u8; 333]);
    let mut r = std::mem::MaybeUninit::<ub_copy_report>::uninit();
    // SAFETY: valid out-pointer; read after the library wrote it.
    let r = unsafe {
        ok(ub_device_copy_report(d.dev, r.as_mut_ptr()));
        r.assume_init()
    };
    assert_eq!((r.host_to_device.count, r.host_to_device.bytes), (1, 333));
    assert_eq!(r.host_to_device.staged_bytes, 333);
    assert_eq!(r.device_to_host, ub_copy_totals::default());
    let mut len = 0;
    // SAFETY: a length query.
    ok(unsafe { ub_device_copy_report_text(d.dev, null_mut(), 0, &mut len) });
    let mut text = vec![0 as std::ffi::c_char; len + 1];
    // SAFETY: `text` has len + 1 bytes.
    ok(unsafe { ub_device_copy_report_text(d.dev, text.as_mut_ptr(), len + 1, &mut len) });
    // SAFETY: NUL-terminated by the library.
    let text = unsafe { CStr::from_ptr(text.as_ptr()) }.to_str().unwrap();
    assert!(text.starts_with("copy audit: 1 transfers"), "{text}");
    ok(ub_buffer_release(b));
}

#[test]
fn handles_of_one_kind_are_not_taken_for_another() {
    let d = Dev::open();
    let as_buffer = d.q.cast::<ub_buffer>();
    fails(
        ub_buffer_release(as_buffer),
        UB_STATUS_INVALID_HANDLE,
        "is a ub_queue handle, not a ub_buffer handle",
    );
    fails(
        ub_device_drain(std::ptr::without_provenance_mut(0xdead_beef)),
        UB_STATUS_INVALID_HANDLE,
        "dev",
    );
}

/// The value of IEEE half-precision bits (normal, subnormal, zero; no infinities are made
/// here).
fn f16_value(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((bits >> 10) & 0x1f);
    let mant = f64::from(bits & 0x3ff);
    sign * if exp == 0 {
        mant * 2f64.powi(-24)
    } else {
        (1.0 + mant / 1024.0) * 2f64.powi(exp - 15)
    }
}

/// Random f16 bits of a normal value of magnitude 2^-6 .. 2^1.
fn f16_bits(rng: &mut Rng) -> u16 {
    let sign = ((rng.next() & 1) as u16) << 15;
    let exp = 9 + (rng.next() % 7) as u16;
    sign | (exp << 10) | (rng.next() & 0x3ff) as u16
}

/// A block format under test: its C value and block bytes.
#[derive(Clone, Copy, Debug)]
enum Format {
    Q8_0,
    Q4_0,
    Q4_1,
}

impl Format {
    fn code(self) -> ub_ggml_type {
        match self {
            Format::Q8_0 => UB_GGML_TYPE_Q8_0,
            Format::Q4_0 => UB_GGML_TYPE_Q4_0,
            Format::Q4_1 => UB_GGML_TYPE_Q4_1,
        }
    }
    fn block_bytes(self) -> usize {
        match self {
            Format::Q8_0 => 34,
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
        }
    }

    /// Random blocks for `rows x cols` weights, with valid f16 scales (and minimums).
    fn random(self, rng: &mut Rng, rows: usize, cols: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..rows * cols / 32 {
            out.extend(f16_bits(rng).to_le_bytes());
            if let Format::Q4_1 = self {
                out.extend(f16_bits(rng).to_le_bytes());
            }
            let codes = if let Format::Q8_0 = self { 32 } else { 16 };
            out.extend(rng.bytes(codes));
        }
        out
    }

    /// The weights of `bytes`, decoded by the table in the ggml module's docs.
    fn dequantize(self, bytes: &[u8]) -> Vec<f64> {
        let mut w = Vec::new();
        for b in bytes.chunks_exact(self.block_bytes()) {
            let d = f16_value(u16::from_le_bytes([b[0], b[1]]));
            match self {
                Format::Q8_0 => w.extend(b[2..].iter().map(|&q| d * f64::from(q as i8))),
                Format::Q4_0 => {
                    w.extend(b[2..].iter().map(|&q| d * (f64::from(q & 15) - 8.0)));
                    w.extend(b[2..].iter().map(|&q| d * (f64::from(q >> 4) - 8.0)));
                }
                Format::Q4_1 => {
                    let m = f16_value(u16::from_le_bytes([b[2], b[3]]));
                    w.extend(b[4..].iter().map(|&q| d * f64::from(q & 15) + m));
                    w.extend(b[4..].iter().map(|&q| d * f64::from(q >> 4) + m));
                }
            }
        }
        w
    }
}

impl Dev {
    /// A matrix of random blocks, and its weights as the reference decodes them.
    fn matrix(
        &self,
        rng: &mut Rng,
        f: Format,
        rows: usize,
        cols: usize,
    ) -> (*mut ub_ggml_matrix, *mut ub_buffer, Vec<f64>) {
        let bytes = f.random(rng, rows, cols);
        let b = self.alloc(
            UB_DTYPE_U8,
            &[rows, cols / 32 * f.block_bytes()],
            UB_STORAGE_AUTO,
        );
        self.upload(b, &bytes);
        let mut m = null_mut();
        // SAFETY: valid out-pointer.
        ok(unsafe { ub_ggml_matrix_new(b, f.code(), rows, cols, &mut m) });
        (m, b, f.dequantize(&bytes))
    }
}

/// `w x` per row of x in f64, and the sum of the products' magnitudes (for the tolerance).
fn products(w: &[f64], rows: usize, cols: usize, x: &[f32]) -> Vec<(f64, f64)> {
    x.chunks(cols)
        .flat_map(|xr| {
            (0..rows).map(move |r| {
                let wr = &w[r * cols..(r + 1) * cols];
                let p = wr.iter().zip(xr).map(|(w, x)| w * f64::from(*x));
                p.fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()))
            })
        })
        .collect()
}

#[track_caller]
fn assert_products(got: &[f32], want: &[(f64, f64)]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, (w, mag))) in got.iter().zip(want).enumerate() {
        assert!(
            (f64::from(*g) - w).abs() <= 1e-5 * (1.0 + mag),
            "[{i}]: {g} vs {w}"
        );
    }
}

/// The RMS norm of each row of `x` times `weight`, in f64.
fn rms_normed(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    x.chunks(weight.len())
        .flat_map(|row| {
            let ms = row.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / row.len() as f64;
            let inv = 1.0 / (ms + f64::from(eps)).sqrt();
            row.iter()
                .zip(weight)
                .map(move |(v, w)| (f64::from(*v) * inv * f64::from(*w)) as f32)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn ggml_products_match_references_in_every_format() {
    let d = Dev::open();
    let mut rng = Rng(0x5eed_0006);
    let (rows, cols, batch) = (7, 96, 3);
    let x = rng.f32s(batch * cols);
    let xb = d.alloc(UB_DTYPE_F32, &[batch, cols], UB_STORAGE_AUTO);
    d.upload(xb, &x);
    for f in [Format::Q8_0, Format::Q4_0, Format::Q4_1] {
        let (m, bytes, w) = d.matrix(&mut rng, f, rows, cols);
        let mut info = ub_ggml_matrix_info::default();
        // SAFETY: valid out-pointer.
        ok(unsafe { ub_ggml_matrix_get_info(m, &mut info) });
        let want_info = ub_ggml_matrix_info {
            ggml_type: f.code(),
            rows,
            cols,
            row_bytes: cols / 32 * f.block_bytes(),
        };
        assert_eq!(info, want_info, "{f:?}");
        let mut y = null_mut();
        // SAFETY: valid out-pointer.
        ok(unsafe { ub_op_ggml_matvec(d.q, m, xb, &mut y) });
        assert_products(
            &d.download_f32(y, batch * rows),
            &products(&w, rows, cols, &x),
        );
        // The dense weights, exact in f32.
        let mut dense = null_mut();
        // SAFETY: valid out-pointer.
        ok(unsafe { ub_op_ggml_dequantize(d.q, m, UB_DTYPE_F32, &mut dense) });
        let want: Vec<f32> = w.iter().map(|v| *v as f32).collect();
        assert_eq!(d.download_f32(dense, rows * cols), want, "{f:?}");
        for h in [y, dense, bytes] {
            ok(ub_buffer_release(h));
        }
        ok(ub_ggml_matrix_release(m));
        fails(
            ub_ggml_matrix_release(m),
            UB_STATUS_INVALID_HANDLE,
            "already released",
        );
    }
}

#[test]
fn ggml_matvec_norm_stacks_matrices_of_different_formats() {
    let d = Dev::open();
    let mut rng = Rng(0x5eed_0007);
    let (cols, batch, eps) = (64, 2, 1e-5f32);
    let x = rng.f32s(batch * cols);
    let nw = rng.f32s(cols);
    let xb = d.alloc(UB_DTYPE_F32, &[batch, cols], UB_STORAGE_AUTO);
    let nb = d.alloc(UB_DTYPE_F32, &[cols], UB_STORAGE_AUTO);
    d.upload(xb, &x);
    d.upload(nb, &nw);
    let shapes = [(Format::Q4_1, 5), (Format::Q8_0, 3), (Format::Q4_0, 1)];
    let made: Vec<_> = shapes
        .iter()
        .map(|&(f, rows)| d.matrix(&mut rng, f, rows, cols))
        .collect();
    let handles: Vec<*mut ub_ggml_matrix> = made.iter().map(|m| m.0).collect();
    let n = rms_normed(&x, &nw, eps);
    let total: usize = shapes.iter().map(|s| s.1).sum();
    let mut want = Vec::new();
    for b in 0..batch {
        for ((_, rows), (_, _, w)) in shapes.iter().zip(&made) {
            want.extend(products(w, *rows, cols, &n[b * cols..(b + 1) * cols]));
        }
    }
    let out = d.alloc(UB_DTYPE_F32, &[batch, total], UB_STORAGE_SHARED);
    d.upload(out, &vec![f32::NAN; batch * total]);
    let mut f = ub_fence::default();
    // SAFETY: `handles` holds 3 handles; valid fence out-pointer.
    ok(unsafe { ub_op_ggml_matvec_norm_into(d.q, handles.as_ptr(), 3, xb, nb, eps, out, &mut f) });
    ok(ub_device_wait(d.dev, f));
    let got = d.download_f32(out, batch * total);
    for (i, (g, (w, mag))) in got.iter().zip(&want).enumerate() {
        // The normalised x is f32 in the kernel: a few roundings more than the products.
        assert!(
            (f64::from(*g) - w).abs() <= 1e-4 * (1.0 + mag),
            "[{i}]: {g} vs {w}"
        );
    }

    // Bad inputs, each with its status and the value that was wrong.
    let four = [handles[0], handles[1], handles[2], handles[0]];
    let mut bad = null_mut();
    // SAFETY: the count is refused before the array is read.
    let s = unsafe { ub_op_ggml_matvec_norm(d.q, four.as_ptr(), 4, xb, nb, eps, &mut bad) };
    fails(s, UB_STATUS_INVALID_ARGUMENT, "at most 3");
    // SAFETY: a count of 0 reads nothing.
    let s = unsafe { ub_op_ggml_matvec_norm(d.q, null(), 0, xb, nb, eps, &mut bad) };
    fails(s, UB_STATUS_INVALID_ARGUMENT, "no matrix");
    let (other, other_bytes, _) = d.matrix(&mut rng, Format::Q8_0, 2, 96);
    let mixed = [handles[0], other];
    // SAFETY: `mixed` holds 2 handles.
    let s = unsafe { ub_op_ggml_matvec_norm(d.q, mixed.as_ptr(), 2, xb, nb, eps, &mut bad) };
    fails(s, UB_STATUS_SHAPE_MISMATCH, "cols");
    let not_a_matrix = [handles[0], xb.cast::<ub_ggml_matrix>()];
    // SAFETY: `not_a_matrix` holds 2 values; the second is looked up, never dereferenced.
    let s = unsafe { ub_op_ggml_matvec_norm(d.q, not_a_matrix.as_ptr(), 2, xb, nb, eps, &mut bad) };
    fails(s, UB_STATUS_INVALID_HANDLE, "matrices[1] (");
    assert!(message().contains("is a ub_buffer handle, not a ub_ggml_matrix handle"));
    // SAFETY: valid out-pointer.
    let s = unsafe { ub_op_ggml_matvec(d.q, other, xb, &mut bad) };
    fails(s, UB_STATUS_SHAPE_MISMATCH, "[96]");
    // SAFETY: as above.
    let s = unsafe { ub_op_ggml_matvec_norm(d.q, handles.as_ptr(), 1, xb, nb, -1.0, &mut bad) };
    fails(s, UB_STATUS_INVALID_ARGUMENT, "eps");
    assert!(bad.is_null());
    for (m, b, _) in made {
        ok(ub_ggml_matrix_release(m));
        ok(ub_buffer_release(b));
    }
    ok(ub_ggml_matrix_release(other));
    for h in [other_bytes, xb, nb, out] {
        ok(ub_buffer_release(h));
    }
}

#[test]
fn ggml_matrices_refuse_bad_geometry_and_formats() {
    let d = Dev::open();
    let b = d.alloc(UB_DTYPE_U8, &[2, 34], UB_STORAGE_AUTO);
    let f = d.alloc(UB_DTYPE_F32, &[2, 34], UB_STORAGE_AUTO);
    let mut m = null_mut();
    // SAFETY: valid out-pointers in every call below.
    unsafe {
        ok(ub_ggml_matrix_new(b, UB_GGML_TYPE_Q8_0, 2, 32, &mut m));
        ok(ub_ggml_matrix_release(m));
        let s = ub_ggml_matrix_new(b, UB_GGML_TYPE_Q8_0, 2, 33, &mut m);
        fails(s, UB_STATUS_INVALID_ARGUMENT, "multiple of 32");
        assert!(m.is_null());
        let s = ub_ggml_matrix_new(b, UB_GGML_TYPE_Q8_0, 3, 32, &mut m);
        fails(s, UB_STATUS_SHAPE_MISMATCH, "[3, 34]");
        let s = ub_ggml_matrix_new(b, UB_GGML_TYPE_Q4_0, 2, 32, &mut m);
        fails(s, UB_STATUS_SHAPE_MISMATCH, "[2, 18]");
        let s = ub_ggml_matrix_new(f, UB_GGML_TYPE_Q8_0, 2, 32, &mut m);
        fails(s, UB_STATUS_DTYPE_MISMATCH, "F32");
        // Q6_K (14) is a GGUF format without kernels of its own; 1000 is no format.
        let s = ub_ggml_matrix_new(b, 14, 2, 32, &mut m);
        fails(s, UB_STATUS_UNSUPPORTED, "Q6_K");
        let s = ub_ggml_matrix_new(b, 1000, 2, 32, &mut m);
        fails(
            s,
            UB_STATUS_INVALID_ARGUMENT,
            "1000 is not a GGUF type code",
        );
        let s = ub_ggml_matrix_new(b, UB_GGML_TYPE_Q8_0, 2, 32, null_mut());
        fails(s, UB_STATUS_NULL_POINTER, "matrix_out");
    }
    ok(ub_buffer_release(b));
    ok(ub_buffer_release(f));
}

#[test]
fn a_launch_batch_replays_its_ops_on_new_inputs() {
    let d = Dev::open();
    let mut rng = Rng(0x5eed_0008);
    let (rows, cols, eps) = (9, 64, 1e-6f32);
    let (m, bytes, w) = d.matrix(&mut rng, Format::Q4_1, rows, cols);
    let x = d.alloc(UB_DTYPE_F32, &[1, cols], UB_STORAGE_AUTO);
    let nw = rng.f32s(cols);
    let nb = d.alloc(UB_DTYPE_F32, &[cols], UB_STORAGE_AUTO);
    d.upload(nb, &nw);
    let y = d.alloc(UB_DTYPE_F32, &[1, rows], UB_STORAGE_AUTO);
    let p = d.alloc(UB_DTYPE_F32, &[1, rows], UB_STORAGE_AUTO);
    let mut batch = null_mut();
    let mut rq = null_mut();
    // SAFETY: a NUL-terminated label and valid out-pointers.
    unsafe {
        ok(ub_launch_batch_new(
            d.dev,
            c"decode step".as_ptr(),
            &mut batch,
        ));
        ok(ub_launch_batch_queue(batch, &mut rq));
    }
    // An empty batch is not submitted.
    // SAFETY: NULL fence out-pointer.
    let s = unsafe { ub_queue_launch_batch(d.q, batch, null_mut()) };
    fails(s, UB_STATUS_INVALID_ARGUMENT, "has no launch");
    let handles = [m];
    let mut f = ub_fence::default();
    // SAFETY: `handles` holds one handle; valid out-pointers.
    unsafe {
        ok(ub_op_ggml_matvec_norm_into(
            rq,
            handles.as_ptr(),
            1,
            x,
            nb,
            eps,
            y,
            &mut f,
        ));
        ok(ub_op_softmax_into(rq, y, p, null_mut()));
    }
    let mut done = false;
    // SAFETY: valid out-pointer.
    ok(unsafe { ub_device_is_complete(d.dev, f, &mut done) });
    assert!(
        done,
        "a recorded op's fence is complete: nothing was submitted"
    );
    let mut len = 0;
    // SAFETY: valid out-pointer.
    ok(unsafe { ub_launch_batch_len(batch, &mut len) });
    assert_eq!(len, 2);
    // A refused op appends nothing; matmul cannot be recorded; transfers refuse the queue.
    // SAFETY: valid out-pointers; the bad calls fail before anything is read.
    unsafe {
        let s = ub_op_softmax_into(rq, y, x, null_mut());
        fails(s, UB_STATUS_SHAPE_MISMATCH, "");
        let s = ub_op_matmul_into(rq, y, y, p, null_mut());
        fails(s, UB_STATUS_UNSUPPORTED, "cannot record");
        let s = ub_queue_upload(rq, x, nw.as_ptr().cast(), cols * 4);
        fails(
            s,
            UB_STATUS_INVALID_ARGUMENT,
            "recording queue of the launch batch 'decode step'",
        );
        let s = ub_queue_launch_batch(rq, batch, null_mut());
        fails(s, UB_STATUS_INVALID_ARGUMENT, "recording queue");
        ok(ub_launch_batch_len(batch, &mut len));
    }
    assert_eq!(len, 2, "nothing appended by the refused calls");
    fails(
        ub_queue_drain(rq),
        UB_STATUS_INVALID_ARGUMENT,
        "recording queue",
    );
    for step in 0..2 {
        let xv = rng.f32s(cols);
        d.upload(x, &xv);
        d.upload(y, &vec![f32::NAN; rows]);
        d.upload(p, &vec![f32::NAN; rows]);
        let mut f = ub_fence::default();
        // SAFETY: valid out-pointer.
        ok(unsafe { ub_queue_launch_batch(d.q, batch, &mut f) });
        ok(ub_device_wait(d.dev, f));
        let want = products(&w, rows, cols, &rms_normed(&xv, &nw, eps));
        let got = d.download_f32(y, rows);
        for (i, (g, (v, mag))) in got.iter().zip(&want).enumerate() {
            assert!(
                (f64::from(*g) - v).abs() <= 1e-4 * (1.0 + mag),
                "step {step} y[{i}]"
            );
        }
        let mx = got.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = got.iter().map(|v| f64::from(v - mx).exp()).sum();
        for (i, (pv, g)) in d.download_f32(p, rows).iter().zip(&got).enumerate() {
            let want = (f64::from(g - mx).exp() / z) as f32;
            assert!(
                (pv - want).abs() <= 1e-6,
                "step {step} p[{i}]: {pv} vs {want}"
            );
        }
    }
    let mut label = [0 as std::ffi::c_char; 16];
    // SAFETY: `label` has 16 bytes.
    ok(unsafe { ub_launch_batch_label(batch, label.as_mut_ptr(), 16, &mut len) });
    // SAFETY: NUL-terminated by the library.
    let label = unsafe { CStr::from_ptr(label.as_ptr()) };
    assert_eq!(label.to_str().unwrap(), "decode step");
    ok(ub_queue_release(rq));
    ok(ub_launch_batch_release(batch));
    fails(
        ub_launch_batch_release(batch),
        UB_STATUS_INVALID_HANDLE,
        "ub_launch_batch",
    );
    ok(ub_ggml_matrix_release(m));
    for h in [bytes, x, nb, y, p] {
        ok(ub_buffer_release(h));
    }
}
