//! Hazard planning: the fences new work on memory must wait for, from what touched it before.
//!
//! Every allocation keeps a record of the work that used it ([`UseState`]): the last writes,
//! and the reads since. Before new work touches it, the planner derives the waits from that
//! record, how the new work touches the memory, and who waits:
//! - a read waits for the last writes (read after write); reads never wait for reads;
//! - a write waits for the last writes (write after write) and for the reads since (write
//!   after read);
//! - a unibuf queue never waits for its own fences: its work runs in submission order, so
//!   single-queue programs get no waits at all;
//! - the host and foreign work (another framework's stream, a DLPack consumer) are ordered by
//!   no queue, so they wait for every fence.
//!
//! Waits for several allocations collapse to the latest epoch per queue, since a queue
//! completes in order. The planner is a pure function of the records: it takes no lock,
//! submits nothing and asks no backend (the caller drops fences already complete with
//! [`Waits::drop_complete`]), so its rules are tested here without a device.

use crate::backend::Command;
use crate::epoch::{Access, Fence, FenceSet, QueueId, UseState};
use std::borrow::Cow;
use std::ops::Deref;

/// Who is about to touch the memory, which decides what orders it already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Waiter {
    /// Work submitted to this queue: the queue's own earlier work is ordered before it.
    Queue(QueueId),
    /// The calling thread, before host access.
    Host,
    /// Work outside unibuf's queues: another framework's stream or command buffer.
    Foreign,
}

impl Waiter {
    /// Whether stream order alone puts `fence`'s work before the waiter's.
    fn ordered_after(self, fence: Fence) -> bool {
        matches!(self, Waiter::Queue(queue) if queue == fence.queue)
    }
}

/// The fences to wait for before the planned work, the latest per queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Waits {
    fences: FenceSet,
}

impl Waits {
    /// Whether the work may go ahead at once.
    pub fn is_empty(&self) -> bool {
        self.fences.is_empty()
    }

    /// How many fences there are (one per queue at most).
    pub fn len(&self) -> usize {
        self.fences.iter().count()
    }

    /// The fences.
    pub fn fences(&self) -> &FenceSet {
        &self.fences
    }

    /// Drops the fences `is_complete` says have completed: their work needs no wait.
    pub fn drop_complete(&mut self, is_complete: impl FnMut(Fence) -> bool) {
        self.fences.retain_pending(is_complete);
    }

    /// `commands` preceded by one device-side wait per fence. Borrowed unchanged when there is
    /// nothing to wait for, which is the common case (one queue, or memory no other queue
    /// used), so that only work that needs waits pays for a copy of its commands.
    pub fn before<'c>(&self, commands: &'c [Command]) -> Cow<'c, [Command]> {
        if self.is_empty() {
            return Cow::Borrowed(commands);
        }
        Cow::Owned(
            self.fences
                .iter()
                .map(Command::Wait)
                .chain(commands.iter().cloned())
                .collect(),
        )
    }
}

/// The waits `waiter` needs before work that touches each allocation as paired: each item is
/// the allocation's use record and the new work's access to it.
///
/// The records may be lock guards: each is dropped before the next is taken, so an
/// allocation named twice (a copy within one buffer) is never locked twice at once.
pub(crate) fn plan_waits<R: Deref<Target = UseState>>(
    waiter: Waiter,
    uses: impl IntoIterator<Item = (R, Access)>,
) -> Waits {
    let mut fences = FenceSet::new();
    for (record, access) in uses {
        let unordered = |f: &Fence| !waiter.ordered_after(*f);
        for f in record.writes.iter().filter(unordered) {
            fences.insert(f);
        }
        if access == Access::Write {
            for f in record.reads.iter().filter(unordered) {
                fences.insert(f);
            }
        }
    }
    Waits { fences }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::RawRange;

    fn q(i: u32) -> QueueId {
        QueueId(i)
    }

    fn fence(queue: u32, epoch: u64) -> Fence {
        Fence {
            device: 1,
            queue: q(queue),
            epoch,
        }
    }

    /// The record of an allocation after `history`, in submission order.
    fn used(history: &[(Fence, Access)]) -> UseState {
        let mut record = UseState::default();
        for &(f, access) in history {
            record.record(f, access);
        }
        record
    }

    fn sorted(waits: &Waits) -> Vec<Fence> {
        let mut v: Vec<_> = waits.fences().iter().collect();
        v.sort_by_key(|f| f.queue);
        v
    }

    fn plan(waiter: Waiter, uses: &[(&UseState, Access)]) -> Vec<Fence> {
        sorted(&plan_waits(waiter, uses.iter().copied()))
    }

    #[test]
    fn read_after_write_on_another_queue_waits_for_the_write() {
        let a = used(&[(fence(0, 5), Access::Write)]);
        assert_eq!(
            plan(Waiter::Queue(q(1)), &[(&a, Access::Read)]),
            [fence(0, 5)]
        );
    }

    #[test]
    fn write_after_read_waits_for_the_reads_since_the_last_write() {
        let a = used(&[
            (fence(0, 1), Access::Write),
            (fence(1, 3), Access::Read),
            (fence(2, 7), Access::Read),
        ]);
        assert_eq!(
            plan(Waiter::Queue(q(3)), &[(&a, Access::Write)]),
            [fence(0, 1), fence(1, 3), fence(2, 7)]
        );
        // A read waits for the write only: reads do not order reads.
        assert_eq!(
            plan(Waiter::Queue(q(3)), &[(&a, Access::Read)]),
            [fence(0, 1)]
        );
    }

    #[test]
    fn write_after_write_waits_for_the_last_write_only() {
        let a = used(&[
            (fence(0, 2), Access::Write),
            (fence(1, 4), Access::Read),
            (fence(1, 6), Access::Write),
        ]);
        // The write on queue 1 waited for everything before it, so it stands for all of it.
        assert_eq!(
            plan(Waiter::Queue(q(2)), &[(&a, Access::Write)]),
            [fence(1, 6)]
        );
    }

    #[test]
    fn the_same_queue_never_waits_for_itself() {
        let a = used(&[(fence(0, 5), Access::Write), (fence(0, 6), Access::Read)]);
        assert!(plan(Waiter::Queue(q(0)), &[(&a, Access::Write)]).is_empty());
        assert!(plan(Waiter::Queue(q(0)), &[(&a, Access::Read)]).is_empty());
        // Mixed: only the other queue's fences remain.
        let b = used(&[(fence(0, 5), Access::Write), (fence(1, 2), Access::Read)]);
        assert_eq!(
            plan(Waiter::Queue(q(0)), &[(&b, Access::Write)]),
            [fence(1, 2)]
        );
        assert_eq!(
            plan(Waiter::Queue(q(1)), &[(&b, Access::Write)]),
            [fence(0, 5)]
        );
    }

    #[test]
    fn unused_memory_needs_no_wait() {
        let fresh = UseState::default();
        assert!(plan(Waiter::Queue(q(1)), &[(&fresh, Access::Write)]).is_empty());
        assert!(plan(Waiter::Host, &[(&fresh, Access::Write)]).is_empty());
    }

    #[test]
    fn several_buffers_collapse_to_the_latest_epoch_per_queue() {
        let a = used(&[(fence(1, 3), Access::Write)]);
        let b = used(&[(fence(1, 5), Access::Write), (fence(2, 2), Access::Read)]);
        let c = used(&[(fence(2, 8), Access::Read)]);
        let d = used(&[(fence(0, 9), Access::Write)]);
        let waits = plan(
            Waiter::Queue(q(0)),
            &[
                (&a, Access::Read),
                (&b, Access::Write),
                (&c, Access::Write),
                (&d, Access::Read),
            ],
        );
        assert_eq!(waits, [fence(1, 5), fence(2, 8)]);
        // Read-only uses of `c` ask for nothing: it holds reads only.
        assert_eq!(
            plan(
                Waiter::Queue(q(0)),
                &[(&a, Access::Read), (&c, Access::Read)]
            ),
            [fence(1, 3)]
        );
    }

    #[test]
    fn the_host_waits_for_every_queue_including_the_one_that_wrote() {
        let a = used(&[(fence(0, 4), Access::Write), (fence(1, 6), Access::Read)]);
        assert_eq!(plan(Waiter::Host, &[(&a, Access::Read)]), [fence(0, 4)]);
        assert_eq!(
            plan(Waiter::Host, &[(&a, Access::Write)]),
            [fence(0, 4), fence(1, 6)]
        );
    }

    #[test]
    fn foreign_work_waits_for_every_fence_external_work_recorded() {
        // External work (`Queue::external`) records its fences like any submission; a foreign
        // consumer of the memory (a DLPack importer's stream) is ordered by none of them.
        let a = used(&[(fence(0, 3), Access::Write), (fence(0, 4), Access::Read)]);
        assert_eq!(plan(Waiter::Foreign, &[(&a, Access::Read)]), [fence(0, 3)]);
        assert_eq!(
            plan(Waiter::Foreign, &[(&a, Access::Write)]),
            [fence(0, 4)],
            "one fence per queue: epoch 4 completes after epoch 3"
        );
    }

    #[test]
    fn reused_memory_waits_for_its_previous_owner_even_to_read() {
        // Freed memory comes back tagged with the fences that last touched it; the new owner
        // inherits them as writes, so that even a read waits for the old owner's reads.
        let mut previous = FenceSet::new();
        previous.insert(fence(1, 2));
        let reused = UseState::inherited(previous);
        assert_eq!(
            plan(Waiter::Queue(q(0)), &[(&reused, Access::Read)]),
            [fence(1, 2)]
        );
        assert!(plan(Waiter::Queue(q(1)), &[(&reused, Access::Read)]).is_empty());
    }

    #[test]
    fn completed_fences_need_no_wait() {
        let a = used(&[(fence(0, 3), Access::Write)]);
        let b = used(&[(fence(1, 7), Access::Write)]);
        let mut waits = plan_waits(
            Waiter::Queue(q(2)),
            [(&a, Access::Read), (&b, Access::Read)],
        );
        assert_eq!(waits.len(), 2);
        // Queue 0 completed epoch 3; queue 1 is at epoch 6.
        waits.drop_complete(|f| f.epoch <= [3, 6][f.queue.0 as usize]);
        assert_eq!(sorted(&waits), [fence(1, 7)]);
    }

    #[test]
    fn waits_go_before_the_commands_and_no_waits_copy_nothing() {
        let range = RawRange {
            addr: 0x1000,
            handle: 1,
            offset: 0,
            bytes: 64,
        };
        let commands = [Command::Copy {
            src: range,
            dst: range,
        }];
        let none = Waits::default();
        assert!(matches!(none.before(&commands), Cow::Borrowed(c) if c.len() == 1));

        let a = used(&[(fence(1, 2), Access::Write)]);
        let waits = plan_waits(Waiter::Queue(q(0)), [(&a, Access::Write)]);
        let with_waits = waits.before(&commands);
        assert!(matches!(
            &*with_waits,
            [Command::Wait(f), Command::Copy { .. }] if *f == fence(1, 2)
        ));
    }
}
