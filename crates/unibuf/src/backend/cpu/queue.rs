//! A CPU queue: one worker thread running submissions in order, so asynchrony is real.

use super::Pipelines;
use crate::backend::{Command, FillPattern, GpuSpan, RawRange};
use crate::epoch::{Epoch, QueueId};
use crate::error::{Error, FaultKind, Result};
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

/// How many recent submissions keep their timing for `gpu_span`.
const SPAN_HISTORY: usize = 1 << 16;

pub(super) struct Job {
    pub epoch: Epoch,
    /// The queue's generation at submission; `reset` starts a new one, and jobs of an older
    /// generation are discarded, never run: their inputs may have been freed meanwhile.
    pub generation: u64,
    pub label: String,
    pub commands: Vec<Command>,
}

#[derive(Default)]
struct Progress {
    submitted: Epoch,
    completed: Epoch,
    fault: Option<Error>,
    generation: u64,
    spans: VecDeque<(Epoch, GpuSpan)>,
}

/// The state a queue shares between its submitters and its worker.
pub(super) struct QueueShared {
    id: QueueId,
    progress: Mutex<Progress>,
    changed: Condvar,
}

impl QueueShared {
    pub fn completed(&self) -> Result<Epoch> {
        let p = self.progress.lock();
        match &p.fault {
            Some(f) => Err(f.clone()),
            None => Ok(p.completed),
        }
    }

    pub fn wait(&self, epoch: Epoch) -> Result<()> {
        let mut p = self.progress.lock();
        if epoch > p.submitted {
            return Err(Error::invalid(
                "epoch",
                format!(
                    "{} has submitted {} epochs; cannot wait for {epoch}",
                    self.id, p.submitted
                ),
            ));
        }
        loop {
            if let Some(f) = &p.fault {
                return Err(f.clone());
            }
            if p.completed >= epoch {
                return Ok(());
            }
            self.changed.wait(&mut p);
        }
    }

    pub fn span(&self, epoch: Epoch) -> Option<GpuSpan> {
        let p = self.progress.lock();
        let first = p.spans.front()?.0;
        let i = usize::try_from(epoch.checked_sub(first)?).ok()?;
        p.spans.get(i).filter(|(e, _)| *e == epoch).map(|(_, s)| *s)
    }

    pub fn reset(&self) {
        let mut p = self.progress.lock();
        p.fault = None;
        p.generation += 1;
        self.changed.notify_all();
    }
}

/// A queue: its shared state and the worker that drains it.
pub(super) struct CpuQueue {
    pub shared: Arc<QueueShared>,
    sender: Mutex<Option<Sender<Job>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl CpuQueue {
    pub fn spawn(
        id: QueueId,
        queues: Weak<RwLock<Vec<Arc<CpuQueue>>>>,
        pipelines: Arc<Pipelines>,
        clock: Instant,
    ) -> Result<CpuQueue> {
        let shared = Arc::new(QueueShared {
            id,
            progress: Mutex::new(Progress::default()),
            changed: Condvar::new(),
        });
        let (tx, rx) = channel::<Job>();
        let worker_shared = shared.clone();
        let worker = std::thread::Builder::new()
            .name(format!("unibuf-cpu-q{}", id.0))
            .spawn(move || {
                let ctx = Worker {
                    shared: worker_shared,
                    queues,
                    pipelines,
                    clock,
                };
                for job in rx {
                    ctx.run(job);
                }
            })
            .map_err(|e| Error::io("spawning a CPU queue worker", e))?;
        Ok(CpuQueue {
            shared,
            sender: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Assigns the next epoch and hands the job to the worker.
    pub fn submit(&self, label: &str, commands: Vec<Command>) -> Result<Epoch> {
        let sender = self.sender.lock();
        let mut p = self.shared.progress.lock();
        if let Some(f) = &p.fault {
            return Err(f.clone());
        }
        let epoch = p.submitted + 1;
        let job = Job {
            epoch,
            generation: p.generation,
            label: label.to_owned(),
            commands,
        };
        match sender.as_ref().map(|s| s.send(job)) {
            Some(Ok(())) => {
                p.submitted = epoch;
                Ok(epoch)
            }
            _ => Err(Error::DeviceFault {
                kind: FaultKind::Other,
                label: label.to_owned(),
                detail: format!("the worker of {} has stopped", self.shared.id),
            }),
        }
    }

    /// Closes the channel and joins the worker after it ran everything submitted.
    pub fn shutdown(&self) {
        drop(self.sender.lock().take());
        if let Some(h) = self.worker.lock().take() {
            let _ = h.join();
        }
    }
}

struct Worker {
    shared: Arc<QueueShared>,
    queues: Weak<RwLock<Vec<Arc<CpuQueue>>>>,
    pipelines: Arc<Pipelines>,
    clock: Instant,
}

impl Worker {
    fn run(&self, job: Job) {
        let faulted = {
            let p = self.shared.progress.lock();
            p.fault.is_some() || p.generation != job.generation
        };
        let start = self.clock.elapsed().as_nanos() as u64;
        // Work queued behind a fault is discarded, not run: its inputs may be garbage, and once
        // the fault counted its fences as retired, its memory may be gone. That stays true after
        // a reset (the generation check). Its epoch still completes so that no waiter hangs.
        let outcome = if faulted {
            Ok(())
        } else {
            catch_unwind(AssertUnwindSafe(|| self.execute(&job.commands, &job.label)))
                .unwrap_or_else(|panic| {
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "panic".to_owned());
                    Err((FaultKind::Trap, format!("kernel panicked: {msg}")))
                })
        };
        let end = self.clock.elapsed().as_nanos() as u64;
        let mut p = self.shared.progress.lock();
        if let Err((kind, detail)) = outcome {
            p.fault.get_or_insert(Error::DeviceFault {
                kind,
                label: job.label,
                detail,
            });
        }
        p.completed = job.epoch;
        if p.spans.len() == SPAN_HISTORY {
            p.spans.pop_front();
        }
        p.spans.push_back((
            job.epoch,
            GpuSpan {
                start_ns: start,
                end_ns: end,
            },
        ));
        self.shared.changed.notify_all();
    }

    /// Runs one kernel launch on this thread.
    fn run_kernel(
        &self,
        pipeline: crate::backend::PipelineId,
        dims: crate::backend::LaunchDims,
        args: &[crate::backend::LaunchArg],
    ) -> Result<(), (FaultKind, String)> {
        let (f, constants) = self.pipelines.get(pipeline).ok_or((
            FaultKind::LaunchFailed,
            format!("pipeline {} does not exist", pipeline.0),
        ))?;
        let mut kargs = super::CpuKernelArgs::new(dims, args, &constants);
        f(&mut kargs).map_err(|e| (FaultKind::Trap, e))
    }

    fn execute(&self, commands: &[Command], label: &str) -> Result<(), (FaultKind, String)> {
        for cmd in commands {
            match cmd {
                Command::Copy { src, dst } => {
                    // SAFETY: Backend::submit's contract: both ranges lie in live memory of this
                    // backend (host memory here), have the same length and do not overlap, and no
                    // host guard touches `dst` until this epoch completes.
                    unsafe {
                        std::ptr::copy_nonoverlapping(host(src), host(dst), src.bytes);
                    }
                }
                Command::Fill { dst, pattern } => {
                    // SAFETY: as for Copy; `dst` is exclusively ours until this epoch completes.
                    let bytes = unsafe { std::slice::from_raw_parts_mut(host(dst), dst.bytes) };
                    fill(bytes, pattern);
                }
                Command::Launch {
                    pipeline,
                    dims,
                    args,
                } => self.run_kernel(*pipeline, *dims, args)?,
                Command::Batch { launches, .. } => {
                    for l in launches.iter() {
                        self.run_kernel(l.pipeline, l.dims, &l.args)?;
                    }
                }
                Command::External(work) => work
                    .run(crate::interop::NativeEncoder::Cpu, label)
                    .map_err(|e| (FaultKind::Trap, e.to_string()))?,
                Command::WaitForeign(signal) => match signal {
                    crate::interop::ForeignSignal::Host(s) => {
                        if !s.wait() {
                            return Err((
                                FaultKind::Other,
                                "waited for a host signal whose every other clone was dropped \
                                 unset: it can never be set"
                                    .to_owned(),
                            ));
                        }
                    }
                    // Refused by `CpuBackend::submit` before it reaches the worker.
                    other => {
                        return Err((
                            FaultKind::InvalidResource,
                            format!("the CPU backend cannot wait for {other:?}"),
                        ))
                    }
                },
                Command::Wait(fence) => {
                    let other = self
                        .queues
                        .upgrade()
                        .and_then(|qs| qs.read().get(fence.queue.0 as usize).cloned());
                    let Some(other) = other else {
                        return Err((
                            FaultKind::InvalidResource,
                            format!("{} does not exist", fence.queue),
                        ));
                    };
                    other.shared.wait(fence.epoch).map_err(|e| {
                        (
                            FaultKind::Other,
                            format!(
                                "waited for {} epoch {}, which failed: {e}",
                                fence.queue, fence.epoch
                            ),
                        )
                    })?;
                }
            }
        }
        Ok(())
    }
}

fn host(r: &RawRange) -> *mut u8 {
    (r.addr as usize + r.offset) as *mut u8
}

/// Writes `pattern` over `bytes` (whose length is a multiple of the width): one repetition,
/// then doubling copies, so the cost is a handful of memcpy calls whatever the width.
pub(super) fn fill(bytes: &mut [u8], pattern: &FillPattern) {
    let p = pattern.bytes();
    if p.iter().all(|b| *b == p[0]) {
        bytes.fill(p[0]);
        return;
    }
    let n = bytes.len();
    if n == 0 {
        return;
    }
    bytes[..p.len()].copy_from_slice(p);
    let mut done = p.len();
    while done < n {
        let take = done.min(n - done);
        bytes.copy_within(..take, done);
        done += take;
    }
}
