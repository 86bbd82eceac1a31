//! An allocation: the storage shared by a buffer and all its views.
//!
//! It owns a block of backend memory (or a wrapped caller region and that region's owner), its
//! use record for hazards, and its host borrows. When the last view drops, the block returns to
//! the allocator with the fences of the work that last touched it; wrapped memory is unwrapped
//! and its owner dropped only once that work has completed.

use crate::alloc::Block;
use crate::backend::{RawAlloc, RawRange};
use crate::buffer::HostMemory;
use crate::device::{DeviceInner, GrowableRegion};
use crate::epoch::UseState;
use crate::storage::{MemoryAccess, StorageMode};
use parking_lot::{Mutex, MutexGuard};
use std::any::Any;
use std::sync::Arc;

/// What keeps memory that did not come from the allocator alive, kept with the allocation and
/// let go only once its last view is dropped and the last work using it has completed.
pub(crate) enum Owner {
    /// Caller host memory wrapped as an External buffer (`Device::wrap_external`): unwrapped,
    /// then dropped.
    HostMemory(Box<dyn HostMemory>),
    /// Another framework's memory (`Device::wrap_foreign`, DLPack imports, the C and Python
    /// bindings): whatever the caller says keeps it alive (a tensor, a capsule, a release
    /// callback). Open-ended because the caller picks it; unibuf only ever drops it.
    Foreign(Box<dyn Any + Send + Sync>),
    /// A growable buffer's reserved address range: unmapped and unreserved.
    GrowableRegion(Arc<GrowableRegion>),
}

/// Bytes an allocation over `raw` holds for its label: a growable region's mapped part, else
/// all of it.
fn owned_bytes(owner: Option<&Owner>, raw: &RawAlloc) -> usize {
    match owner {
        Some(Owner::GrowableRegion(region)) => region.mapped(),
        _ => raw.bytes,
    }
}

pub(crate) struct Allocation {
    pub device: Arc<DeviceInner>,
    /// The memory; `None` only during drop.
    block: Option<Block>,
    /// What the caller asked for (before rounding): counted in the stats.
    pub requested: usize,
    pub mode: StorageMode,
    pub label: String,
    /// Whether writes are allowed (`MemoryAccess::ReadWrite`).
    pub writable: bool,
    /// The host address of the block, for host-visible modes.
    host: Option<usize>,
    uses: Mutex<UseState>,
    /// What keeps the memory alive; `None` for memory of the allocator, which takes it back.
    owner: Option<Owner>,
}

impl Allocation {
    pub fn new(
        device: Arc<DeviceInner>,
        block: Block,
        requested: usize,
        mode: StorageMode,
        label: String,
        access: MemoryAccess,
        owner: Option<Owner>,
    ) -> Allocation {
        let host = device
            .backend
            .host_ptr(&block.raw)
            .map(|p| p.as_ptr() as usize);
        let uses = Mutex::new(UseState::inherited(block.fences.clone()));
        device.own(&label, owned_bytes(owner.as_ref(), &block.raw));
        Allocation {
            device,
            block: Some(block),
            requested,
            mode,
            label,
            writable: access.is_writable(),
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
            .disown(&self.label, owned_bytes(self.owner.as_ref(), &block.raw));
        match self.owner.take() {
            Some(owner) => self.device.defer_release(block, owner),
            None => self.device.free_block(block, self.requested),
        }
    }
}
