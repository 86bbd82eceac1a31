//! Residency: which allocations a backend keeps in the device's working set.
//!
//! Backends that page memory (Metal residency sets) expose [`ResidencyHooks`]. The policy here is
//! the same for all of them: an opt-in byte budget; additions batched and committed once per
//! submission; removals deferred until every submission that used the allocation has completed,
//! never applied while work is in flight. Backends without hooks keep the bookkeeping (so the
//! budget and the API behave alike) and have nothing to page.

use crate::backend::{Backend, ResidencyHooks};
#[cfg(test)]
use crate::epoch::Fence;
use crate::epoch::FenceSet;
use crate::error::{Error, Result};
use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Default)]
struct State {
    budget: Option<usize>,
    /// Resident allocations by backend handle, with their sizes.
    resident: HashMap<u64, usize>,
    resident_bytes: usize,
    pending_add: Vec<u64>,
    /// Removals waiting for the fences of the work that used the allocation.
    pending_remove: Vec<(u64, FenceSet)>,
}

/// Residency bookkeeping of one device.
#[derive(Default)]
pub(crate) struct Residency {
    state: Mutex<State>,
    /// Whether additions or removals may be pending: every submission commits and applies
    /// them, and most programs never use residency, so the lock is skipped while this is
    /// false. Set under the lock when one is queued; cleared under it when none is left.
    pending: AtomicBool,
    /// Whether any allocation is resident: every free asks to remove its allocation, so the
    /// lock (and the hash lookup) is skipped while none is. Kept under the lock.
    any_resident: AtomicBool,
}

/// Residency figures of a device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResidencyStats {
    /// Bytes marked resident.
    pub resident_bytes: usize,
    /// Allocations marked resident.
    pub resident_count: usize,
    /// Additions not yet committed (they commit with the next submission).
    pub pending_additions: usize,
    /// Removals waiting for in-flight work.
    pub pending_removals: usize,
    /// The budget, if one is set.
    pub budget: Option<usize>,
}

impl Residency {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Records, under the lock `s`, whether anything is left to commit or apply and whether
    /// anything is resident: every change of the state ends here.
    fn note_state(&self, s: &State) {
        let pending = !s.pending_add.is_empty() || !s.pending_remove.is_empty();
        self.pending.store(pending, Ordering::Release);
        self.any_resident
            .store(!s.resident.is_empty(), Ordering::Release);
    }

    pub fn set_budget(&self, budget: Option<usize>) {
        self.lock().budget = budget;
    }

    /// Marks an allocation resident from the next submission on.
    pub fn add(&self, handle: u64, bytes: usize) -> Result<()> {
        let mut s = self.lock();
        if s.resident.contains_key(&handle) {
            // A pending removal of it is cancelled: it stays resident.
            s.pending_remove.retain(|(h, _)| *h != handle);
            self.note_state(&s);
            return Ok(());
        }
        if let Some(budget) = s.budget {
            if s.resident_bytes + bytes > budget {
                return Err(Error::BudgetExceeded {
                    which: "residency",
                    requested: bytes,
                    in_use: s.resident_bytes,
                    budget,
                });
            }
        }
        s.resident.insert(handle, bytes);
        s.resident_bytes += bytes;
        s.pending_add.push(handle);
        self.note_state(&s);
        Ok(())
    }

    /// Schedules removal once `fences` complete. Returns false if it was not resident.
    pub fn remove(&self, handle: u64, fences: &FenceSet) -> bool {
        if !self.any_resident.load(Ordering::Acquire) {
            return false;
        }
        let mut s = self.lock();
        if !s.resident.contains_key(&handle) || s.pending_remove.iter().any(|(h, _)| *h == handle) {
            return false;
        }
        if let Some(i) = s.pending_add.iter().position(|h| *h == handle) {
            // Never committed: nothing on the device to wait for.
            s.pending_add.swap_remove(i);
            let bytes = s.resident.remove(&handle).unwrap_or(0);
            s.resident_bytes -= bytes;
            self.note_state(&s);
            return true;
        }
        s.pending_remove.push((handle, fences.clone()));
        self.note_state(&s);
        true
    }

    /// Called when an allocation's memory leaves its owner: a resident one is removed after its
    /// last work.
    pub fn forget(&self, handle: u64, fences: &FenceSet) {
        self.remove(handle, fences);
    }

    /// Commits batched additions (once per submission).
    pub fn commit(&self, backend: &dyn Backend) {
        if !self.pending.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.lock();
        if s.pending_add.is_empty() {
            return;
        }
        let adds = std::mem::take(&mut s.pending_add);
        self.note_state(&s);
        if let Some(hooks) = backend.residency() {
            hooks.add(&adds);
            hooks.commit();
        }
    }

    /// Applies removals whose fences `complete` says have completed.
    pub fn apply_removals(&self, backend: &dyn Backend, complete: impl Fn(&FenceSet) -> bool) {
        if !self.pending.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.lock();
        if s.pending_remove.is_empty() {
            return;
        }
        let (ready, pending): (Vec<_>, Vec<_>) = std::mem::take(&mut s.pending_remove)
            .into_iter()
            .partition(|(_, f)| complete(f));
        s.pending_remove = pending;
        let handles: Vec<u64> = ready.iter().map(|(h, _)| *h).collect();
        for h in &handles {
            let bytes = s.resident.remove(h).unwrap_or(0);
            s.resident_bytes -= bytes;
        }
        self.note_state(&s);
        if handles.is_empty() {
            return;
        }
        if let Some(hooks) = backend.residency() {
            apply(hooks, &handles);
        }
    }

    pub fn stats(&self) -> ResidencyStats {
        let s = self.lock();
        ResidencyStats {
            resident_bytes: s.resident_bytes,
            resident_count: s.resident.len(),
            pending_additions: s.pending_add.len(),
            pending_removals: s.pending_remove.len(),
            budget: s.budget,
        }
    }

    /// Whether `handle` is resident (committed or pending addition).
    pub fn contains(&self, handle: u64) -> bool {
        self.lock().resident.contains_key(&handle)
    }

    #[cfg(test)]
    fn pending_fences(&self) -> Vec<Fence> {
        self.lock()
            .pending_remove
            .iter()
            .flat_map(|(_, f)| f.iter())
            .collect()
    }
}

fn apply(hooks: &dyn ResidencyHooks, handles: &[u64]) {
    // SAFETY: only removals whose fences completed reach here (apply_removals partitions on
    // `complete`), so no pending work uses these allocations.
    unsafe { hooks.remove(handles) };
    hooks.commit();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epoch::QueueId;

    /// The flags that let submissions and frees skip the lock are set while there is work and
    /// cleared once there is none, on every path: a flag left set costs every submission the
    /// lock, one left clear would lose work.
    #[test]
    fn the_skip_flags_follow_the_state() {
        let flags = |r: &Residency| {
            (
                r.pending.load(Ordering::Acquire),
                r.any_resident.load(Ordering::Acquire),
            )
        };
        let cpu = crate::backend::cpu::CpuBackend::new().unwrap();
        let r = Residency::default();
        assert_eq!(flags(&r), (false, false));
        // Added, then removed before any commit: nothing left at all.
        r.add(1, 10).unwrap();
        assert_eq!(flags(&r), (true, true));
        assert!(r.remove(1, &FenceSet::new()));
        assert_eq!(flags(&r), (false, false));
        // Committed, removal scheduled and cancelled by a new add: resident, nothing pending.
        r.add(2, 10).unwrap();
        r.commit(&cpu);
        assert_eq!(flags(&r), (false, true));
        let mut fences = FenceSet::new();
        fences.insert(Fence {
            device: 1,
            queue: QueueId(0),
            epoch: 5,
        });
        assert!(r.remove(2, &fences));
        assert_eq!(flags(&r), (true, true));
        r.add(2, 10).unwrap();
        assert_eq!(flags(&r), (false, true));
        // Removed once its work completes: nothing resident, nothing pending.
        assert!(r.remove(2, &fences));
        r.apply_removals(&cpu, |_| false);
        assert_eq!(flags(&r), (true, true), "still waiting for the fence");
        r.apply_removals(&cpu, |_| true);
        assert_eq!(flags(&r), (false, false));
        assert!(!r.remove(2, &fences), "nothing resident to remove");
    }

    #[test]
    fn removal_waits_for_fences_and_budget_holds() {
        let r = Residency::default();
        r.set_budget(Some(100));
        r.add(1, 60).unwrap();
        assert!(matches!(
            r.add(2, 60),
            Err(Error::BudgetExceeded {
                which: "residency",
                requested: 60,
                in_use: 60,
                budget: 100
            })
        ));
        let cpu = crate::backend::cpu::CpuBackend::new().unwrap();
        r.commit(&cpu);
        let mut fences = FenceSet::new();
        fences.insert(Fence {
            device: 1,
            queue: QueueId(0),
            epoch: 3,
        });
        assert!(r.remove(1, &fences));
        assert_eq!(
            r.pending_fences(),
            vec![Fence {
                device: 1,
                queue: QueueId(0),
                epoch: 3
            }]
        );
        r.apply_removals(&cpu, |_| false);
        assert_eq!(
            r.stats().resident_bytes,
            60,
            "not removed while work is pending"
        );
        r.apply_removals(&cpu, |_| true);
        assert_eq!(r.stats().resident_bytes, 0);
        r.add(2, 60).unwrap();
        assert!(
            r.remove(2, &fences),
            "uncommitted additions are dropped at once"
        );
        assert_eq!(
            r.stats(),
            ResidencyStats {
                budget: Some(100),
                ..Default::default()
            }
        );
    }
}
