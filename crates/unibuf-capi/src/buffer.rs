//! Buffers: allocation with a storage mode and a label, what a buffer is, and views.

use crate::call::{call, opt_str_in, shape_in, write_str, Out};
use crate::device::{device, ub_device};
use crate::error::{ub_status, CResult, Failure};
use crate::handle::{from_ptr, to_ptr, Kind, Registry};
use crate::types::{dtype_in, dtype_out, mode_in, mode_out, ub_dtype, ub_storage_mode};
use std::ffi::c_char;
use std::sync::Arc;
use unibuf::{Buffer, DType, StorageMode};

/// A typed, row-major view of device memory: a whole allocation or a view of one. Opaque;
/// release with `ub_buffer_release`.
///
/// Views share memory and keep it alive: the memory is reused only after the last view is
/// released and the last work that used it has completed, so releasing a buffer while work
/// on it is in flight is safe.
pub struct ub_buffer {
    _opaque: [u8; 0],
}

pub(crate) static BUFFERS: Registry<Buffer> = Registry::new(Kind::Buffer);

/// The buffer named by `b`; `what` names the argument in errors.
pub(crate) fn buffer(what: &'static str, b: *mut ub_buffer) -> CResult<Arc<Buffer>> {
    BUFFERS.get(what, from_ptr(b))
}

/// Registers `b` and returns its handle.
pub(crate) fn new_buffer_handle(b: Buffer) -> CResult<*mut ub_buffer> {
    BUFFERS.insert(b).map(to_ptr)
}

/// What a buffer is. Filled by `ub_buffer_get_info`; the shape itself comes from
/// `ub_buffer_shape`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ub_buffer_info {
    /// The element type.
    pub dtype: ub_dtype,
    /// The storage mode it resolved to (never `UB_STORAGE_AUTO`).
    pub mode: ub_storage_mode,
    /// Dimensions of the shape.
    pub rank: usize,
    /// Elements in the view.
    pub len: usize,
    /// Bytes in the view.
    pub byte_len: usize,
    /// The view's offset in its allocation, in bytes.
    pub byte_offset: usize,
    /// The device address of the first element (a host address on the CPU backend).
    pub device_address: u64,
    /// Whether the host can map it (`ub_buffer_map`): Shared, External, host Foreign memory.
    pub host_accessible: bool,
    /// Whether it can be written (false over read-only memory).
    pub writable: bool,
}

/// Allocates a buffer of `dtype` x `shape` (`rank` dimensions) in `mode` (Shared, Private or
/// Auto; External and Foreign memory is wrapped, not allocated), labelled `label` (NULL: no
/// label) for errors, stats and the copy ledger. Its contents are unspecified until written.
///
/// Errors: `UB_STATUS_INVALID_ARGUMENT` for External/Foreign or an unknown mode or dtype, or a
/// shape whose byte size overflows; `UB_STATUS_OUT_OF_MEMORY`, `UB_STATUS_NEVER_FITS`,
/// `UB_STATUS_BUDGET_EXCEEDED` when it cannot be had.
///
/// # Safety
/// `shape` is NULL with `rank` 0, or points to `rank` `size_t`s; `label` is NULL or a
/// NUL-terminated string; `buf_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_device_alloc(
    dev: *mut ub_device,
    dtype: ub_dtype,
    shape: *const usize,
    rank: usize,
    mode: ub_storage_mode,
    label: *const c_char,
    buf_out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_device_alloc", || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("buf_out", buf_out) }?;
        // SAFETY: the caller's contract.
        let shape = unsafe { shape_in(shape, rank) }?;
        // SAFETY: the caller's contract.
        let label = unsafe { opt_str_in("label", label, "") }?;
        let d = device(dev)?;
        let dtype = dtype_in("dtype", dtype)?;
        let mode = match mode_in("mode", mode)? {
            m @ (StorageMode::External | StorageMode::Foreign) => {
                return Err(Failure::invalid(
                    "mode",
                    format!(
                        "{} memory is wrapped, not allocated: use ub_device_wrap_host or \
                         ub_device_wrap_foreign (allocate Shared, Private or Auto)",
                        m.name()
                    ),
                ))
            }
            m => m,
        };
        let b = d.alloc_labelled(label, dtype, shape, mode)?;
        // SAFETY: checked by `Out::handle`.
        unsafe { out.write(new_buffer_handle(b)?) };
        Ok(())
    })
}

/// Releases a buffer handle (a buffer or a view). NULL is a no-op; releasing a handle twice
/// is `UB_STATUS_INVALID_HANDLE`. Other views of the memory stay valid.
#[no_mangle]
pub extern "C" fn ub_buffer_release(buf: *mut ub_buffer) -> ub_status {
    call("ub_buffer_release", || BUFFERS.release(from_ptr(buf)))
}

/// Writes what `buf` is into `*info_out`.
///
/// # Safety
/// `info_out` is valid for a write of `ub_buffer_info`.
#[no_mangle]
pub unsafe extern "C" fn ub_buffer_get_info(
    buf: *mut ub_buffer,
    info_out: *mut ub_buffer_info,
) -> ub_status {
    call("ub_buffer_get_info", || {
        let out = Out::new("info_out", info_out)?;
        let b = buffer("buf", buf)?;
        let info = ub_buffer_info {
            dtype: dtype_out(b.dtype()),
            mode: mode_out(b.mode()),
            rank: b.shape().len(),
            len: b.len(),
            byte_len: b.byte_len(),
            byte_offset: b.byte_offset(),
            device_address: b.device_address(),
            host_accessible: b.is_host_accessible(),
            writable: b.is_writable(),
        };
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(info) };
        Ok(())
    })
}

/// Writes the shape of `buf` into `dims` (room for `cap` dimensions) and its rank into
/// `*rank_out`. `dims` NULL with `cap` 0 asks for the rank; a `cap` below the rank is
/// `UB_STATUS_BUFFER_TOO_SMALL` (with `*rank_out` set, `dims` untouched).
///
/// # Safety
/// `dims` is NULL or valid for `cap` `size_t` writes; `rank_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_buffer_shape(
    buf: *mut ub_buffer,
    dims: *mut usize,
    cap: usize,
    rank_out: *mut usize,
) -> ub_status {
    call("ub_buffer_shape", || {
        let rank_out = Out::new("rank_out", rank_out)?;
        let b = buffer("buf", buf)?;
        let shape = b.shape();
        // SAFETY: checked; valid by the caller's contract.
        unsafe { rank_out.write(shape.len()) };
        if dims.is_null() {
            return if cap == 0 {
                Ok(())
            } else {
                Err(Failure::null("dims (with cap > 0)"))
            };
        }
        if cap < shape.len() {
            return Err(Failure::new(
                ub_status::UB_STATUS_BUFFER_TOO_SMALL,
                format!(
                    "the shape {shape:?} has {} dimensions, dims has room for {cap}",
                    shape.len()
                ),
            ));
        }
        if !dims.is_aligned() {
            return Err(unibuf::Error::Misaligned {
                what: "dims",
                value: dims.addr(),
                align: std::mem::align_of::<usize>(),
            }
            .into());
        }
        // SAFETY: `dims` is non-NULL, aligned and valid for `cap` >= rank writes (caller's
        // contract); the shape is the library's own memory, so they cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(shape.as_ptr(), dims, shape.len()) };
        Ok(())
    })
}

/// The label of `buf` (given at allocation), as `ub_device_name` writes strings.
///
/// # Safety
/// `buf_text` is NULL or valid for `cap` bytes of writes; `len_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_buffer_label(
    buf: *mut ub_buffer,
    buf_text: *mut c_char,
    cap: usize,
    len_out: *mut usize,
) -> ub_status {
    call("ub_buffer_label", || {
        let b = buffer("buf", buf)?;
        // SAFETY: the caller's contract.
        unsafe { write_str(b.label(), buf_text, cap, len_out) }
    })
}

/// Whether `a` and `b` are views of one allocation, into `*shared_out`.
///
/// # Safety
/// `shared_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_buffer_shares_memory(
    a: *mut ub_buffer,
    b: *mut ub_buffer,
    shared_out: *mut bool,
) -> ub_status {
    call("ub_buffer_shares_memory", || {
        let out = Out::new("shared_out", shared_out)?;
        let (a, b) = (buffer("a", a)?, buffer("b", b)?);
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(a.shares_memory_with(&b)) };
        Ok(())
    })
}

/// Makes a view with `f` and registers it.
///
/// # Safety
/// `view_out` is valid for a write.
unsafe fn make_view(
    buf: *mut ub_buffer,
    view_out: *mut *mut ub_buffer,
    f: impl FnOnce(&Buffer) -> CResult<Buffer>,
) -> CResult<()> {
    // SAFETY: forwarded contract.
    let out = unsafe { Out::handle("view_out", view_out) }?;
    let b = buffer("buf", buf)?;
    let v = f(&b)?;
    // SAFETY: checked by `Out::handle`.
    unsafe { out.write(new_buffer_handle(v)?) };
    Ok(())
}

/// A 1-D view of the elements `start..end` of the flattened buffer (no copy).
///
/// Errors: `UB_STATUS_OUT_OF_RANGE` if `start > end` or `end` is past the length.
///
/// # Safety
/// `view_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_buffer_slice(
    buf: *mut ub_buffer,
    start: usize,
    end: usize,
    view_out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_buffer_slice", || {
        // SAFETY: forwarded contract.
        unsafe { make_view(buf, view_out, |b| Ok(b.slice(start..end)?)) }
    })
}

/// A view of the rows `start..end` along the first dimension, keeping the others (no copy).
///
/// Errors: `UB_STATUS_OUT_OF_RANGE` if the rows are not inside the buffer,
/// `UB_STATUS_INVALID_ARGUMENT` for a 0-dimensional buffer.
///
/// # Safety
/// `view_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_buffer_rows(
    buf: *mut ub_buffer,
    start: usize,
    end: usize,
    view_out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_buffer_rows", || {
        // SAFETY: forwarded contract.
        unsafe { make_view(buf, view_out, |b| Ok(b.rows(start..end)?)) }
    })
}

/// The same elements with another shape of the same element count (no copy).
///
/// Errors: `UB_STATUS_SHAPE_MISMATCH` if the element counts differ.
///
/// # Safety
/// `shape` is NULL with `rank` 0, or points to `rank` `size_t`s; `view_out` is valid for a
/// write.
#[no_mangle]
pub unsafe extern "C" fn ub_buffer_reshape(
    buf: *mut ub_buffer,
    shape: *const usize,
    rank: usize,
    view_out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_buffer_reshape", || {
        // SAFETY: the caller's contract.
        let shape = unsafe { shape_in(shape, rank) }?;
        // SAFETY: forwarded contract.
        unsafe { make_view(buf, view_out, |b| Ok(b.reshape(shape)?)) }
    })
}

/// The same bytes as another dtype, the last dimension rescaled by the size ratio (no copy).
///
/// Errors: `UB_STATUS_SHAPE_MISMATCH` if the last dimension does not come out whole,
/// `UB_STATUS_MISALIGNED` if the view's offset is not aligned for the new dtype.
///
/// # Safety
/// `view_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_buffer_cast(
    buf: *mut ub_buffer,
    dtype: ub_dtype,
    view_out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_buffer_cast", || {
        let dtype = dtype_in("dtype", dtype)?;
        // SAFETY: forwarded contract.
        unsafe { make_view(buf, view_out, |b| Ok(b.cast(dtype)?)) }
    })
}

/// The bytes `byte_offset .. byte_offset + byte_len` of `buf` as a 1-D `UB_DTYPE_U8` view (no
/// copy): what byte-addressed APIs (copy a range from offset A of one buffer to offset B of
/// another) work with.
///
/// Errors: `UB_STATUS_OUT_OF_RANGE` if the range is not inside the buffer (or overflows).
///
/// # Safety
/// `view_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_buffer_byte_view(
    buf: *mut ub_buffer,
    byte_offset: usize,
    byte_len: usize,
    view_out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_buffer_byte_view", || {
        // SAFETY: forwarded contract.
        unsafe { make_view(buf, view_out, |b| byte_view(b, byte_offset, byte_len)) }
    })
}

/// `b`'s bytes `offset .. offset + len` as a 1-D U8 view.
pub(crate) fn byte_view(b: &Buffer, offset: usize, len: usize) -> CResult<Buffer> {
    let total = b.byte_len();
    let end = offset.checked_add(len).filter(|e| *e <= total);
    let Some(end) = end else {
        return Err(unibuf::Error::OutOfBounds {
            what: "byte view",
            start: offset,
            end: offset.saturating_add(len),
            len: total,
        }
        .into());
    };
    Ok(bytes_of(b)?.slice(offset..end)?)
}

/// `b` as a 1-D view of its bytes.
pub(crate) fn bytes_of(b: &Buffer) -> CResult<Buffer> {
    Ok(b.cast(DType::U8)?.reshape(&[b.byte_len()])?)
}
