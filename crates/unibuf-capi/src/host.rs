//! Host memory: caller memory wrapped as External buffers (zero copy), and host mappings of
//! host-visible buffers.

use crate::buffer::{buffer, bytes_of, new_buffer_handle, ub_buffer};
use crate::call::{call, opt_str_in, shape_in, Out};
use crate::device::{device, ub_device};
use crate::error::{ub_status, Failure};
use crate::handle::{from_ptr, to_ptr, Kind, Registry};
use crate::types::{dtype_in, ub_dtype};
use std::ffi::{c_char, c_void};
use std::sync::Arc;
use unibuf::{Buffer, HostMemory, HostRead, HostWrite};

/// Called once when the library no longer needs memory or a callback context the caller
/// handed over: with the `user_data` given alongside. It may run on any thread (a queue's
/// worker thread after the last work using the memory), must return normally (no C++
/// exception, no `longjmp`), and must not call back into the library.
pub type ub_release_fn = Option<unsafe extern "C" fn(user_data: *mut c_void)>;

/// A caller's release callback and its context: called once, when this value is dropped.
pub(crate) struct ReleaseOnDrop {
    release: ub_release_fn,
    user_data: *mut c_void,
}

impl ReleaseOnDrop {
    /// Takes over `user_data`, to be handed to `release` (if not NULL) on drop.
    pub fn new(release: ub_release_fn, user_data: *mut c_void) -> ReleaseOnDrop {
        ReleaseOnDrop { release, user_data }
    }

    /// The context, for callbacks made before the release.
    pub fn user_data(&self) -> *mut c_void {
        self.user_data
    }
}

// SAFETY: the entry points that take a release callback document that it, and the context,
// may be used from any thread; the struct itself holds only the two values.
unsafe impl Send for ReleaseOnDrop {}
// SAFETY: as above; nothing is reachable through a shared reference but the two values.
unsafe impl Sync for ReleaseOnDrop {}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(release) = self.release {
            // SAFETY: the callback and its context are the caller's, called exactly once (this
            // value is dropped once), as the entry point that took them documents.
            unsafe { release(self.user_data) };
        }
    }
}

/// Caller memory handed to the library: released (the callback run) when dropped.
struct CallerMemory {
    data: *mut u8,
    len: usize,
    writable: bool,
    _owner: ReleaseOnDrop,
}

// SAFETY: the caller of `ub_device_wrap_host` promises that the memory may be read and
// written from any thread (and the release callback run on any thread: `ReleaseOnDrop`).
unsafe impl Send for CallerMemory {}
// SAFETY: as above; the struct itself holds only plain values.
unsafe impl Sync for CallerMemory {}

// SAFETY: the caller of `ub_device_wrap_host` promises that `len` bytes at `data` stay valid
// (and writable if `writable`) and unmoved until the release callback runs, which happens only
// when this value is dropped, and that nothing else writes them while wrapped.
unsafe impl HostMemory for CallerMemory {
    fn as_bytes_ptr(&self) -> *const u8 {
        self.data
    }
    fn byte_len(&self) -> usize {
        self.len
    }
    fn writable(&self) -> bool {
        self.writable
    }
}

/// Wraps caller host memory (`len` bytes at `data`) as an External buffer of `dtype` x
/// `shape`, without copying. The whole pages around the memory become addressable by the
/// device; the view starts at `data`, which must be aligned for `dtype`.
///
/// **Ownership:** the memory belongs to the library from this call on: `release(user_data)`
/// (if `release` is not NULL) is called exactly once when the library is done with it — after
/// the last view is released and the last work using it completed — *and also when this call
/// fails* (before it returns). Until then the memory must stay valid and nothing else may
/// write it. `writable` false makes every write to it (uploads, op outputs, write mappings) a
/// `UB_STATUS_READ_ONLY` error.
///
/// Errors: `UB_STATUS_OUT_OF_RANGE` if the shape needs more than `len` bytes,
/// `UB_STATUS_MISALIGNED` for `data` not aligned to the dtype, `UB_STATUS_INVALID_ARGUMENT` for
/// empty memory.
///
/// # Safety
/// `data` points to `len` bytes that stay valid (readable, and writable if `writable`) until
/// `release` is called, readable and writable from any thread; `release` may be called on any
/// thread with `user_data`; `shape` is NULL with `rank` 0 or points to `rank` `size_t`s;
/// `label` is NULL or NUL-terminated; `buf_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_device_wrap_host(
    dev: *mut ub_device,
    label: *const c_char,
    data: *mut c_void,
    len: usize,
    writable: bool,
    dtype: ub_dtype,
    shape: *const usize,
    rank: usize,
    release: ub_release_fn,
    user_data: *mut c_void,
    buf_out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_device_wrap_host", || {
        // Taken first, so that any failure below releases the memory (as documented).
        let memory = CallerMemory {
            data: data.cast(),
            len,
            writable,
            _owner: ReleaseOnDrop::new(release, user_data),
        };
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("buf_out", buf_out) }?;
        // SAFETY: the caller's contract.
        let shape = unsafe { shape_in(shape, rank) }?;
        // SAFETY: the caller's contract.
        let label = unsafe { opt_str_in("label", label, "") }?;
        if data.is_null() {
            return Err(Failure::null("data"));
        }
        if len > isize::MAX as usize || data.addr().checked_add(len).is_none() {
            return Err(Failure::invalid(
                "len",
                format!("{len} bytes from {data:p} overflow the address space"),
            ));
        }
        let d = device(dev)?;
        let dtype = dtype_in("dtype", dtype)?;
        let b = d.wrap_external(label, memory, dtype, shape)?;
        // SAFETY: checked by `Out::handle`.
        unsafe { out.write(new_buffer_handle(b)?) };
        Ok(())
    })
}

/// How a mapping may touch the bytes: one of the `UB_MAP_*` values.
pub type ub_map_access = u32;
/// Read only: waits for the device writes the bytes depend on.
pub const UB_MAP_READ: ub_map_access = 1;
/// Read and write: waits for device reads and writes of the bytes.
pub const UB_MAP_WRITE: ub_map_access = 2;

/// A host mapping of a buffer: its bytes as host memory. Opaque; `ub_mapping_release` unmaps.
pub struct ub_mapping {
    _opaque: [u8; 0],
}

/// A host access guard, held for its drop (which ends the borrow of the bytes).
enum Guard {
    Read { _held: HostRead<'static, u8> },
    Write { _held: HostWrite<'static, u8> },
}

/// A host access guard together with the view it borrows.
struct Mapping {
    /// Declared before `view`, so dropped first: it borrows `*view`.
    _guard: Guard,
    /// Keeps the borrowed view alive and in place (an `Arc`'s contents never move).
    _view: Arc<Buffer>,
}

static MAPPINGS: Registry<Mapping> = Registry::new(Kind::Mapping);

/// Maps the bytes of a host-visible buffer (Shared, External, host Foreign memory) into host
/// memory: `*data_out` and `*len_out` (its byte length; `*data_out` is any non-NULL value when
/// it is 0) stay valid until `ub_mapping_release`. Mapping waits for the device work the
/// bytes depend on; while the mapping lives, device work that would conflict with it (any
/// access to the bytes of a write mapping, a write to those of a read mapping) is refused with
/// `UB_STATUS_HOST_ACCESS_CONFLICT` (retryable: release the mapping first).
///
/// Errors: `UB_STATUS_NOT_HOST_ACCESSIBLE` for a Private buffer, `UB_STATUS_READ_ONLY` for a
/// write mapping of read-only memory, `UB_STATUS_HOST_ACCESS_CONFLICT` while an overlapping
/// mapping forbids it, `UB_STATUS_INVALID_ARGUMENT` for an unknown `access`.
///
/// # Safety
/// `map_out`, `data_out` and `len_out` are valid for writes. Writing through `*data_out` is
/// allowed only for `UB_MAP_WRITE`, and only `*len_out` bytes.
#[no_mangle]
pub unsafe extern "C" fn ub_buffer_map(
    buf: *mut ub_buffer,
    access: ub_map_access,
    map_out: *mut *mut ub_mapping,
    data_out: *mut *mut c_void,
    len_out: *mut usize,
) -> ub_status {
    call("ub_buffer_map", || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("map_out", map_out) }?;
        let data = Out::new("data_out", data_out)?;
        let len = Out::new("len_out", len_out)?;
        let b = buffer("buf", buf)?;
        let view = Arc::new(bytes_of(&b)?);
        // SAFETY: the reference is to the contents of `view`'s Arc, which the Mapping below
        // owns and drops only after the guard made from the reference (field order); the
        // reference never leaves the Mapping, so 'static is never observed beyond its life.
        let borrowed: &'static Buffer = unsafe { &*Arc::as_ptr(&view) };
        let (guard, ptr, n) = match access {
            UB_MAP_READ => {
                let g = borrowed.read::<u8>()?;
                let (p, n) = (g.as_ptr().cast_mut(), g.len());
                (Guard::Read { _held: g }, p, n)
            }
            UB_MAP_WRITE => {
                let mut g = borrowed.write::<u8>()?;
                let (p, n) = (g.as_mut_ptr(), g.len());
                (Guard::Write { _held: g }, p, n)
            }
            other => {
                return Err(Failure::invalid(
                    "access",
                    format!("{other} is not a ub_map_access (UB_MAP_READ = 1, UB_MAP_WRITE = 2)"),
                ))
            }
        };
        let h = MAPPINGS.insert(Mapping {
            _guard: guard,
            _view: view,
        })?;
        // SAFETY: all three checked non-NULL and aligned; valid by the caller's contract.
        unsafe {
            data.write(ptr.cast());
            len.write(n);
            out.write(to_ptr(h));
        }
        Ok(())
    })
}

/// Ends a mapping: its pointer is invalid from here on, and device work on the bytes may
/// proceed. NULL is a no-op; releasing twice is `UB_STATUS_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn ub_mapping_release(map: *mut ub_mapping) -> ub_status {
    call("ub_mapping_release", || MAPPINGS.release(from_ptr(map)))
}

/// Live mappings (for the handle counts).
pub(crate) fn live_mappings() -> usize {
    MAPPINGS.live()
}

/// Checks nothing unsafe is left to the mapping types' auto traits: the registry needs them.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Mapping>();
    send_sync::<CallerMemory>();
};
