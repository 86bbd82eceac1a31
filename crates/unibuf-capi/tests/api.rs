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
