//! A Metal queue: one MTLCommandQueue, one MTLSharedEvent whose value is the queue's completed
//! epoch, and the completion record that command-buffer completion handlers feed.
//!
//! Each submission is one command buffer, labelled with the submission's label, that ends by
//! signalling the queue's shared event with the submission's epoch (`encodeSignalEvent:value:`).
//! Metal runs a queue's command buffers in commit order and Apple requires signalled values not
//! to decrease, so `signaledValue` is the latest completed epoch, readable without blocking. A
//! completion handler on every command buffer records its GPU start and end times (the
//! submission stats) and, if it failed, the classified fault, which is sticky until `reset`.
//! Waits block on a condition variable the handlers notify: a handler runs for every committed
//! command buffer, failed or not, so no wait can outlive the work it waits for, and a wait for a
//! failed submission returns its fault.
//!
//! A failed command buffer may not reach its signal. Its handler then raises the event to the
//! failed epoch itself (`setSignaledValue:`), so that command buffers of other queues waiting for
//! it (`encodeWaitForEvent:value:`) do not wait forever; the fault stays recorded and every later
//! call reports it.

use crate::backend::GpuSpan;
use crate::epoch::{Epoch, QueueId};
use crate::error::{Error, FaultKind, Result};
use block2::RcBlock;
use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2_foundation::{NSError, NSString};
use objc2_metal::{
    MTLCommandBuffer, MTLCommandBufferError, MTLCommandBufferErrorDomain, MTLCommandBufferStatus,
    MTLCommandQueue, MTLDevice, MTLEvent, MTLSharedEvent,
};
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::collections::{BTreeSet, VecDeque};
use std::ptr::NonNull;
use std::sync::Arc;

/// GPU spans kept per queue: enough for the stats of every submission in flight and then some;
/// older ones are dropped (`gpu_span` answers `None` for them).
const SPANS_KEPT: usize = 4096;

/// The host clock the GPU times are given in: seconds of `mach_absolute_time`, the clock of
/// `GPUStartTime` and `GPUEndTime` (and of `CACurrentMediaTime`). `CLOCK_UPTIME_RAW` is that
/// clock converted to nanoseconds.
pub(super) fn host_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer and a clock id macOS defines.
    unsafe { libc::clock_gettime(libc::CLOCK_UPTIME_RAW, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Classifies a command buffer's error (`MTLCommandBufferErrorDomain` codes) as a fault kind.
pub(super) fn fault_kind(domain_is_metal: bool, code: isize) -> FaultKind {
    if !domain_is_metal {
        return FaultKind::Other;
    }
    match MTLCommandBufferError(code as _) {
        MTLCommandBufferError::Timeout => FaultKind::Timeout,
        MTLCommandBufferError::PageFault => FaultKind::PageFault,
        // A memoryless attachment ran out of tile memory: still memory exhaustion.
        MTLCommandBufferError::OutOfMemory | MTLCommandBufferError::Memoryless => {
            FaultKind::OutOfMemory
        }
        MTLCommandBufferError::InvalidResource => FaultKind::InvalidResource,
        // The GPU ran out of stack for function calls: the kernel aborted.
        MTLCommandBufferError::StackOverflow => FaultKind::Trap,
        // Internal, AccessRevoked, NotPermitted, DeviceRemoved and codes added later.
        _ => FaultKind::Other,
    }
}

/// The completion record of one queue, shared with the completion handlers.
pub(super) struct Completion {
    state: Mutex<State>,
    done: Condvar,
    /// `host_seconds()` at the backend's creation: the zero of the GPU spans.
    origin: f64,
}

struct State {
    /// Epochs submitted (the last command buffer committed has this epoch).
    submitted: Epoch,
    /// Every epoch up to this one has run its completion handler.
    handled: Epoch,
    /// Epochs above `handled` whose handlers ran out of order.
    handled_early: BTreeSet<Epoch>,
    fault: Option<Error>,
    spans: VecDeque<(Epoch, GpuSpan)>,
}

impl Completion {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Records that the command buffer of `epoch` finished, successfully or not.
    fn finish(&self, epoch: Epoch, span: Option<GpuSpan>, fault: Option<Error>) {
        let mut st = self.lock();
        if let Some(f) = fault {
            st.fault.get_or_insert(f);
        }
        if let Some(span) = span {
            if st.spans.len() == SPANS_KEPT {
                st.spans.pop_front();
            }
            st.spans.push_back((epoch, span));
        }
        if epoch == st.handled + 1 {
            st.handled = epoch;
            loop {
                let next = st.handled + 1;
                if !st.handled_early.remove(&next) {
                    break;
                }
                st.handled = next;
            }
        } else if epoch > st.handled {
            st.handled_early.insert(epoch);
        }
        drop(st);
        self.done.notify_all();
    }
}

/// One unibuf queue on Metal.
pub(super) struct MetalQueue {
    pub id: QueueId,
    pub queue: Retained<ProtocolObject<dyn MTLCommandQueue>>,
    pub event: Retained<ProtocolObject<dyn MTLSharedEvent>>,
    completion: Arc<Completion>,
    /// Held from creating a submission's command buffer to its commit, so that epochs follow
    /// commit order (and so the order Metal runs them in).
    pub encoding: Mutex<()>,
}

impl MetalQueue {
    pub fn create(
        device: &ProtocolObject<dyn MTLDevice>,
        id: QueueId,
        origin: f64,
    ) -> Result<MetalQueue> {
        let fail = |what: &str| Error::Unsupported {
            backend: "metal",
            what: format!("creating a queue: {what} returned nil"),
        };
        let queue = device
            .newCommandQueue()
            .ok_or_else(|| fail("newCommandQueue"))?;
        let event = device
            .newSharedEvent()
            .ok_or_else(|| fail("newSharedEvent"))?;
        let label = NSString::from_str(&format!("unibuf {id}"));
        queue.setLabel(Some(&label));
        event.setLabel(Some(&label));
        Ok(MetalQueue {
            id,
            queue,
            event,
            completion: Arc::new(Completion {
                state: Mutex::new(State {
                    submitted: 0,
                    handled: 0,
                    handled_early: BTreeSet::new(),
                    fault: None,
                    spans: VecDeque::new(),
                }),
                done: Condvar::new(),
                origin,
            }),
            encoding: Mutex::new(()),
        })
    }

    /// The sticky fault, if any.
    pub fn fault(&self) -> Option<Error> {
        self.completion.lock().fault.clone()
    }

    /// The epoch the next submission gets. Call with `encoding` held.
    pub fn next_epoch(&self) -> Epoch {
        self.completion.lock().submitted + 1
    }

    /// Adds the completion handler of the command buffer of `epoch`, then counts it submitted
    /// and commits it. Call with `encoding` held, once everything is encoded.
    pub fn commit(&self, cb: &ProtocolObject<dyn MTLCommandBuffer>, epoch: Epoch, label: &str) {
        let completion = self.completion.clone();
        let event = self.event.clone();
        let label = label.to_owned();
        let id = self.id;
        let handler = RcBlock::new(move |cb: NonNull<ProtocolObject<dyn MTLCommandBuffer>>| {
            // SAFETY: Metal passes the command buffer that completed, alive for the call.
            let cb = unsafe { cb.as_ref() };
            completed(cb, epoch, id, &label, &completion, &event);
        });
        // SAFETY: the block is a valid heap block taking the command buffer, as
        // MTLCommandBufferHandler requires; Metal copies (retains) it, and it captures only
        // values that are safe to use from Metal's completion thread (Arc, retained event).
        unsafe { cb.addCompletedHandler(RcBlock::as_ptr(&handler)) };
        self.completion.lock().submitted = epoch;
        cb.commit();
    }

    /// The latest completed epoch, or the sticky fault.
    pub fn completed(&self) -> Result<Epoch> {
        let st = self.completion.lock();
        if let Some(f) = &st.fault {
            return Err(f.clone());
        }
        // The event can run ahead of the handlers (they are called later, on another thread);
        // it never passes what was submitted.
        Ok(st.handled.max(self.event.signaledValue().min(st.submitted)))
    }

    /// Blocks until `epoch` completes or the queue faults.
    pub fn wait(&self, epoch: Epoch) -> Result<()> {
        let mut st = self.completion.lock();
        if epoch > st.submitted {
            return Err(Error::invalid(
                "epoch",
                format!(
                    "{} has submitted {} epochs; cannot wait for {epoch}",
                    self.id, st.submitted
                ),
            ));
        }
        loop {
            if let Some(f) = &st.fault {
                return Err(f.clone());
            }
            // Only the handler's word counts here: a failed command buffer may still have
            // signalled its epoch, and a wait must report that fault, not success.
            if st.handled >= epoch {
                return Ok(());
            }
            self.completion.done.wait(&mut st);
        }
    }

    /// Blocks until every submission's handler ran, ignoring faults (for teardown).
    pub fn drain(&self) {
        let mut st = self.completion.lock();
        while st.handled < st.submitted {
            self.completion.done.wait(&mut st);
        }
    }

    /// The GPU start and end of `epoch`, if recorded and still kept.
    pub fn span(&self, epoch: Epoch) -> Option<GpuSpan> {
        let st = self.completion.lock();
        st.spans
            .iter()
            .rev()
            .find(|(e, _)| *e == epoch)
            .map(|(_, s)| *s)
    }

    /// Clears the sticky fault.
    pub fn reset(&self) {
        self.completion.lock().fault = None;
    }
}

/// The completion handler's work: times, fault classification, completion.
fn completed(
    cb: &ProtocolObject<dyn MTLCommandBuffer>,
    epoch: Epoch,
    queue: QueueId,
    label: &str,
    completion: &Completion,
    event: &ProtocolObject<dyn MTLSharedEvent>,
) {
    let status = cb.status();
    if status == MTLCommandBufferStatus::Completed {
        let ns = |t: f64| ((t - completion.origin).max(0.0) * 1e9) as u64;
        let (start, end) = (cb.GPUStartTime(), cb.GPUEndTime());
        let span = (start > 0.0 && end >= start).then(|| GpuSpan {
            start_ns: ns(start),
            end_ns: ns(end),
        });
        completion.finish(epoch, span, None);
        return;
    }
    let fault = classify(cb.error().as_deref(), status, epoch, queue, label);
    tracing::error!(%fault, "Metal command buffer failed");
    // The fault is recorded before the event moves, so that no reader sees the epoch complete
    // without also seeing the fault.
    completion.finish(epoch, None, Some(fault));
    // Release waiters on other queues (see the module docs); values never decrease.
    if event.signaledValue() < epoch {
        event.setSignaledValue(epoch);
    }
}

/// The `DeviceFault` for a failed command buffer.
fn classify(
    error: Option<&NSError>,
    status: MTLCommandBufferStatus,
    epoch: Epoch,
    queue: QueueId,
    label: &str,
) -> Error {
    let (kind, detail) = match error {
        Some(e) => {
            // SAFETY: reading an extern static NSString that Metal defines.
            let metal_domain = unsafe { MTLCommandBufferErrorDomain };
            let is_metal = *e.domain() == *metal_domain;
            (
                fault_kind(is_metal, e.code()),
                format!(
                    "{} (domain {}, code {})",
                    e.localizedDescription(),
                    e.domain(),
                    e.code()
                ),
            )
        }
        None => (
            FaultKind::Other,
            format!("the command buffer ended with status {}", status.0),
        ),
    };
    Error::DeviceFault {
        kind,
        label: label.to_owned(),
        detail: format!("{detail} (epoch {epoch} of {queue})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_buffer_errors_map_to_fault_kinds() {
        let k = |e: MTLCommandBufferError| fault_kind(true, e.0 as isize);
        assert_eq!(k(MTLCommandBufferError::Timeout), FaultKind::Timeout);
        assert_eq!(k(MTLCommandBufferError::PageFault), FaultKind::PageFault);
        assert_eq!(
            k(MTLCommandBufferError::OutOfMemory),
            FaultKind::OutOfMemory
        );
        assert_eq!(
            k(MTLCommandBufferError::InvalidResource),
            FaultKind::InvalidResource
        );
        assert_eq!(k(MTLCommandBufferError::StackOverflow), FaultKind::Trap);
        assert_eq!(k(MTLCommandBufferError::Internal), FaultKind::Other);
        assert_eq!(k(MTLCommandBufferError::DeviceRemoved), FaultKind::Other);
        assert_eq!(fault_kind(false, 3), FaultKind::Other, "other domains");
    }
}
