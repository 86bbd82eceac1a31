//! Queues: the default queue and new ones, waits, and the last fence.
//!
//! A `ub_queue` handle names either a queue of a device or a recording queue of a launch
//! batch (`ub_launch_batch_queue`): ops given the latter append their launches to the batch
//! instead of submitting them ([`op_target`]); every other function that takes a queue refuses
//! it ([`queue`]).

use crate::batch::Batch;
use crate::call::{call, opt_str_in, str_in, Out};
use crate::device::{device, ub_device};
use crate::error::{ub_status, CResult, Failure};
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

/// What a `ub_queue` handle names.
pub(crate) enum QueueEntry {
    /// A queue of a device: work given to it is submitted.
    Device(Arc<Queue>),
    /// The recording queue of a launch batch: ops given to it are appended to the batch.
    Recording(Arc<Batch>),
}

pub(crate) static QUEUES: Registry<QueueEntry> = Registry::new(Kind::Queue);

/// Registers a device queue and returns its handle.
fn new_queue_handle(q: Queue) -> CResult<*mut ub_queue> {
    QUEUES.insert(QueueEntry::Device(Arc::new(q))).map(to_ptr)
}

/// Registers the recording queue of `batch` and returns its handle.
pub(crate) fn new_recording_handle(batch: Arc<Batch>) -> CResult<*mut ub_queue> {
    QUEUES.insert(QueueEntry::Recording(batch)).map(to_ptr)
}

/// The device queue named by `q`. A recording queue is refused: only ops record.
pub(crate) fn queue(q: *mut ub_queue) -> CResult<Arc<Queue>> {
    match &*QUEUES.get("queue", from_ptr(q))? {
        QueueEntry::Device(queue) => Ok(queue.clone()),
        QueueEntry::Recording(batch) => Err(Failure::invalid(
            "queue",
            format!(
                "{:#x} is the recording queue of the launch batch '{}': only ops (ub_op_*) \
                 take it, to record their launches; transfers, waits, interop and batch \
                 submissions need a queue of the device",
                from_ptr(q),
                batch.label()
            ),
        )),
    }
}

/// Where an op given the queue handle `q` goes.
pub(crate) enum OpTarget {
    /// Submitted on a device queue.
    Submit(Arc<Queue>),
    /// Recorded into a launch batch.
    Record(Arc<Batch>),
}

/// The target of an op given `q`: a device queue or a launch batch's recording queue.
pub(crate) fn op_target(q: *mut ub_queue) -> CResult<OpTarget> {
    Ok(match &*QUEUES.get("queue", from_ptr(q))? {
        QueueEntry::Device(queue) => OpTarget::Submit(queue.clone()),
        QueueEntry::Recording(batch) => OpTarget::Record(batch.clone()),
    })
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
        unsafe { out.write(new_queue_handle(q)?) };
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
        unsafe { out.write(new_queue_handle(q)?) };
        Ok(())
    })
}

/// Releases a queue handle (also a recording queue of a launch batch; the batch keeps what
/// was recorded). NULL is a no-op; releasing twice is `UB_STATUS_INVALID_HANDLE`. Work already
/// submitted runs to completion.
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
