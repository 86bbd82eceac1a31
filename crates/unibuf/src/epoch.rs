//! Completion epochs: fences, and the per-allocation record of which submissions used it.
//!
//! Every submission on a queue gets the next epoch of that queue; a queue's completed epoch
//! only grows. An allocation remembers the last fences that wrote it and the fences that read it
//! since. From that record the core derives, without ever synchronising the whole device:
//! - which waits a submission on another queue must insert before touching the allocation, and
//!   what host access must wait for (the device's hazard planner, `device::hazards`);
//! - when freed memory, staging chunks and residency entries may be reused or dropped.

use std::fmt;

/// A queue's index on its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u32);

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "queue {}", self.0)
    }
}

/// The sequence number of a submission on its queue, from 1. Epoch 0 is "before any work".
pub type Epoch = u64;

/// A point in one queue's work: complete once that queue's completed epoch reaches `epoch`.
/// It names its device, so that a fence handed to another device is refused, not waited on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The device ([`Device::id`](crate::Device::id)).
    pub device: u64,
    /// The queue.
    pub queue: QueueId,
    /// The epoch on that queue.
    pub epoch: Epoch,
}

impl Fence {
    /// A fence of `device`'s `queue` that is complete from the start (epoch 0): returned by
    /// operations the host finished before returning.
    pub const fn done(device: u64, queue: QueueId) -> Fence {
        Fence {
            device,
            queue,
            epoch: 0,
        }
    }
}

/// The latest epoch per queue; because a queue completes in order, that is all that matters.
/// Inference programs use one to three queues, so a small vector beats a map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FenceSet {
    latest: Vec<Fence>,
}

impl FenceSet {
    /// An empty set.
    pub const fn new() -> FenceSet {
        FenceSet { latest: Vec::new() }
    }

    /// Adds a fence, keeping only the latest epoch per queue.
    pub fn insert(&mut self, fence: Fence) {
        if fence.epoch == 0 {
            return;
        }
        match self.latest.iter_mut().find(|f| f.queue == fence.queue) {
            Some(f) => f.epoch = f.epoch.max(fence.epoch),
            None => self.latest.push(fence),
        }
    }

    /// Adds every fence of `other`.
    pub fn extend(&mut self, other: &FenceSet) {
        for f in &other.latest {
            self.insert(*f);
        }
    }

    /// Whether no fence is held.
    pub fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }

    /// The fences, one per queue.
    pub fn iter(&self) -> impl Iterator<Item = Fence> + '_ {
        self.latest.iter().copied()
    }

    /// Drops the fences that `is_complete` says are complete.
    pub fn retain_pending(&mut self, mut is_complete: impl FnMut(Fence) -> bool) {
        self.latest.retain(|f| !is_complete(*f));
    }

    pub(crate) fn clear(&mut self) {
        self.latest.clear();
    }
}

/// How a submission touches an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The device only reads.
    Read,
    /// The device writes (and may read).
    Write,
}

/// An active host access guard's range within an allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HostBorrow {
    id: u64,
    start: usize,
    end: usize,
    access: Access,
}

/// A host borrow that stands in the way of an access: its range and how it holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BorrowConflict {
    pub start: usize,
    pub end: usize,
    /// `Write` for a write guard, `Read` for a read guard.
    pub held: Access,
}

impl BorrowConflict {
    /// The error refusing `what` on the allocation labelled `label`.
    pub fn error(self, what: &'static str, label: &str) -> crate::Error {
        crate::Error::HostAccessConflict {
            what,
            label: label.to_owned(),
            start: self.start,
            end: self.end,
            held: match self.held {
                Access::Write => "write-locked",
                Access::Read => "read-locked",
            },
        }
    }
}

/// What the core knows about the use of one allocation. Lives behind the allocation's mutex.
#[derive(Debug, Default)]
pub(crate) struct UseState {
    /// The submissions whose writes must complete before anyone reads.
    pub writes: FenceSet,
    /// The submissions that read since the last write; they must complete before anyone writes.
    pub reads: FenceSet,
    borrows: Vec<HostBorrow>,
    next_borrow: u64,
}

impl UseState {
    /// The state of memory reused from the cache: everything that touched it before must
    /// complete before the new owner's work, so those fences count as writes.
    pub fn inherited(previous: FenceSet) -> UseState {
        UseState {
            writes: previous,
            ..UseState::default()
        }
    }

    /// Records that `fence` accessed the allocation. A write on a queue that has waited for all
    /// hazards supersedes every earlier fence.
    pub fn record(&mut self, fence: Fence, access: Access) {
        match access {
            Access::Write => {
                self.writes.clear();
                self.reads.clear();
                self.writes.insert(fence);
            }
            Access::Read => self.reads.insert(fence),
        }
    }

    /// Every fence that still touches the allocation (for reuse after free).
    pub fn all_fences(&self) -> FenceSet {
        let mut all = self.writes.clone();
        all.extend(&self.reads);
        all
    }

    /// The first host borrow that conflicts with `access` of `start..end`, if any: any borrow
    /// conflicts with a write; only write borrows conflict with a read.
    pub fn borrow_conflict(
        &self,
        start: usize,
        end: usize,
        access: Access,
    ) -> Option<BorrowConflict> {
        self.borrows
            .iter()
            .find(|b| {
                b.start < end
                    && start < b.end
                    && (access == Access::Write || b.access == Access::Write)
            })
            .map(|b| BorrowConflict {
                start: b.start,
                end: b.end,
                held: b.access,
            })
    }

    /// Registers a host borrow; the caller has checked for conflicts.
    pub fn add_borrow(&mut self, start: usize, end: usize, access: Access) -> u64 {
        self.next_borrow += 1;
        let id = self.next_borrow;
        self.borrows.push(HostBorrow {
            id,
            start,
            end,
            access,
        });
        id
    }

    /// Ends a host borrow.
    pub fn remove_borrow(&mut self, id: u64) {
        self.borrows.retain(|b| b.id != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(q: u32, e: Epoch) -> Fence {
        Fence {
            device: 1,
            queue: QueueId(q),
            epoch: e,
        }
    }

    #[test]
    fn fence_set_keeps_latest_per_queue() {
        let mut s = FenceSet::new();
        s.insert(f(0, 3));
        s.insert(f(0, 2));
        s.insert(f(1, 7));
        s.insert(f(0, 0));
        let mut v: Vec<_> = s.iter().collect();
        v.sort_by_key(|f| f.queue);
        assert_eq!(v, vec![f(0, 3), f(1, 7)]);
        s.retain_pending(|x| x.queue == QueueId(0));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![f(1, 7)]);
    }

    #[test]
    fn a_write_supersedes_every_earlier_fence() {
        let mut u = UseState::default();
        u.record(f(0, 1), Access::Write);
        u.record(f(1, 4), Access::Read);
        u.record(f(0, 2), Access::Read);
        let mut all: Vec<_> = u.all_fences().iter().collect();
        all.sort_by_key(|f| f.queue);
        assert_eq!(all, vec![f(0, 2), f(1, 4)]);
        u.record(f(2, 9), Access::Write);
        assert_eq!(u.all_fences().iter().collect::<Vec<_>>(), vec![f(2, 9)]);
        assert!(u.reads.is_empty());
    }

    #[test]
    fn host_borrows_conflict_by_range_and_kind() {
        let conflict = |start, end, held| Some(BorrowConflict { start, end, held });
        let mut u = UseState::default();
        let a = u.add_borrow(0, 16, Access::Read);
        assert_eq!(u.borrow_conflict(8, 24, Access::Read), None);
        assert_eq!(
            u.borrow_conflict(8, 24, Access::Write),
            conflict(0, 16, Access::Read)
        );
        assert_eq!(u.borrow_conflict(16, 24, Access::Write), None);
        u.remove_borrow(a);
        assert_eq!(u.borrow_conflict(0, 16, Access::Write), None);
        u.add_borrow(4, 8, Access::Write);
        assert_eq!(
            u.borrow_conflict(0, 5, Access::Read),
            conflict(4, 8, Access::Write)
        );
    }
}
