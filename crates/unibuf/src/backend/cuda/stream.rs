//! A CUDA queue: a stream and the completion record of its submissions.
//!
//! While the device has one queue, no events are recorded for ordinary work: completion is read
//! with cuStreamQuery (all-or-nothing, so the completed epoch may lag but is never ahead) and
//! waits use cuStreamSynchronize. Submissions that ask for exact completion (staging chunks,
//! which the transfer engine waits for one by one while later ones run) get an event, and so
//! does one submission in 64, so that completion advances while the stream stays busy. Once a second queue exists, every submission records a pooled event,
//! so that completion is exact per epoch and cross-queue waits are cuStreamWaitEvent on the
//! producer's event, never a device-wide sync.

use super::driver::{check, fault_kind, CuError};
use crate::epoch::{Epoch, QueueId};
use crate::error::{Error, FaultKind, Result};
use cudarc::driver::sys::{self, CUresult};
use parking_lot::{Mutex, MutexGuard};
use std::collections::VecDeque;
use std::sync::Arc;

/// A raw event handle from the backend's pool.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Event(pub sys::CUevent);

// SAFETY: event handles are usable from any thread with the context current.
unsafe impl Send for Event {}

struct InFlight {
    epoch: Epoch,
    label: Arc<str>,
    event: Option<Event>,
}

pub(super) struct QueueState {
    pub submitted: Epoch,
    completed: Epoch,
    in_flight: VecDeque<InFlight>,
    fault: Option<Error>,
    /// The last submission's label, shared by the next ones that carry the same label (a decode
    /// loop's), so that recording one costs a comparison, not an allocation.
    last_label: Arc<str>,
}

pub(super) struct CudaQueue {
    pub id: QueueId,
    pub stream: sys::CUstream,
    state: Mutex<QueueState>,
}

// SAFETY: the stream handle is used from any thread with the context current; the mutable
// state is behind the mutex.
unsafe impl Send for CudaQueue {}
// SAFETY: as above.
unsafe impl Sync for CudaQueue {}

/// Event results as one of three outcomes.
enum Poll {
    Done,
    Pending,
    Failed(CuError),
}

fn poll(code: CUresult, call: &'static str) -> Poll {
    match code {
        CUresult::CUDA_SUCCESS => Poll::Done,
        CUresult::CUDA_ERROR_NOT_READY => Poll::Pending,
        code => Poll::Failed(CuError { code, call }),
    }
}

/// A new stream of the current context. Non-blocking: no implicit synchronisation with the
/// legacy default stream that other libraries may use.
pub(super) fn new_stream() -> Result<sys::CUstream, CuError> {
    let mut stream: sys::CUstream = std::ptr::null_mut();
    // SAFETY: the out-pointer is valid; callers have the context current.
    check(
        unsafe {
            sys::cuStreamCreate(
                &mut stream,
                sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
            )
        },
        "cuStreamCreate",
    )?;
    Ok(stream)
}

impl CudaQueue {
    pub fn create(id: QueueId) -> Result<CudaQueue, CuError> {
        let stream = new_stream()?;
        Ok(CudaQueue {
            id,
            stream,
            state: Mutex::new(QueueState {
                submitted: 0,
                completed: 0,
                in_flight: VecDeque::new(),
                fault: None,
                last_label: Arc::from(""),
            }),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock()
    }

    /// The fault to report for a failed query: the first incomplete submission is named.
    fn fault(&self, st: &mut QueueState, e: CuError) -> Error {
        let first = st
            .in_flight
            .front()
            .map_or_else(|| "(none)".to_owned(), |f| f.label.to_string());
        let span = match (st.in_flight.front(), st.in_flight.back()) {
            (Some(a), Some(b)) if a.epoch != b.epoch => {
                format!(" (one of epochs {}..={} of {})", a.epoch, b.epoch, self.id)
            }
            (Some(a), _) => format!(" (epoch {} of {})", a.epoch, self.id),
            _ => String::new(),
        };
        let err = Error::DeviceFault {
            kind: fault_kind(e.code).unwrap_or(FaultKind::Other),
            label: first,
            detail: format!("{} reported {}{span}", e.call, e.name()),
        };
        st.fault.get_or_insert(err).clone()
    }

    /// Records a submission just encoded on the stream. The caller holds the state lock from
    /// encoding to here, so epochs follow stream order.
    pub fn push(st: &mut QueueState, label: &str, event: Option<Event>) -> Epoch {
        st.submitted += 1;
        if *st.last_label != *label {
            st.last_label = Arc::from(label);
        }
        let label = st.last_label.clone();
        st.in_flight.push_back(InFlight {
            epoch: st.submitted,
            label,
            event,
        });
        st.submitted
    }

    /// Gives the last in-flight submission an event if it has none (when a second queue
    /// appears, so that cross-queue waits and completion become exact from here on).
    pub fn catch_up(&self, st: &mut QueueState, event: Event) -> Result<bool, CuError> {
        match st.in_flight.back_mut() {
            Some(last) if last.event.is_none() => {
                // SAFETY: a pooled event and this queue's stream, with the context current.
                check(
                    unsafe { sys::cuEventRecord(event.0, self.stream) },
                    "cuEventRecord",
                )?;
                last.event = Some(event);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Advances the completed epoch as far as the device says; returns events to recycle.
    pub fn refresh(&self, st: &mut QueueState, recycle: &mut Vec<Event>) -> Result<Epoch> {
        if let Some(f) = &st.fault {
            return Err(f.clone());
        }
        loop {
            let Some(idx) = st.in_flight.iter().position(|f| f.event.is_some()) else {
                if st.in_flight.is_empty() {
                    break;
                }
                // SAFETY: a live stream of this context.
                match poll(unsafe { sys::cuStreamQuery(self.stream) }, "cuStreamQuery") {
                    Poll::Done => {
                        st.completed = st.submitted;
                        st.in_flight.clear();
                    }
                    Poll::Pending => {}
                    Poll::Failed(e) => return Err(self.fault(st, e)),
                }
                break;
            };
            let ev = st.in_flight[idx].event.expect("found above");
            // SAFETY: a pooled event recorded on this stream.
            match poll(unsafe { sys::cuEventQuery(ev.0) }, "cuEventQuery") {
                Poll::Done => {
                    st.completed = st.in_flight[idx].epoch;
                    for f in st.in_flight.drain(..=idx) {
                        recycle.extend(f.event);
                    }
                }
                Poll::Pending => break,
                Poll::Failed(e) => return Err(self.fault(st, e)),
            }
        }
        Ok(st.completed)
    }

    /// What to block on to see `epoch` complete: the first event recorded at or after it (its
    /// completion implies the epoch's), or the whole stream when none is.
    pub fn wait_target(st: &QueueState, epoch: Epoch) -> Option<(Event, Epoch)> {
        st.in_flight
            .iter()
            .filter(|f| f.epoch >= epoch)
            .find_map(|f| f.event.map(|e| (e, f.epoch)))
    }

    /// Records that everything up to `upto` completed (seen by blocking on it), returning the
    /// events of those submissions for recycling.
    pub fn mark_completed(st: &mut QueueState, upto: Epoch, recycle: &mut Vec<Event>) {
        st.completed = st.completed.max(upto);
        while st.in_flight.front().is_some_and(|f| f.epoch <= upto) {
            recycle.extend(st.in_flight.pop_front().and_then(|f| f.event));
        }
    }

    /// The event a wait on another queue can use for `epoch`, if one is recorded at or after it.
    pub fn event_for(st: &QueueState, epoch: Epoch) -> Option<Event> {
        Self::wait_target(st, epoch).map(|(e, _)| e)
    }

    /// Blocks on the stream or an event (without holding the state lock).
    pub fn block(&self, target: Option<Event>) -> Result<(), CuError> {
        match target {
            // SAFETY: a pooled event; synchronising on a re-recorded event waits for later work,
            // which is longer but never wrong.
            Some(ev) => check(
                unsafe { sys::cuEventSynchronize(ev.0) },
                "cuEventSynchronize",
            ),
            // SAFETY: a live stream of this context.
            None => check(
                unsafe { sys::cuStreamSynchronize(self.stream) },
                "cuStreamSynchronize",
            ),
        }
    }

    /// Marks a failure seen while blocking as this queue's fault.
    pub fn fail(&self, e: CuError) -> Error {
        let mut st = self.lock();
        self.fault(&mut st, e)
    }

    pub fn completed_epoch(st: &QueueState) -> Epoch {
        st.completed
    }

    pub fn fault_state(st: &QueueState) -> Option<Error> {
        st.fault.clone()
    }
}

impl Drop for CudaQueue {
    fn drop(&mut self) {
        // SAFETY: the stream is ours; the backend synchronised it before dropping the queue.
        unsafe { sys::cuStreamDestroy_v2(self.stream) };
    }
}
