//! Transfers: upload, download, copy and fill, synchronous or returning a fence.
//!
//! Host data crosses the boundary as bytes: `len` must be exactly the buffer's byte length
//! (whatever its dtype). The route (a host memcpy for Shared and External buffers, staging for
//! Private ones) is the library's choice, and every transfer is recorded in the copy ledger.

use crate::buffer::{buffer, bytes_of, ub_buffer};
use crate::call::{bytes_in, bytes_out, call, Out};
use crate::error::{ub_status, CResult, Failure};
use crate::fence::{ub_fence, write_fence};
use crate::handle::{from_ptr, to_ptr, Kind, Registry};
use crate::queue::{queue, ub_queue};
use parking_lot::Mutex;
use std::ffi::c_void;
use unibuf::{Buffer, FillPattern, PendingDownload};

/// Checks that `len` host bytes match `b`'s byte length.
fn check_len(what: &'static str, b: &Buffer, len: usize) -> CResult<()> {
    if len != b.byte_len() {
        return Err(unibuf::Error::ShapeMismatch {
            what,
            expected: format!(
                "{} bytes (buffer '{}', {} x {:?})",
                b.byte_len(),
                b.label(),
                b.dtype(),
                b.shape()
            ),
            got: format!("{len} bytes"),
        }
        .into());
    }
    Ok(())
}

/// Uploads `len` bytes at `src` into `dst` and waits until they are there.
///
/// Errors: `UB_STATUS_SHAPE_MISMATCH` if `len` is not `dst`'s byte length, `UB_STATUS_READ_ONLY`
/// for read-only memory, `UB_STATUS_HOST_ACCESS_CONFLICT` while a mapping of `dst` lives.
///
/// # Safety
/// `src` points to `len` readable bytes (NULL allowed for 0) not written during the call.
#[no_mangle]
pub unsafe extern "C" fn ub_queue_upload(
    queue: *mut ub_queue,
    dst: *mut ub_buffer,
    src: *const c_void,
    len: usize,
) -> ub_status {
    call("ub_queue_upload", || {
        // SAFETY: the caller's contract.
        let data = unsafe { bytes_in("src", src, len) }?;
        let q = self::queue(queue)?;
        let b = buffer("dst", dst)?;
        check_len("upload: src length", &b, len)?;
        Ok(q.upload(&bytes_of(&b)?, data)?)
    })
}

/// Uploads `len` bytes at `src` into `dst` and returns at once with the fence that completes
/// when they are there, in `*fence_out`. `src` may be reused as soon as this returns: the bytes
/// were copied into `dst` or into staging. Errors as `ub_queue_upload`.
///
/// # Safety
/// As `ub_queue_upload`; `fence_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_queue_upload_async(
    queue: *mut ub_queue,
    dst: *mut ub_buffer,
    src: *const c_void,
    len: usize,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_queue_upload_async", || {
        let out = Out::new("fence_out", fence_out)?;
        // SAFETY: the caller's contract.
        let data = unsafe { bytes_in("src", src, len) }?;
        let q = self::queue(queue)?;
        let b = buffer("dst", dst)?;
        check_len("upload: src length", &b, len)?;
        let f = q.upload_async(&bytes_of(&b)?, data)?;
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(f.into()) };
        Ok(())
    })
}

/// Downloads `src` into `len` bytes at `dst`, waiting for the work that writes it.
///
/// Errors: `UB_STATUS_SHAPE_MISMATCH` if `len` is not `src`'s byte length.
///
/// # Safety
/// `dst` points to `len` writable bytes (NULL allowed for 0) not accessed otherwise during the
/// call.
#[no_mangle]
pub unsafe extern "C" fn ub_queue_download(
    queue: *mut ub_queue,
    src: *mut ub_buffer,
    dst: *mut c_void,
    len: usize,
) -> ub_status {
    call("ub_queue_download", || {
        // SAFETY: the caller's contract.
        let out = unsafe { bytes_out("dst", dst, len) }?;
        let q = self::queue(queue)?;
        let b = buffer("src", src)?;
        check_len("download: dst length", &b, len)?;
        Ok(q.download_into(&bytes_of(&b)?, out)?)
    })
}

/// A download in flight: the bytes of a buffer as of a point in a queue's order, copied to
/// host memory when it completes. Opaque; release with `ub_download_release`.
pub struct ub_download {
    _opaque: [u8; 0],
}

/// A pending download, taken by the wait.
struct Download {
    pending: Mutex<Option<PendingDownload<u8>>>,
    len: usize,
    label: String,
}

static DOWNLOADS: Registry<Download> = Registry::new(Kind::Download);

/// Starts downloading `src`: its bytes as of this point in the queue's order are copied into
/// a host-visible snapshot on the device; `ub_download_wait` hands them over. The fence of the
/// copy goes to `*fence_out` (optional: may be NULL).
///
/// # Safety
/// `download_out` is valid for a write; `fence_out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_queue_download_async(
    queue: *mut ub_queue,
    src: *mut ub_buffer,
    download_out: *mut *mut ub_download,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_queue_download_async", || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("download_out", download_out) }?;
        let fence = Out::optional("fence_out", fence_out)?;
        let q = self::queue(queue)?;
        let b = buffer("src", src)?;
        let pending = q.download_async::<u8>(&bytes_of(&b)?)?;
        let f = pending.fence();
        let h = DOWNLOADS.insert(Download {
            pending: Mutex::new(Some(pending)),
            len: b.byte_len(),
            label: b.label().to_owned(),
        })?;
        // SAFETY: checked; valid by the caller's contract.
        unsafe {
            out.write(to_ptr(h));
            write_fence(fence, f);
        }
        Ok(())
    })
}

/// Waits for the download and copies its bytes into `len` bytes at `dst` (`len` must be the
/// source's byte length). A download hands its bytes over once: a second wait is
/// `UB_STATUS_INVALID_ARGUMENT`. The handle still needs `ub_download_release`.
///
/// # Safety
/// `dst` points to `len` writable bytes (NULL allowed for 0) not accessed otherwise during the
/// call.
#[no_mangle]
pub unsafe extern "C" fn ub_download_wait(
    download: *mut ub_download,
    dst: *mut c_void,
    len: usize,
) -> ub_status {
    call("ub_download_wait", || {
        // SAFETY: the caller's contract.
        let out = unsafe { bytes_out("dst", dst, len) }?;
        let d = DOWNLOADS.get("download", from_ptr(download))?;
        if len != d.len {
            return Err(unibuf::Error::ShapeMismatch {
                what: "download wait: dst length",
                expected: format!("{} bytes (buffer '{}')", d.len, d.label),
                got: format!("{len} bytes"),
            }
            .into());
        }
        let pending = d.pending.lock().take().ok_or_else(|| {
            Failure::invalid(
                "download",
                format!(
                    "the download of '{}' was already waited for: it hands its bytes over \
                         once",
                    d.label
                ),
            )
        })?;
        let bytes = pending.wait()?;
        out.copy_from_slice(&bytes);
        Ok(())
    })
}

/// Releases a download (waited for or not: its snapshot is freed after the copy completes).
/// NULL is a no-op; releasing twice is `UB_STATUS_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn ub_download_release(download: *mut ub_download) -> ub_status {
    call("ub_download_release", || {
        DOWNLOADS.release(from_ptr(download))
    })
}

/// Live downloads (for the handle counts).
pub(crate) fn live_downloads() -> usize {
    DOWNLOADS.live()
}

/// Copies `src` into `dst` on the device (same dtype and element count, any storage modes)
/// and waits.
///
/// Errors: `UB_STATUS_DTYPE_MISMATCH`, `UB_STATUS_SHAPE_MISMATCH`, `UB_STATUS_INVALID_ARGUMENT`
/// when the two views overlap in one allocation.
#[no_mangle]
pub extern "C" fn ub_queue_copy(
    queue: *mut ub_queue,
    src: *mut ub_buffer,
    dst: *mut ub_buffer,
) -> ub_status {
    call("ub_queue_copy", || {
        let q = self::queue(queue)?;
        Ok(q.copy(&*buffer("src", src)?, &*buffer("dst", dst)?)?)
    })
}

/// Queues a device copy of `src` into `dst` and returns its fence in `*fence_out` at once.
/// Errors as `ub_queue_copy`.
///
/// # Safety
/// `fence_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_queue_copy_async(
    queue: *mut ub_queue,
    src: *mut ub_buffer,
    dst: *mut ub_buffer,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_queue_copy_async", || {
        let out = Out::new("fence_out", fence_out)?;
        let q = self::queue(queue)?;
        let f = q.copy_async(&*buffer("src", src)?, &*buffer("dst", dst)?)?;
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(f.into()) };
        Ok(())
    })
}

/// The fill pattern of `width` bytes at `pattern` (1, 2, 4 or 8; native byte order).
///
/// # Safety
/// `pattern` points to `width` readable bytes.
unsafe fn pattern_in(pattern: *const c_void, width: usize) -> CResult<FillPattern> {
    if !matches!(width, 1 | 2 | 4 | 8) {
        return Err(Failure::invalid(
            "pattern_width",
            format!("{width} bytes: a fill pattern is 1, 2, 4 or 8 bytes"),
        ));
    }
    // SAFETY: the caller's contract.
    let b = unsafe { bytes_in("pattern", pattern, width) }?;
    let mut v = [0u8; 8];
    v[..width].copy_from_slice(b);
    Ok(match width {
        1 => FillPattern::u8(v[0]),
        2 => FillPattern::u16(u16::from_ne_bytes([v[0], v[1]])),
        4 => FillPattern::u32(u32::from_ne_bytes([v[0], v[1], v[2], v[3]])),
        _ => FillPattern::u64(u64::from_ne_bytes(v)),
    })
}

/// Fills `dst` with the repeating pattern of `pattern_width` bytes (1, 2, 4 or 8, native byte
/// order: a `float` value's bytes fill with that float) and waits. Zeroing is a 1-byte 0.
///
/// Errors: `UB_STATUS_INVALID_ARGUMENT` for another width, `UB_STATUS_MISALIGNED` when the view's
/// byte offset or length is not a multiple of the width.
///
/// # Safety
/// `pattern` points to `pattern_width` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn ub_queue_fill(
    queue: *mut ub_queue,
    dst: *mut ub_buffer,
    pattern: *const c_void,
    pattern_width: usize,
) -> ub_status {
    call("ub_queue_fill", || {
        // SAFETY: the caller's contract.
        let p = unsafe { pattern_in(pattern, pattern_width) }?;
        let q = self::queue(queue)?;
        Ok(q.fill(&*buffer("dst", dst)?, p)?)
    })
}

/// Queues a fill of `dst` (as `ub_queue_fill`) and returns its fence in `*fence_out` at once.
///
/// # Safety
/// `pattern` points to `pattern_width` readable bytes; `fence_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_queue_fill_async(
    queue: *mut ub_queue,
    dst: *mut ub_buffer,
    pattern: *const c_void,
    pattern_width: usize,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_queue_fill_async", || {
        let out = Out::new("fence_out", fence_out)?;
        // SAFETY: the caller's contract.
        let p = unsafe { pattern_in(pattern, pattern_width) }?;
        let q = self::queue(queue)?;
        let f = q.fill_async(&*buffer("dst", dst)?, p)?;
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(f.into()) };
        Ok(())
    })
}
