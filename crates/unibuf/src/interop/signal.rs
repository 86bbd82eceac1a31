//! Foreign streams: a unibuf queue waits for work it does not own, and foreign work waits for a
//! unibuf fence. Both are device-side waits on events; there is never a device-wide sync.

use crate::device::{Completion, Device};
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::interop::NativeHandle;
use crate::queue::Queue;
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;

/// A one-shot signal set by host code: the CPU backend's counterpart of a CUDA event on a
/// stream unibuf does not own. A queue told to wait for it ([`Queue::wait_host_signal`]) runs
/// nothing after the wait until some clone of it is [`set`](HostSignal::set).
///
/// A signal whose every other clone is dropped unset can never be set: a queue waiting for it
/// then fails with a device fault rather than hanging.
///
/// ```
/// use unibuf::{interop::HostSignal, Device, FillPattern, DType, StorageMode};
/// let dev = Device::open("cpu")?;
/// let q = dev.queue();
/// let ready = HostSignal::new();
/// q.wait_host_signal(&ready)?;                // later work on q waits for `ready`
/// let b = dev.alloc(DType::U32, &[4], StorageMode::Shared)?;
/// let fence = q.fill_async(&b, FillPattern::u32(7))?;
/// assert!(!dev.is_complete(fence)?);
/// ready.set();                                // the "foreign stream" finished
/// dev.wait(fence)?;
/// # Ok::<(), unibuf::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct HostSignal {
    inner: Arc<SignalState>,
}

#[derive(Debug, Default)]
struct SignalState {
    set: Mutex<bool>,
    changed: Condvar,
}

impl Default for HostSignal {
    fn default() -> Self {
        HostSignal::new()
    }
}

impl HostSignal {
    /// A new signal, not set.
    pub fn new() -> HostSignal {
        HostSignal {
            inner: Arc::new(SignalState::default()),
        }
    }

    /// Sets the signal: whatever waits for it goes on.
    pub fn set(&self) {
        *self.inner.set.lock() = true;
        self.inner.changed.notify_all();
    }

    /// Whether it is set.
    pub fn is_set(&self) -> bool {
        *self.inner.set.lock()
    }

    /// Blocks until the signal is set; `false` if every other clone was dropped unset first, so
    /// that it can never be set.
    pub(crate) fn wait(&self) -> bool {
        let mut set = self.inner.set.lock();
        loop {
            if *set {
                return true;
            }
            if Arc::strong_count(&self.inner) == 1 {
                return false;
            }
            // Drops of other clones notify (see Drop); the timeout covers a drop that raced
            // with the count check above.
            self.inner
                .changed
                .wait_for(&mut set, std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for HostSignal {
    fn drop(&mut self) {
        self.inner.changed.notify_all();
    }
}

/// Work a queue can wait for that unibuf did not submit.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ForeignSignal {
    /// Host code's signal: the CPU backend's foreign stream (GPU backends refuse it: a device
    /// cannot wait for host code without blocking a driver thread).
    Host(HostSignal),
    /// CUDA: an event recorded on a foreign stream; the wait is for its record at the time of
    /// the wait call (as `cuStreamWaitEvent`).
    CudaEvent(NativeHandle),
    /// CUDA: everything enqueued on a foreign stream so far (unibuf records an event of its own
    /// on that stream and waits for it).
    CudaStream(NativeHandle),
    /// Metal: an `id<MTLSharedEvent>` reaching `value`.
    MetalEvent {
        /// The `id<MTLSharedEvent>`.
        event: NativeHandle,
        /// The value to wait for.
        value: u64,
    },
}

/// Foreign work that is made to wait for a unibuf fence ([`Device::order_native`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NativeWaiter {
    /// The calling thread: it blocks until the fence completes (every backend).
    Host,
    /// CUDA: a foreign stream; later work on it waits (`cuStreamWaitEvent` on an event unibuf
    /// records after the fence's work).
    CudaStream(NativeHandle),
    /// Metal: a foreign command buffer not yet committed; its later commands wait
    /// (`encodeWaitForEvent:value:` on the queue's shared event). No encoder may be open.
    MetalCommandBuffer(NativeHandle),
}

impl Queue {
    /// Makes this queue's later work wait for foreign work: a device-side wait, never a sync.
    /// Returns the fence of the wait itself (complete once the signal is).
    ///
    /// # Safety
    /// A CUDA event or stream, or a Metal shared event, is a live object of this device's
    /// context (or `MTLDevice`) for the duration of the call, and not used by another thread
    /// in a way its platform forbids meanwhile (recording the same event concurrently).
    pub unsafe fn wait_foreign(&self, signal: ForeignSignal) -> Result<Fence> {
        let handle = match &signal {
            ForeignSignal::CudaEvent(h) | ForeignSignal::CudaStream(h) => Some(*h),
            ForeignSignal::MetalEvent { event, .. } => Some(*event),
            ForeignSignal::Host(_) => None,
        };
        if let Some(h) = handle {
            if h.is_null() {
                return Err(Error::invalid(
                    "foreign signal",
                    format!("{signal:?}: a null handle"),
                ));
            }
        }
        let label = self.submission_label("wait foreign");
        self.device.submit(
            self.id(),
            label,
            "wait for foreign work",
            &[],
            &[crate::backend::Command::WaitForeign(signal)],
            Completion::Queue,
        )
    }

    /// Makes this queue's later work wait until `signal` is set ([`HostSignal`]).
    pub fn wait_host_signal(&self, signal: &HostSignal) -> Result<Fence> {
        // SAFETY: a host signal holds no platform handle.
        unsafe { self.wait_foreign(ForeignSignal::Host(signal.clone())) }
    }
}

impl Device {
    /// Makes foreign work wait for `fence`: a foreign CUDA stream's later work waits for it on
    /// the device (`cuStreamWaitEvent`), a Metal command buffer's later commands wait for it
    /// (`encodeWaitForEvent:value:`), and [`NativeWaiter::Host`] blocks the calling thread.
    /// This is how a framework's stream consumes a buffer unibuf wrote (DLPack's stream rule).
    ///
    /// # Safety
    /// The stream or command buffer is a live object of this device's context (or
    /// `MTLDevice`), and a command buffer is not yet committed and has no open encoder.
    pub unsafe fn order_native(&self, fence: Fence, waiter: NativeWaiter) -> Result<()> {
        if fence.device != self.id() {
            return Err(Error::WrongDevice {
                what: "fence",
                expected: self.id(),
                got: fence.device,
            });
        }
        match waiter {
            NativeWaiter::Host => self.wait(fence),
            NativeWaiter::CudaStream(h) | NativeWaiter::MetalCommandBuffer(h) if h.is_null() => {
                Err(Error::invalid(
                    "native waiter",
                    format!("{waiter:?}: a null handle"),
                ))
            }
            _ => {
                self.inner.check_fault()?;
                let last = self.inner.last_submitted(fence.queue);
                if fence.epoch > last {
                    return Err(Error::invalid(
                        "fence",
                        format!(
                            "{} has submitted {last} epochs; epoch {} is not submitted yet",
                            fence.queue, fence.epoch
                        ),
                    ));
                }
                // SAFETY: the caller's contract covers the waiter; the fence names a submitted
                // epoch of this device (checked above).
                self.inner
                    .note(unsafe { self.inner.backend.order_native(fence, waiter) })
            }
        }
    }
}
