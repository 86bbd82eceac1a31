//! The device: the entry point. It owns the backend, the allocator, the staging pool, the
//! ledger, the kernel registry and the queues, and it is where every submission is checked for
//! hazards before it reaches the backend.

use super::labels::LabelFigures;
use crate::alloc::{Allocator, Block, Budget, MemoryStats};
use crate::allocation::{Allocation, Owner};
use crate::backend::{fences_retired, Backend, Command, DeviceInfo, RawAlloc, Submission};
use crate::buffer::GrowableRegion;
use crate::epoch::{Access, Epoch, Fence, FenceSet, QueueId};
use crate::error::{Error, Result};
use crate::kernel::KernelRegistry;
use crate::ledger::Ledger;
use crate::queue::StatsCollector;
use crate::residency::Residency;
use crate::storage::StorageMode;
use crate::transfer::staging::{StagingConfig, StagingPool};
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// Wrapped caller memory whose unwrapping waits for the work that used it.
struct DeferredRelease {
    raw: RawAlloc,
    owner: Owner,
    fences: FenceSet,
}

pub(crate) struct DeviceInner {
    pub id: u64,
    /// The state a BLAS library keeps per device (`ops::matmul`'s cuBLAS handle), made on first
    /// use and dropped in `Drop`, after the drain and while the backend still holds its context.
    pub blas: std::sync::OnceLock<Arc<dyn std::any::Any + Send + Sync>>,
    pub backend: Box<dyn Backend>,
    pub info: DeviceInfo,
    alloc: Mutex<Allocator>,
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
    fault: Mutex<Option<Error>>,
    /// Whether `fault` holds one: every call checks, so the lock is taken only once it does.
    /// Set after the fault is stored; cleared with it on reset.
    faulted: AtomicBool,
    deferred: Mutex<Vec<DeferredRelease>>,
    /// Whether `deferred` may hold releases: every submission polls it, so the lock is skipped
    /// while this is false. Set under the lock when one is queued, cleared when none is left.
    has_deferred: AtomicBool,
    /// Live bytes and allocations per label.
    owners: Mutex<LabelFigures>,
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
            fault: Mutex::new(None),
            faulted: AtomicBool::new(false),
            deferred: Mutex::new(Vec::new()),
            has_deferred: AtomicBool::new(false),
            owners: Mutex::new(LabelFigures::default()),
            residency: Residency::default(),
            default_queue,
            backend,
        }))
    }

    /// The sticky fault, if the device is in one.
    pub fn check_fault(&self) -> Result<()> {
        if !self.faulted.load(Ordering::Acquire) {
            return Ok(());
        }
        match &*self.fault.lock() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
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
        if let Err(e @ Error::DeviceFault { .. }) = &r {
            let mut fault = self.fault.lock();
            fault.get_or_insert_with(|| {
                tracing::error!(
                    device = self.id,
                    "device fault, the device stays faulted until reset: {e}"
                );
                e.clone()
            });
            // Under the lock, as `reset` clears it: the flag never outlives the fault.
            self.faulted.store(true, Ordering::Release);
            drop(fault);
        }
        r
    }

    pub fn reset(&self) -> Result<()> {
        self.backend.reset()?;
        let mut fault = self.fault.lock();
        *fault = None;
        self.faulted.store(false, Ordering::Release);
        drop(fault);
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

    // ---- memory -------------------------------------------------------------------------

    pub fn allocate(
        self: &Arc<Self>,
        mode: StorageMode,
        bytes: usize,
        label: String,
    ) -> Result<Allocation> {
        self.check_fault()?;
        self.poll_deferred();
        let mode = mode.resolve(self.info.unified_memory);
        if mode == StorageMode::External {
            return Err(Error::invalid(
                "mode",
                "External buffers wrap caller memory: use Device::wrap_external",
            ));
        }
        let block = {
            let mut a = self.alloc.lock();
            let block = a.allocate(&*self.backend, mode.memory_kind(), bytes)?;
            if let Some(r) = a.recorder() {
                r.alloc(block.raw.addr, bytes);
            }
            block
        };
        Ok(Allocation::new(
            self.clone(),
            block,
            bytes,
            mode,
            label,
            true,
            None,
        ))
    }

    /// Wraps host memory kept alive by `owner`. On failure the owner comes back with the
    /// error, so that the caller can still copy the memory when the backend refuses it.
    pub fn wrap(
        self: &Arc<Self>,
        owner: Owner,
        base: std::ptr::NonNull<u8>,
        bytes: usize,
        writable: bool,
        label: String,
    ) -> std::result::Result<Allocation, (Error, Owner)> {
        if let Err(e) = self.check_fault() {
            return Err((e, owner));
        }
        self.poll_deferred();
        // SAFETY: the caller (wrap_external) passes a page-rounded region inside pages that
        // `owner` keeps mapped; `owner` is stored in the allocation and dropped only after
        // `release`, which happens once all work using the region completed.
        let raw = match unsafe { self.backend.wrap_host(base, bytes, writable) } {
            Ok(raw) => raw,
            Err(e) => return Err((e, owner)),
        };
        let mut a = self.alloc.lock();
        let s = a.stats_mut();
        s.external_bytes += raw.bytes;
        s.external_count += 1;
        drop(a);
        let block = Block {
            raw,
            fences: FenceSet::new(),
            in_arena: false,
        };
        Ok(Allocation::new(
            self.clone(),
            block,
            bytes,
            StorageMode::External,
            label,
            writable,
            Some(owner),
        ))
    }

    /// An allocation over foreign memory the backend wrapped (`Backend::wrap_foreign`), keeping
    /// `owner` until its release, which waits for every fence that used it.
    pub fn adopt_foreign(
        self: &Arc<Self>,
        raw: RawAlloc,
        requested: usize,
        writable: bool,
        label: String,
        owner: Owner,
    ) -> Allocation {
        debug_assert_eq!(raw.kind, crate::storage::MemoryKind::Foreign);
        {
            let mut a = self.alloc.lock();
            let s = a.stats_mut();
            s.foreign_bytes += raw.bytes;
            s.foreign_count += 1;
        }
        let block = Block {
            raw,
            fences: FenceSet::new(),
            in_arena: false,
        };
        Allocation::new(
            self.clone(),
            block,
            requested,
            StorageMode::Foreign,
            label,
            writable,
            Some(owner),
        )
    }

    /// Counts an allocation's bytes for its label.
    pub fn own(&self, label: &str, bytes: usize) {
        self.owners.lock().own(label, bytes);
    }

    /// Adds bytes to a label's count (a growable buffer that grew).
    pub fn own_bytes(&self, label: &str, bytes: usize) {
        self.owners.lock().add_bytes(label, bytes);
    }

    /// Stops counting an allocation's bytes for its label.
    pub fn disown(&self, label: &str, bytes: usize) {
        self.owners.lock().disown(label, bytes);
    }

    /// Live bytes and allocations per label, most bytes first.
    pub fn owners(&self) -> Vec<(String, usize, usize)> {
        self.owners.lock().live()
    }

    pub fn free_block(&self, block: Block, requested: usize) {
        self.residency.forget(block.raw.handle, &block.fences);
        let mut a = self.alloc.lock();
        if let Some(r) = a.recorder() {
            r.free(block.raw.addr);
        }
        a.free(&*self.backend, block, requested);
    }

    /// Starts recording the allocator's allocations and frees to `path`.
    pub fn record_alloc_trace(&self, path: &std::path::Path) -> Result<()> {
        // Under the lock: a second start must be refused before it truncates any file (the
        // running recording's own, say).
        let mut a = self.alloc.lock();
        if let Some(running) = a.recorder() {
            return Err(Error::invalid(
                "allocation trace",
                format!(
                    "already recording to {} (finish it first); {} not started",
                    running.path().display(),
                    path.display()
                ),
            ));
        }
        a.start_recording(crate::alloc::TraceRecorder::create(path)?);
        Ok(())
    }

    /// Stops the recording and finishes its file.
    pub fn finish_alloc_trace(&self) -> Result<crate::alloc::TraceSummary> {
        let recorder = self.alloc.lock().stop_recording().ok_or_else(|| {
            Error::invalid(
                "allocation trace",
                "no recording is running (start one with Device::record_alloc_trace)",
            )
        })?;
        recorder.finish()
    }

    pub fn release_external(&self, block: Block, owner: Owner) {
        self.residency.forget(block.raw.handle, &block.fences);
        let mut deferred = self.deferred.lock();
        deferred.push(DeferredRelease {
            raw: block.raw,
            owner,
            fences: block.fences,
        });
        self.has_deferred.store(true, Ordering::Release);
        drop(deferred);
        self.poll_deferred();
    }

    fn fences_complete(&self, fences: &FenceSet) -> bool {
        fences_retired(&*self.backend, fences)
    }

    /// Unwraps External regions whose work has completed; also applies residency removals
    /// whose work has completed.
    pub fn poll_deferred(&self) {
        let ready: Vec<DeferredRelease> = if self.has_deferred.load(Ordering::Acquire) {
            let mut d = self.deferred.lock();
            let (ready, pending): (Vec<_>, Vec<_>) = std::mem::take(&mut *d)
                .into_iter()
                .partition(|r| self.fences_complete(&r.fences));
            *d = pending;
            self.has_deferred.store(!d.is_empty(), Ordering::Release);
            ready
        } else {
            Vec::new()
        };
        for r in ready {
            self.unwrap_external(r);
        }
        self.residency
            .apply_removals(&*self.backend, |f| self.fences_complete(f));
    }

    /// Reserves address space for a growable buffer of up to `capacity` bytes and maps its
    /// first `initial` bytes; `None` where the backend has no virtual memory for `mode`.
    pub fn reserve_region(
        self: &Arc<Self>,
        mode: StorageMode,
        capacity: usize,
        initial: usize,
        label: &str,
    ) -> Result<Option<(Allocation, Arc<GrowableRegion>)>> {
        self.check_fault()?;
        let kind = mode.memory_kind();
        let Some(vm) = self.backend.virtual_memory(kind) else {
            return Ok(None);
        };
        let g = vm.granularity();
        let too_big = || Error::NeverFits {
            requested: capacity,
            limit: self.info.max_buffer_len,
            limit_name: "maximum buffer length",
        };
        let reserved = capacity
            .max(1)
            .checked_next_multiple_of(g)
            .ok_or_else(too_big)?;
        if reserved > self.info.max_buffer_len.saturating_mul(2) {
            return Err(too_big());
        }
        let mapped = initial.next_multiple_of(g);
        self.check_budget(mapped)?;
        // SAFETY: released by `finish_release` (unreserve) after unmapping what was mapped.
        let base = unsafe { vm.reserve(kind, reserved)? };
        if mapped > 0 {
            // SAFETY: inside the fresh reservation, nothing mapped yet.
            if let Err(e) = unsafe { vm.map(kind, base, mapped) } {
                // SAFETY: nothing is mapped in it.
                unsafe { vm.unreserve(kind, base, reserved) };
                return Err(e);
            }
        }
        {
            let mut a = self.alloc.lock();
            let s = a.stats_mut();
            s.growable_bytes += mapped;
            s.growable_count += 1;
        }
        let region = Arc::new(GrowableRegion {
            kind,
            base,
            reserved,
            mapped: std::sync::atomic::AtomicUsize::new(mapped),
        });
        let block = Block {
            raw: RawAlloc {
                addr: base,
                handle: base,
                bytes: reserved,
                kind,
            },
            fences: FenceSet::new(),
            in_arena: false,
        };
        let owner: Owner = Box::new(region.clone());
        let alloc = Allocation::new(
            self.clone(),
            block,
            initial,
            mode,
            label.to_owned(),
            true,
            Some(owner),
        );
        Ok(Some((alloc, region)))
    }

    /// Maps more of a growable region so that its first `bytes` are backed.
    pub fn grow_region(&self, region: &GrowableRegion, bytes: usize, label: &str) -> Result<()> {
        self.check_fault()?;
        let vm = self
            .backend
            .virtual_memory(region.kind)
            .ok_or_else(|| Error::invalid("grow", "the backend lost its virtual memory"))?;
        let need = bytes.next_multiple_of(vm.granularity());
        let have = region.mapped();
        if need <= have {
            return Ok(());
        }
        self.check_budget(need - have)?;
        // SAFETY: `have..need` lies inside the region's reservation (need <= reserved, since
        // `bytes` <= capacity) and is not mapped yet; only the buffer's `&mut` handle grows it.
        unsafe { vm.map(region.kind, region.base + have as u64, need - have)? };
        region
            .mapped
            .store(need, std::sync::atomic::Ordering::Release);
        self.alloc.lock().stats_mut().growable_bytes += need - have;
        self.own_bytes(label, need - have);
        Ok(())
    }

    /// Refuses `more` bytes past the memory budget (allocator reservations plus growable
    /// buffers count against it).
    fn check_budget(&self, more: usize) -> Result<()> {
        let a = self.alloc.lock();
        if let Some(budget) = a.budget().memory_limit {
            let s = a.stats();
            let in_use = s.reserved_bytes + s.growable_bytes;
            if in_use + more > budget {
                return Err(Error::BudgetExceeded {
                    which: "memory",
                    requested: more,
                    in_use,
                    budget,
                });
            }
        }
        Ok(())
    }

    fn unwrap_external(&self, r: DeferredRelease) {
        if let Some(region) = r.owner.downcast_ref::<Arc<GrowableRegion>>() {
            let mapped = region.mapped();
            if let Some(vm) = self.backend.virtual_memory(region.kind) {
                // SAFETY: every view of the region is gone and every fence that used it has
                // completed; `mapped` bytes from the base are exactly what was mapped.
                unsafe {
                    if mapped > 0 {
                        vm.unmap(region.kind, region.base, mapped);
                    }
                    vm.unreserve(region.kind, region.base, region.reserved);
                }
            }
            let mut a = self.alloc.lock();
            let s = a.stats_mut();
            s.growable_bytes -= mapped;
            s.growable_count -= 1;
            return;
        }
        let mut a = self.alloc.lock();
        let s = a.stats_mut();
        if r.raw.kind == crate::storage::MemoryKind::Foreign {
            s.foreign_bytes -= r.raw.bytes;
            s.foreign_count -= 1;
        } else {
            s.external_bytes -= r.raw.bytes;
            s.external_count -= 1;
        }
        drop(a);
        // SAFETY: the region came from wrap_host or wrap_foreign, and every fence that used it
        // has completed.
        unsafe { self.backend.release(r.raw) };
        drop(r.owner);
    }

    pub fn memory_stats(&self) -> MemoryStats {
        let mut s = self.alloc.lock().stats();
        s.staging_bytes = self.staging.bytes();
        s
    }

    pub fn budget(&self) -> Budget {
        self.alloc.lock().budget()
    }

    pub fn set_budget(&self, budget: Budget) {
        self.alloc.lock().set_budget(budget);
    }

    /// The allocator's segments and cached blocks, after deferred releases are applied.
    pub fn memory_snapshot(&self) -> crate::alloc::MemorySnapshot {
        self.poll_deferred();
        self.alloc.lock().snapshot()
    }

    /// Releases every cached block and idle staging chunk back to the backend.
    pub fn trim(&self) -> usize {
        self.poll_deferred();
        let released = self
            .alloc
            .lock()
            .release_cached(&*self.backend, usize::MAX, true);
        released + self.staging.trim(&*self.backend)
    }

    // ---- submission ---------------------------------------------------------------------

    /// Checks `uses` for hazards, prepends the waits they need, submits, and records the uses.
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
        let mut waits = FenceSet::new();
        for u in uses {
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
            let state = u.alloc.uses();
            if let Some((start, end, held_write)) =
                state.borrow_conflict(u.start, u.end, u.access == Access::Write)
            {
                return Err(Error::HostAccessConflict {
                    what,
                    label: u.alloc.label.clone(),
                    start,
                    end,
                    held: if held_write {
                        "write-locked"
                    } else {
                        "read-locked"
                    },
                });
            }
            state.hazards(Some(queue), u.access, &mut waits);
        }
        waits.retain_pending(|f| self.backend.completed(f.queue).is_ok_and(|c| c >= f.epoch));
        let wait_count = waits.iter().count() as u32;
        // Commands arrive as a slice (most submissions are one command built on the caller's
        // stack); a vector is built, and the commands cloned into it, only when waits go first
        // (work on memory another queue used: the rare case).
        let with_waits: Vec<Command>;
        let commands = if waits.is_empty() {
            commands
        } else {
            with_waits = waits
                .iter()
                .map(Command::Wait)
                .chain(commands.iter().cloned())
                .collect();
            &with_waits
        };
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
                    commands,
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

    /// Registers a host borrow of `start..end` and waits for the work it depends on: GPU writes
    /// for a read; GPU reads and writes for a write.
    pub fn host_borrow(
        &self,
        alloc: &Allocation,
        start: usize,
        end: usize,
        write: bool,
        what: &'static str,
    ) -> Result<u64> {
        self.check_fault()?;
        if !alloc.host_accessible() {
            return Err(Error::NotHostAccessible {
                what,
                mode: alloc.mode,
            });
        }
        if write && !alloc.writable {
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
        let (id, fences) = {
            let mut state = alloc.uses();
            if let Some((s, e, held_write)) = state.borrow_conflict(start, end, write) {
                return Err(Error::HostAccessConflict {
                    what,
                    label: alloc.label.clone(),
                    start: s,
                    end: e,
                    held: if held_write {
                        "write-locked"
                    } else {
                        "read-locked"
                    },
                });
            }
            let mut fences = FenceSet::new();
            state.hazards(
                None,
                if write { Access::Write } else { Access::Read },
                &mut fences,
            );
            (state.add_borrow(start, end, write), fences)
        };
        drop(serial);
        if let Err(e) = self.wait_all(&fences) {
            alloc.uses().remove_borrow(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Whether host access to `alloc` for `write` would have to wait for pending device work.
    pub fn host_access_would_wait(&self, alloc: &Allocation, write: bool) -> bool {
        let mut fences = FenceSet::new();
        alloc.uses().hazards(
            None,
            if write { Access::Write } else { Access::Read },
            &mut fences,
        );
        !self.fences_complete(&fences)
    }
}

impl Drop for DeviceInner {
    fn drop(&mut self) {
        let _ = self.drain();
        // A BLAS handle goes with its context alive (the backend is dropped after this).
        drop(self.blas.take());
        for r in std::mem::take(&mut *self.deferred.lock()) {
            for f in r.fences.iter() {
                let _ = self.backend.wait(f.queue, f.epoch);
            }
            self.unwrap_external(r);
        }
        self.residency.apply_removals(&*self.backend, |_| true);
        self.staging.trim(&*self.backend);
        let mut alloc = self.alloc.lock();
        alloc.release_cached(&*self.backend, usize::MAX, true);
        alloc.shutdown(&*self.backend);
    }
}
