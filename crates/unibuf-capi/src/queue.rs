//! Queues: the default queue and new ones, waits, and the last fence.

use crate::call::{call, opt_str_in, str_in, Out};
use crate::device::{device, ub_device};
use crate::error::{ub_status, CResult};
use crate::fence::{ub_fence, wait};
use crate::handle::{from_ptr, to_ptr, Kind, Registry};
use std::ffi::c_char;
use std::sync::Arc;
use unibuf::Queue;

/// A queue of one device: work on it runs in submission order; work on different queues runs
/// concurrently, ordered by the library only where it shares memory. Opaque; release with
/// `ub_queue_release` (the queue itself lives as long as its device).
pub struct ub_queue {
    _opaque: [u8; 0],
}

pub(crate) static QUEUES: Registry<Queue> = Registry::new(Kind::Queue);

/// The queue named by `q`.
pub(crate) fn queue(q: *mut ub_queue) -> CResult<Arc<Queue>> {
    QUEUES.get("queue", from_ptr(q))
}

/// A handle of the device's default queue. With a `label` (not NULL), the submissions made
/// through this handle carry it in the stats, faults, ledger and traces; every handle names
/// the same queue.
///
/// # Safety
/// `label` is NULL or NUL-terminated; `queue_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_device_queue(
    dev: *mut ub_device,
    label: *const c_char,
    queue_out: *mut *mut ub_queue,
) -> ub_status {
    call("ub_device_queue", || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("queue_out", queue_out) }?;
        // SAFETY: the caller's contract.
        let label = unsafe { opt_str_in("label", label, "") }?;
        let q = device(dev)?.queue();
        let q = if label.is_empty() {
            q
        } else {
            q.labelled(label)
        };
        // SAFETY: checked by `Out::handle`.
        unsafe { out.write(to_ptr(QUEUES.insert(q)?)) };
        Ok(())
    })
}

/// A new queue with its own stream, labelled `label`: its work runs concurrently with other
/// queues' (ordered where buffers are shared).
///
/// # Safety
/// `label` is a NUL-terminated string; `queue_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_device_new_queue(
    dev: *mut ub_device,
    label: *const c_char,
    queue_out: *mut *mut ub_queue,
) -> ub_status {
    call("ub_device_new_queue", || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("queue_out", queue_out) }?;
        // SAFETY: the caller's contract.
        let label = unsafe { str_in("label", label) }?;
        let q = device(dev)?.new_queue(label)?;
        // SAFETY: checked by `Out::handle`.
        unsafe { out.write(to_ptr(QUEUES.insert(q)?)) };
        Ok(())
    })
}

/// Releases a queue handle. NULL is a no-op; releasing twice is `UB_STATUS_INVALID_HANDLE`.
/// Work already submitted runs to completion.
#[no_mangle]
pub extern "C" fn ub_queue_release(queue: *mut ub_queue) -> ub_status {
    call("ub_queue_release", || QUEUES.release(from_ptr(queue)))
}

/// Blocks until `fence` (of any queue of this queue's device) completes. Errors as
/// `ub_device_wait`.
#[no_mangle]
pub extern "C" fn ub_queue_wait(queue: *mut ub_queue, fence: ub_fence) -> ub_status {
    call("ub_queue_wait", || {
        wait(&self::queue(queue)?.device(), fence)
    })
}

/// Blocks until everything submitted to this queue so far completes.
#[no_mangle]
pub extern "C" fn ub_queue_drain(queue: *mut ub_queue) -> ub_status {
    call("ub_queue_drain", || Ok(self::queue(queue)?.drain()?))
}

/// The fence of the last submission to this queue (complete from the start if none), into
/// `*fence_out`.
///
/// # Safety
/// `fence_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_queue_last_fence(
    queue: *mut ub_queue,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_queue_last_fence", || {
        let out = Out::new("fence_out", fence_out)?;
        let f = self::queue(queue)?.last_fence();
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(f.into()) };
        Ok(())
    })
}
