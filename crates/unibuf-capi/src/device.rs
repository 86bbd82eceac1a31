//! Devices: opening a backend, what it is, and device-wide operations.

use crate::call::{call, opt_str_in, write_str, Out};
use crate::error::{ub_status, CResult, Failure};
use crate::handle::{from_ptr, to_ptr, Kind, Registry};
use crate::types::fixed_str;
use std::ffi::c_char;
use std::sync::Arc;
use unibuf::{Budget, Device};

/// A device of one backend (`"cpu"`, `"cuda"`, `"metal"`): memory, queues, kernels, the copy
/// ledger. Opaque; release with `ub_device_release`.
///
/// Releasing the handle does not invalidate the device's queues, buffers or loaded weights:
/// each keeps the device alive, and the device is closed when the last of them is released.
pub struct ub_device {
    _opaque: [u8; 0],
}

pub(crate) static DEVICES: Registry<Device> = Registry::new(Kind::Device);

/// The device named by `dev`.
pub(crate) fn device(dev: *mut ub_device) -> CResult<Arc<Device>> {
    DEVICES.get("dev", from_ptr(dev))
}

/// Registers `d` and returns its handle.
pub(crate) fn new_device_handle(d: Device) -> CResult<*mut ub_device> {
    DEVICES.insert(d).map(to_ptr)
}

/// Options for `ub_device_open_with`. Zero-initialise it (`ub_device_options o = {0};`) and set
/// what you need: zero means "the default" for every field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ub_device_options {
    /// `"cpu"`, `"cuda"` or `"metal"`; NULL: the `UNIBUF_BACKEND` environment variable, else
    /// the best available (Metal, CUDA, then the CPU). Naming an absent backend is an error,
    /// never a fallback.
    pub backend: *const c_char,
    /// Caps the bytes the allocator holds from the backend (live plus cached); 0: no cap.
    pub memory_limit: usize,
    /// Caps the bytes of freed blocks kept for reuse; 0: no cap.
    pub cache_limit: usize,
    /// Records device time per submission where that costs extra (CUDA).
    pub gpu_timing: bool,
}

/// What a device is. Filled by `ub_device_get_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ub_device_info {
    /// The device's number in this process (fences name it).
    pub id: u64,
    /// The backend's name, NUL-terminated: `"cpu"`, `"cuda"` or `"metal"`.
    pub backend: [c_char; 16],
    /// Whether host and device share memory (then `UB_STORAGE_AUTO` means Shared).
    pub unified_memory: bool,
    /// Total memory of the device in bytes.
    pub total_memory: usize,
    /// The host page size; External memory is wrapped in whole pages of it.
    pub page_size: usize,
    /// The largest single allocation the backend accepts.
    pub max_buffer_len: usize,
    /// The alignment of every allocation's address.
    pub alloc_alignment: usize,
    /// Whether the backend reports device-side execution times.
    pub timestamps: bool,
}

/// Opens a device of the backend `backend` (`"cpu"`, `"cuda"`, `"metal"`), or, with NULL, the
/// one `UNIBUF_BACKEND` names, else the best available. Writes the handle to `*dev_out` (NULL
/// on failure).
///
/// Errors: `UB_STATUS_BACKEND_UNAVAILABLE` for a backend not compiled in or without a device.
///
/// # Safety
/// `backend` is NULL or a NUL-terminated string; `dev_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_device_open(
    backend: *const c_char,
    dev_out: *mut *mut ub_device,
) -> ub_status {
    call("ub_device_open", || {
        // SAFETY: the caller's contract (`dev_out` valid for writes).
        let out = unsafe { Out::handle("dev_out", dev_out) }?;
        // SAFETY: the caller's contract (`backend` NULL or NUL-terminated).
        let name = unsafe { opt_str_in("backend", backend, "") }?;
        let d = if name.is_empty() {
            Device::new()?
        } else {
            Device::open(name)?
        };
        // SAFETY: checked by `Out::handle`; valid by the caller's contract.
        unsafe { out.write(new_device_handle(d)?) };
        Ok(())
    })
}

/// Opens a device with options (see `ub_device_options`).
///
/// # Safety
/// `options` points to an initialised `ub_device_options` whose `backend` is NULL or a
/// NUL-terminated string; `dev_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_device_open_with(
    options: *const ub_device_options,
    dev_out: *mut *mut ub_device,
) -> ub_status {
    call("ub_device_open_with", || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("dev_out", dev_out) }?;
        if options.is_null() {
            return Err(Failure::null("options"));
        }
        if !options.is_aligned() {
            return Err(unibuf::Error::Misaligned {
                what: "options",
                value: options.addr(),
                align: std::mem::align_of::<ub_device_options>(),
            }
            .into());
        }
        // SAFETY: non-NULL and aligned (checked), initialised by the caller's contract.
        let o = unsafe { options.read() };
        // SAFETY: the caller's contract on `backend`.
        let name = unsafe { opt_str_in("options.backend", o.backend, "") }?;
        let mut b = Device::builder().gpu_timing(o.gpu_timing);
        if !name.is_empty() {
            b = b.backend(name);
        }
        if o.memory_limit != 0 {
            b = b.memory_limit(o.memory_limit);
        }
        if o.cache_limit != 0 {
            b = b.cache_limit(o.cache_limit);
        }
        let d = b.open()?;
        // SAFETY: checked by `Out::handle`.
        unsafe { out.write(new_device_handle(d)?) };
        Ok(())
    })
}

/// Releases a device handle. NULL is a no-op; releasing a handle twice is
/// `UB_STATUS_INVALID_HANDLE`. The device itself closes when its last queue, buffer and
/// loaded weights are released too.
#[no_mangle]
pub extern "C" fn ub_device_release(dev: *mut ub_device) -> ub_status {
    call("ub_device_release", || DEVICES.release(from_ptr(dev)))
}

/// Writes what the device is into `*info_out`.
///
/// # Safety
/// `info_out` is valid for a write of `ub_device_info`.
#[no_mangle]
pub unsafe extern "C" fn ub_device_get_info(
    dev: *mut ub_device,
    info_out: *mut ub_device_info,
) -> ub_status {
    call("ub_device_get_info", || {
        let out = Out::new("info_out", info_out)?;
        let d = device(dev)?;
        let i = d.info();
        let info = ub_device_info {
            id: d.id(),
            backend: fixed_str(i.backend),
            unified_memory: i.unified_memory,
            total_memory: i.total_memory,
            page_size: i.page_size,
            max_buffer_len: i.max_buffer_len,
            alloc_alignment: i.alloc_alignment,
            timestamps: i.timestamps,
        };
        // SAFETY: checked by `Out::new`; valid by the caller's contract.
        unsafe { out.write(info) };
        Ok(())
    })
}

/// The device's name as the driver gives it ("NVIDIA H200", "CPU (16 threads)"): written to
/// `buf` (`cap` bytes, NUL-terminated) with its length (without the NUL) in `*len_out`. Pass
/// `buf` NULL and `cap` 0 to ask for the length; a `cap` too small is
/// `UB_STATUS_BUFFER_TOO_SMALL` with `*len_out` set.
///
/// # Safety
/// `buf` is NULL or valid for `cap` bytes of writes; `len_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_device_name(
    dev: *mut ub_device,
    buf: *mut c_char,
    cap: usize,
    len_out: *mut usize,
) -> ub_status {
    call("ub_device_name", || {
        let d = device(dev)?;
        // SAFETY: the caller's contract.
        unsafe { write_str(&d.info().name, buf, cap, len_out) }
    })
}

/// Blocks until every queue's submitted work completes. A device fault is returned here.
#[no_mangle]
pub extern "C" fn ub_device_drain(dev: *mut ub_device) -> ub_status {
    call("ub_device_drain", || Ok(device(dev)?.drain()?))
}

/// Releases cached blocks whose work is complete; the bytes released go to `*released_out`
/// (optional: may be NULL).
///
/// # Safety
/// `released_out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_device_trim(
    dev: *mut ub_device,
    released_out: *mut usize,
) -> ub_status {
    call("ub_device_trim", || {
        let out = Out::optional("released_out", released_out)?;
        let n = device(dev)?.trim();
        if let Some(out) = out {
            // SAFETY: checked; valid by the caller's contract.
            unsafe { out.write(n) };
        }
        Ok(())
    })
}

/// Returns the device's sticky fault as this call's error (`UB_STATUS_DEVICE_FAULT` with its
/// message), or `UB_STATUS_OK` if the device is healthy.
#[no_mangle]
pub extern "C" fn ub_device_check_fault(dev: *mut ub_device) -> ub_status {
    call("ub_device_check_fault", || match device(dev)?.fault() {
        Some(e) => Err(e.into()),
        None => Ok(()),
    })
}

/// Clears a device fault after the faulted work has been dealt with.
#[no_mangle]
pub extern "C" fn ub_device_reset(dev: *mut ub_device) -> ub_status {
    call("ub_device_reset", || Ok(device(dev)?.reset()?))
}

/// Sets the memory budget: `memory_limit` caps the bytes held from the backend, `cache_limit`
/// the cached bytes; 0 lifts a cap.
#[no_mangle]
pub extern "C" fn ub_device_set_budget(
    dev: *mut ub_device,
    memory_limit: usize,
    cache_limit: usize,
) -> ub_status {
    call("ub_device_set_budget", || {
        device(dev)?.set_budget(Budget {
            memory_limit: (memory_limit != 0).then_some(memory_limit),
            cache_limit: (cache_limit != 0).then_some(cache_limit),
        });
        Ok(())
    })
}
