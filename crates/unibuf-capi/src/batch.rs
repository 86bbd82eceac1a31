//! Launch batches: a fixed sequence of op launches recorded once and submitted as one
//! submission (on CUDA one graph launch), what a server replays for every decode step.
//!
//! # Design
//! `unibuf::LaunchBatch::push_with` records the launches an op makes on a queue that it hands
//! to a closure for the length of one call. That maps to C as a *recording queue*: a `ub_queue`
//! handle ([`ub_launch_batch_queue`]) that names the batch instead of a device queue. Every op
//! (`ub_op_*`, fresh or `_into`) given it runs inside one `push_with`: its checks run as they
//! would on a device queue, its launches are appended to the batch, nothing is submitted, and
//! an op refused for any reason appends nothing. No Rust queue outlives the call, so a launch
//! can never go to a batch that is no longer recording. Functions that submit or wait
//! (transfers, waits, interop, [`ub_queue_launch_batch`]) refuse a recording queue.
//!
//! A recorded launch keeps its arguments: the buffers (which the batch keeps alive) and the
//! scalars. A replay reads what those buffers hold when it runs, so a step's varying inputs
//! (the token id, the position) live in device buffers written before each submission.
//!
//! The batch is shared behind a mutex: recording from several threads is serialised (in the
//! order the calls take the lock), and a submission sees every launch recorded before it.

use crate::call::{call, str_in, write_str, Out};
use crate::device::{device, ub_device};
use crate::error::{ub_status, CResult, Failure};
use crate::fence::{ub_fence, write_fence};
use crate::handle::{from_ptr, to_ptr, Kind, Registry};
use crate::queue::{new_recording_handle, queue, ub_queue};
use parking_lot::{Mutex, MutexGuard};
use std::ffi::c_char;
use std::sync::Arc;
use unibuf::{LaunchBatch, Queue};

/// A fixed sequence of op launches on one device, recorded through its recording queue
/// (`ub_launch_batch_queue`) and submitted with `ub_queue_launch_batch`. Opaque; release with
/// `ub_launch_batch_release`.
pub struct ub_launch_batch {
    _opaque: [u8; 0],
}

/// A batch and its label (kept here for messages, without taking the batch's lock).
pub(crate) struct Batch {
    label: String,
    batch: Mutex<LaunchBatch>,
}

impl Batch {
    /// The label its submissions carry.
    pub fn label(&self) -> &str {
        &self.label
    }

    fn lock(&self) -> MutexGuard<'_, LaunchBatch> {
        // A panic while recording leaves the batch as it was: `push_with` appends only after
        // the op returned.
        self.batch.lock()
    }

    /// Runs `op` on a queue that records its launches into this batch, and returns what the
    /// op returned. If the op fails, nothing it launched is kept and its failure is returned.
    pub fn record<T>(&self, op: impl FnOnce(&Queue) -> CResult<T>) -> CResult<T> {
        let mut value = None;
        let mut failure = None;
        let pushed = self.lock().push_with(|q| match op(q) {
            Ok(v) => {
                value = Some(v);
                Ok(q.last_fence())
            }
            Err(f) => {
                failure = Some(f);
                // Only makes `push_with` drop what the op launched; the op's own failure is
                // what the caller gets.
                Err(unibuf::Error::InvalidArgument {
                    what: "launch batch",
                    detail: "the op was refused".to_owned(),
                })
            }
        });
        if let Some(f) = failure {
            return Err(f);
        }
        pushed?;
        value.ok_or_else(|| Failure::invalid("launch batch", "the op returned no result"))
    }
}

static BATCHES: Registry<Batch> = Registry::new(Kind::LaunchBatch);

fn batch(b: *mut ub_launch_batch) -> CResult<Arc<Batch>> {
    BATCHES.get("batch", from_ptr(b))
}

/// Live launch batches (for the handle counts).
pub(crate) fn live_batches() -> usize {
    BATCHES.live()
}

/// An empty launch batch of `dev`'s kernels; `label` names its submissions in the stats,
/// faults and traces (unless the queue submitting it has a label of its own).
///
/// # Safety
/// `label` is a NUL-terminated string; `batch_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_launch_batch_new(
    dev: *mut ub_device,
    label: *const c_char,
    batch_out: *mut *mut ub_launch_batch,
) -> ub_status {
    call("ub_launch_batch_new", || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("batch_out", batch_out) }?;
        // SAFETY: the caller's contract.
        let label = unsafe { str_in("label", label) }?;
        let d = device(dev)?;
        let h = BATCHES.insert(Batch {
            label: label.to_owned(),
            batch: Mutex::new(LaunchBatch::new(&d, label)),
        })?;
        // SAFETY: checked by `Out::handle`.
        unsafe { out.write(to_ptr(h)) };
        Ok(())
    })
}

/// Releases a launch batch handle. A recording queue of it keeps the batch alive (and can
/// still record into it) until that queue is released; a submission in flight completes. NULL
/// is a no-op; releasing twice is `UB_STATUS_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn ub_launch_batch_release(batch: *mut ub_launch_batch) -> ub_status {
    call("ub_launch_batch_release", || {
        BATCHES.release(from_ptr(batch))
    })
}

/// A recording queue of `batch`, into `*queue_out`: every op (`ub_op_*`, fresh or `_into`)
/// given this queue appends its launches to the batch instead of submitting them. Each call is
/// checked as on a device queue and is all or nothing: an op that fails appends nothing. A
/// fresh op's output is allocated when it is recorded and written by every submission; the
/// fence an `_into` op returns through a recording queue is complete at once (nothing was
/// submitted; wait for the batch's submission instead).
///
/// Ops that run through the backend's BLAS (`ub_op_matmul`, `ub_op_matmul_bt` and their
/// `_into` forms) are external work, which a batch cannot record: they are refused with
/// `UB_STATUS_UNSUPPORTED`. Every other function that takes a queue (transfers, waits,
/// interop, `ub_queue_launch_batch`, weights loads) refuses a recording queue with
/// `UB_STATUS_INVALID_ARGUMENT`. Release it with `ub_queue_release`; several may exist.
///
/// # Safety
/// `queue_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_launch_batch_queue(
    batch: *mut ub_launch_batch,
    queue_out: *mut *mut ub_queue,
) -> ub_status {
    call("ub_launch_batch_queue", || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("queue_out", queue_out) }?;
        let b = self::batch(batch)?;
        // SAFETY: checked by `Out::handle`.
        unsafe { out.write(new_recording_handle(b)?) };
        Ok(())
    })
}

/// The number of launches recorded into `batch`, into `*len_out` (an op may record more than
/// one).
///
/// # Safety
/// `len_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_launch_batch_len(
    batch: *mut ub_launch_batch,
    len_out: *mut usize,
) -> ub_status {
    call("ub_launch_batch_len", || {
        let out = Out::new("len_out", len_out)?;
        let n = self::batch(batch)?.lock().len();
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(n) };
        Ok(())
    })
}

/// The batch's label, as a string through `(buf, cap, len_out)` (see the README).
///
/// # Safety
/// `buf` is NULL or valid for `cap` bytes of writes; `len_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_launch_batch_label(
    batch: *mut ub_launch_batch,
    buf: *mut c_char,
    cap: usize,
    len_out: *mut usize,
) -> ub_status {
    call("ub_launch_batch_label", || {
        let b = self::batch(batch)?;
        // SAFETY: the caller's contract.
        unsafe { write_str(b.label(), buf, cap, len_out) }
    })
}

/// Submits every launch of `batch`, in order, as one submission on `queue` (labelled with the
/// queue handle's label, else the batch's), and writes its fence to `*fence_out` if not NULL.
/// Returns once queued. The batch may be submitted any number of times; each submission waits
/// for earlier work on the memory it uses, and later work waits for it. On CUDA the first
/// submission instantiates a graph that later ones relaunch; recording more launches after it
/// makes the next submission prepare anew.
///
/// Errors: `UB_STATUS_INVALID_ARGUMENT` for an empty batch or a recording queue;
/// `UB_STATUS_WRONG_DEVICE` for a queue of another device than the batch's.
///
/// # Safety
/// `fence_out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_queue_launch_batch(
    queue: *mut ub_queue,
    batch: *mut ub_launch_batch,
    fence_out: *mut ub_fence,
) -> ub_status {
    call("ub_queue_launch_batch", || {
        let fence = Out::optional("fence_out", fence_out)?;
        let q = self::queue(queue)?;
        let b = self::batch(batch)?;
        let f = q.launch_batch(&b.lock())?;
        // SAFETY: checked by `Out::optional`; valid by the caller's contract.
        unsafe { write_fence(fence, f) };
        Ok(())
    })
}
