//! Device-side timing of submissions: a pair of timing events around each submission's
//! commands, opt-in (`BackendOptions::gpu_timing`), since recording two more events costs about
//! a microsecond of CPU per submission, which launch-bound decode loops should not pay unasked.
//!
//! Times are read back lazily: `span` asks whether the end event completed and then converts
//! both events to nanoseconds since a base event recorded when the backend opened. Only the
//! most recent `KEEP` submissions of each queue keep their events; older ones answer `None`
//! (the submission stats read spans before that: they harvest when their window of `KEEP`
//! submissions fills).
//! A submission to an idle stream starts its span when the start mark runs, which is as soon
//! as it is enqueued: the span then includes the host's launch latency for the commands after
//! it. Back-to-back work (a busy stream) measures the work alone.
//! `cuEventElapsedTime` gives f32 milliseconds: durations are exact to its 0.5 µs resolution,
//! start times lose resolution as the process ages (about 60 µs after ten minutes), which only
//! blurs where a trace places a span.

use super::driver::{check, CuError};
use super::stream::Event;
use crate::backend::GpuSpan;
use crate::epoch::{Epoch, QueueId};
use cudarc::driver::sys::{self, CUresult};
use parking_lot::Mutex;
use std::collections::VecDeque;

/// How many recent submissions of each queue keep their timing events.
pub(crate) const KEEP: usize = 4096;

struct Timed {
    epoch: Epoch,
    start: Event,
    end: Event,
    span: Option<GpuSpan>,
}

pub(super) struct Timer {
    base: Event,
    pool: Mutex<Vec<Event>>,
    /// Per queue (indexed by id), in epoch order.
    recent: Mutex<Vec<VecDeque<Timed>>>,
}

// SAFETY: event handles are usable from any thread with the context current; the mutable state
// is behind mutexes.
unsafe impl Send for Timer {}
// SAFETY: as above.
unsafe impl Sync for Timer {}

fn create_timing_event() -> Result<Event, CuError> {
    let mut ev: sys::CUevent = std::ptr::null_mut();
    // SAFETY: valid out-pointer; the context is current (callers bind it). Flags 0: timing on.
    check(unsafe { sys::cuEventCreate(&mut ev, 0) }, "cuEventCreate")?;
    Ok(Event(ev))
}

/// Milliseconds between two completed timing events, as nanoseconds.
fn elapsed_ns(from: Event, to: Event) -> Option<u64> {
    let mut ms = 0f32;
    // SAFETY: valid out-pointer; both are timing events of this context.
    let r = unsafe { sys::cuEventElapsedTime(&mut ms, from.0, to.0) };
    (r == CUresult::CUDA_SUCCESS).then(|| (f64::from(ms.max(0.0)) * 1e6) as u64)
}

impl Timer {
    /// A timer whose zero is now: the base event is recorded on the legacy stream and waited
    /// for, so every later event completes after it.
    pub fn new() -> Result<Timer, CuError> {
        let base = create_timing_event()?;
        // SAFETY: a fresh event; the null stream is always valid with a current context.
        check(
            unsafe { sys::cuEventRecord(base.0, std::ptr::null_mut()) },
            "cuEventRecord",
        )?;
        // SAFETY: the event was just recorded.
        check(
            unsafe { sys::cuEventSynchronize(base.0) },
            "cuEventSynchronize",
        )?;
        Ok(Timer {
            base,
            pool: Mutex::new(Vec::new()),
            recent: Mutex::new(Vec::new()),
        })
    }

    /// Records a timing event on `stream` (before or after a submission's commands).
    pub fn mark(&self, stream: sys::CUstream) -> Result<Event, CuError> {
        let ev = match self.pool.lock().pop() {
            Some(ev) => ev,
            None => create_timing_event()?,
        };
        // SAFETY: a timing event of this context and a live stream of it; re-recording an
        // event from the pool is allowed even if its earlier capture is still pending.
        match check(unsafe { sys::cuEventRecord(ev.0, stream) }, "cuEventRecord") {
            Ok(()) => Ok(ev),
            Err(e) => {
                self.recycle([ev]);
                Err(e)
            }
        }
    }

    /// Keeps the events of submission `epoch` of `queue` until its span is asked for.
    pub fn keep(&self, queue: QueueId, epoch: Epoch, start: Event, end: Event) {
        let mut recent = self.recent.lock();
        let q = queue.0 as usize;
        if recent.len() <= q {
            recent.resize_with(q + 1, VecDeque::new);
        }
        recent[q].push_back(Timed {
            epoch,
            start,
            end,
            span: None,
        });
        if recent[q].len() > KEEP {
            let old = recent[q].pop_front().expect("longer than KEEP");
            drop(recent);
            self.recycle([old.start, old.end]);
        }
    }

    /// Returns events that were marked but whose submission failed to be recorded.
    pub fn recycle(&self, events: impl IntoIterator<Item = Event>) {
        self.pool.lock().extend(events);
    }

    /// The device-side span of a submission, once its end event completed.
    pub fn span(&self, queue: QueueId, epoch: Epoch) -> Option<GpuSpan> {
        let mut recent = self.recent.lock();
        let list = recent.get_mut(queue.0 as usize)?;
        // Epochs of one queue are kept in order: a binary search.
        let i = list.partition_point(|t| t.epoch < epoch);
        let t = list.get_mut(i).filter(|t| t.epoch == epoch)?;
        if t.span.is_none() {
            // SAFETY: a timing event recorded on a stream of this context.
            if unsafe { sys::cuEventQuery(t.end.0) } != CUresult::CUDA_SUCCESS {
                return None;
            }
            let start_ns = elapsed_ns(self.base, t.start)?;
            let duration = elapsed_ns(t.start, t.end)?;
            t.span = Some(GpuSpan {
                start_ns,
                end_ns: start_ns + duration,
            });
        }
        t.span
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let recent = std::mem::take(self.recent.get_mut());
        let pool = std::mem::take(self.pool.get_mut());
        let events = recent
            .into_iter()
            .flatten()
            .flat_map(|t| [t.start, t.end])
            .chain(pool)
            .chain([self.base]);
        for ev in events {
            // SAFETY: events of this context, destroyed once; the backend synchronised its
            // streams before dropping the timer.
            unsafe { sys::cuEventDestroy_v2(ev.0) };
        }
    }
}
