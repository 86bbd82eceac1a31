//! Residency on MTLResidencySet (macOS 15 and later): the backend half of the core's residency
//! policy (`crate::residency`), which keeps the budget, batches additions to one commit per
//! submission and defers every removal until the command buffers that used the allocation have
//! completed.
//!
//! Allocations go into size-capped sets: a set holds at most `SET_BYTES` bytes, so that a
//! commit, which Metal applies to a whole set, touches only the sets that changed, and so that
//! one busy set does not grow without bound. Every set is attached to every queue
//! (`addResidencySet:`), so each command buffer of the device sees the resident memory, and is
//! asked to become resident once it holds committed allocations (`requestResidency`).

use super::memory::Buffers;
use super::queue::MetalQueue;
use crate::backend::ResidencyHooks;
use objc2::rc::Retained;
use objc2::runtime::{AnyClass, ProtocolObject};
use objc2::sel;
use objc2_foundation::{NSObjectProtocol, NSString};
use objc2_metal::{
    MTLAllocation, MTLCommandQueue, MTLDevice, MTLResidencySet, MTLResidencySetDescriptor,
};
use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::sync::Arc;

/// The most bytes one residency set holds (an allocation larger than this gets a set alone).
const SET_BYTES: usize = 4 << 30;

/// One residency set and what it holds.
struct Set {
    set: Retained<ProtocolObject<dyn MTLResidencySet>>,
    /// Bytes of its members, committed or not.
    bytes: usize,
    /// Bytes at its last commit.
    committed_bytes: usize,
    dirty: bool,
    /// Whether it gained members since its last commit (then residency is requested again).
    grew: bool,
}

struct State {
    sets: Vec<Set>,
    /// Set index and bytes of each member allocation, by handle.
    members: HashMap<u64, (usize, usize)>,
    /// Queues the sets are attached to.
    queues: Vec<Retained<ProtocolObject<dyn MTLCommandQueue>>>,
}

/// The residency sets of one device.
pub(super) struct Residency {
    device: Retained<ProtocolObject<dyn MTLDevice>>,
    buffers: Arc<Buffers>,
    state: Mutex<State>,
}

// SAFETY: the residency sets (not marked Send or Sync by objc2-metal) are only touched with the
// `state` mutex held, so never by two threads at once; an Objective-C object may be used from
// another thread than the one that made it, and retain/release are atomic. The device and the
// queues are Send and Sync themselves.
unsafe impl Send for Residency {}
// SAFETY: as above: every access goes through the mutex.
unsafe impl Sync for Residency {}

impl Residency {
    /// The residency sets of `device`, where the OS has them (macOS 15 and later).
    pub fn new(
        device: &Retained<ProtocolObject<dyn MTLDevice>>,
        buffers: Arc<Buffers>,
    ) -> Option<Residency> {
        // Availability is checked at run time, as Apple advises for newer APIs: the descriptor
        // class must exist and the device must answer the creating selector.
        let has_class = AnyClass::get(c"MTLResidencySetDescriptor").is_some();
        let responds = device.respondsToSelector(sel!(newResidencySetWithDescriptor:error:));
        (has_class && responds).then(|| Residency {
            device: device.clone(),
            buffers,
            state: Mutex::new(State {
                sets: Vec::new(),
                members: HashMap::new(),
                queues: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Attaches every set to a new queue.
    pub fn attach(&self, queue: &MetalQueue) {
        let mut st = self.lock();
        for s in &st.sets {
            queue.queue.addResidencySet(&s.set);
        }
        st.queues.push(queue.queue.clone());
    }

    /// A set with room for `bytes` more, created (and attached) when none has.
    fn set_for(&self, st: &mut State, bytes: usize) -> Option<usize> {
        if let Some(i) = st
            .sets
            .iter()
            .position(|s| s.bytes == 0 || s.bytes + bytes <= SET_BYTES)
        {
            return Some(i);
        }
        let desc = MTLResidencySetDescriptor::new();
        desc.setLabel(Some(&NSString::from_str(&format!(
            "unibuf residency {}",
            st.sets.len()
        ))));
        let set = match self.device.newResidencySetWithDescriptor_error(&desc) {
            Ok(set) => set,
            Err(e) => {
                // The core counts the bytes as resident either way; the device just cannot
                // pin them. Say so, once per failure.
                tracing::warn!(error = %e.localizedDescription(), "creating a Metal residency set failed");
                return None;
            }
        };
        for q in &st.queues {
            q.addResidencySet(&set);
        }
        st.sets.push(Set {
            set,
            bytes: 0,
            committed_bytes: 0,
            dirty: false,
            grew: false,
        });
        Some(st.sets.len() - 1)
    }

    /// Removes `handle` from its set at once and commits it: for `release`, when no work can
    /// use the allocation any more.
    pub fn forget(&self, handle: u64) {
        let mut st = self.lock();
        if let Some(i) = remove_member(&self.buffers, &mut st, handle) {
            commit_set(&mut st.sets[i]);
        }
    }
}

/// Marks `handle`'s buffers for removal from its set; returns the set's index.
fn remove_member(buffers: &Buffers, st: &mut State, handle: u64) -> Option<usize> {
    let (i, bytes) = st.members.remove(&handle)?;
    let set = &mut st.sets[i];
    if let Ok(alloc) = buffers.get(handle) {
        for p in &alloc.parts {
            set.set.removeAllocation(allocation(&p.buffer));
        }
    }
    set.bytes -= bytes;
    set.dirty = true;
    Some(i)
}

fn commit_set(s: &mut Set) {
    s.set.commit();
    s.committed_bytes = s.bytes;
    s.dirty = false;
    if std::mem::take(&mut s.grew) {
        s.set.requestResidency();
    }
}

impl ResidencyHooks for Residency {
    fn add(&self, handles: &[u64]) {
        let mut st = self.lock();
        for &h in handles {
            if st.members.contains_key(&h) {
                continue;
            }
            // A handle the backend no longer knows was released before its addition was
            // committed: there is nothing to make resident.
            let Ok(alloc) = self.buffers.get(h) else {
                continue;
            };
            let Some(i) = self.set_for(&mut st, alloc.bytes) else {
                return;
            };
            let set = &mut st.sets[i];
            for p in &alloc.parts {
                set.set.addAllocation(allocation(&p.buffer));
            }
            set.bytes += alloc.bytes;
            set.dirty = true;
            set.grew = true;
            st.members.insert(h, (i, alloc.bytes));
        }
    }

    unsafe fn remove(&self, handles: &[u64]) {
        let mut st = self.lock();
        for &h in handles {
            remove_member(&self.buffers, &mut st, h);
        }
    }

    fn commit(&self) {
        let mut st = self.lock();
        for s in st.sets.iter_mut().filter(|s| s.dirty) {
            commit_set(s);
        }
    }

    fn resident_bytes(&self) -> usize {
        self.lock().sets.iter().map(|s| s.committed_bytes).sum()
    }
}

/// A buffer as the allocation residency sets hold.
fn allocation(
    b: &ProtocolObject<dyn objc2_metal::MTLBuffer>,
) -> &ProtocolObject<dyn MTLAllocation> {
    ProtocolObject::from_ref(b)
}
