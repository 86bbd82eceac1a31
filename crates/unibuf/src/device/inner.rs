//! The device's shared state and its submission flow.
//!
//! `DeviceInner` composes the parts a device is made of (the backend, the allocator, the
//! staging pool, the ledger, the kernels, the queues, the fault state, the deferred releases,
//! the residency set) and runs the flow every piece of work goes through: check the uses, plan
//! the waits their hazards need (`hazards`), submit, record the uses; then wait, drain, and let
//! the host borrow memory once the work it depends on is done. Memory entry points live in
//! `memory`.

use super::deferred::DeferredReleases;
use super::faults::FaultState;
use super::hazards::{plan_waits, Waiter};
use super::labels::LabelFigures;
use crate::alloc::{Allocator, Budget};
use crate::allocation::Allocation;
use crate::backend::{fences_retired, Backend, Command, DeviceInfo, Submission};
use crate::epoch::{Access, Epoch, Fence, FenceSet, QueueId};
use crate::error::{Error, Result};
use crate::kernel::KernelRegistry;
use crate::ledger::Ledger;
use crate::queue::StatsCollector;
use crate::residency::Residency;
use crate::transfer::staging::{StagingConfig, StagingPool};
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

static NEXT_DEVICE_ID: AtomicU64 = AtomicU64::new(1);

/// One allocation's part in a submission.
pub(crate) struct Use<'a> {
    pub alloc: &'a Allocation,
    pub start: usize,
    pub end: usize,
    pub access: Access,
}

/// How precisely a submission's completion must be observable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Completion {
    /// Completion of the queue as a whole suffices (no per-submission event on CUDA while the
    /// device has one queue).
    Queue,
    /// The caller waits for this submission while later ones run (staging chunks).
    Exact,
}

/// A device's shared state, behind every `Device`, `Queue` and allocation of it.
pub(crate) struct DeviceInner {
    pub id: u64,
    /// The state a BLAS library keeps per device (`ops::matmul`'s cuBLAS handle), made on first
    /// use and dropped in `Drop`, after the drain and while the backend still holds its context.
    pub blas: std::sync::OnceLock<Arc<dyn std::any::Any + Send + Sync>>,
    pub backend: Box<dyn Backend>,
    pub info: DeviceInfo,
    pub(super) alloc: Mutex<Allocator>,
    pub staging: StagingPool,
    pub ledger: Ledger,
    pub kernels: RwLock<KernelRegistry>,
    /// Per-label counts and times of submissions.
    pub submission_stats: StatsCollector,
    /// Serialises hazard analysis, submission and use recording, so that two threads submitting
    /// work on the same memory from different queues cannot both miss each other's use.
    submit_lock: Mutex<()>,
    /// Per queue: its label and the last epoch submitted.
    queues: Mutex<Vec<(String, Epoch)>>,
    faults: FaultState,
    pub(super) deferred: DeferredReleases,
    /// Live bytes and allocations per label.
    pub(super) owners: Mutex<LabelFigures>,
    pub residency: Residency,
    pub default_queue: QueueId,
}

/// A wait at least this long blocked on running work (for the submission stats).
const BLOCKING_WAIT_NS: u64 = 1_000;

impl DeviceInner {
    pub fn open(
        backend: Box<dyn Backend>,
        budget: Budget,
        staging: StagingConfig,
        ledger_capacity: usize,
    ) -> Result<Arc<DeviceInner>> {
        let default_queue = backend.create_queue()?;
        let info = backend.info().clone();
        Ok(Arc::new(DeviceInner {
            id: NEXT_DEVICE_ID.fetch_add(1, Ordering::Relaxed),
            blas: std::sync::OnceLock::new(),
            info,
            alloc: Mutex::new(Allocator::new(budget)),
            staging: StagingPool::new(staging),
            ledger: Ledger::new(ledger_capacity),
            kernels: RwLock::new(KernelRegistry::with_ops()?),
            submission_stats: StatsCollector::default(),
            submit_lock: Mutex::new(()),
            queues: Mutex::new(vec![("default".to_owned(), 0)]),
            faults: FaultState::default(),
            deferred: DeferredReleases::default(),
            owners: Mutex::new(LabelFigures::default()),
            residency: Residency::default(),
            default_queue,
            backend,
        }))
    }

    /// The sticky fault, if the device is in one.
    pub fn check_fault(&self) -> Result<()> {
        self.faults.check()
    }

    /// Asks every queue whether its work faulted, recording the first fault found, and returns
    /// the sticky state. Hot paths check only the recorded state; this is for explicit queries.
    pub fn poll_fault(&self) -> Result<()> {
        self.check_fault()?;
        for i in 0..self.queue_count() {
            self.note(self.backend.completed(QueueId(i as u32)))?;
        }
        Ok(())
    }

    /// Passes an error through, keeping device faults as the sticky state.
    pub fn note<T>(&self, r: Result<T>) -> Result<T> {
        self.faults.note(self.id, r)
    }

    /// Resets the backend's context and clears the sticky fault.
    pub fn reset(&self) -> Result<()> {
        self.backend.reset()?;
        self.faults.clear();
        Ok(())
    }

    pub fn create_queue(&self, label: &str) -> Result<QueueId> {
        self.check_fault()?;
        let mut queues = self.queues.lock();
        let id = self.backend.create_queue()?;
        debug_assert_eq!(id.0 as usize, queues.len());
        queues.push((label.to_owned(), 0));
        Ok(id)
    }

    pub fn queue_label(&self, q: QueueId) -> String {
        self.queues
            .lock()
            .get(q.0 as usize)
            .map_or_else(|| q.to_string(), |(l, _)| l.clone())
    }

    pub fn queue_count(&self) -> usize {
        self.queues.lock().len()
    }

    // ---- submission ---------------------------------------------------------------------

    /// Checks `uses`, prepends the waits their hazards need, submits, and records the uses.
    pub fn submit(
        &self,
        queue: QueueId,
        label: &str,
        what: &'static str,
        uses: &[Use<'_>],
        commands: &[Command],
        completion: Completion,
    ) -> Result<Fence> {
        self.check_fault()?;
        let started = self.ledger.now_ns();
        let _serial = self.submit_lock.lock();
        for u in uses {
            self.check_use(u, what)?;
        }
        let mut waits = plan_waits(
            Waiter::Queue(queue),
            uses.iter().map(|u| (u.alloc.uses(), u.access)),
        );
        waits.drop_complete(|f| self.backend.completed(f.queue).is_ok_and(|c| c >= f.epoch));
        let wait_count = waits.len() as u32;
        // Commands arrive as a slice (most submissions are one command built on the caller's
        // stack); they are copied only when waits go first (work on memory another queue used:
        // the rare case).
        let commands = waits.before(commands);
        self.residency.commit(&*self.backend);
        // SAFETY: every range in `commands` was bounds-checked against its allocation by the
        // caller; the allocations stay alive until this epoch completes because their fences
        // (recorded below) travel with freed blocks and deferred releases; host borrows were
        // checked above and new ones wait for the recorded fences; waits name submitted fences.
        let epoch = self.note(unsafe {
            self.backend.submit(
                queue,
                Submission {
                    label,
                    commands: &commands,
                    exact_completion: completion == Completion::Exact,
                },
            )
        })?;
        let fence = Fence {
            device: self.id,
            queue,
            epoch,
        };
        for u in uses {
            u.alloc.uses().record(fence, u.access);
        }
        if let Some(q) = self.queues.lock().get_mut(queue.0 as usize) {
            q.1 = epoch;
        }
        let encode_ns = self.ledger.now_ns() - started;
        // Under the submission lock: the stats window then holds each queue's submissions in
        // epoch order, in step with the spans the backend keeps (see `StatsCollector`).
        self.submission_stats
            .submitted(&*self.backend, fence, label, encode_ns);
        drop(_serial);
        self.ledger
            .record_submission(fence, label, wait_count, started, encode_ns);
        self.poll_deferred();
        Ok(fence)
    }

    /// Refuses a use of another device's memory, a write to read-only memory, and a use that
    /// conflicts with a host borrow (`what` names the work in the error).
    fn check_use(&self, u: &Use<'_>, what: &'static str) -> Result<()> {
        if !u.alloc.device.same_device(self) {
            return Err(Error::WrongDevice {
                what: "buffer",
                expected: self.id,
                got: u.alloc.device.id,
            });
        }
        if u.access == Access::Write && !u.alloc.writable {
            return Err(Error::ReadOnly {
                what,
                label: u.alloc.label.clone(),
            });
        }
        match u.alloc.uses().borrow_conflict(u.start, u.end, u.access) {
            Some(conflict) => Err(conflict.error(what, &u.alloc.label)),
            None => Ok(()),
        }
    }

    pub fn same_device(&self, other: &DeviceInner) -> bool {
        self.id == other.id
    }

    /// Refuses a fence of another device.
    fn check_fence(&self, fence: Fence) -> Result<()> {
        if fence.device != self.id {
            return Err(Error::WrongDevice {
                what: "fence",
                expected: self.id,
                got: fence.device,
            });
        }
        Ok(())
    }

    pub fn is_complete(&self, fence: Fence) -> Result<bool> {
        self.check_fence(fence)?;
        if fence.epoch == 0 {
            return Ok(true);
        }
        let queues = self.queue_count();
        if fence.queue.0 as usize >= queues {
            return Err(Error::invalid(
                "queue",
                format!("{} does not exist ({queues} queues)", fence.queue),
            ));
        }
        let submitted = self.last_submitted(fence.queue);
        if fence.epoch > submitted {
            return Err(Error::invalid(
                "fence",
                format!("{} has submitted {submitted} epochs; epoch {} never will complete before it is submitted", fence.queue, fence.epoch),
            ));
        }
        Ok(self.note(self.backend.completed(fence.queue))? >= fence.epoch)
    }

    pub fn wait(&self, fence: Fence) -> Result<()> {
        self.check_fence(fence)?;
        if fence.epoch == 0 {
            return self.check_fault();
        }
        let started = std::time::Instant::now();
        let r = self.note(self.backend.wait(fence.queue, fence.epoch));
        // Only waits that blocked count: a wait for finished work returns in well under a
        // microsecond, and telling them apart by time costs no driver query on the way in.
        let waited = started.elapsed().as_nanos() as u64;
        if waited >= BLOCKING_WAIT_NS {
            self.submission_stats.waited(fence, waited);
        }
        r
    }

    pub fn wait_all(&self, fences: &FenceSet) -> Result<()> {
        for f in fences.iter() {
            self.wait(f)?;
        }
        Ok(())
    }

    /// Waits for everything submitted on every queue.
    pub fn drain(&self) -> Result<()> {
        let last: Vec<Epoch> = self.queues.lock().iter().map(|(_, e)| *e).collect();
        for (i, e) in last.into_iter().enumerate() {
            self.wait(Fence {
                device: self.id,
                queue: QueueId(i as u32),
                epoch: e,
            })?;
        }
        self.poll_deferred();
        Ok(())
    }

    pub fn last_submitted(&self, queue: QueueId) -> Epoch {
        self.queues.lock().get(queue.0 as usize).map_or(0, |q| q.1)
    }

    // ---- host access --------------------------------------------------------------------

    /// Registers a host borrow of `start..end` for `access` and waits for the work it depends
    /// on: GPU writes for a read; GPU reads and writes for a write.
    pub fn host_borrow(
        &self,
        alloc: &Allocation,
        start: usize,
        end: usize,
        access: Access,
        what: &'static str,
    ) -> Result<u64> {
        self.check_fault()?;
        if !alloc.host_accessible() {
            return Err(Error::NotHostAccessible {
                what,
                mode: alloc.mode,
            });
        }
        if access == Access::Write && !alloc.writable {
            return Err(Error::ReadOnly {
                what,
                label: alloc.label.clone(),
            });
        }
        // Registered under the submission lock: a submission checks host borrows and records
        // its fence under the same lock, so a borrow either sees that fence (and waits for it)
        // or the submission sees the borrow (and is refused). Without it, a borrow taken between
        // a submission's check and its record would not wait for work writing these bytes.
        let serial = self.submit_lock.lock();
        let (id, waits) = {
            let mut state = alloc.uses();
            if let Some(conflict) = state.borrow_conflict(start, end, access) {
                return Err(conflict.error(what, &alloc.label));
            }
            let waits = plan_waits(Waiter::Host, [(&*state, access)]);
            (state.add_borrow(start, end, access), waits)
        };
        drop(serial);
        if let Err(e) = self.wait_all(waits.fences()) {
            alloc.uses().remove_borrow(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Whether host access to `alloc` for `access` would have to wait for pending device work.
    pub fn host_access_would_wait(&self, alloc: &Allocation, access: Access) -> bool {
        let waits = plan_waits(Waiter::Host, [(alloc.uses(), access)]);
        !fences_retired(&*self.backend, waits.fences())
    }
}

impl Drop for DeviceInner {
    fn drop(&mut self) {
        let _ = self.drain();
        // A BLAS handle goes with its context alive (the backend is dropped after this).
        drop(self.blas.take());
        for r in self.deferred.take_all() {
            for f in r.fences.iter() {
                let _ = self.backend.wait(f.queue, f.epoch);
            }
            // SAFETY: every fence of the release was waited for (or its queue faulted, which
            // discards its work); `r` came from this device's backend.
            unsafe { r.release(&*self.backend, &self.alloc) };
        }
        self.residency.apply_removals(&*self.backend, |_| true);
        self.staging.trim(&*self.backend);
        let mut alloc = self.alloc.lock();
        alloc.release_cached(&*self.backend, usize::MAX, true);
        alloc.shutdown(&*self.backend);
    }
}
