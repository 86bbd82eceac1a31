//! Fences: points in a queue's completion epochs, as plain values.
//!
//! A fence owns nothing (it is `{device, queue, epoch}`), so it is a value struct, not a
//! handle: it needs no release, copying it is free, and it can be stored anywhere. It names its
//! device, so waiting on it through another device is `UB_STATUS_WRONG_DEVICE`, never a wrong
//! wait; and a fence whose epoch was never submitted is refused (`UB_STATUS_INVALID_ARGUMENT`)
//! instead of blocking forever. A zero-initialised fence of a device's id is complete.

use crate::call::{call, Out};
use crate::device::{device, ub_device};
use crate::error::{ub_status, CResult};
use unibuf::{Device, Fence, QueueId};

/// A point in one queue's work: complete once that queue has finished its `epoch`-th
/// submission. Returned by every asynchronous call; wait for it with `ub_device_wait` or
/// `ub_queue_wait`. Epoch 0 is complete from the start (work the host finished at once).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ub_fence {
    /// The device's id (`ub_device_info.id`).
    pub device: u64,
    /// The submission's epoch on its queue.
    pub epoch: u64,
    /// The queue's index on its device.
    pub queue: u32,
}

impl From<Fence> for ub_fence {
    fn from(f: Fence) -> ub_fence {
        ub_fence {
            device: f.device,
            epoch: f.epoch,
            queue: f.queue.0,
        }
    }
}

impl From<ub_fence> for Fence {
    fn from(f: ub_fence) -> Fence {
        Fence {
            device: f.device,
            queue: QueueId(f.queue),
            epoch: f.epoch,
        }
    }
}

/// Waits for `f` on `d`, after checking that it names a submitted epoch of one of `d`'s
/// queues (a forged fence would otherwise wait forever).
pub(crate) fn wait(d: &Device, f: ub_fence) -> CResult<()> {
    let f = Fence::from(f);
    d.is_complete(f)?;
    Ok(d.wait(f)?)
}

/// Writes `f` through an optional out-pointer.
///
/// # Safety
/// `out` is NULL or valid for a write.
pub(crate) unsafe fn write_fence(out: Option<Out<ub_fence>>, f: Fence) {
    if let Some(out) = out {
        // SAFETY: checked by `Out::optional`; valid by the caller's contract.
        unsafe { out.write(f.into()) };
    }
}

/// Blocks until `fence` completes. A device fault is returned here (`UB_STATUS_DEVICE_FAULT`).
///
/// Errors: `UB_STATUS_WRONG_DEVICE` for a fence of another device, `UB_STATUS_INVALID_ARGUMENT`
/// for a queue that does not exist or an epoch not yet submitted.
#[no_mangle]
pub extern "C" fn ub_device_wait(dev: *mut ub_device, fence: ub_fence) -> ub_status {
    call("ub_device_wait", || wait(&*device(dev)?, fence))
}

/// Whether `fence` has completed, into `*complete_out`; never blocks. Errors as
/// `ub_device_wait`.
///
/// # Safety
/// `complete_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_device_is_complete(
    dev: *mut ub_device,
    fence: ub_fence,
    complete_out: *mut bool,
) -> ub_status {
    call("ub_device_is_complete", || {
        let out = Out::new("complete_out", complete_out)?;
        let done = device(dev)?.is_complete(fence.into())?;
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(done) };
        Ok(())
    })
}
