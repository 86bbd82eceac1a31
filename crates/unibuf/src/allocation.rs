//! An allocation: the storage shared by a buffer and all its views.
//!
//! It owns a block of backend memory (or a wrapped caller region and that region's owner), its
//! use record for hazards, and its host borrows. When the last view drops, the block returns to
//! the allocator with the fences of the work that last touched it; wrapped memory is unwrapped
//! and its owner dropped only once that work has completed.

use crate::alloc::Block;
use crate::backend::{RawAlloc, RawRange};
use crate::device::DeviceInner;
use crate::epoch::UseState;
use crate::storage::StorageMode;
use parking_lot::{Mutex, MutexGuard};
use std::any::Any;
use std::sync::Arc;

/// The owner of wrapped caller memory, kept alive as long as the allocation (and its work).
pub(crate) type Owner = Box<dyn Any + Send + Sync>;

/// Bytes an allocation holds for its label: a growable region's mapped part, else all of it.
fn owned_bytes(raw: &RawAlloc, owner: Option<&Owner>) -> usize {
    owner
        .and_then(|o| o.downcast_ref::<Arc<crate::buffer::GrowableRegion>>())
        .map_or(raw.bytes, |r| r.mapped())
}

pub(crate) struct Allocation {
    pub device: Arc<DeviceInner>,
    /// The memory; `None` only during drop.
    block: Option<Block>,
    /// What the caller asked for (before rounding): counted in the stats.
    pub requested: usize,
    pub mode: StorageMode,
    pub label: String,
    pub writable: bool,
    /// The host address of the block, for host-visible modes.
    host: Option<usize>,
    uses: Mutex<UseState>,
    owner: Option<Owner>,
}

impl Allocation {
    pub fn new(
        device: Arc<DeviceInner>,
        block: Block,
        requested: usize,
        mode: StorageMode,
        label: String,
        writable: bool,
        owner: Option<Owner>,
    ) -> Allocation {
        let host = device
            .backend
            .host_ptr(&block.raw)
            .map(|p| p.as_ptr() as usize);
        let uses = Mutex::new(UseState::inherited(block.fences.clone()));
        device.own(&label, owned_bytes(&block.raw, owner.as_ref()));
        Allocation {
            device,
            block: Some(block),
            requested,
            mode,
            label,
            writable,
            host,
            uses,
            owner,
        }
    }

    pub fn raw(&self) -> &RawAlloc {
        &self.block.as_ref().expect("allocation is alive").raw
    }

    /// A range for commands; the caller checked bounds.
    pub fn range(&self, offset: usize, bytes: usize) -> RawRange {
        self.raw().range(offset, bytes)
    }

    /// The host address at `offset`, for host-visible allocations.
    pub fn host_addr(&self, offset: usize) -> Option<*mut u8> {
        self.host.map(|h| (h + offset) as *mut u8)
    }

    /// Whether the host may touch the memory: a host-visible mode whose memory the backend
    /// maps for the host (Foreign memory: where it is host memory).
    pub fn host_accessible(&self) -> bool {
        self.host.is_some() && (self.mode.host_accessible() || self.mode == StorageMode::Foreign)
    }

    pub fn uses(&self) -> MutexGuard<'_, UseState> {
        self.uses.lock()
    }

    pub fn same(&self, other: &Allocation) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        let Some(mut block) = self.block.take() else {
            return;
        };
        let uses = self.uses.get_mut();
        block.fences = uses.all_fences();
        self.device
            .disown(&self.label, owned_bytes(&block.raw, self.owner.as_ref()));
        match self.owner.take() {
            Some(owner) => self.device.release_external(block, owner),
            None => self.device.free_block(block, self.requested),
        }
    }
}
