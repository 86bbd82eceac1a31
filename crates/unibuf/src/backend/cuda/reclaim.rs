//! Unmapping device memory off the allocating thread, and physical allocations kept for reuse.
//!
//! Measured on an H200 host (bench/tune/vmm_calls.cu), per 2 MiB granule: cuMemCreate 9.3 µs,
//! cuMemMap 1.0, cuMemSetAccess about 25 per call, cuMemUnmap 15.4, cuMemRelease 9.8. The
//! allocator unmaps cached granules when memory held would pass its bound and maps others for
//! the request that caused it, so on a decode trace about as many granules go as come: done on
//! the allocating thread, the way down (unmap + release) was half of all driver time. Here it
//! runs on a worker thread:
//! - `unmap` hands the granules to the worker and returns at once;
//! - the worker unmaps them and keeps up to `SPARE_MAX` physical allocations for the next map
//!   (which then skips cuMemCreate), releasing the rest;
//! - a map of a granule still waiting in the queue takes it back as it is (still mapped, still
//!   accessible: no driver call at all); one being unmapped right now is waited for.
//!
//! Physical memory therefore outlives `unmap` for the worker's few microseconds per granule,
//! plus the spares: [`Reclaimer::physical`] counts all of it (mapped, queued, spare), with its
//! peak, so that a report of memory held can include what the driver still holds.

use cudarc::driver::sys;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Physical allocations kept for reuse after unmapping, at most: enough for the typical map
/// that follows an unmap on a decode trace, little enough to be negligible beside the bound.
const SPARE_MAX: usize = 2;

type Handle = sys::CUmemGenericAllocationHandle;

/// What the worker has to do and what it keeps.
#[derive(Default)]
struct State {
    /// Granules to unmap (address, physical allocation), oldest first.
    queue: VecDeque<(u64, Handle)>,
    /// The granule the worker is unmapping now.
    busy: Option<u64>,
    /// Unmapped physical allocations of one granule, ready to map again.
    spare: Vec<Handle>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signals the worker: work queued, or stop.
    work: Condvar,
    /// Signals waiters: the worker finished a granule.
    progress: Condvar,
    /// Bytes of physical memory alive (mapped, queued, being unmapped, spare), and the most.
    physical: AtomicUsize,
    peak: AtomicUsize,
    granule: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the map path may use for a granule: the granule itself taken back from the queue
/// (still mapped and accessible), a spare physical allocation to map, or neither (create one).
pub(super) enum Reuse {
    StillMapped(Handle),
    Spare(Handle),
    Create,
}

/// The context handle, sent to the worker thread.
struct RawContext(sys::CUcontext);
// SAFETY: a CUcontext may be made current on any thread; the worker only binds it, and the
// backend keeps the context retained until the worker has been joined (`Reclaimer` is dropped
// before the backend's `Context`).
unsafe impl Send for RawContext {}

/// The worker and its queue.
pub(super) struct Reclaimer {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

impl Reclaimer {
    /// A worker for `granule`-byte mappings in context `ctx` (which must outlive it).
    pub fn new(ctx: sys::CUcontext, granule: usize) -> Reclaimer {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            progress: Condvar::new(),
            physical: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            granule,
        });
        let ctx = RawContext(ctx);
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("unibuf-cuda-unmap".into())
            .spawn(move || {
                let ctx = ctx;
                worker(&s, ctx.0)
            })
            .ok();
        Reclaimer { shared, worker }
    }

    /// Counts a physical allocation created by the map path.
    pub fn created(&self) {
        let now = self
            .shared
            .physical
            .fetch_add(self.shared.granule, Ordering::Relaxed)
            + self.shared.granule;
        self.shared.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// Counts a physical allocation released by the map path (a failed map).
    pub fn released(&self) {
        self.shared
            .physical
            .fetch_sub(self.shared.granule, Ordering::Relaxed);
    }

    /// What the map path can use for the granule at `addr`: the granule itself if it waits in
    /// the queue, else a spare allocation, else nothing (create one). Waits while the worker
    /// is unmapping `addr`.
    pub fn reuse(&self, addr: u64) -> Reuse {
        let mut st = self.shared.lock();
        while st.busy == Some(addr) {
            st = self
                .shared
                .progress
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
        if let Some(i) = st.queue.iter().position(|&(a, _)| a == addr) {
            if let Some((_, h)) = st.queue.remove(i) {
                return Reuse::StillMapped(h);
            }
        }
        match st.spare.pop() {
            Some(h) => Reuse::Spare(h),
            None => Reuse::Create,
        }
    }

    /// Queues mapped granules for unmapping; returns at once. Without a worker (its thread
    /// could not start) they are unmapped here.
    pub fn unmap(&self, granules: impl IntoIterator<Item = (u64, Handle)>) {
        if self.worker.is_none() {
            for (addr, h) in granules {
                // SAFETY: the caller passes granules it mapped with these allocations, unused
                // by any pending work (the `VirtualMemory::unmap` contract).
                unsafe { unmap_one(&self.shared, addr, h) };
            }
            return;
        }
        self.shared.lock().queue.extend(granules);
        self.shared.work.notify_one();
    }

    /// Waits until every queued granule is unmapped; with `release_spares`, also hands the
    /// spare allocations back to the driver (before a retry after running out of memory, and
    /// before the address range goes).
    pub fn settle(&self, release_spares: bool) {
        let mut st = self.shared.lock();
        while !st.queue.is_empty() || st.busy.is_some() {
            if self.worker.is_none() {
                // Nothing would drain it; `unmap` never queues without a worker.
                break;
            }
            st = self
                .shared
                .progress
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
        if release_spares {
            let spare = std::mem::take(&mut st.spare);
            drop(st);
            for h in spare {
                // SAFETY: an unmapped allocation no mapping refers to; the caller's thread
                // has the context current (every backend entry point binds it).
                unsafe { sys::cuMemRelease(h) };
                self.released();
            }
        }
    }

    /// Bytes of physical memory behind the mappings (mapped, waiting to be unmapped, being
    /// unmapped, or kept for reuse) and the most since the last [`reset_peak`](Self::reset_peak).
    pub fn physical(&self) -> (usize, usize) {
        (
            self.shared.physical.load(Ordering::Relaxed),
            self.shared.peak.load(Ordering::Relaxed),
        )
    }

    /// Starts a new peak from the current figure.
    pub fn reset_peak(&self) {
        let now = self.shared.physical.load(Ordering::Relaxed);
        self.shared.peak.store(now, Ordering::Relaxed);
    }
}

/// Unmaps one granule and keeps its allocation as a spare or releases it.
///
/// # Safety
/// `addr` is a granule mapped with `h` in a context current on this thread, and no pending
/// work uses it.
unsafe fn unmap_one(shared: &Shared, addr: u64, h: Handle) {
    // SAFETY: the caller's contract.
    unsafe { sys::cuMemUnmap(addr, shared.granule) };
    let mut st = shared.lock();
    if st.spare.len() < SPARE_MAX {
        st.spare.push(h);
        return;
    }
    drop(st);
    // SAFETY: unmapped just above; nothing else refers to it.
    unsafe { sys::cuMemRelease(h) };
    shared.physical.fetch_sub(shared.granule, Ordering::Relaxed);
}

fn worker(shared: &Shared, ctx: sys::CUcontext) {
    // SAFETY: the context is retained until this thread has been joined (see `RawContext`).
    // Binding a retained context does not fail in practice; if it did, queued granules would
    // stay mapped until the context goes, which frees them.
    let bound = unsafe { sys::cuCtxSetCurrent(ctx) } == sys::CUresult::CUDA_SUCCESS;
    let mut st = shared.lock();
    loop {
        if let Some((addr, h)) = st.queue.pop_front() {
            st.busy = Some(addr);
            drop(st);
            if bound {
                // SAFETY: queued by `Reclaimer::unmap` under the `VirtualMemory::unmap`
                // contract: mapped with `h`, unused; the context is current here.
                unsafe { unmap_one(shared, addr, h) };
            }
            st = shared.lock();
            st.busy = None;
            shared.progress.notify_all();
            continue;
        }
        if st.stop {
            return;
        }
        st = shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
    }
}

impl Drop for Reclaimer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_one();
        if let Some(w) = self.worker.take() {
            // The worker empties the queue before it stops.
            let _ = w.join();
        }
        // The backend's Drop has bound the context on this thread.
        self.settle(true);
    }
}
