//! Deferred releases: memory that did not come from the allocator (wrapped host memory,
//! foreign memory, growable regions) outlives its last view until the work that used it has
//! completed, and only then is unwrapped and its owner dropped.
//!
//! Dropping the last view must not block on the device, so the release is queued with the
//! fences of that work and applied by a later poll (every allocation and submission polls) once
//! they have retired; the device's drop applies what is left after draining.

use crate::alloc::Allocator;
use crate::allocation::Owner;
use crate::backend::{Backend, RawAlloc};
use crate::epoch::FenceSet;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Wrapped memory waiting for the work that used it.
pub(crate) struct DeferredRelease {
    pub raw: RawAlloc,
    pub owner: Owner,
    /// The last fences that touched the memory.
    pub fences: FenceSet,
}

impl DeferredRelease {
    /// Unwraps the memory, updates the memory stats and drops the owner.
    ///
    /// # Safety
    /// Every fence of `self.fences` has retired, and `raw` came from this backend.
    pub unsafe fn release(self, backend: &dyn Backend, allocator: &Mutex<Allocator>) {
        match self.owner {
            Owner::GrowableRegion(region) => {
                // SAFETY: the allocation over the region is gone (it queued this release) and
                // its work has retired (the caller's contract).
                unsafe { region.release(backend, allocator) };
            }
            Owner::HostMemory(memory) => {
                let mut a = allocator.lock();
                let s = a.stats_mut();
                s.external_bytes -= self.raw.bytes;
                s.external_count -= 1;
                drop(a);
                // SAFETY: the region came from `wrap_host` and its work has retired.
                unsafe { backend.release(self.raw) };
                // Only now, once the device no longer addresses it, may the memory go.
                drop(memory);
            }
            Owner::Foreign(keep_alive) => {
                let mut a = allocator.lock();
                let s = a.stats_mut();
                s.foreign_bytes -= self.raw.bytes;
                s.foreign_count -= 1;
                drop(a);
                // SAFETY: the region came from `wrap_foreign` and its work has retired.
                unsafe { backend.release(self.raw) };
                drop(keep_alive);
            }
        }
    }
}

/// The releases waiting for their work.
#[derive(Default)]
pub(crate) struct DeferredReleases {
    pending: Mutex<Vec<DeferredRelease>>,
    /// Whether `pending` may hold releases: every submission polls, so the lock is skipped
    /// while this is false. Set under the lock when one is queued, cleared when none is left.
    any_pending: AtomicBool,
}

impl DeferredReleases {
    /// Queues a release until its fences retire.
    pub fn defer(&self, release: DeferredRelease) {
        let mut pending = self.pending.lock();
        pending.push(release);
        self.any_pending.store(true, Ordering::Release);
        drop(pending);
    }

    /// Takes the releases whose fences `retired` says have all retired, leaving the rest.
    pub fn take_retired(&self, retired: impl Fn(&FenceSet) -> bool) -> Vec<DeferredRelease> {
        if !self.any_pending.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut pending = self.pending.lock();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut *pending)
            .into_iter()
            .partition(|r| retired(&r.fences));
        *pending = waiting;
        self.any_pending
            .store(!pending.is_empty(), Ordering::Release);
        ready
    }

    /// Takes every release, retired or not (the device's drop waits for them).
    pub fn take_all(&self) -> Vec<DeferredRelease> {
        let mut pending = self.pending.lock();
        self.any_pending.store(false, Ordering::Release);
        std::mem::take(&mut *pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epoch::{Fence, QueueId};
    use crate::storage::MemoryKind;
    use std::sync::Arc;

    /// A release of memory that was never wrapped: only its bookkeeping is exercised here
    /// (releasing it would hand the backend memory it never gave out).
    fn release(tag: u64, epochs: &[(u32, u64)], dropped: &Arc<()>) -> DeferredRelease {
        let mut fences = FenceSet::new();
        for &(queue, epoch) in epochs {
            fences.insert(Fence {
                device: 1,
                queue: QueueId(queue),
                epoch,
            });
        }
        DeferredRelease {
            raw: RawAlloc {
                addr: tag,
                handle: tag,
                bytes: 4096,
                kind: MemoryKind::Foreign,
            },
            owner: Owner::Foreign(Box::new(dropped.clone())),
            fences,
        }
    }

    #[test]
    fn releases_wait_for_every_fence_of_their_work() {
        let owners = Arc::new(());
        let deferred = DeferredReleases::default();
        assert!(deferred.take_retired(|_| true).is_empty());
        deferred.defer(release(1, &[(0, 3)], &owners));
        deferred.defer(release(2, &[(0, 2), (1, 9)], &owners));
        deferred.defer(release(3, &[], &owners));
        // Queue 0 completed epoch 3, queue 1 epoch 5.
        let completed = [3, 5];
        let retired = |fences: &FenceSet| {
            fences
                .iter()
                .all(|f| f.epoch <= completed[f.queue.0 as usize])
        };
        let ready: Vec<u64> = deferred
            .take_retired(retired)
            .iter()
            .map(|r| r.raw.addr)
            .collect();
        assert_eq!(ready, [1, 3]);
        assert_eq!(
            Arc::strong_count(&owners),
            2,
            "the taken owners are dropped"
        );
        assert!(deferred.take_retired(retired).is_empty());
        let left: Vec<u64> = deferred.take_all().iter().map(|r| r.raw.addr).collect();
        assert_eq!(left, [2]);
        assert!(deferred.take_retired(|_| true).is_empty());
        assert_eq!(Arc::strong_count(&owners), 1);
    }
}
